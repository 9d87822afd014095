"""Execution providers for real: onnxruntime-gpu on a machine without a usable CUDA.

ONNX Runtime creates the session anyway and quietly runs on the CPU. A forced GPU
provider must be refused with ONNX Runtime's own reason; an automatic choice falls back
and says so. onnxruntime-gpu cannot share an environment with onnxruntime, so these run
in a separate virtualenv, cached in .cache/ between runs.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from .conftest import CACHE, REPO

pytestmark = pytest.mark.slow

ORT_GPU = "onnxruntime-gpu==1.31.1"

PROBE = r'''
import json, sys
import edge_embed
from edge_embed.backends.onnx import OnnxProvider
from edge_embed.errors import BackendUnavailableError

bundle = edge_embed.load_bundle(sys.argv[1])
report = {}
for name, providers in {"cuda": ("CUDAExecutionProvider", "CPUExecutionProvider"),
                        "tensorrt": ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")}.items():
    try:
        OnnxProvider(bundle, "fp32", providers=providers, strict=True)
        report[name + "_forced"] = "accepted"
    except BackendUnavailableError as exc:
        report[name + "_forced"] = str(exc)
    provider = OnnxProvider(bundle, "fp32", providers=providers, strict=False)
    report[name + "_auto"] = {"active": list(provider.info.execution_providers), "fallback": provider.info.fallback,
                              "precision": provider.info.precision, "shape": list(provider.embed(["x"]).shape),
                              "stepped_rows": provider.info.stepped_rows}
print(json.dumps(report))
'''


@pytest.fixture(scope="module")
def gpu_venv():
    venv = CACHE / "onnxruntime-gpu-venv"
    python = venv / "bin" / "python"
    marker = venv / ".ready"
    if not marker.is_file() or marker.read_text() != ORT_GPU:
        shutil.rmtree(venv, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
        subprocess.run([str(python), "-m", "pip", "install", "-q", ORT_GPU, "numpy", "tokenizers"],
                       check=True, timeout=900)
        marker.write_text(ORT_GPU)
    # The project itself, fresh each run, without its dependencies (onnxruntime would clash).
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--force-reinstall", str(REPO)],
                   check=True, timeout=600, capture_output=True)
    return python


def test_gpu_providers_without_cuda_never_fall_back_silently(gpu_venv, minilm_bundle, tmp_path):
    # cwd away from the repo, so the installed package is imported, not the source tree
    done = subprocess.run([str(gpu_venv), "-c", PROBE, str(minilm_bundle)], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    for name, provider in (("cuda", "CUDAExecutionProvider"), ("tensorrt", "TensorrtExecutionProvider")):
        forced = report[f"{name}_forced"]
        assert forced.startswith(f"asked for {provider} but ONNX Runtime activated ['CPUExecutionProvider']"), forced
        assert "Failed" in forced or "Require" in forced or "Please install" in forced  # ONNX Runtime's own reason
        auto = report[f"{name}_auto"]
        assert auto["active"] == ["CPUExecutionProvider"] and auto["shape"] == [1, 384]
        assert auto["fallback"] and provider in auto["fallback"]
        assert auto["stepped_rows"] is False  # TensorRT's profile rows bind only where TensorRT runs


@pytest.mark.slow
def test_lines_written_while_a_session_is_created_reach_the_console_after_it(minilm_bundle, capfd, monkeypatch):
    """ONNX Runtime's own lines are captured (they carry a provider's failure); anything
    else written meanwhile, such as the server's log from another thread, is written back."""
    import os

    import onnxruntime as ort

    from edge_embed import load_bundle
    from edge_embed.backends.onnx import OnnxProvider

    real = ort.InferenceSession

    def noisy_session(*args, **kwargs):
        os.write(2, b"2026-12-05 10:00:00.123456 [W:onnxruntime:, session.cc:1 Init] provider noise\n")
        os.write(2, b"edge_embed.server: another model answered a request\n")
        os.write(1, b"a line for stdout\n")
        return real(*args, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", noisy_session)
    provider = OnnxProvider(load_bundle(minilm_bundle), "fp32", providers=("CPUExecutionProvider",))
    provider.close()
    out, err = capfd.readouterr()
    assert "another model answered a request" in err and "a line for stdout" in out
    assert "provider noise" not in err + out
