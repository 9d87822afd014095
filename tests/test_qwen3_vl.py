"""Qwen3-VL-Embedding: a tiny random-weight Qwen3VLModel with Qwen's real tokenizer, exported
by the real pipeline, run by ONNX Runtime, compared with the transformers model reading the
whole chat prompt as Qwen's tokenizer tokenizes it."""

from __future__ import annotations

import json

import numpy as np
import pytest

import edge_embed
from edge_embed.errors import InvalidInputError
from edge_embed.images import Image
from edge_embed.manifest import Manifest
from tests.conftest import skimage_photo

pytestmark = pytest.mark.slow

SYSTEM = "<|im_start|>system\n{instruction}<|im_end|>\n<|im_start|>user\n"
TAIL = "<|im_end|>\n<|im_start|>assistant\n"


def _prompt(parts: list, tokens: list[int], instruction: str = "Represent the user's input.") -> str:
    """The chat as Qwen3-VL-Embedding's processor writes it, images expanded to their tokens."""
    body, k = "", 0
    for part in parts:
        if isinstance(part, str):
            body += part
        else:
            body += "<|vision_start|>" + "<|image_pad|>" * tokens[k] + "<|vision_end|>"
            k += 1
    return SYSTEM.format(instruction=instruction) + body + TAIL


def _torch_vector(source, prompt: str, images: list[Image], bounds: dict) -> tuple[list[int], np.ndarray]:
    import torch
    from tokenizers import Tokenizer
    from transformers import AutoImageProcessor, AutoModel

    tokenizer = Tokenizer.from_file(str(source / "tokenizer.json"))
    ids = tokenizer.encode(prompt, add_special_tokens=False).ids
    model = AutoModel.from_pretrained(str(source)).eval()
    extra = {}
    if images:
        processor = AutoImageProcessor.from_pretrained(str(source), use_fast=False)
        extra = dict(processor(images=[im.rgb() for im in images], return_tensors="pt", size=bounds))
    image_id = tokenizer.token_to_id("<|image_pad|>")
    t = torch.tensor([ids])
    with torch.no_grad():
        hidden = model(input_ids=t, attention_mask=torch.ones_like(t), mm_token_type_ids=(t == image_id).int(),
                       **extra).last_hidden_state
    return ids, hidden[0, -1].numpy()


@pytest.mark.parametrize("kind", ["text", "image", "mixed", "text and two images"])
def test_fp32_equals_transformers_on_the_whole_prompt(qwen3_vl_source, qwen3_vl_bundle, kind):
    """Inputs the export never saw, at their own sizes: the token ids equal Qwen's tokenizer
    on the whole prompt, and the vector the model's own forward (vision tower, DeepStack,
    M-RoPE) at cos >= 0.99999."""
    moon, coffee = Image.open(skimage_photo("moon.png")), Image.open(skimage_photo("coffee.png"))
    parts = {"text": ["What is the capital of France? Paris."], "image": [moon],
             "mixed": [coffee, "a cup of coffee on a saucer"],
             "text and two images": ["compare ", moon, " with ", coffee]}[kind]
    provider = edge_embed.load(qwen3_vl_bundle, precision="fp32")
    (encoded,) = provider.tokenize([parts if len(parts) > 1 else parts[0]])
    prompt = _prompt(parts, [im.tokens for im in encoded.images])
    images = [p for p in parts if isinstance(p, Image)]
    spec = provider.manifest.image
    ids, reference = _torch_vector(qwen3_vl_source, prompt, images,
                                   {"shortest_edge": spec.min_pixels, "longest_edge": spec.max_pixels})
    assert encoded.ids.tolist() == ids
    ours = provider.embed([parts if len(parts) > 1 else parts[0]])[0]
    assert float(ours @ (reference / np.linalg.norm(reference))) >= 0.99999


