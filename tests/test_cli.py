"""The CLI as a user runs it: a subprocess, JSON lines out, one clear line on errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def run(*args: str, stdin: str | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "edge_embed.cli", *args], input=stdin, capture_output=True,
        text=True, timeout=300, env={**os.environ, **(env or {})},
    )


def test_embed_prints_json_lines(minilm_bundle):
    done = run("embed", "--bundle", str(minilm_bundle), "first text", "second text")
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["index"] for r in rows] == [0, 1]
    assert all(len(r["embedding"]) == 384 for r in rows)


def test_embed_reads_stdin_and_env(minilm_bundle):
    done = run("embed", "-", stdin="one\n\ntwo\nthree\n", env={"EDGE_EMBED_BUNDLE": str(minilm_bundle)})
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.splitlines()) == 3


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--dimensions", "100", "x"], 2, "no Matryoshka"),
        (["--instruction", "find", "x"], 2, "does not take instructions"),
        (["--precision", "bf16", "x"], 3, "no bf16 variant"),
        ([], 2, "give texts"),
    ],
)
def test_bad_input_is_one_line_without_traceback(minilm_bundle, args, code, message):
    done = run("embed", "--bundle", str(minilm_bundle), *args)
    assert done.returncode == code
    assert message in done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_missing_bundle_and_bad_source(tmp_path):
    done = run("embed", "--bundle", str(tmp_path / "nope"), "x")
    assert done.returncode == 3 and "does not exist" in done.stderr
    done = run("export", str(tmp_path), str(tmp_path / "out"), "--precision", "fp32")
    assert done.returncode == 5 and "no config.json" in done.stderr
    done = run("export", str(tmp_path), str(tmp_path / "out"), "--precision", "fp64")
    assert done.returncode == 5 and "fp32,fp16,int8" in done.stderr
    assert "Traceback" not in done.stderr


def test_info_reports_what_runs(minilm_bundle):
    done = run("info", "--bundle", str(minilm_bundle), "--precision", "fp16")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["provider"]["precision"] == "fp16"
    assert report["provider"]["execution_providers"] == ["CPUExecutionProvider"]
    assert report["manifest"]["variants"]["int8"]["recipe"]["method"]


@pytest.fixture(scope="module")
def default_cache(tmp_path_factory):
    """One cache folder for the default-model tests: the first exports, the rest reuse."""
    return tmp_path_factory.mktemp("default-cache")


def test_main_job_exports_the_default_model_in_a_child_and_serves_it(default_cache, tmp_path):
    """The README's main job on a fresh machine: `edge-embed serve` with no bundle exports
    the default model first (in a child process, so the server never loads torch), shows
    only our progress lines, then answers over gRPC and, as the README starts it, over the
    OpenAI-compatible HTTP API with the same vector."""
    import signal
    import socket
    import time
    import urllib.request

    ports = []
    for _ in range(2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    port, http_port = ports
    env = {**os.environ, "EDGE_EMBED_CACHE": str(default_cache)}
    console = tmp_path / "console.txt"
    with console.open("w") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "edge_embed.cli", "serve", "--port", str(port),
                                 "--http-port", str(http_port)], env=env, stdout=sink, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            health = run("health", "--server", f"127.0.0.1:{port}")
            if health.returncode == 0:
                break
            assert proc.poll() is None, console.read_text()
            time.sleep(0.5)
        assert health.stdout.strip() == "SERVING"
        done = run("embed", "--server", f"127.0.0.1:{port}", "served text")
        assert done.returncode == 0, done.stderr
        vector = json.loads(done.stdout)["embedding"]
        assert len(vector) == 384
        request = urllib.request.Request(f"http://127.0.0.1:{http_port}/v1/embeddings",
                                         data=json.dumps({"input": "served text"}).encode(),
                                         headers={"Content-Type": "application/json"})
        answer = json.loads(urllib.request.urlopen(request, timeout=30).read())
        assert max(abs(a - b) for a, b in zip(answer["data"][0]["embedding"], vector)) < 1e-6  # the CLI rounds
        maps = Path(f"/proc/{proc.pid}/maps").read_text()
        assert "libtorch" not in maps  # the export ran in a child process
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    lines = console.read_text().splitlines()
    assert "bundle is ready" in console.read_text() and any(line.startswith("[export") for line in lines)
    # Our progress lines and log lines only: no library's INFO chatter (onnxscript, onnx_ir, the quantizer).
    assert len(lines) < 40, lines
    ours = ("[export", "edge-embed:", "int8:")
    assert all(line.startswith(ours) or " edge_embed." in line for line in lines), lines


def test_the_default_model_is_exported_once(default_cache):
    env = {"EDGE_EMBED_CACHE": str(default_cache)}
    first = run("embed", "edge devices need fast embeddings", env=env)
    assert first.returncode == 0 and first.stderr == "", first.stderr  # reused, not re-exported
    (row,) = [json.loads(line) for line in first.stdout.splitlines()]
    assert len(row["embedding"]) == 384
    manifest = json.loads((default_cache / "bundles" / "all-MiniLM-L6-v2" / "manifest.json").read_text())
    assert list(manifest["variants"]) == ["int8"]
    assert manifest["variants"]["int8"]["recipe"]["batch_invariant"] is True  # INT8 that batches
    assert manifest["model_id"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert not list((default_cache / "bundles").glob(".*partial*"))


def test_a_cached_default_bundle_with_batch_dependent_int8_is_replaced(minilm_bundle, minilm_per_tensor_bundle):
    """A default bundle cached before INT8 batched would keep serving one text per batch:
    it is recognised and exported again; a current one is kept."""
    from edge_embed.default_model import _batch_dependent

    assert _batch_dependent(minilm_per_tensor_bundle) is True
    assert _batch_dependent(minilm_bundle) is False


def test_doctor_explains_what_runs_and_why(minilm_bundle):
    done = run("doctor", "--bundle", str(minilm_bundle), "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["platform"]["cpus"] >= 1 and report["platform"]["memory_bytes"] > 0
    chosen = [c for c in report["candidates"] if c["chosen"]]
    assert chosen and all(c["reason"] for c in report["candidates"])
    run_ = report["would_run"]
    assert run_["backend"] == "onnx" and run_["precision"] == "int8"
    assert run_["parity_ok"] is True and run_["parity"]["probes"] >= 32
    assert run_["memory"]["fits"] is True
    text = run("doctor", "--bundle", str(minilm_bundle))
    assert "Backend candidates" in text.stdout and "Would run" in text.stdout and "passes" in text.stdout


def test_forced_backend_that_cannot_run_is_an_error(minilm_bundle):
    done = run("embed", "--bundle", str(minilm_bundle), "x", env={"EDGE_EMBED_BACKEND": "tensorrt"})
    assert done.returncode == 4 and "TensorrtExecutionProvider" in done.stderr and not done.stdout
    doctor = run("doctor", "--bundle", str(minilm_bundle), "--backend", "tensorrt")
    assert doctor.returncode == 4 and "TensorrtExecutionProvider" in doctor.stdout + doctor.stderr
    warm = run("warm", "--bundle", str(minilm_bundle), "--backend", "cuda")
    assert warm.returncode == 4 and "CUDAExecutionProvider" in warm.stderr
    assert "Traceback" not in warm.stderr


def test_warm_runs_the_profile_shapes_of_the_limits_serve_reads(minilm_bundle):
    """`warm` takes the batching limits from the flags and EDGE_EMBED_* variables `serve` reads."""
    done = run("warm", "--bundle", str(minilm_bundle), "--precision", "fp32", "--max-batch-size", "4",
               env={"EDGE_EMBED_MAX_BATCH_TOKENS": "512"})
    assert done.returncode == 0, done.stderr
    assert "CPUExecutionProvider" in done.stdout and "[(4, 128), (2, 256)]" in done.stdout
