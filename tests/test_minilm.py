"""The real all-MiniLM-L6-v2, exported by the real pipeline, against PyTorch."""

from __future__ import annotations

import json

import numpy as np
import pytest

import edge_embed
from edge_embed.errors import BundleError, InvalidInputError

from .conftest import minilm_source

pytestmark = pytest.mark.slow

TEXTS = [
    "How do I reset my router to factory settings?",
    "Hold the reset button for ten seconds to restore the router's defaults.",
    "The recipe needs two cups of flour and a pinch of salt.",
    "ok",
    "Die Katze schläft auf dem Sofa.",
    "def add(a, b):\n    return a + b",
]


def _torch_reference(texts: list[str]) -> np.ndarray:
    """sentence-transformers' recipe for this model, written out: mean pooling, L2 norm."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_source())
    model = AutoModel.from_pretrained(minilm_source()).eval()
    batch = tokenizer(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    pooled = (hidden * mask).sum(1) / mask.sum(1)
    return torch.nn.functional.normalize(pooled, dim=1).numpy()


def test_manifest_records_the_model(minilm_bundle):
    manifest = edge_embed.load_bundle(minilm_bundle).manifest
    assert manifest.model_id == "sentence-transformers/all-MiniLM-L6-v2"
    assert (manifest.architecture, manifest.pooling, manifest.padding_side) == ("bert", "mean", "right")
    assert (manifest.dim, manifest.max_length, manifest.matryoshka_min_dim) == (384, 256, None)
    assert set(manifest.variants) == {"fp32", "fp16", "int8"}
    assert manifest.variants["int8"].parity.probes >= 200
    assert manifest.variants["int8"].parity.cos_min >= 0.97
    assert manifest.variants["int8"].parity.cos_mean >= 0.99
    assert manifest.variants["fp16"].parity.cos_min >= 0.999
    for path in minilm_bundle.iterdir():
        assert path.stat().st_mode & 0o777 == 0o644


def test_shipped_graphs_are_fused(minilm_bundle):
    """Every variant is built from the fused graph: ONNX Runtime's Attention, Skip- and
    EmbedLayerNormalization and BiasGelu kernels instead of dozens of small ops each."""
    import onnx

    manifest = edge_embed.load_bundle(minilm_bundle).manifest

    def ops(precision: str) -> list[str]:
        return [n.op_type for n in onnx.load(str(minilm_bundle / manifest.variants[precision].file)).graph.node]

    fp32 = ops("fp32")
    expected = {"Attention": 6, "SkipLayerNormalization": 12, "EmbedLayerNormalization": 1, "BiasGelu": 6}
    assert {op: fp32.count(op) for op in expected} == expected == manifest.variants["fp32"].recipe["fused_ops"]
    assert "Softmax" not in fp32 and "Erf" not in fp32 and len(fp32) < 120
    assert ops("fp16").count("Attention") == 6
    # INT8 fuses attention after its Q/K/V projections, which it quantizes per token.
    int8 = ops("int8")
    assert int8.count("MultiHeadAttention") == 6 and "Softmax" not in int8
    assert int8.count("SkipLayerNormalization") == 12 and int8.count("BiasGelu") == 6


@pytest.mark.parametrize(("precision", "gate"), [("fp32", 0.9999), ("fp16", 0.999), ("int8", 0.97)])
def test_variants_match_pytorch(minilm_bundle, precision, gate):
    reference = _torch_reference(TEXTS)
    with edge_embed.load(minilm_bundle, precision=precision) as provider:
        vectors = provider.embed(TEXTS)
        assert provider.info.precision == precision
        assert provider.info.execution_providers[0] == "CPUExecutionProvider"
    assert vectors.dtype == np.float32 and vectors.shape == (len(TEXTS), 384)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert np.sum(vectors * reference, axis=1).min() >= gate


def test_variants_match_the_golden_vectors(minilm_bundle):
    bundle = edge_embed.load_bundle(minilm_bundle)
    texts, golden = bundle.golden()
    golden = golden / np.linalg.norm(golden, axis=1, keepdims=True)
    for precision, variant in bundle.manifest.variants.items():
        with edge_embed.load(bundle, precision=precision) as provider:
            cos = np.sum(provider.embed(texts) * golden, axis=1)
        assert cos.min() == pytest.approx(variant.parity.cos_min, abs=2e-4)


def test_embeddings_carry_meaning(minilm_bundle):
    with edge_embed.load(minilm_bundle) as provider:
        v = provider.embed(TEXTS[:3])
    assert v[0] @ v[1] > 0.5 > v[0] @ v[2]


def test_auto_precision_on_cpu_is_int8_unless_measured_slower_on_this_kind_of_cpu(minilm_bundle):
    """The export times int8 against fp32 and records the CPU's int8 kernel class; `auto`
    passes int8 over only on CPUs of the class where it ran slower at every shape."""
    from edge_embed.backends.onnx import auto_precision
    from edge_embed.platform import this_cpu

    variants = edge_embed.load_bundle(minilm_bundle).manifest.variants
    speed = variants["int8"].recipe["speed"]
    assert speed["int8_kernels"] == this_cpu()[1] and set(speed["vs_fp32"]) == {"1x16", "8x64"}
    slower = max(speed["vs_fp32"].values()) < 1.0
    assert auto_precision(variants, int8_kernels=speed["int8_kernels"]) == ("fp32" if slower else "int8")
    other = "vnni" if speed["int8_kernels"] != "vnni" else "avx2"
    assert auto_precision(variants, int8_kernels=other) == "int8"
    assert auto_precision({"int8": variants["int8"]}, int8_kernels=speed["int8_kernels"]) == "int8"
    with edge_embed.load(minilm_bundle) as provider:
        assert provider.info.precision == ("fp32" if slower else "int8")
        assert provider.info.threads >= 1


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_same_vector_alone_and_in_any_batch(minilm_bundle, precision):
    """Every recipe the export ships by default batches: a text's vector does not depend
    on its neighbours or their padding (right padding here), per-token INT8 included."""
    from edge_embed.export.probes import probe_texts

    bundle = minilm_bundle
    texts = probe_texts()[:120]
    shipped = edge_embed.load_bundle(bundle).manifest.variants[precision]
    assert shipped.recipe["batch_invariant"] is True
    assert shipped.parity.batch_cos_min >= 0.99999  # checked at export
    with edge_embed.load(bundle, precision=precision, limits=edge_embed.BatchLimits(
            max_batch_tokens=2048)) as provider:
        assert provider.limits.max_batch_size == 32
        assert provider.info.parity.batch_cos_min >= 0.99999  # and at boot, on this device
        together = provider.embed(texts)
        alone = np.vstack([provider.embed([t]) for t in texts[:40]])
        shuffled_order = np.random.default_rng(0).permutation(len(texts))
        shuffled = provider.embed([texts[i] for i in shuffled_order])
    assert np.sum(together[:40] * alone, axis=1).min() >= 0.99999
    assert np.sum(together[shuffled_order] * shuffled, axis=1).min() >= 0.99999


def test_per_tensor_int8_runs_one_text_per_batch_so_neighbours_do_not_matter(minilm_per_tensor_bundle):
    """Dynamic per-tensor INT8 (the old default recipe, still in bundles exported before
    per-token INT8 and behind --int8-recipe per-tensor) scales activations per batch
    tensor; the runtime hides that by running it one text per batch."""
    from edge_embed.export.probes import probe_texts

    texts = probe_texts()[::4]
    variant = edge_embed.load_bundle(minilm_per_tensor_bundle).manifest.variants["int8"]
    assert variant.recipe["batch_invariant"] is False and variant.parity.batch_cos_min is None
    assert variant.parity.retrieval is None  # its ranking floors are 0: no corpus was run
    with edge_embed.load(minilm_per_tensor_bundle, precision="int8") as provider:
        assert provider.limits.max_batch_size == 1 and provider.info.batch_invariant is False
        together = provider.embed(texts)
        alone = np.vstack([provider.embed([t]) for t in texts])
    assert np.sum(together * alone, axis=1).min() >= 0.99999


def test_a_variant_not_batch_invariant_on_this_device_runs_one_text_per_batch(minilm_per_tensor_bundle,
                                                                              tampered, caplog):
    """Batch invariance is measured on the device, not taken from the manifest: a variant
    whose vectors depend on their neighbours here (this one claims otherwise) is served
    one text per batch, with a warning, instead of being refused or batched."""
    import logging

    from edge_embed.export.probes import probe_texts

    bundle = tampered(minilm_per_tensor_bundle)
    raw = json.loads((bundle / "manifest.json").read_text())
    raw["variants"]["int8"]["recipe"]["batch_invariant"] = True
    (bundle / "manifest.json").write_text(json.dumps(raw))
    texts = probe_texts()[::6]
    with caplog.at_level(logging.WARNING, logger="edge_embed"):
        with edge_embed.load(bundle, precision="int8") as provider:
            assert provider.info.batch_invariant is False and provider.limits.max_batch_size == 1
            assert provider.info.parity_ok is True
            together = provider.embed(texts)
            alone = np.vstack([provider.embed([t]) for t in texts])
    assert "runs one text per batch here" in caplog.text
    assert np.sum(together * alone, axis=1).min() >= 0.99999


def test_int8_with_8bit_weights_runs_exact_integer_products_on_this_cpu(minilm_bundle, tmp_path):
    """8-bit weights overflow the 16-bit pair sums of x86 without VNNI; the recipe asks for
    ONNX Runtime's x64quantprecision, and the provider's vectors equal those of the same
    graph with the weights stored as uint8 (the u8 x u8 kernels are exact on every ISA)."""
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    from edge_embed.export.probes import probe_texts
    from edge_embed.tokenization import model_inputs

    model = onnx.load(str(minilm_bundle / "model.int8.onnx"))
    weights = {init.name: init for init in model.graph.initializer}
    zero_point = numpy_helper.from_array(np.array(128, dtype=np.uint8), "u8_weight_zero_point")
    shifted = set()
    for node in model.graph.node:
        if node.op_type == "MatMulInteger":
            weight = weights[node.input[1]]
            if weight.name not in shifted:
                values = numpy_helper.to_array(weight).astype(np.int16) + 128
                weight.CopyFrom(numpy_helper.from_array(values.astype(np.uint8), weight.name))
                shifted.add(weight.name)
            node.input.append(zero_point.name)
    model.graph.initializer.append(zero_point)
    onnx.save(model, str(tmp_path / "u8u8.onnx"))
    assert len(shifted) >= 30

    texts = probe_texts()[:64]
    with edge_embed.load(minilm_bundle, precision="int8", parity_probes=0) as provider:
        manifest = provider.manifest
        vectors = provider.embed(texts, normalize=False)
        seqs = provider.tokenizer.encode(texts)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    u8u8 = ort.InferenceSession(str(tmp_path / "u8u8.onnx"), options, providers=["CPUExecutionProvider"])
    expected = np.vstack([u8u8.run(None, model_inputs([seq], manifest))[0] for seq in seqs])
    assert np.abs(vectors - expected).max() <= 1e-5


def test_per_token_int8_runs_on_fused_integer_kernels(minilm_bundle, tmp_path):
    """Per-token INT8 quantizes activations per token and runs ONNX Runtime's fused
    integer GEMM (MatMulIntegerToFloat), as the optimized graph shows; the vocabulary
    table is int8 rows."""
    import onnx
    import onnxruntime as ort

    manifest = edge_embed.load_bundle(minilm_bundle).manifest
    recipe = manifest.variants["int8"].recipe
    assert recipe["activations"].startswith("uint8 per token") and recipe["reduce_range"] is False
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(minilm_bundle / "model.int8.onnx"), options, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]
    assert ops.count("MatMulIntegerToFloat") == recipe["quantized_nodes"] >= 30
    assert "DynamicQuantizeLinear" not in ops and "DynamicQuantizeMatMul" not in ops
    assert recipe["embedding_tables"] == "int8 per row, symmetric (30522x384)"
    graph = onnx.load(str(minilm_bundle / "model.int8.onnx")).graph
    # Few extra nodes per run: one zero point for every [batch, sequence] input. The biases
    # live in the fused ops (MultiHeadAttention, SkipLayerNormalization, BiasGelu), so no
    # bias Add follows an integer GEMM.
    names = [n.name for n in graph.node]
    assert sum(n.endswith("_ZeroPoint") for n in names) == 1
    assert not [n for n in graph.node if n.op_type == "Add" and any(i.endswith(".bias") for i in n.input)]
    tables = {i.name: i for i in graph.initializer if i.name.endswith("word_embeddings.weight_int8")}
    assert [list(t.dims) for t in tables.values()] == [[30522, 384]]
    assert all(t.data_type == onnx.TensorProto.INT8 for t in tables.values())
    fp32_bytes = manifest.variants["fp32"].bytes
    assert manifest.variants["int8"].bytes < 0.35 * fp32_bytes  # 91 MB -> ~24 MB with int8 tables


def test_boot_parity_is_reported_and_enforced(minilm_bundle):
    with edge_embed.load(minilm_bundle, precision="int8") as provider:
        parity = provider.info.parity
        assert parity is not None and parity.probes >= 32 and parity.cos_min >= 0.97
    with edge_embed.load(minilm_bundle, precision="fp32", parity_probes=0) as provider:
        assert provider.info.parity is None
        # A stricter gate than the variant can meet: refused, unless overridden.
        from edge_embed.parity import Gates

        with pytest.raises(BundleError, match="fails its parity gate on this device"):
            provider.check_parity(16, gates=Gates(fp32_cos_min=1.000001))
        assert provider.check_parity(16, enforce=False, gates=Gates(fp32_cos_min=1.000001)).cos_min > 0.9999


def test_input_contract(minilm_bundle):
    with edge_embed.load(minilm_bundle, precision="fp32") as provider:
        assert provider.embed([]).shape == (0, 384)
        with pytest.raises(InvalidInputError, match="no Matryoshka"):
            provider.embed(["a"], dimensions=128)
        with pytest.raises(InvalidInputError, match=r"texts\[1\] must be a string"):
            provider.embed(["a", 3])
        with pytest.raises(InvalidInputError, match="not a single string"):
            provider.embed("a")
        with pytest.raises(InvalidInputError, match=r"texts\[0\] is empty"):
            provider.embed(["  "])
        with pytest.raises(InvalidInputError, match="does not take instructions"):
            provider.embed(["a"], instruction="find")
        long_text = "word " * 600
        assert provider.embed([long_text]).shape == (1, 384)
        with pytest.raises(InvalidInputError, match=r"texts\[1\] is longer than the model's 256 tokens"):
            provider.embed(["short", long_text], truncate=False)
        raw = provider.embed(["hello"], normalize=False)
        assert np.linalg.norm(raw) > 1.01 or np.linalg.norm(raw) < 0.99
        assert provider.count_tokens(["hello world"]) == [4]


def test_missing_and_altered_files_are_refused(minilm_bundle, tampered):
    bundle = tampered(minilm_bundle)
    (bundle / "tokenizer.json").write_text((bundle / "tokenizer.json").read_text() + " ")
    with pytest.raises(BundleError, match="tokenizer.json .* fails its checksum"):
        edge_embed.load(bundle)

    (bundle / "tokenizer.json").unlink()
    with pytest.raises(BundleError, match="tokenizer.json .* is missing"):
        edge_embed.load(bundle)


def test_altered_model_file_is_refused(minilm_bundle, tampered):
    bundle = tampered(minilm_bundle)
    with open(bundle / "model.int8.onnx", "r+b") as fh:
        fh.seek(1000)
        byte = fh.read(1)
        fh.seek(1000)
        fh.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(BundleError, match="model.int8.onnx .* fails its checksum"):
        edge_embed.load(bundle, precision="int8")
    (bundle / "model.fp16.onnx").unlink()
    with pytest.raises(BundleError, match="model.fp16.onnx .* is missing"):
        edge_embed.load(bundle, precision="fp16")
    with pytest.raises(BundleError, match="has no bf16 variant"):
        edge_embed.load(bundle, precision="bf16")
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["pooling"] = "max"
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="pooling 'max'"):
        edge_embed.load(bundle)
