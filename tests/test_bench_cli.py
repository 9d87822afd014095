"""`edge-embed bench`: real bundles, each variant measured in its own process."""

from __future__ import annotations

import json

import pytest

from edge_embed.bench import device_memory_bytes

from .test_cli import run


@pytest.mark.slow
def test_each_variant_is_measured_in_its_own_process(minilm_bundle, tmp_path):
    out = tmp_path / "report.json"
    done = run("bench", "--bundle", str(minilm_bundle), "--precision", "fp32,int8", "--warmup", "1", "--steps", "3",
               "--text-samples", "8", "--batch-size", "4", "--json", str(out))
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    assert report["settings"] == {"warmup": 1, "steps": 3, "text_samples": 8, "batch_size": 4, "images": 0,
                                  "backend": "auto", "threads": None}
    assert report["device"]["cpus"] >= 1 and report["device"]["cpu"]
    rows = {row["variant"]: row for row in report["rows"]}
    assert list(rows) == ["fp32", "int8"]
    for row in rows.values():
        (texts,) = row["workloads"]
        assert (texts["kind"], texts["items"], texts["batch_size"]) == ("texts", 12, 4)
        assert texts["items_per_s"] > 0 and texts["batch_latency_ms_mean"] > 0 and texts["batch_latency_ms_std"] >= 0
        assert row["execution_providers"] == ["CPUExecutionProvider"] and row["parity_cos_min"] >= 0.98
        assert row["peak_rss_bytes"] > 50 * 2**20 and row["peak_device_bytes"] is None
    # Its own process each: the INT8 graph (23 MB against 90 MB) leaves a lower high-water mark.
    assert rows["int8"]["peak_rss_bytes"] < rows["fp32"]["peak_rss_bytes"]
    table = done.stdout.splitlines()
    assert table[0].split()[:3] == ["variant", "backend", "workload"] and len(table) == 3
    assert all(line.startswith("edge-embed: bench: ") for line in done.stderr.splitlines()), done.stderr


@pytest.mark.slow
def test_images_and_reranker_pairs_are_workloads_too(clip_bundle, cross_encoder_bundle, tmp_path):
    out = tmp_path / "clip.json"
    done = run("bench", "--bundle", str(clip_bundle), "--precision", "fp32", "--warmup", "0", "--steps", "2",
               "--images", "4", "--batch-size", "2", "--json", str(out))
    assert done.returncode == 0, done.stderr
    (row,) = json.loads(out.read_text())["rows"]
    assert [(w["kind"], w["items"]) for w in row["workloads"]] == [("texts", 4), ("images", 4)]
    out = tmp_path / "rerank.json"
    done = run("bench", "--bundle", str(cross_encoder_bundle), "--precision", "fp32", "--steps", "2",
               "--json", str(out))
    assert done.returncode == 0, done.stderr
    (row,) = json.loads(out.read_text())["rows"]
    assert [(w["kind"], w["items"]) for w in row["workloads"]] == [("pairs", 16)]


@pytest.mark.slow
def test_what_cannot_be_measured_is_said_before_any_work(minilm_bundle, tmp_path):
    done = run("bench", "--bundle", str(minilm_bundle), "--precision", "bf16")
    assert done.returncode == 2 and "has no bf16 variant; it has fp32, fp16, int8" in done.stderr, done.stderr
    done = run("bench", "--bundle", str(minilm_bundle), "--images", "2")
    assert done.returncode == 2 and "reads text only: --images needs a bundle that reads images" in done.stderr
    done = run("bench", "--bundle", str(minilm_bundle), "--json", str(tmp_path / "missing" / "r.json"))
    assert done.returncode == 2 and "its folder does not exist" in done.stderr
    done = run("bench", "--bundle", str(minilm_bundle), "--steps", "0")
    assert done.returncode == 2 and "is not a positive integer" in done.stderr


def test_device_memory_is_read_for_the_process_asked_about():
    listing = "4121, 812\n77, 1536\n"
    assert device_memory_bytes(77, listing) == 1536 * 2**20
    assert device_memory_bytes(78, listing) is None
    assert device_memory_bytes(77, "") is None


@pytest.mark.slow
def test_a_variants_peak_is_its_own_not_its_parents(minilm_bundle):
    """Linux keeps a parent's ru_maxrss across fork and exec: a bench called from a process
    that holds a big heap (an export just ran in it) must still report each child's own peak."""
    import numpy as np

    from edge_embed.bench import BenchSettings, bench_bundle

    ballast = np.ones(1024 * 2**20 // 8)  # 1 GiB, touched
    report = bench_bundle(minilm_bundle, ["int8"], BenchSettings(warmup=0, steps=1, text_samples=4, batch_size=4))
    (row,) = report["rows"]
    assert row["peak_rss_bytes"] < 700 * 2**20, row["peak_rss_bytes"]
    del ballast
