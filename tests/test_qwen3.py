"""A tiny Qwen3 (real architecture, random weights, Qwen's real tokenizer) through the pipeline."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import edge_embed
from edge_embed.errors import GateError, InvalidInputError

pytestmark = pytest.mark.slow

DOCS = ["The quick brown fox jumps over the lazy dog.", "ok", "Wie spät ist es?", "x = [i * i for i in range(10)]"]


def _torch_last_token(source, texts: list[str], side: str) -> np.ndarray:
    """The model card's recipe written out independently: EOS-terminated ids, pad, take the last real token."""
    import torch
    from tokenizers import Tokenizer
    from transformers import AutoModel

    tokenizer = Tokenizer.from_file(str(source / "tokenizer.json"))
    model = AutoModel.from_pretrained(source).eval()
    ids = [tokenizer.encode(t).ids for t in texts]
    eos = tokenizer.token_to_id("<|endoftext|>")
    assert all(seq[-1] == eos for seq in ids)
    width = max(map(len, ids))
    input_ids = torch.full((len(ids), width), eos)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for row, seq in enumerate(ids):
        cols = slice(width - len(seq), width) if side == "left" else slice(0, len(seq))
        input_ids[row, cols] = torch.tensor(seq)
        mask[row, cols] = 1
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        hidden = model(input_ids=input_ids, attention_mask=mask, position_ids=positions).last_hidden_state
    last = [width - 1 if side == "left" else len(seq) - 1 for seq in ids]
    pooled = hidden[torch.arange(len(ids)), last]
    return torch.nn.functional.normalize(pooled, dim=1).numpy()


def test_manifest_rules(qwen3_bundle):
    m = edge_embed.load_bundle(qwen3_bundle).manifest
    # Right padding, though the tokenizer config says left: exact batch invariance.
    assert (m.architecture, m.pooling, m.padding_side) == ("qwen3", "last_token", "right")
    assert m.append_eos is False  # the tokenizer's post-processor appends EOS, as Qwen3-Embedding's does
    assert m.graph_inputs == ("input_ids", "attention_mask")  # positions are 0..len-1 with right padding
    assert (m.dim, m.matryoshka_min_dim) == (64, 32)
    assert m.instruction_template == "Instruct: {instruction}\nQuery:{text}"


def test_attention_and_rms_norms_are_fused_in_every_variant(qwen3_bundle):
    import onnx

    manifest = edge_embed.load_bundle(qwen3_bundle).manifest
    assert manifest.variants["fp32"].recipe["fused_ops"] == {"GroupQueryAttention": 2,
                                                            "SimplifiedLayerNormalization": 5,
                                                            "SkipSimplifiedLayerNormalization": 4}
    for precision in ("fp32", "fp16", "int8", "int4"):
        ops = [n.op_type for n in onnx.load(str(qwen3_bundle / manifest.variants[precision].file)).graph.node]
        assert ops.count("SimplifiedLayerNormalization") + ops.count("SkipSimplifiedLayerNormalization") == 9
        assert "ReduceMean" not in ops and "Pow" not in ops, precision
        # Attention, rotary included, is one kernel per layer: no Softmax or rotary halves left.
        assert ops.count("GroupQueryAttention") == 2 and "Softmax" not in ops and "Neg" not in ops, precision


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_onnx_matches_pytorch_for_either_padding(qwen3_source, qwen3_bundle, side, precision):
    reference = _torch_last_token(qwen3_source, DOCS, side)
    with edge_embed.load(qwen3_bundle, precision=precision) as provider:
        vectors = provider.embed(DOCS)
    gate = 0.99999 if precision == "fp32" else 0.999
    assert np.sum(vectors * reference, axis=1).min() >= gate


def test_int8_passes_its_gate(qwen3_source, qwen3_bundle):
    reference = _torch_last_token(qwen3_source, DOCS, "left")
    with edge_embed.load(qwen3_bundle, precision="int8") as provider:
        assert np.sum(provider.embed(DOCS) * reference, axis=1).min() >= 0.97


