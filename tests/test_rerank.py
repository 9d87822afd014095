"""Rerankers: a tiny Qwen3ForCausalLM (Qwen3-Reranker's shape and prompt) and a tiny BERT
cross-encoder, built with random weights, exported by the real pipeline and scored by
ONNX Runtime against PyTorch scoring the same weights the way the models' own code does."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

import edge_embed
from edge_embed.bundle import load_bundle
from edge_embed.errors import ExportError, InvalidInputError, WrongTaskError
from edge_embed.export.probes import rerank_probe_pairs
from edge_embed.export.source import QWEN3_DEFAULT_TASK, QWEN3_RERANK_TEMPLATE, read_source
from edge_embed.manifest import Manifest, ScoreParity
from edge_embed.parity import Gates, gate_failure, measure_score_parity

QUERY = "how do I reset a router"
DOCUMENTS = [
    "Restart the modem and router: power down both, wait thirty seconds, start the modem, then the router.",
    "Brown the onions slowly over medium heat until they turn sweet and golden.",
    "The central bank raised interest rates by a quarter point to cool persistent inflation.",
    "Forgetting the saved network and joining it again clears stale settings on a laptop.",
    "The striker scored twice in the second half.",
]


def _tokenizer(source: Path) -> Tokenizer:
    """The model's tokenizer as its own code runs it on one input: no padding, no cut."""
    tokenizer = Tokenizer.from_file(str(source / "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer


def _qwen3_prompt(query: str, document: str, instruction: str = QWEN3_DEFAULT_TASK) -> str:
    """The whole prompt in one string, as Qwen3-Reranker's reference code builds it."""
    return (QWEN3_RERANK_TEMPLATE.replace("{instruction}", instruction).replace("{query}", query)
            .replace("{document}", document))


def _qwen3_torch_scores(source: Path, query: str, documents: list[str], instruction: str = QWEN3_DEFAULT_TASK):
    """P(yes) against P(no) from the full vocabulary logits at the last position."""
    from transformers import AutoModelForCausalLM

    tokenizer = _tokenizer(source)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    yes, no = tokenizer.token_to_id("yes"), tokenizer.token_to_id("no")
    scores = []
    with torch.inference_mode():
        for doc in documents:
            ids = tokenizer.encode(_qwen3_prompt(query, doc, instruction), add_special_tokens=False).ids
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
            pair = torch.log_softmax(torch.stack([logits[no], logits[yes]]), dim=0)
            scores.append(float(pair[1].exp()))
    return np.array(scores)


def _cross_encoder_torch_scores(source: Path, query: str, documents: list[str]) -> np.ndarray:
    """sigmoid(logit) of BertForSequenceClassification on the tokenizer's pair encoding,
    segment ids included, as sentence-transformers' CrossEncoder scores."""
    from transformers import AutoModelForSequenceClassification

    tokenizer = _tokenizer(source)
    model = AutoModelForSequenceClassification.from_pretrained(source, dtype=torch.float32).eval()
    scores = []
    with torch.inference_mode():
        for doc in documents:
            enc = tokenizer.encode(query, doc)
            logit = model(input_ids=torch.tensor([enc.ids]), token_type_ids=torch.tensor([enc.type_ids]),
                          attention_mask=torch.ones(1, len(enc.ids), dtype=torch.int64)).logits[0, 0]
            scores.append(float(torch.sigmoid(logit)))
    return np.array(scores)


def _by_index(results) -> np.ndarray:
    out = np.empty(len(results))
    for r in results:
        out[r.index] = r.score
    return out


# -- export -----------------------------------------------------------------------------


@pytest.mark.slow
def test_export_detects_both_rerankers_and_records_the_task(qwen3_reranker_source, cross_encoder_source,
                                                             qwen3_source):
    qwen = read_source(qwen3_reranker_source).manifest
    assert qwen.task == "rerank" and qwen.rerank.format == "template" and qwen.dim == 1
    assert qwen.rerank.template == QWEN3_RERANK_TEMPLATE and qwen.rerank.default_instruction == QWEN3_DEFAULT_TASK
    tokenizer = _tokenizer(qwen3_reranker_source)
    assert (qwen.rerank.yes_token_id, qwen.rerank.no_token_id) == (tokenizer.token_to_id("yes"),
                                                                   tokenizer.token_to_id("no"))
    cross = read_source(cross_encoder_source).manifest
    assert cross.task == "rerank" and cross.rerank.format == "pair" and cross.rerank.activation == "sigmoid"
    assert read_source(qwen3_source).manifest.task == "embed"  # a bare Qwen3Model embeds
    with pytest.raises(ExportError, match="must be a \\*ForSequenceClassification model or a Qwen3 causal"):
        read_source(qwen3_source, task="rerank")
    assert read_source(qwen3_reranker_source, task="embed").manifest.task == "embed"


@pytest.mark.slow
def test_bundles_hold_the_task_the_score_gates_and_golden_scores(qwen3_reranker_bundle, cross_encoder_bundle):
    for path in (qwen3_reranker_bundle, cross_encoder_bundle):
        manifest = json.loads((path / "manifest.json").read_text())
        assert manifest["task"] == "rerank" and manifest["graph_output"] == "rerank_logit"
        bundle = load_bundle(path)
        for precision, variant in bundle.manifest.variants.items():
            assert isinstance(variant.parity, ScoreParity)
            assert variant.recipe["gate"]["score_diff_max"] == Gates().limits(precision, "rerank")["score_diff_max"]
            assert gate_failure(precision, variant.parity, Gates.recorded(precision, variant.recipe)) is None
            assert variant.parity.batch_diff_max is not None and variant.parity.batch_diff_max <= 1e-4
        queries, documents, groups, logits = bundle.golden_pairs()
        expected_q, expected_d, expected_g = rerank_probe_pairs()
        assert (queries, documents, groups.tolist()) == (expected_q, expected_d, expected_g)
        assert logits.shape == (len(queries),) and np.isfinite(logits).all()
        assert np.ptp(logits) > 1.0, "random weights were meant to spread the scores"
        with np.load(path / "golden.npz") as golden:
            np.testing.assert_allclose(golden["scores"], 1 / (1 + np.exp(-logits.astype(np.float64))), atol=1e-6)
    assert load_bundle(qwen3_reranker_bundle).variant("int8").recipe["method"].startswith("per-token")


@pytest.mark.slow
def test_mlx_variants_of_a_reranker_are_refused_before_work(qwen3_reranker_source, tmp_path):
    from edge_embed.export import export

    with pytest.raises(ExportError, match="reranker, and the MLX backend runs embedders only"):
        export(qwen3_reranker_source, tmp_path / "b", "fp32,mlx-fp32")
    assert not (tmp_path / "b").exists()


# -- scores against PyTorch ----------------------------------------------------------------


@pytest.mark.slow
def test_qwen3_reranker_scores_equal_pytorch_over_the_full_vocabulary(qwen3_reranker_bundle, qwen3_reranker_source):
    reference = _qwen3_torch_scores(qwen3_reranker_source, QUERY, DOCUMENTS)
    with edge_embed.load(qwen3_reranker_bundle, precision="fp32") as fp32:
        results = fp32.rerank(QUERY, DOCUMENTS)
        assert fp32.info.task == "rerank" and fp32.info.parity_ok
        np.testing.assert_allclose(_by_index(results), reference, atol=2e-5)
        # Best first, and the pair's tokens are the whole prompt's tokens in one piece.
        assert [r.score for r in results] == sorted((r.score for r in results), reverse=True)
        tokenizer = _tokenizer(qwen3_reranker_source)
        for doc, seq in zip(DOCUMENTS, fp32.tokenize_pairs(QUERY, DOCUMENTS)):
            assert seq.tolist() == tokenizer.encode(_qwen3_prompt(QUERY, doc), add_special_tokens=False).ids
        other = "Given a question about home networks, find the fix"
        np.testing.assert_allclose(_by_index(fp32.rerank(QUERY, DOCUMENTS, instruction=other)),
                                   _qwen3_torch_scores(qwen3_reranker_source, QUERY, DOCUMENTS, other), atol=2e-5)
    with edge_embed.load(qwen3_reranker_bundle, precision="int8") as int8:
        assert int8.info.parity_ok
        np.testing.assert_allclose(_by_index(int8.rerank(QUERY, DOCUMENTS)), reference, atol=0.05)


@pytest.mark.slow
def test_cross_encoder_scores_equal_pytorch_with_segment_ids(cross_encoder_bundle, cross_encoder_source):
    reference = _cross_encoder_torch_scores(cross_encoder_source, QUERY, DOCUMENTS)
    tokenizer = _tokenizer(cross_encoder_source)
    for precision, atol in (("fp32", 2e-5), ("fp16", 0.02), ("int8", 0.05)):
        with edge_embed.load(cross_encoder_bundle, precision=precision) as provider:
            assert provider.info.parity_ok
            np.testing.assert_allclose(_by_index(provider.rerank(QUERY, DOCUMENTS)), reference, atol=atol)
            if precision == "fp32":
                for doc, seq in zip(DOCUMENTS, provider.tokenize_pairs(QUERY, DOCUMENTS)):
                    assert seq.tolist() == tokenizer.encode(QUERY, doc).ids
                with pytest.raises(InvalidInputError, match="does not take instructions"):
                    provider.rerank(QUERY, DOCUMENTS, instruction="find it")


# -- the API ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def qwen3_reranker(qwen3_reranker_bundle):
    with edge_embed.load(qwen3_reranker_bundle, precision="fp32") as provider:
        yield provider


@pytest.mark.slow
def test_top_n_return_documents_and_bad_input(qwen3_reranker):
    every = qwen3_reranker.rerank(QUERY, DOCUMENTS)
    top = qwen3_reranker.rerank(QUERY, DOCUMENTS, top_n=2, return_documents=True)
    assert [(r.index, r.score) for r in top] == [(r.index, r.score) for r in every[:2]]
    assert [r.document for r in top] == [DOCUMENTS[r.index] for r in top]
    assert all(r.document is None for r in every)
    assert qwen3_reranker.rerank(QUERY, []) == []
    for bad, match in ((dict(query=""), "query is empty"), (dict(query=3), "query must be a string"),
                       (dict(documents="one"), "not a single string"), (dict(documents=["a", " "]), "documents\\[1\\]"),
                       (dict(top_n=0), "top_n must be a positive integer"),
                       (dict(instruction="  "), "instruction must be a non-empty string")):
        args = {"query": QUERY, "documents": DOCUMENTS, **bad}
        with pytest.raises(InvalidInputError, match=match):
            qwen3_reranker.rerank(args.pop("query"), args.pop("documents"), **args)


@pytest.mark.slow
def test_long_pairs_lose_the_end_of_the_document_never_the_query_or_template(qwen3_reranker, qwen3_reranker_source):
    limit = qwen3_reranker.info.max_length
    tokenizer = _tokenizer(qwen3_reranker_source)
    long_doc = " ".join(DOCUMENTS * 80)
    (seq,) = qwen3_reranker.tokenize_pairs(QUERY, [long_doc])
    head, tail = QWEN3_RERANK_TEMPLATE.split("{document}")
    head_ids = tokenizer.encode(head.replace("{instruction}", QWEN3_DEFAULT_TASK).replace("{query}", QUERY).rstrip(),
                                add_special_tokens=False).ids
    tail_ids = tokenizer.encode(tail, add_special_tokens=False).ids
    assert len(seq) == limit
    assert seq[: len(head_ids)].tolist() == head_ids and seq[-len(tail_ids):].tolist() == tail_ids
    doc_ids = tokenizer.encode(" " + long_doc, add_special_tokens=False).ids
    assert seq[len(head_ids):-len(tail_ids)].tolist() == doc_ids[: limit - len(head_ids) - len(tail_ids)]
    # The same pair scored from a document cut by hand to what fits scores the same.
    kept = tokenizer.decode(doc_ids[: limit - len(head_ids) - len(tail_ids)]).lstrip()
    assert qwen3_reranker.rerank(QUERY, [long_doc])[0].score == pytest.approx(
        qwen3_reranker.rerank(QUERY, [kept])[0].score, abs=1e-5)
    with pytest.raises(InvalidInputError, match="documents\\[0\\] makes a pair longer .* truncate is false"):
        qwen3_reranker.rerank(QUERY, [long_doc], truncate=False)
    with pytest.raises(InvalidInputError, match="leaves .* tokens for the document"):
        qwen3_reranker.rerank(" ".join(DOCUMENTS * 20), ["short"])


@pytest.mark.slow
def test_a_request_for_the_other_task_names_both(qwen3_reranker, qwen3_bundle):
    with pytest.raises(WrongTaskError, match="tiny-qwen3-reranker is a reranker and cannot embed texts; send this "
                                             "request to an embedding model"):
        qwen3_reranker.embed(["text"])
    with edge_embed.load(qwen3_bundle, precision="fp32") as embedder:
        with pytest.raises(WrongTaskError, match="tiny-qwen3 is an embedding model and cannot rerank documents"):
            embedder.rerank(QUERY, DOCUMENTS)
        assert embedder.info.task == "embed"


def test_score_parity_counts_order_within_each_query():
    reference = np.array([3.0, 1.0, -1.0, 0.5, 0.0, -0.5])
    groups = np.array([0, 0, 0, 1, 1, 1])
    names = [f"p{i}" for i in range(6)]
    same = measure_score_parity(reference, reference + 1e-7, groups, names, "sigmoid")
    assert (same.kendall_tau_min, same.top1_agreement) == (1.0, 1.0) and same.score_diff_max < 1e-6
    swapped = measure_score_parity(reference, np.array([1.0, 3.0, -1.0, 0.5, 0.0, -0.5]), groups, names, "sigmoid")
    assert swapped.top1_agreement == 0.5 and swapped.kendall_tau_min == pytest.approx(1 / 3, abs=1e-4)
    assert swapped.worst_pair in ("p0", "p1")
    failure = gate_failure("int8", swapped, Gates())
    assert failure is not None and failure.figure == "score_diff_max" and "> 0.05" in str(failure)


def test_a_manifest_without_a_task_is_an_embedder():
    from tests.fakes import FAKE_MANIFEST

    data = json.loads(FAKE_MANIFEST.to_json())
    data.pop("task")
    data.pop("rerank")
    assert Manifest.from_dict(data).task == "embed"


@pytest.mark.slow
def test_a_corpus_job_refuses_a_reranker_before_any_work(qwen3_reranker_bundle, tmp_path):
    corpus = tmp_path / "in.jsonl"
    corpus.write_text('{"id": "a", "text": "one passage"}\n')
    with pytest.raises(WrongTaskError, match="is a reranker and cannot embed texts"):
        edge_embed.embed_corpus(qwen3_reranker_bundle, corpus, tmp_path / "out")
    assert not (tmp_path / "out").exists()
