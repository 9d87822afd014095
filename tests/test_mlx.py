"""The MLX backend (run here on mlx's Linux CPU build) against PyTorch and ONNX Runtime."""

from __future__ import annotations

import dataclasses
import json
import sys
import threading

import numpy as np
import pytest

import edge_embed
from edge_embed.bundle import Bundle
from edge_embed.errors import BundleError
from edge_embed.parity import Gates
from edge_embed.platform import PlatformInfo

from .test_minilm import TEXTS as MINILM_TEXTS
from .test_minilm import _torch_reference as _torch_minilm
from .test_qwen3 import DOCS, _torch_last_token

pytestmark = pytest.mark.mlx

TASK = "Given a question, retrieve passages that answer it"
MINILM_SAMPLE = MINILM_TEXTS[:4]


def _unit(a: np.ndarray) -> np.ndarray:
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(_unit(a) * _unit(b), axis=1)


def _mlx(bundle, precision: str = "auto", **options):
    """The backend itself, without load()'s platform detection and boot-time parity check."""
    from edge_embed.backends.mlx import MlxProvider

    if not isinstance(bundle, Bundle):
        bundle = edge_embed.load_bundle(bundle)
    return MlxProvider(bundle, precision, **options)


def _mlx_vectors(bundle, precision: str, texts: list[str], **options) -> np.ndarray:
    with _mlx(bundle, precision) as provider:
        assert provider.info.precision == precision
        return provider.embed(texts, **options)


def _apple_silicon_mac() -> PlatformInfo:
    import mlx.core as mx
    import onnxruntime

    return PlatformInfo(
        os="darwin", arch="arm64", cpu_model="Apple M2", apple_chip="Apple M2", cpus=8,
        runtimes={"onnxruntime": onnxruntime.__version__, "mlx": mx.__version__},
        ort_providers=("CPUExecutionProvider",),
    )


def test_unavailable_reason_names_the_install(monkeypatch):
    from edge_embed.backends.mlx import MlxProvider, _mlx_problem

    monkeypatch.setitem(sys.modules, "mlx.core", None)  # makes `import mlx.core` fail
    reason = _mlx_problem.__wrapped__()
    assert reason is not None and "mlx cannot be imported" in reason
    assert ('pip install "mlx[cpu]"' if sys.platform.startswith("linux") else "pip install mlx") in reason
    monkeypatch.undo()
    assert MlxProvider.unavailable_reason() is MlxProvider.unavailable_reason()  # cached, never raises


@pytest.mark.slow
@pytest.mark.parametrize(("precision", "gate"), [("mlx-fp32", 0.9999), ("mlx-fp16", 0.999)])
def test_qwen3_matches_pytorch(qwen3_source, qwen3_mlx_bundle, precision, gate):
    reference = _torch_last_token(qwen3_source, DOCS, "left")
    assert _cos(_mlx_vectors(qwen3_mlx_bundle, precision, DOCS), reference).min() >= gate


def _minilm_fp32_pooled(bundle, weights_dir, texts: list[str]) -> np.ndarray:
    """MiniLM's real weights at FP32 through the MLX encoder, unnormalized. The MiniLM bundle
    ships mlx-fp16 (what a Mac runs): the export's MLX check of each variant over its 285
    probes takes minutes on mlx's Linux CPU build, whose BLAS is the reference one."""
    from transformers import AutoModel

    from edge_embed.backends.mlx import MlxEncoder
    from edge_embed.export.mlx_weights import save_mlx_weights
    from edge_embed.tokenization import BundleTokenizer, model_inputs

    from .conftest import minilm_source

    weights = weights_dir / "model.mlx-fp32.safetensors"
    save_mlx_weights(AutoModel.from_pretrained(minilm_source()).eval(), weights, "fp32")
    bundle = edge_embed.load_bundle(bundle)
    seqs = BundleTokenizer(bundle.tokenizer_path, bundle.manifest).encode(texts)
    return MlxEncoder(bundle.path / "config.json", weights, bundle.manifest)(model_inputs(seqs, bundle.manifest))


@pytest.mark.slow
@pytest.mark.parametrize(("precision", "gate"), [("mlx-fp32", 0.9999), ("mlx-fp16", 0.999)])
def test_minilm_matches_pytorch(minilm_mlx_bundle, precision, gate, tmp_path):
    reference = _torch_minilm(MINILM_SAMPLE)
    if precision == "mlx-fp16":
        vectors = _mlx_vectors(minilm_mlx_bundle, precision, MINILM_SAMPLE)
    else:
        vectors = _unit(_minilm_fp32_pooled(minilm_mlx_bundle, tmp_path, MINILM_SAMPLE))
    assert vectors.dtype == np.float32 and vectors.shape == (len(MINILM_SAMPLE), 384)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert _cos(vectors, reference).min() >= gate