def test_the_whole_image_attention_op_means_what_transformers_computes(qwen3_vl_source, qwen3_vl_bundle):
    """The vision graph's attention op, run eagerly (the meaning given to MultiHeadAttention),
    gives the unchanged vision tower's features; the exported graph uses the fused node."""
    import onnx
    import torch
    from transformers import AutoModel

    from edge_embed.export.vl import _graph_modules, exportable_qwen3_vl
    from edge_embed.vl import vision_feeds

    provider = edge_embed.load(qwen3_vl_bundle, precision="fp32")
    (encoded,) = provider.tokenize([Image.open(skimage_photo("coffee.png"))])
    (image,) = encoded.images
    model = AutoModel.from_pretrained(str(qwen3_vl_source)).eval()
    feeds = {k: torch.from_numpy(v) for k, v in vision_feeds(image, provider.manifest).items()}
    with torch.no_grad():
        reference = model.visual(feeds["pixel_values"], grid_thw=torch.tensor([image.grid])).pooler_output
        with exportable_qwen3_vl():
            fused, _ = _graph_modules(model)[0](*feeds.values())
    assert torch.nn.functional.cosine_similarity(reference, fused, dim=1).min().item() >= 0.999999
    vision = onnx.load(str(qwen3_vl_bundle / provider.manifest.variants["fp32"].vision.file), load_external_data=False)
    ops = [n.op_type for n in vision.graph.node]
    assert ops.count("MultiHeadAttention") == 3 and "Softmax" not in ops


def test_the_smoke_test_users_run_after_install(qwen3_vl_bundle):
    """Dimension, cos(text, text) = 1.0000, cos(mixed, mixed) = 1.0000, in any batch."""
    provider = edge_embed.load(qwen3_vl_bundle)
    photo = Image.open(skimage_photo("astronaut.png"))
    text, mixed = "A woman playing with her dog on a beach at sunset.", [photo, "an astronaut"]
    v = provider.embed([text, mixed, photo, text, mixed])
    assert v.shape == (5, provider.info.dim) and provider.info.modalities == ("text", "image")
    assert round(float(v[0] @ v[3]), 4) == 1.0 and round(float(v[1] @ v[4]), 4) == 1.0
    alone = np.vstack([provider.embed([x]) for x in (text, mixed, photo)])
    assert np.sum(alone * v[:3], axis=1).min() >= 0.99999


def test_instructions_truncation_and_limits(qwen3_vl_bundle):
    provider = edge_embed.load(qwen3_vl_bundle, precision="fp32")
    tokenizer = provider.tokenizer
    (plain,) = provider.tokenize(["hello"], instruction="Find the photo")
    (dotted,) = provider.tokenize(["hello"], instruction="Find the photo.")
    assert plain.ids.tolist() == dotted.ids.tolist()  # a period is added where punctuation is missing
    (long,) = provider.tokenize(["word " * 10_000])
    tail = tokenizer.template_ids(TAIL, {})
    assert len(long) == provider.info.max_length and long.ids[-len(tail):].tolist() == tail
    with pytest.raises(InvalidInputError, match="longer than the model's .* truncate is false"):
        provider.tokenize(["word " * 10_000], truncate=False)
    with pytest.raises(InvalidInputError, match=r"texts\[0\] is empty"):
        provider.tokenize(["   "])
    with pytest.raises(InvalidInputError, match=r"texts\[0\] is an empty list"):
        provider.tokenize([[]])
    with pytest.raises(InvalidInputError, match=r"texts\[1\] must be a string, an edge_embed.Image"):
        provider.tokenize(["a", [b"bytes"]])


def test_the_manifest_pins_the_template_and_the_pixel_bounds(qwen3_vl_bundle):
    manifest = Manifest.read(qwen3_vl_bundle / "manifest.json")
    assert manifest.vl.template == SYSTEM.replace("{instruction}", "{instruction}") + "{content}" + TAIL
    assert manifest.default_instruction == "Represent the user's input."
    assert (manifest.image.min_pixels, manifest.image.max_pixels) == (64 * 64, 256 * 256)
    int8 = manifest.variants["int8"]
    assert int8.vision.file == "vision.int8.onnx" and int8.vision.precision == "int8"
    for variant in manifest.variants.values():
        assert variant.parity.batch_cos_min >= 0.99999 and variant.vision.parity.probes >= 50
    raw = json.loads((qwen3_vl_bundle / "manifest.json").read_text())
    assert raw["graph_inputs"] == ["input_ids", "attention_mask", "position_ids", "image_rows", "image_embeds",
                                   "deepstack"]


