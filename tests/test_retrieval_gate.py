"""The ranking gate of quantized embedders: the retrieval probe corpus, the figures, the
refusal of a variant that keeps cosine but loses ranking, and the record in the manifest."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

import edge_embed
from edge_embed.errors import GateError
from edge_embed.export.probes import PROBE_LANGUAGES, retrieval_probes
from edge_embed.manifest import Manifest, Parity
from edge_embed.parity import Gates, gate_failure, measure_retrieval


def test_the_probe_corpus_is_data_with_enough_queries_and_passages_in_every_language_set():
    english = retrieval_probes(["en"])
    assert len(english.queries) >= 300 and len(english.passages) >= 1000
    every = retrieval_probes()
    assert set(every.query_languages) == set(PROBE_LANGUAGES) and len(set(every.passages)) == len(every.passages)
    assert every.relevant.dtype == np.int64 and every.relevant.max() < len(every.passages)
    # Each query's own passage is in its language; lengths vary from a line to paragraphs.
    assert all(every.passage_languages[p] == lang for p, lang in zip(every.relevant, every.query_languages))
    words = sorted(len(p.split()) for p in english.passages)
    assert words[0] < 20 and words[-1] > 150
    assert len(set(english.domains)) >= 20
    with pytest.raises(ValueError, match="tlh"):
        retrieval_probes(["tlh"])


def _corpus(queries: int = 400, passages: int = 1200, dim: int = 64, seed: int = 0):
    """Unit vectors where each query is a noisy copy of its own passage: a retrieval task
    the reference solves well (MRR near 1), as a trained model does."""
    rng = np.random.default_rng(seed)
    docs = rng.normal(size=(passages, dim))
    relevant = rng.choice(passages, size=queries, replace=False).astype(np.int64)
    q = docs[relevant] + rng.normal(scale=0.9, size=(queries, dim))
    return q, docs, relevant


def _retrieval(reference, candidate, relevant):
    names = [f"query {i}" for i in range(len(relevant))]
    return measure_retrieval(reference, candidate, relevant, names, ("en",))


def _parity(retrieval) -> Parity:
    return Parity(probes=10, cos_min=0.999, cos_mean=0.9995, topk=5, topk_agreement=1.0, worst_text="x",
                  batch_cos_min=1.0, retrieval=retrieval)


def test_the_reference_against_itself_keeps_everything():
    q, p, relevant = _corpus()
    r = _retrieval((q, p), (q, p), relevant)
    assert (r.topk_kept, r.spearman, r.mrr_ratio, r.top1_rr) == (1.0, 1.0, 1.0, 1.0)
    assert r.reference_mrr > 0.5 and r.queries == 400 and r.passages == 1200 and r.topk == 10
    assert gate_failure("int8", _parity(r), Gates()) is None


def test_a_variant_that_keeps_cosine_but_loses_half_a_percent_of_mrr_is_refused():
    q, p, relevant = _corpus()
    reference = (q, p)
    ref = _retrieval(reference, reference, relevant)
    # Turn a few queries just far enough toward their best distractor that it ranks
    # first: every vector keeps cosine > 0.98 with the reference, the ranking does not.
    unit_p = p / np.linalg.norm(p, axis=1, keepdims=True)
    scores = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ unit_p.T
    ranked_first = np.flatnonzero(np.argmax(scores, axis=1) == relevant)
    top2 = -np.sort(-scores[ranked_first], axis=1)[:, :2]
    closest = ranked_first[np.argsort(top2[:, 0] - top2[:, 1])[:8]]
    moved = q.copy()
    for query in closest:
        runner_up = np.argsort(-scores[query])[1]
        step = np.linalg.norm(q[query]) * (unit_p[runner_up] - unit_p[relevant[query]])
        alpha = 0.0
        while np.argmax(unit_p @ moved[query]) != runner_up:
            alpha += 0.01
            moved[query] = q[query] + alpha * step
    candidate = (moved, p)
    cos = np.sum(q * moved, axis=1) / np.linalg.norm(q, axis=1) / np.linalg.norm(moved, axis=1)
    assert cos.min() > 0.98
    lost = _retrieval(reference, candidate, relevant)
    assert lost.mrr_ratio <= 0.995 < 1.0 == ref.mrr_ratio
    failure = gate_failure("int8", _parity(lost), Gates(int8_topk_kept=0.0, int8_spearman=0.0))
    assert isinstance(failure, GateError) and failure.figure == "retrieval mrr_ratio"
    assert "query" in failure.worst_text


def test_topk_and_rank_correlation_refuse_a_noisy_variant_and_ignore_mrr_of_a_random_model():
    q, p, relevant = _corpus()
    rng = np.random.default_rng(1)
    noisy = (q + rng.normal(scale=0.25, size=q.shape), p + rng.normal(scale=0.25, size=p.shape))
    r = _retrieval((q, p), noisy, relevant)
    assert r.topk_kept < Gates().int8_topk_kept
    assert gate_failure("int8", _parity(r), Gates()).figure == "retrieval topk_kept"
    assert gate_failure("int8", _parity(r), Gates(int8_topk_kept=0.0)).figure == "retrieval spearman"
    # A model that does not retrieve (reference MRR below the floor) is not judged on MRR.
    random_q = rng.normal(size=q.shape)
    r = _retrieval((random_q, p), (random_q, noisy[1]), relevant)
    assert r.reference_mrr < Gates().retrieval_min_reference_mrr
    assert gate_failure("int8", _parity(r), Gates(int8_topk_kept=0.0, int8_spearman=0.0)) is None


def test_the_figures_travel_through_the_manifest_and_old_manifests_have_none(tmp_path):
    q, p, relevant = _corpus()
    r = _retrieval((q, p), (q, p), relevant)
    from tests.fakes import FAKE_MANIFEST
    from edge_embed.manifest import Variant

    variant = Variant(precision="int8", file="model.int8.onnx", sha256="0" * 64, bytes=1, opset=21,
                      min_onnxruntime="1.17", recipe={}, parity=_parity(r))
    manifest = dataclasses.replace(FAKE_MANIFEST, variants={"int8": variant})
    manifest.write(tmp_path / "manifest.json")
    back = Manifest.read(tmp_path / "manifest.json")
    assert back.variants["int8"].parity.retrieval == r
    data = json.loads((tmp_path / "manifest.json").read_text())
    del data["variants"]["int8"]["parity"]["retrieval"]
    assert Manifest.from_dict(data).variants["int8"].parity.retrieval is None


def test_the_corpus_runs_only_when_a_ranking_floor_can_refuse_a_wanted_variant():
    assert Gates().ranks({"int8"}) and Gates().ranks({"int4"})
    assert not Gates().ranks(set()) and not Gates().ranks({"fp32", "fp16"})
    unranked = Gates(int8_topk_kept=0.0, int8_spearman=0.0, quantized_mrr_ratio=0.0)
    assert not unranked.ranks({"int8"}) and unranked.ranks({"int8", "int4"})
    assert Gates(int8_topk_kept=0.0, int8_spearman=0.0).ranks({"int8"})  # MRR still gates


def test_an_unknown_probe_language_is_refused_before_any_work(tmp_path):
    from edge_embed.errors import ExportError
    from edge_embed.export import export
    from tests.conftest import minilm_source

    with pytest.raises(ExportError, match="probe languages must be some of en, de"):
        export(minilm_source(), tmp_path / "bundle", "int8", languages=["tlh"], progress=lambda _: None)
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_an_export_refuses_an_int8_variant_that_loses_ranking_and_writes_nothing(qwen3_source, tmp_path):
    """A real export (tiny Qwen3, Qwen's tokenizer): with the bar for the kept top 10 above
    what INT8 reaches on this random-weight model, every recipe the search tries misses
    it, the error names the figure and the query, and no bundle is written."""
    from edge_embed.export import export

    lines: list[str] = []
    with pytest.raises(GateError, match="int8 variant failed its gate: retrieval topk_kept") as caught:
        export(qwen3_source, tmp_path / "bundle", "fp32,int8", model_id="tiny-qwen3",
               gates=Gates(int8_topk_kept=0.9999), progress=lines.append)
    assert caught.value.worst_text in retrieval_probes().queries
    assert not (tmp_path / "bundle").exists()
    assert any(f"retrieval probes ({', '.join(PROBE_LANGUAGES)})" in line for line in lines)
    assert any("top-10 kept" in line and "Spearman" in line for line in lines)


@pytest.mark.slow
def test_minilm_int8_keeps_the_ranking_and_says_so_in_manifest_doctor_and_check(minilm_bundle):
    """The default INT8 (per-token, 8-bit weights, SmoothQuant) passes the ranking gate on
    the English probe corpus, and the figures reach the manifest, doctor and check."""
    from edge_embed.check import check, render_check
    from edge_embed.doctor import diagnose, render

    variant = edge_embed.load_bundle(minilm_bundle).manifest.variants["int8"]
    r = variant.parity.retrieval
    assert r.languages == ("en",) and r.queries >= 300 and r.passages >= 1000
    assert r.topk_kept >= Gates().int8_topk_kept and r.spearman >= Gates().int8_spearman
    assert r.mrr_ratio >= Gates().quantized_mrr_ratio and r.reference_mrr > 0.5
    assert variant.recipe["gate"]["topk_kept"] == Gates().int8_topk_kept
    assert variant.recipe["weights"].endswith("+-127") and variant.recipe["smoothquant_alpha"] == 0.5
    assert variant.recipe["session_config"] == {"session.x64quantprecision": "1"}
    assert edge_embed.load_bundle(minilm_bundle).manifest.variants["fp16"].parity.retrieval is None
    shown = f"top-10 kept {r.topk_kept:.3f}, Spearman {r.spearman:.3f}"
    assert shown in render(diagnose(minilm_bundle))
    assert shown in render_check(check([str(minilm_bundle)], precision="int8", measure=False))
