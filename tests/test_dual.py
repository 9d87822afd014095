"""CLIP and SigLIP dual encoders: exported by the real pipeline (tiny random-weight models,
MiniLM's real tokenizer), run by ONNX Runtime, compared with the transformers models and
their own image processors on inputs the export never saw."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import edge_embed
from edge_embed.errors import BundleError, ExportError, InvalidInputError
from edge_embed.images import Image
from edge_embed.manifest import Manifest
from tests.conftest import skimage_photo

pytestmark = pytest.mark.slow

# Photos at their own sizes and modes (the probes in the bundle are at most 160 pixels).
UNSEEN_PHOTOS = ("moon.png", "coins.png", "motorcycle_right.png", "ihc.png", "grass.png",
                 "hubble_deep_field.jpg", "logo.png")
UNSEEN_TEXTS = ["a photo of the moon", "coins on a table", "a red motorcycle parked outside",
                "Ein Foto von Gras auf einer Wiese", "the hubble deep field, thousands of galaxies"]


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _torch_vectors(source, texts: list[str], photos: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """What the transformers model gives, with its own image processor and the
    tokenizer as the model's processor would call it."""
    import PIL.Image
    import torch
    from tokenizers import Tokenizer
    from transformers import AutoImageProcessor, AutoModel

    model = AutoModel.from_pretrained(str(source)).eval()
    processor = AutoImageProcessor.from_pretrained(str(source), use_fast=False)
    config = json.loads((source / "config.json").read_text())
    tokenizer = Tokenizer.from_file(str(source / "tokenizer.json"))
    siglip = config["model_type"] == "siglip"
    if siglip:  # SigLIP's processor pads every text to 64 tokens and passes no mask
        tokenizer.enable_padding(length=64, pad_id=0)
        tokenizer.enable_truncation(64)
    else:
        tokenizer.enable_padding(pad_id=0)
    encodings = tokenizer.encode_batch(texts)
    ids = torch.tensor([e.ids for e in encodings])
    mask = None if siglip else torch.tensor([e.attention_mask for e in encodings])
    images = []
    for name in photos:
        with PIL.Image.open(skimage_photo(name)) as im:
            images.append(im.convert("RGB") if im.mode not in ("RGB", "RGBA", "L") else im.copy())
    pixels = processor(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        text = model.get_text_features(input_ids=ids, attention_mask=mask).pooler_output.numpy()
        image = model.get_image_features(pixel_values=pixels).pooler_output.numpy()
    return text, image


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_fp32_equals_the_transformers_model_on_texts_and_images_it_never_saw(kind, request):
    source, bundle = request.getfixturevalue(f"{kind}_source"), request.getfixturevalue(f"{kind}_bundle")
    provider = edge_embed.load(bundle, precision="fp32")
    assert provider.info.modalities == ("text", "image")
    texts, images = _torch_vectors(source, UNSEEN_TEXTS, list(UNSEEN_PHOTOS))
    ours = provider.embed([*UNSEEN_TEXTS, *(Image.open(skimage_photo(n)) for n in UNSEEN_PHOTOS)])
    cos = np.sum(ours * _unit(np.vstack([texts, images])), axis=1)
    assert cos.min() >= 0.99999, cos
    assert provider.parity_passes() and provider.image_parity.cos_min >= 0.99999


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_every_variant_ships_gated_on_text_and_image_probes(kind, request):
    manifest = Manifest.read(request.getfixturevalue(f"{kind}_bundle") / "manifest.json")
    assert manifest.modalities == ("text", "image") and manifest.image.processor == kind
    assert set(manifest.variants) == {"fp32", "fp16", "int8"}
    for precision, variant in manifest.variants.items():
        vision = variant.vision
        assert vision is not None and vision.file.startswith("vision.")
        assert variant.parity.batch_cos_min >= 0.99999 and vision.parity.batch_cos_min >= 0.99999
        assert vision.parity.probes >= 30, "real photos, mirrored and cropped copies, rendered pages"
        floor = {"fp32": 0.99999, "fp16": 0.999, "int8": 0.98}[precision]
        assert variant.parity.cos_min >= floor and vision.parity.cos_min >= floor, precision
    int8 = manifest.variants["int8"]
    assert int8.parity.retrieval is not None and int8.parity.retrieval.languages == ("text->image",)


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_texts_and_images_in_one_batch_get_the_vectors_they_get_alone(clip_bundle, precision):
    provider = edge_embed.load(clip_bundle, precision=precision)
    inputs = ["a cat", Image.open(skimage_photo("chelsea.png")), "a longer sentence about a rocket launch at dawn",
              Image.open(skimage_photo("rocket.jpg")), Image.open(skimage_photo("page.png"))]
    together = provider.embed(inputs)
    alone = np.vstack([provider.embed([item]) for item in inputs])
    assert np.sum(together * alone, axis=1).min() >= 0.99999
    assert provider.count_tokens(["a cat"])[0] < provider.count_tokens([inputs[1]])[0] == 17


def test_what_a_model_cannot_read_is_refused_by_name(clip_bundle, minilm_bundle):
    clip = edge_embed.load(clip_bundle, precision="fp32")
    photo = Image.open(skimage_photo("coffee.png"))
    with pytest.raises(InvalidInputError, match=r"texts\[1\] mixes parts in one input.*Qwen3-VL"):
        clip.embed(["a", ["a caption", photo]])
    with pytest.raises(InvalidInputError, match=r"texts\[0\] must be a string or an edge_embed.Image, got bytes"):
        clip.embed([b"\x89PNG"])
    with pytest.raises(InvalidInputError, match=r"texts\[1\] is empty"):
        clip.embed([photo, "  "])
    text_only = edge_embed.load(minilm_bundle, precision="fp32")
    with pytest.raises(InvalidInputError, match=r"texts\[0\] is an image, and .* reads text only"):
        text_only.embed([photo])


def test_siglip_texts_are_padded_to_its_64_positions(siglip_bundle):
    from edge_embed.tokenization import model_inputs

    provider = edge_embed.load(siglip_bundle, precision="fp32")
    seqs = provider.tokenize(["short", "a somewhat longer text than the first one"])
    feeds = model_inputs(seqs, provider.manifest)
    assert list(feeds) == ["input_ids"] and feeds["input_ids"].shape == (2, 64)
    assert (feeds["input_ids"][0, len(seqs[0]):] == provider.manifest.pad_token_id).all()


def test_an_altered_vision_graph_is_refused(clip_bundle, tampered):
    bundle = tampered(clip_bundle)
    with open(bundle / "vision.fp32.onnx", "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(BundleError, match="vision.fp32.onnx .fp32 vision graph. fails its checksum"):
        edge_embed.load(bundle, precision="fp32")
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["variants"]["fp16"]["vision"] = None
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="variant 'fp16' has no vision graph"):
        edge_embed.load(bundle, precision="fp16")


def test_image_models_refuse_what_they_cannot_export(clip_source, tmp_path):
    from edge_embed.export import export

    with pytest.raises(ExportError, match="dual encoder, and the MLX backend runs text models"):
        export(clip_source, tmp_path / "mlx", "fp32,mlx-fp32")
    with pytest.raises(ExportError, match="exports fp32, fp16 and int8, not int4"):
        export(clip_source, tmp_path / "int4", "fp32,int4")
    with pytest.raises(ExportError, match="reads images at one fixed size"):
        export(clip_source, tmp_path / "pixels", "fp32", max_pixels=100_000)
    source = tmp_path / "no-processor"
    shutil.copytree(clip_source, source)
    (source / "preprocessor_config.json").unlink()
    with pytest.raises(ExportError, match="no preprocessor_config.json"):
        export(source, tmp_path / "out", "fp32")


def test_the_cli_embeds_image_files_beside_texts(clip_bundle, tmp_path):
    from tests.test_cli import run

    photo = skimage_photo("coffee.png")
    done = run("embed", "--bundle", str(clip_bundle), "--precision", "fp32", "--image", str(photo), "a cup of coffee")
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    expected = edge_embed.load(clip_bundle, precision="fp32").embed([Image.open(photo), "a cup of coffee"])
    assert [r["index"] for r in rows] == [0, 1]
    assert np.allclose(np.array([r["embedding"] for r in rows]), expected, atol=1e-6)
    broken = tmp_path / "broken.png"
    broken.write_bytes(photo.read_bytes()[:200])
    done = run("embed", "--bundle", str(clip_bundle), "--image", str(broken))
    assert done.returncode != 0 and "cannot be decoded" in done.stderr and "Traceback" not in done.stderr