@pytest.mark.slow
@pytest.mark.parametrize("model", ["qwen3", "minilm"])
def test_matches_onnx_fp32(request, model, tmp_path):
    bundle = request.getfixturevalue(f"{model}_mlx_bundle")
    texts = DOCS if model == "qwen3" else MINILM_SAMPLE
    if model == "qwen3":
        mlx = _mlx_vectors(bundle, "mlx-fp32", texts, normalize=False)
    else:
        mlx = _minilm_fp32_pooled(bundle, tmp_path, texts)
    with edge_embed.load(bundle, precision="fp32") as provider:
        onnx = provider.embed(texts, normalize=False)
    assert _cos(mlx, onnx).min() >= 0.9999
    # Unnormalized too: the backends agree on the pooled vector, not only its direction.
    assert np.allclose(mlx, onnx, rtol=1e-3, atol=1e-3 * np.abs(onnx).max())


@pytest.mark.slow
def test_left_padded_batch_invariance(qwen3_mlx_bundle):
    from edge_embed.export.probes import probe_texts

    texts = sorted(probe_texts()[::25], key=len)[::2] + DOCS  # short and long, mixed
    with _mlx(qwen3_mlx_bundle, "mlx-fp32") as provider:
        lengths = provider.count_tokens(texts)
        assert max(lengths) >= 3 * min(lengths)
        together = provider.embed(texts)
        alone = np.vstack([provider.embed([t]) for t in texts])
    assert _cos(together, alone).min() >= 0.9999


@pytest.mark.slow
def test_matryoshka_and_instructions_follow_the_onnx_contract(qwen3_mlx_bundle):
    with _mlx(qwen3_mlx_bundle, "mlx-fp32") as provider:
        mlx_short = provider.embed(DOCS, dimensions=32, instruction=TASK)
        mlx_documents = provider.embed(DOCS)
        mlx_tokens = provider.count_tokens(DOCS, instruction=TASK)
    with edge_embed.load(qwen3_mlx_bundle, precision="fp32") as provider:
        onnx_short = provider.embed(DOCS, dimensions=32, instruction=TASK)
        onnx_tokens = provider.count_tokens(DOCS, instruction=TASK)
    assert mlx_short.shape == (len(DOCS), 32)
    assert np.allclose(np.linalg.norm(mlx_short, axis=1), 1.0, atol=1e-5)
    assert mlx_tokens == onnx_tokens
    assert _cos(mlx_short, onnx_short).min() >= 0.9999
    assert _cos(mlx_short, mlx_documents[:, :32]).max() < 0.9999  # the instruction changed the vector


@pytest.mark.slow
def test_load_prefers_fp16_and_reports_mlx(qwen3_mlx_bundle):
    """load() on a Mac, as the platform detector sees one: MLX first, fp16 weights, checked at boot."""
    with edge_embed.load(qwen3_mlx_bundle, backend="mlx", platform=_apple_silicon_mac()) as provider:
        info = provider.info
        assert (info.backend, info.precision) == ("mlx", "mlx-fp16")
        assert info.execution_providers in (("mlx:cpu",), ("mlx:gpu",))
        assert info.threads >= 1 and info.dim == 64 and info.instruction_aware
        assert info.parity is not None and info.parity.cos_min >= Gates().fp16_cos_min
    with edge_embed.load(qwen3_mlx_bundle, platform=_apple_silicon_mac()) as provider:
        assert (provider.info.backend, provider.info.precision) == ("mlx", "mlx-fp16")
    with _mlx(qwen3_mlx_bundle, threads=3) as provider:
        assert (provider.info.precision, provider.info.threads) == ("mlx-fp16", 3)


@pytest.mark.slow
def test_forced_mlx_loads_wherever_mlx_runs(qwen3_mlx_bundle):
    with edge_embed.load(qwen3_mlx_bundle, backend="mlx") as provider:
        assert (provider.info.backend, provider.info.precision) == ("mlx", "mlx-fp16")
        assert provider.info.parity is not None and provider.info.parity.cos_min >= 0.999
    if sys.platform != "darwin":  # automatic choice on Linux: ONNX Runtime, mlx[cpu] only when forced
        with edge_embed.load(qwen3_mlx_bundle) as provider:
            assert provider.info.backend == "onnx"


