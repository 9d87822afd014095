"""The CLI as a user runs it: a subprocess, JSON lines out, one clear line on errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from edge_embed.platform import this_cpu

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
    # INT8 runs unless the export measured it slower than FP32 on a CPU of this one's kind: then
    # FP32 runs and the report says why.
    speed = report["bundle"]["variants"]["int8"]["speed"]
    slower_here = speed["int8_kernels"] == this_cpu()[1] and max(speed["vs_fp32"].values()) < 1.0
    assert run_["backend"] == "onnx" and run_["precision"] == ("fp32" if slower_here else "int8")
    assert ("int8" in run_["passed_over"]) is slower_here
    assert run_["parity_ok"] is True and run_["parity"]["probes"] >= 32
    assert run_["memory"]["fits"] is True
    text = run("doctor", "--bundle", str(minilm_bundle))
    assert "Backend candidates" in text.stdout and "Would run" in text.stdout and "passes" in text.stdout
    assert ("not int8: measured slower than fp32" in text.stdout) is slower_here


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


@pytest.fixture
def emb_and_rr(qwen3_bundle, qwen3_reranker_bundle, tmp_path):
    """The README's pair, served as the README does: `edge-embed serve --bundle emb=...
    --bundle rr=...`; yields its HOST:PORT once health says SERVING."""
    import signal
    import socket
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        target = f"127.0.0.1:{s.getsockname()[1]}"
    console = tmp_path / "console.txt"
    env = {**os.environ, "EDGE_EMBED_CACHE": str(tmp_path / "cache")}  # loads store their footprints there
    with console.open("w") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "edge_embed.cli", "serve", "--port", target.split(":")[1],
                                 "--bundle", f"emb={qwen3_bundle}@fp32",
                                 "--bundle", f"rr={qwen3_reranker_bundle}@fp32"],
                                env=env, stdout=sink, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while run("health", "--server", target).returncode != 0:
            assert proc.poll() is None and time.monotonic() < deadline, console.read_text()
            time.sleep(0.5)
        yield target
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, console.read_text()


def test_embed_rerank_and_health_pick_one_of_a_servers_models(emb_and_rr):
    """--model (or EDGE_EMBED_MODEL) picks the reranker for `rerank`; a request to the other
    kind of model exits 2 (WrongTaskError) in one line that names the model to pick."""
    target = emb_and_rr
    query, documents = "jetson memory", ["Jetson Orin has 8 GB of unified memory.", "Bread needs flour and time."]
    ranked = run("rerank", "--server", target, "--model", "rr", query, *documents)
    assert ranked.returncode == 0, ranked.stderr
    rows = [json.loads(line) for line in ranked.stdout.splitlines()]
    assert sorted(r["index"] for r in rows) == [0, 1] and rows[0]["score"] >= rows[1]["score"]
    by_env = run("rerank", "--server", target, query, *documents, env={"EDGE_EMBED_MODEL": "rr"})
    assert by_env.returncode == 0 and by_env.stdout == ranked.stdout, by_env.stderr
    embedded = run("embed", "--server", target, "--model", "emb", "--query", "a text")
    assert embedded.returncode == 0 and len(json.loads(embedded.stdout)["embedding"]) == 64, embedded.stderr

    for args, message, pick in (
        (["rerank", "--server", target, query, *documents], "emb is an embedding model and cannot rerank",
         "--model rr"),
        (["embed", "--server", target, "--model", "rr", "a text"], "rr is a reranker and cannot embed", "--model emb"),
    ):
        done = run(*args)
        assert done.returncode == 2, done.stderr  # WrongTaskError's exit code, not 3 (bad bundle)
        assert message in done.stderr and done.stderr.rstrip().endswith(pick) and not done.stdout
        assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1

    health = run("health", "--server", target, "--model", "rr")
    assert health.returncode == 0 and health.stdout.startswith("SERVING (rr: "), health.stdout + health.stderr
    missing = run("health", "--server", target, "--model", "nope")
    assert missing.returncode == 2 and "'nope' is not served here" in missing.stderr
    local = run("embed", "--model", "emb", "a text")
    assert local.returncode == 2 and "give --server" in local.stderr


def test_health_of_one_model_from_its_health_name_or_its_state():
    """A model with its own grpc.health.v1 name is that name's status; one without is the
    server's status and its state in Info: a failed load is NOT_SERVING and says why."""
    from grpc_health.v1 import health_pb2

    from edge_embed.client import health_service_name
    from edge_embed.v1 import embed_pb2 as pb

    from .test_client import scripted_server

    serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    names = {"": serving, health_service_name("emb"): serving, health_service_name("rr"): not_serving}
    info = pb.InfoResponse(model="broken", models=[
        pb.ModelStatus(name="emb", state="loaded"),
        pb.ModelStatus(name="broken", state="failed", error="model.fp32.onnx fails its checksum")])
    with scripted_server(info, health_status=names) as (_, target):
        whole = run("health", "--server", target)
        assert whole.returncode == 0 and whole.stdout == "SERVING\n", whole.stderr
        emb = run("health", "--server", target, "--model", "emb")
        assert emb.returncode == 0 and emb.stdout == "SERVING\n", emb.stderr
        rr = run("health", "--server", target, "--model", "rr")
        assert rr.returncode == 4 and rr.stdout == "NOT_SERVING\n"
        broken = run("health", "--server", target, "--model", "broken")
    assert broken.returncode == 4 and broken.stdout == "NOT_SERVING (broken: failed)\n"
    assert "model broken is failed: model.fp32.onnx fails its checksum" in broken.stderr
