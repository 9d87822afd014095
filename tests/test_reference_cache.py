"""PyTorch reference outputs kept between exports: reused only for the same source files,
token ids and code, and recomputed when the kept file is unusable."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from edge_embed.export.reference_cache import load_references, reference_path, store_references
from edge_embed.export.source import read_source


@pytest.fixture
def private_cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("EDGE_EMBED_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "references"


def test_the_key_follows_the_source_files_and_the_token_ids(cross_encoder_source, tmp_path, private_cache):
    copy = tmp_path / "source"
    shutil.copytree(cross_encoder_source, copy)
    seqs = [np.array([101, 2023, 102]), np.array([101, 102])]
    source = read_source(copy)
    key = reference_path(source, seqs, [], 2048)
    assert key.parent == private_cache
    assert reference_path(read_source(copy), [s.copy() for s in seqs], [], 2048) == key  # same inputs
    assert reference_path(source, seqs[:1], [], 2048) != key
    assert reference_path(source, seqs, [np.array([101, 102])], 2048) != key
    assert reference_path(source, seqs, [], 1024) != key
    weights = next(p for p in copy.iterdir() if p.suffix in (".safetensors", ".bin"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of one weight
    weights.write_bytes(bytes(data))
    assert reference_path(read_source(copy), seqs, [], 2048) != key


def test_a_kept_file_is_used_only_when_it_loads_with_the_asked_shapes(private_cache):
    path = private_cache / "k.npz"
    probe, corpus = np.ones((3, 4), np.float32), np.zeros((5, 4), np.float32)
    store_references(path, probe, corpus)
    kept = load_references(path, 3, 5)
    assert kept is not None and np.array_equal(kept[0], probe) and np.array_equal(kept[1], corpus)
    assert load_references(path, 2, 5) is None and load_references(path, 3, 6) is None
    path.write_bytes(path.read_bytes()[:40])  # truncated
    assert load_references(path, 3, 5) is None
    assert load_references(private_cache / "absent.npz", 3, 5) is None
    assert not list(private_cache.glob("*.partial*"))


@pytest.mark.slow
def test_a_second_export_of_the_same_model_reuses_the_reference_bit_for_bit(cross_encoder_source, tmp_path,
                                                                            private_cache):
    from edge_embed.export import export

    lines: list[list[str]] = [[], []]
    for i in range(2):
        export(cross_encoder_source, tmp_path / f"b{i}", "fp32", progress=lines[i].append)
    assert any(line.startswith("reference vectors: 192/192") for line in lines[0])
    assert any("kept by an earlier export of the same model and probes" in line for line in lines[1]), lines[1]
    assert len(list(private_cache.glob("*.npz"))) == 1
    with np.load(tmp_path / "b0" / "golden.npz") as first, np.load(tmp_path / "b1" / "golden.npz") as second:
        for name in ("logits", "scores"):
            assert np.array_equal(first[name], second[name])