@pytest.mark.slow
def test_precision_and_backend_must_match(qwen3_mlx_bundle):
    with pytest.raises(BundleError, match="int8 is an ONNX variant; load it with backend='onnx'"):
        _mlx(qwen3_mlx_bundle, "int8")
    with pytest.raises(BundleError, match="mlx-fp16 is an MLX variant; load it with backend='mlx'"):
        edge_embed.load(qwen3_mlx_bundle, precision="mlx-fp16", backend="onnx")
    with pytest.raises(BundleError, match="has no mlx-bf16 variant"):
        _mlx(qwen3_mlx_bundle, "mlx-bf16")


@pytest.mark.slow
def test_bundle_without_mlx_variants_is_refused(qwen3_mlx_bundle, tampered):
    bundle = tampered(qwen3_mlx_bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["variants"] = {k: v for k, v in manifest["variants"].items() if v["format"] == "onnx"}
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="has no MLX variant .*backend='onnx'"):
        _mlx(bundle)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["qwen3", "minilm"])
def test_manifest_records_mlx_parity(request, model):
    manifest = edge_embed.load_bundle(request.getfixturevalue(f"{model}_mlx_bundle")).manifest
    exported = ("mlx-fp32", "mlx-fp16") if model == "qwen3" else ("mlx-fp16",)
    assert set(manifest.variants) == {"fp32", *exported}
    gates = Gates()
    for precision, gate in (("mlx-fp32", gates.fp32_cos_min), ("mlx-fp16", gates.fp16_cos_min)):
        if precision not in exported:
            continue
        variant = manifest.variants[precision]
        assert variant.format == "mlx" and variant.file == f"model.{precision}.safetensors"
        assert (variant.opset, variant.min_onnxruntime) == (None, None)
        assert variant.parity.probes >= 200 and variant.parity.cos_min >= gate
    assert manifest.variants["fp32"].format == "onnx"


@pytest.mark.slow
def test_golden_vectors_reproduce_the_recorded_parity(qwen3_mlx_bundle):
    bundle = edge_embed.load_bundle(qwen3_mlx_bundle)
    texts, golden = bundle.golden()
    for precision in ("mlx-fp32", "mlx-fp16"):
        cos = _cos(_mlx_vectors(bundle, precision, texts), golden)
        assert cos.min() == pytest.approx(bundle.manifest.variants[precision].parity.cos_min, abs=2e-4)


@pytest.mark.slow
def test_runs_from_a_worker_thread(qwen3_mlx_bundle):
    """The server calls providers from an executor thread; MLX streams are per thread."""
    with _mlx(qwen3_mlx_bundle, "mlx-fp32") as provider:
        here = provider.embed(DOCS)
        there: list[np.ndarray] = []
        worker = threading.Thread(target=lambda: there.append(provider.embed(DOCS)))
        worker.start()
        worker.join()
    assert there and np.array_equal(here, there[0])


def _tiny_roberta(dest):
    import torch
    from safetensors.torch import save_file
    from transformers import RobertaConfig, RobertaModel

    torch.manual_seed(0)
    model = RobertaModel(RobertaConfig(
        vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=40, type_vocab_size=1, pad_token_id=1,
    )).eval()
    model.config.to_json_file(dest / "config.json")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(dest / "w.safetensors"))
    return model


@pytest.mark.slow
def test_roberta_positions_match_pytorch(qwen3_mlx_bundle, tmp_path):
    """RoBERTa-style encoders share BERT's tensors but number positions from pad_token_id + 1."""
    import torch

    from edge_embed.backends.mlx import MlxEncoder

    model = _tiny_roberta(tmp_path)
    manifest = dataclasses.replace(edge_embed.load_bundle(qwen3_mlx_bundle).manifest, dim=32, pooling="mean")
    ids = np.array([[0, 5, 6, 7, 8, 2], [0, 9, 2, 1, 1, 1]])
    mask = (ids != 1).astype(np.int64)
    pooled = MlxEncoder(tmp_path / "config.json", tmp_path / "w.safetensors", manifest)(
        {"input_ids": ids, "attention_mask": mask}
    )
    with torch.no_grad():
        hidden = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).last_hidden_state
    weights = torch.from_numpy(mask)[..., None].float()
    reference = ((hidden * weights).sum(1) / weights.sum(1)).numpy()
    assert np.allclose(pooled, reference, atol=1e-5)