def test_queries_use_the_instruction_template(qwen3_source, qwen3_bundle):
    task = "Given a question, retrieve passages that answer it"
    formatted = [f"Instruct: {task}\nQuery:{t}" for t in DOCS]
    reference = _torch_last_token(qwen3_source, formatted, "left")
    with edge_embed.load(qwen3_bundle, precision="fp32") as provider:
        queries = provider.embed(DOCS, instruction=task)
        documents = provider.embed(DOCS)
        assert provider.count_tokens(DOCS[:1], instruction=task)[0] > provider.count_tokens(DOCS[:1])[0]
    assert np.sum(queries * reference, axis=1).min() >= 0.99999
    assert np.sum(queries * documents, axis=1).max() < 0.9999


def test_matryoshka_truncates_then_normalizes(qwen3_bundle):
    with edge_embed.load(qwen3_bundle, precision="fp32") as provider:
        full = provider.embed(DOCS, normalize=False)
        short = provider.embed(DOCS, dimensions=32)
        with pytest.raises(InvalidInputError, match="allows 32..64"):
            provider.embed(DOCS, dimensions=16)
    expected = full[:, :32] / np.linalg.norm(full[:, :32], axis=1, keepdims=True)
    assert short.shape == (len(DOCS), 32)
    assert np.allclose(short, expected, atol=1e-6)


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8", "int4"])
def test_batch_invariance_with_right_padding(qwen3_bundle, precision):
    from edge_embed.export.probes import probe_texts

    bundle = qwen3_bundle
    texts = probe_texts()[::3]
    assert edge_embed.load_bundle(bundle).manifest.variants[precision].parity.batch_cos_min >= 0.99999
    with edge_embed.load(bundle, precision=precision,
                         limits=edge_embed.BatchLimits(max_batch_tokens=1024)) as provider:
        together = provider.embed(texts)
        alone = np.vstack([provider.embed([t]) for t in texts[:30]])
    assert np.sum(together[:30] * alone, axis=1).min() >= 0.99999


def test_the_fused_attention_op_means_what_transformers_computes(qwen3_source):
    """The export's custom op, run eagerly (the meaning given to GroupQueryAttention), gives
    the unchanged model's vectors with right padding: the ONNX gates then compare the
    kernel with the same thing."""
    import torch
    from transformers import AutoConfig

    from edge_embed.export.attention import cannot_fuse, with_fused_attention
    from edge_embed.export.graph import load_pooled_encoder
    from edge_embed.export.source import read_source
    from edge_embed.tokenization import model_inputs

    source = read_source(qwen3_source)
    config = AutoConfig.from_pretrained(qwen3_source)
    assert cannot_fuse(config, "right") is None and "right padding" in cannot_fuse(config, "left")
    seqs = [np.arange(5, 5 + n, dtype=np.int64) * 37 for n in (9, 4, 7, 1)]
    feeds = [torch.from_numpy(model_inputs(seqs, source.manifest)[n]) for n in source.manifest.graph_inputs]
    with torch.no_grad():
        reference = load_pooled_encoder(source)(*feeds)
        fused = with_fused_attention(load_pooled_encoder(source), config, source.manifest.max_length)(*feeds)
    cos = torch.nn.functional.cosine_similarity(reference, fused, dim=1)
    assert cos.min().item() >= 0.999999