def test_int4_is_a_4bit_decoder_beside_the_int8_vision_tower_gated_on_texts_and_images(qwen3_vl_bundle):
    """Weight-only INT4 of the decoder (what fits an 8B model on a small device): MatMulNBits
    4-bit blocks, the vision tower per token in INT8 (its linear layers, Gemms in the export,
    all quantized), gated on text, image and mixed probes and on the text->image ranking;
    it runs images and is never what auto picks."""
    import onnx

    manifest = Manifest.read(qwen3_vl_bundle / "manifest.json")
    int4 = manifest.variants["int4"]
    assert int4.vision.file == "vision.int8.onnx" and int4.vision.precision == "int8"
    assert int4.recipe["weights"].startswith("int4") and int4.parity.retrieval is not None
    ops = {n.op_type for n in onnx.load(str(qwen3_vl_bundle / int4.file), load_external_data=False).graph.node}
    assert "MatMulNBits" in ops
    tower = [n.op_type for n in onnx.load(str(qwen3_vl_bundle / int4.vision.file), load_external_data=False).graph.node]
    assert "Gemm" not in tower and tower.count("MatMulInteger") == int4.vision.recipe["quantized_nodes"] >= 3 * 4
    assert int4.parity.cos_min >= 0.95 and int4.vision.parity.cos_min >= 0.95
    inputs = ["a red bicycle", Image.open(skimage_photo("coffee.png")),
              ["a cup of coffee", Image.open(skimage_photo("coffee.png"))]]
    with edge_embed.load(qwen3_vl_bundle, precision="fp32") as fp32, \
            edge_embed.load(qwen3_vl_bundle, precision="int4") as four:
        assert four.info.precision == "int4"
        cos = np.sum(fp32.embed(inputs) * four.embed(inputs), axis=1)
    assert cos.min() >= 0.95, cos
    with edge_embed.load(qwen3_vl_bundle) as auto:
        assert auto.info.precision != "int4"


def test_an_export_may_pin_fewer_pixels_and_images_keep_to_them(qwen3_vl_source, tmp_path):
    from edge_embed.errors import ExportError
    from edge_embed.export import export

    with pytest.raises(ExportError, match="max_pixels 10 is outside 4096..65536"):
        export(qwen3_vl_source, tmp_path / "small", "fp32", max_pixels=10)
    manifest = export(qwen3_vl_source, tmp_path / "small", "fp32", max_pixels=128 * 128, model_id="small")
    assert manifest.image.max_pixels == 128 * 128 and manifest.image.tokens == 16
    provider = edge_embed.load(tmp_path / "small", precision="fp32")
    (encoded,) = provider.tokenize([Image.open(skimage_photo("retina.jpg"))])
    assert encoded.images[0].tokens <= 16


def test_a_vision_tower_that_misses_the_gate_in_int8_stays_fp32(qwen3_vl_bundle, tmp_path):
    """The quantized variants try the INT8 tower first; where the variant then misses its
    gate it keeps the FP32 tower, says so in the recipe, and no graph it does not use is left.
    The judge here stands in for the export's (it refuses any INT8 tower); the graphs and
    their quantization are real."""
    import shutil

    from edge_embed.errors import GateError
    from edge_embed.export.vl import graph_variants

    for name in ("model.fp32.onnx", "vision.fp32.onnx"):
        shutil.copyfile(qwen3_vl_bundle / name, tmp_path / name)
    judged = []

    def judge(precision, decoder, vision, recipe):
        judged.append((precision, decoder.name, vision.name))
        if vision.name == "vision.int8.onnx":
            raise GateError(precision, "cos_min", 0.5, 0.97, "a probe image")
        return "text parity", "image parity"

    built = graph_variants(tmp_path, ("int8",), tmp_path / "model.fp32.onnx", tmp_path / "vision.fp32.onnx", judge,
                           lambda line: None)
    assert judged == [("fp32", "model.fp32.onnx", "vision.fp32.onnx"), ("int8", "model.int8.onnx", "vision.int8.onnx"),
                      ("int8", "model.int8.onnx", "vision.fp32.onnx")]
    decoder, _, _, vision, vision_recipe, _, vision_precision = built["int8"]
    assert list(built) == ["int8"] and (decoder.name, vision.name, vision_precision) == (
        "model.int8.onnx", "vision.fp32.onnx", "fp32")
    assert vision_recipe["kept"] == "fp32: int8 missed its gate"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.int8.onnx", "vision.fp32.onnx"]