@pytest.mark.slow
def test_unsupported_or_incomplete_models_are_refused(qwen3_mlx_bundle, tmp_path):
    from safetensors.numpy import load_file, save_file

    from edge_embed.backends.mlx import MlxEncoder

    _tiny_roberta(tmp_path)
    manifest = dataclasses.replace(edge_embed.load_bundle(qwen3_mlx_bundle).manifest, dim=32, pooling="mean")
    tensors = load_file(tmp_path / "w.safetensors")
    del tensors["encoder.layer.1.output.dense.bias"]
    save_file(tensors, tmp_path / "partial.safetensors")
    with pytest.raises(BundleError, match=r"partial.safetensors lacks .*encoder\.layer\.1\.output\.dense\.bias"):
        MlxEncoder(tmp_path / "config.json", tmp_path / "partial.safetensors", manifest)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "mpnet"}))
    with pytest.raises(BundleError, match="not 'mpnet'; use backend='onnx'"):
        MlxEncoder(tmp_path / "config.json", tmp_path / "w.safetensors", manifest)


@pytest.mark.slow
def test_qwen3_vl_text_path_equals_pytorch_and_onnx(qwen3_vl_source, qwen3_vl_mlx_bundle):
    """A Qwen3-VL bundle's MLX variant: the chat template, the language model, last-token
    pooling, as the transformers model computes them on the whole prompt; and as the ONNX
    decoder does, unnormalized, for texts with and without an instruction."""
    from .test_qwen3_vl import _prompt, _torch_vector

    texts = ["What is the capital of France? Paris.", "a cup of coffee on a saucer"]
    with _mlx(qwen3_vl_mlx_bundle, "mlx-fp32") as provider:
        mlx = provider.embed(texts, normalize=False)
        mlx_task = provider.embed(texts, instruction=TASK, normalize=False)
        (encoded,) = provider.tokenize(texts[:1])
    ids, reference = _torch_vector(qwen3_vl_source, _prompt(texts[:1], []), [], {})
    assert encoded.ids.tolist() == ids
    assert _cos(mlx[:1], reference[None])[0] >= 0.99999
    with edge_embed.load(qwen3_vl_mlx_bundle, precision="fp32") as provider:
        onnx = provider.embed(texts, normalize=False)
        onnx_task = provider.embed(texts, instruction=TASK, normalize=False)
    for ours, theirs in ((mlx, onnx), (mlx_task, onnx_task)):
        assert _cos(ours, theirs).min() >= 0.99999
        assert np.allclose(ours, theirs, rtol=1e-3, atol=1e-3 * np.abs(theirs).max())
    assert _cos(mlx, mlx_task).max() < 0.9999  # the instruction is in the template


@pytest.mark.slow
def test_qwen3_vl_text_path_refuses_images_and_auto_keeps_them(qwen3_vl_mlx_bundle):
    """The MLX variant says it reads texts only and refuses images before any batch forms;
    on a Mac `auto` runs the ONNX variants, which read images, and says why; a named
    backend='mlx' runs the text path, checked at boot on the golden texts."""
    from edge_embed.client import EmbedClient
    from edge_embed.images import Image
    from edge_embed.loading import planned_precision

    from .conftest import skimage_photo
    from .servers import running_server

    photo = Image.open(skimage_photo("coffee.png"))
    mac = _apple_silicon_mac()
    with edge_embed.load(qwen3_vl_mlx_bundle, backend="mlx", platform=mac) as provider:
        info = provider.info
        assert (info.backend, info.precision, info.modalities, info.image_tokens) == (
            "mlx", "mlx-fp16", ("text",), None)
        assert info.parity_ok and provider.image_parity is None
        for item in (photo, ["a caption", photo]):
            with pytest.raises(edge_embed.InvalidInputError, match=r"texts\[1\] holds an image, and the mlx-fp16 "
                                                                   r"variant .* runs its texts only; .*backend='onnx'"):
                provider.embed(["a text", item])
        with running_server(provider) as (_, target), EmbedClient(target) as client:
            with pytest.raises(edge_embed.InvalidInputError, match=r"holds images, and .*mlx-fp16 on mlx.* reads "
                                                                   "text only"):
                client.embed([photo])
            served = client.embed(["a text"])
        assert np.array_equal(served, provider.embed(["a text"]))
    with edge_embed.load(qwen3_vl_mlx_bundle, platform=mac) as provider:
        assert (provider.info.backend, provider.info.precision) == ("onnx", "fp32")
        assert "mlx: its variants run this bundle's texts only (backend='mlx' runs them)" in provider.info.fallback
        assert provider.info.modalities == ("text", "image")
        assert provider.embed([photo]).shape == (1, 64)
    assert planned_precision(edge_embed.load_bundle(qwen3_vl_mlx_bundle).manifest, platform=mac) == "fp32"