def test_a_left_padded_bundle_of_an_older_export_gives_the_same_vectors(qwen3_source, qwen3_bundle, tmp_path):
    """Bundles exported before right padding say "left" in their manifest, feed position_ids
    and spell attention out op by op: such a graph, exported from the same model, keeps
    giving the vectors of the current one (fused attention, right padding)."""
    import dataclasses

    from edge_embed.bundle import file_sha256
    from edge_embed.export.graph import export_onnx, load_pooled_encoder
    from edge_embed.export.source import read_source
    from edge_embed.tokenization import model_inputs

    source = read_source(qwen3_source)
    older = dataclasses.replace(source, manifest=dataclasses.replace(
        source.manifest, padding_side="left", graph_inputs=("input_ids", "attention_mask", "position_ids")))
    old = tmp_path / "left-padded"
    shutil.copytree(qwen3_bundle, old)
    sample = model_inputs([np.arange(1, 6, dtype=np.int64), np.arange(1, 4, dtype=np.int64)], older.manifest)
    export_onnx(load_pooled_encoder(older), older, old / "model.fp32.onnx", sample)
    import onnx

    ops = {n.op_type for n in onnx.load(str(old / "model.fp32.onnx")).graph.node}
    assert "GroupQueryAttention" not in ops and "Softmax" in ops  # attention as the older exports spelled it
    data = json.loads((old / "manifest.json").read_text())
    data["padding_side"], data["graph_inputs"] = "left", list(older.manifest.graph_inputs)
    data["variants"]["fp32"]["sha256"] = file_sha256(old / "model.fp32.onnx")
    (old / "manifest.json").write_text(json.dumps(data))
    texts = DOCS + ["a much longer text than the others, so that every other row is padded"]
    with edge_embed.load(qwen3_bundle, precision="fp32") as right, edge_embed.load(old, precision="fp32") as left:
        assert left.manifest.padding_side == "left"
        assert np.sum(right.embed(texts) * left.embed(texts), axis=1).min() >= 0.99999


def test_tokenizer_without_eos_rule_gets_eos_appended(qwen3_source, tmp_path):
    from edge_embed.export import export

    source = tmp_path / "src"
    shutil.copytree(qwen3_source, source)
    tok = json.loads((source / "tokenizer.json").read_text())
    tok["post_processor"] = None
    (source / "tokenizer.json").write_text(json.dumps(tok))
    manifest = export(source, tmp_path / "bundle", "fp32", model_id="tiny-qwen3-noeos", progress=lambda _: None)
    assert manifest.append_eos is True
    with edge_embed.load(tmp_path / "bundle") as provider:
        seq = provider.tokenizer.encode(["hello"])[0]
        assert seq[-1] == manifest.eos_token_id
        # Same ids as the EOS-appending tokenizer, so the same vector as the original export.
    reference = _torch_last_token(qwen3_source, DOCS, "left")
    with edge_embed.load(tmp_path / "bundle") as provider:
        assert np.sum(provider.embed(DOCS) * reference, axis=1).min() >= 0.99999


@pytest.mark.parametrize(("precision", "gates"), [("int8", {"int8_cos_min": 0.999999}),
                                                 ("int4", {"int4_cos_mean": 0.999999})])
def test_unreachable_gate_for_a_quantized_variant_writes_nothing(qwen3_source, tmp_path, precision, gates):
    """Each quantized precision is judged by its own configurable gate; a miss after the
    whole search (block sizes, sensitive MatMuls kept out) writes nothing."""
    from edge_embed.export import Gates, export

    out = tmp_path / "bundle"
    with pytest.raises(GateError, match=rf"{precision} variant failed its gate: .* \(worst text") as info:
        export(qwen3_source, out, precision, gates=Gates(**gates), progress=lambda _: None)
    assert info.value.variant == precision and info.value.worst_text
    assert not out.exists() and not list(tmp_path.iterdir())


