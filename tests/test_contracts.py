"""The provider contracts and `load`: what every runner offers the server, top_n checked
before any work, a provider refused at boot is closed, and the package root imported by
no module it imports."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import numpy as np
import pytest

import edge_embed
from edge_embed.bundle import file_sha256
from edge_embed.errors import BundleError, InvalidInputError, WrongTaskError
from edge_embed.provider import EmbeddingProvider, ModelRunner, Reranker, check_top_n
from .fakes import FakeProvider

PACKAGE = Path(edge_embed.__file__).parent


def test_top_n_is_none_or_a_positive_integer():
    assert [check_top_n(n) for n in (None, 1, 7)] == [None, 1, 7]
    for bad in (0, -2, True, 1.5, "3"):
        with pytest.raises(InvalidInputError, match="top_n must be a positive integer"):
            check_top_n(bad)


def test_every_runner_names_both_halves_and_refuses_the_other_task():
    fake = FakeProvider()
    assert isinstance(fake, ModelRunner)
    for call in (lambda: fake.tokenize_pairs("q", ["d"]), lambda: fake.finish_scores(np.zeros(1))):
        with pytest.raises(WrongTaskError, match="fake-model is an embedding model and cannot rerank"):
            call()
    assert not fake.batches


def test_load_lives_in_loading_and_no_module_imports_the_package_root():
    """`edge_embed` re-exports `load`; the modules it imports must not import it back."""
    from edge_embed import loading

    assert edge_embed.load is loading.load and edge_embed.planned_precision is loading.planned_precision
    for name in ("loading.py", "corpus.py", "provider.py"):
        tree = ast.parse((PACKAGE / name).read_text())
        roots = [node.lineno for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module is None]
        assert roots == [], f"{name} imports the package root (from . import ...) at lines {roots}"


@pytest.mark.slow
def test_a_provider_that_fails_its_boot_parity_check_is_closed(minilm_bundle, tampered, monkeypatch):
    from edge_embed.backends.onnx import OnnxProvider

    bundle = tampered(minilm_bundle)
    golden = bundle / "golden.npz"
    with np.load(golden, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    arrays["vectors"] = -arrays["vectors"]  # the reference points the other way: parity cannot pass
    np.savez(golden, **arrays)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["files"]["golden.npz"] = file_sha256(golden)
    (bundle / "manifest.json").write_text(json.dumps(manifest))

    closed: list[OnnxProvider] = []
    close = OnnxProvider.close
    monkeypatch.setattr(OnnxProvider, "close", lambda self: (closed.append(self), close(self))[1])
    with pytest.raises(BundleError, match="fails its parity gate on this device"):
        edge_embed.load(bundle, precision="fp32", threads=1)
    assert len(closed) == 1
    with edge_embed.load(bundle, precision="fp32", threads=1, enforce_parity=False) as accepted:
        assert accepted.info.parity_ok is False and not closed[1:]


@pytest.mark.slow
def test_a_bad_top_n_is_refused_before_the_model_runs(cross_encoder_bundle):
    with edge_embed.load(cross_encoder_bundle, precision="fp32", threads=1) as reranker:
        assert isinstance(reranker, Reranker) and isinstance(reranker, EmbeddingProvider)
        assert reranker.info.sha256 == reranker.bundle.variant("fp32").sha256
        runs = []
        run_batch = reranker.run_batch
        reranker.run_batch = lambda seqs: (runs.append(len(seqs)), run_batch(seqs))[1]
        for bad in (0, -1, True, 2.0):
            with pytest.raises(InvalidInputError, match="top_n must be a positive integer"):
                reranker.rerank("a query", ["one document", "another document"], top_n=bad)
        with pytest.raises(InvalidInputError, match="top_n must be a positive integer"):
            reranker.rerank("a query", [], top_n=0)
        assert runs == []
        assert [r.index for r in reranker.rerank("a query", ["one document", "another"], top_n=1)] in ([0], [1])
        assert runs == [2]
