"""The layout contract: three top-level folders install as one `edge_embed` namespace."""

from __future__ import annotations

import subprocess
import sys
import zipfile

import pytest

from .conftest import REPO


def test_runtime_never_imports_torch(minilm_bundle):
    code = (
        "import asyncio, sys, edge_embed\n"
        "from edge_embed.server import ServerConfig, create_server\n"
        "from edge_embed.client import EmbedClient\n"
        f"p = edge_embed.load({str(minilm_bundle)!r})\n"
        "p.embed(['hello'])\n"
        "async def main():\n"
        "    edge, port = await create_server(ServerConfig(port=0), p)\n"
        "    await edge.stop(1)\n"
        "asyncio.run(main())\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'onnx', 'edge_embed.export') if m in sys.modules)\n"
        "print(heavy)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_installed_package_names():
    import edge_embed.backends.onnx
    import edge_embed.export.pipeline

    assert edge_embed.backends.onnx.__file__.endswith("backends/onnx.py")
    assert edge_embed.export.pipeline.__file__.endswith("export/pipeline.py")


def test_public_names_are_pinned():
    import edge_embed

    assert sorted(edge_embed.__all__) == sorted([
        "__version__", "load", "load_bundle", "Bundle", "Manifest", "EmbeddingProvider",
        "BundleEmbedder", "ProviderInfo", "EdgeEmbedError", "InvalidInputError", "BundleError",
        "BackendUnavailableError", "ExportError", "GateError", "OverloadedError",
        "ModelNotFoundError", "UnauthenticatedError", "ModelNotReadyError", "MemoryBudgetError",
        "ModelRunner", "BatchLimits", "ModelRunError", "InputRunError", "NonFiniteOutputError", "RequestTimeoutError",
        "WorkerStoppedError",
        "planned_precision", "CorpusError", "embed_corpus", "check_same_bundle", "WrongTaskError", "Reranker",
        "RerankResult", "Image",
    ])


@pytest.mark.slow
def test_wheel_carries_all_three_parts(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(REPO)],
        check=True, timeout=300, capture_output=True,
    )
    (wheel,) = tmp_path.glob("edge_embed-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for expected in ("edge_embed/cli.py", "edge_embed/backends/onnx.py", "edge_embed/export/pipeline.py",
                     "edge_embed/export/probes.py", "edge_embed/server/app.py", "edge_embed/v1/embed_pb2.py",
                     "edge_embed/v1/embed.proto"):
        assert expected in names
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, timeout=300, capture_output=True)
    probe = "import edge_embed.backends.onnx, edge_embed.export.pipeline as p; print(p.__file__)"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path, env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(str(target))


def test_grpc_stubs_match_the_proto(tmp_path):
    """The committed stubs are what scripts/gen_proto.sh makes from embed.proto today."""
    import shutil

    (tmp_path / "edge_embed" / "v1").mkdir(parents=True)
    shutil.copy(REPO / "edge_embed" / "v1" / "embed.proto", tmp_path / "edge_embed" / "v1")
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-I", ".", "--python_out=.", "--pyi_out=.",
         "--grpc_python_out=.", "edge_embed/v1/embed.proto"],
        cwd=tmp_path, check=True, timeout=60,
    )
    for name in ("embed_pb2.py", "embed_pb2.pyi", "embed_pb2_grpc.py"):
        fresh = (tmp_path / "edge_embed" / "v1" / name).read_text()
        assert fresh == (REPO / "edge_embed" / "v1" / name).read_text(), f"{name} is stale: run scripts/gen_proto.sh"


def test_the_tested_onnx_runtime_is_the_one_pinned_for_devices():
    """scripts/setup.sh, deploy/install.sh and the images install with deploy/constraints.txt:
    the runtime under test is the runtime that ships."""
    from importlib.metadata import version

    pins = dict(line.split("==") for line in (REPO / "deploy" / "constraints.txt").read_text().splitlines()
                if line and not line.startswith("#"))
    assert version("onnxruntime") == pins["onnxruntime"]
    for path in ("scripts/setup.sh", "deploy/install.sh"):
        assert "constraints.txt" in (REPO / path).read_text(), path
    for path in ("docker/Dockerfile", "docker/Dockerfile.jetson"):
        assert "deploy/constraints.txt" in (REPO / path).read_text(), path