def test_int4_is_weight_only_4bit_gated_and_refused_when_tampered(qwen3_bundle, tampered):
    """INT4: MatMulNBits 4-bit weights, int8 vocabulary rows, its own gate (cos mean 0.98,
    min 0.95) recorded in the bundle and enforced again at load; never picked by auto."""
    import onnx

    manifest = edge_embed.load_bundle(qwen3_bundle).manifest
    variant = manifest.variants["int4"]
    assert variant.recipe["gate"]["cos_mean"] == 0.98 and variant.recipe["gate"]["cos_min"] == 0.95
    assert variant.parity.cos_mean >= 0.98 and variant.parity.cos_min >= 0.95
    assert variant.parity.batch_cos_min >= 0.99999
    nodes = onnx.load(str(qwen3_bundle / variant.file)).graph.node
    bits = [next(a.i for a in n.attribute if a.name == "bits") for n in nodes if n.op_type == "MatMulNBits"]
    kept = variant.recipe["kept_8bit_nodes"]
    assert bits.count(4) >= 14 - len(kept) > 0 and bits.count(8) == len(kept)
    assert not [n for n in nodes if n.op_type == "MatMul" and "embed" in n.input[1]]
    assert variant.recipe["embedding_tables"].startswith("int8 per row")

    with edge_embed.load(qwen3_bundle, precision="int4") as provider:
        assert provider.info.parity.cos_min >= 0.95  # checked again here, at load
        assert provider.info.batch_invariant and provider.limits.max_batch_size == 32
        int4 = provider.embed(DOCS)
    with edge_embed.load(qwen3_bundle, precision="fp32") as provider:
        fp32 = provider.embed(DOCS)
    assert np.sum(int4 * fp32, axis=1).min() >= 0.95
    with edge_embed.load(qwen3_bundle) as provider:
        # int8, or fp32 where the export measured int8 slower on this kind of CPU
        assert provider.info.precision in ("int8", "fp32")

    bundle = tampered(qwen3_bundle)
    data = bytearray((bundle / "model.int4.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (bundle / "model.int4.onnx").write_bytes(bytes(data))
    with pytest.raises(edge_embed.BundleError, match="model.int4.onnx .* fails its checksum"):
        edge_embed.load(bundle, precision="int4")

    # Weights rewritten with a matching checksum: the golden vectors catch it at load.
    from onnx import numpy_helper

    from edge_embed.bundle import file_sha256

    model = onnx.load(str(qwen3_bundle / "model.fp32.onnx"))
    weight = [i for i in model.graph.initializer if len(i.dims) == 2 and i.dims[0] > 1][-1]  # the last layer's
    weight.CopyFrom(numpy_helper.from_array(np.random.default_rng(0).permutation(
        numpy_helper.to_array(weight)), weight.name))
    onnx.save(model, str(bundle / "model.int4.onnx"))
    raw = json.loads((bundle / "manifest.json").read_text())
    raw["variants"]["int4"]["sha256"] = file_sha256(bundle / "model.int4.onnx")
    (bundle / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(edge_embed.BundleError, match="fails its parity gate on this device"):
        edge_embed.load(bundle, precision="int4")


@pytest.mark.parametrize("which", ["qwen3", "minilm"])
def test_huge_texts_tokenize_from_a_prefix_exactly_as_whole(which, qwen3_bundle, minilm_bundle):
    """A text far past the model's limit is tokenized from a prefix only when that keeps
    the same tokens: ids equal the whole-text tokenization, for byte-level BPE (left
    padding, EOS appended) and WordPiece alike, on awkward inputs too."""
    import random

    from edge_embed.tokenization import BundleTokenizer

    bundle = edge_embed.load_bundle(qwen3_bundle if which == "qwen3" else minilm_bundle)
    rng = random.Random(5)
    words = ["memory", "edge", "x" * 30, "jetson,", "orin!", "é", "漢字", "  ", "\n", "a" * 150, "tokenization"]
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 5000))) for _ in range(40)]
    texts += ["word " * 6000, " " * 30000 + "hello", "x" * 30000, "w1 " * 10000]
    prefixed = BundleTokenizer(bundle.tokenizer_path, bundle.manifest)
    whole = BundleTokenizer(bundle.tokenizer_path, bundle.manifest)
    whole.prefix_chars = 10**9
    assert any(len(t) > prefixed.prefix_chars for t in texts)
    for instruction in (None, "find the passage") if bundle.manifest.instruction_template else (None,):
        got = prefixed.encode(texts, instruction=instruction)
        expected = whole.encode(texts, instruction=instruction)
        assert all(np.array_equal(a, b) for a, b in zip(got, expected))
    with pytest.raises(InvalidInputError, match=r"texts\[0\] is longer"):
        prefixed.encode(["word " * 6000], truncate=False)
