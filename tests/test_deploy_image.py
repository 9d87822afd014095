"""The CPU image (docker/Dockerfile), built for amd64 and arm64 from local Debian bases and run.

No registry is reachable, so the bases are Debian rootfs tarballs made with mmdebstrap and
passed with --build-arg BASE_IMAGE (--pull=never). amd64 runs natively; arm64 runs under
qemu user emulation (binfmt_misc) and serves through the aarch64 onnxruntime wheel. Both
answer real gRPC Embed calls from this host, and the arm64 vectors match amd64's within
the bundle's INT8 gate. Built images are cached in .cache/deploy, keyed by their inputs.
"""

from __future__ import annotations

import json
import os
import socket
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from tests.deploy.host import REPO, enable_arm64_emulation, record, skip_without_system
from tests.deploy.images import IMAGE, QEMU_CPU, Containers, context_key, running, stage_context
from tests.deploy.manifests import cpu_memory_limit_bytes, cpu_pod_env, find, memory_bytes, server_container

pytestmark = pytest.mark.deploy

EXTRA_TEXTS = ["edge devices embed text locally", "Jetson Orin has 8 GB of unified memory."]
SIZE_GOAL = 400_000_000  # bytes, amd64 image with its bundle


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def unit(vectors: np.ndarray) -> np.ndarray:
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def containers() -> Containers:
    skip_without_system()
    return Containers.create()


@pytest.fixture(scope="module")
def context(minilm_bundle) -> Path:
    return stage_context(minilm_bundle)


@pytest.fixture(scope="module")
def texts(context) -> list[str]:
    with np.load(context / "bundle" / "golden.npz", allow_pickle=False) as golden:
        return [str(t) for t in golden["texts"][:12]] + EXTRA_TEXTS


@pytest.fixture(scope="module")
def int8_gate(context) -> float:
    """The INT8 variant's cosine minimum to the FP32 reference, as its manifest records it."""
    manifest = json.loads((context / "bundle" / "manifest.json").read_text())
    return float(manifest["variants"]["int8"]["parity"]["cos_min"])


def _tag(arch: str, context: Path, base: str, flavour: str = "") -> str:
    return f"{IMAGE}:{arch}{flavour}-{context_key(context)}-{base.rsplit('-', 1)[1]}"


@pytest.fixture(scope="module")
def amd64_images(containers, context) -> dict[str, str]:
    base = containers.base_image("amd64")
    tags = {"bundle": _tag("amd64", context, base), "nobundle": _tag("amd64", context, base, "-nobundle")}
    containers.drop_stale(f"{IMAGE}:amd64", keep=set(tags.values()))
    containers.build("docker/Dockerfile", context, tags["bundle"], "amd64", base, bundle=True, timeout=900)
    containers.build("docker/Dockerfile", context, tags["nobundle"], "amd64", base, bundle=False, timeout=900)
    return tags


@pytest.fixture(scope="module")
def arm64_image(containers, context) -> str:
    if reason := enable_arm64_emulation():
        pytest.skip(reason)
    base = containers.base_image("arm64")
    tag = _tag("arm64", context, base)
    containers.drop_stale(f"{IMAGE}:arm64", keep={tag})
    # As a multi-arch build on an x86 host: the build stage runs natively on the amd64
    # base and installs the arm64 wheels without emulation (deploy/install.sh --arch).
    return containers.build("docker/Dockerfile", context, tag, "arm64", base, bundle=True, timeout=1800,
                            build_base=containers.base_image("amd64"))


def _serve_options(port: int, metrics_port: int) -> list[str]:
    # Configured by environment alone; loopback, since the container shares the host network.
    return ["-e", "EDGE_EMBED_HOST=127.0.0.1", "-e", f"EDGE_EMBED_PORT={port}",
            "-e", f"EDGE_EMBED_METRICS_PORT={metrics_port}"]


@pytest.fixture(scope="module")
def amd64_server(containers, amd64_images):
    """The amd64 image serving, under the memory limit the CPU DaemonSet gives it."""
    port, metrics_port = free_port(), free_port()
    pod_env = [arg for name, value in cpu_pod_env().items() for arg in ("-e", f"{name}={value}")]
    options = [*_serve_options(port, metrics_port), *pod_env, "--memory", str(cpu_memory_limit_bytes())]
    with running(containers, amd64_images["bundle"], f"edge-embed-test-amd64-{os.getpid()}", timeout=600,
                 options=options) as container:
        record("amd64_healthy_after_s", round(container.wait_healthy(180), 1))
        yield container, f"127.0.0.1:{port}", metrics_port


@pytest.fixture(scope="module")
def amd64_vectors(amd64_server, texts) -> np.ndarray:
    from edge_embed.client import EmbedClient

    _, address, _ = amd64_server
    with EmbedClient(address, timeout=60) as client:
        return client.embed(texts)


@pytest.fixture(scope="module")
def arm64_server(containers, arm64_image):
    port, metrics_port = free_port(), free_port()
    # ONNX Runtime's cpuinfo crashes under qemu when it can read /sys/devices/system/cpu.
    options = [*_serve_options(port, metrics_port), "--security-opt", "mask=/sys/devices/system/cpu",
               "-e", f"QEMU_CPU={QEMU_CPU}"]
    with running(containers, arm64_image, f"edge-embed-test-arm64-{os.getpid()}", timeout=1500,
                 options=options) as container:
        record("arm64_healthy_after_s", round(container.wait_healthy(900, step=5), 1))
        yield container, f"127.0.0.1:{port}", metrics_port


def test_amd64_image_is_small_runtime_only_and_non_root(containers, amd64_images):
    image = amd64_images["bundle"]
    size = containers.size(image)
    record("amd64_image_bytes", size)
    record("amd64_image_without_bundle_bytes", containers.size(amd64_images["nobundle"]))
    assert size < SIZE_GOAL, f"amd64 image is {size / 1e6:.0f} MB, goal < {SIZE_GOAL / 1e6:.0f} MB"

    config = containers.config(image)
    docker = config["Docker"]["config"]
    assert docker["User"] == "10001:10001"
    assert docker["Healthcheck"]["Test"] == ["CMD", "edge-embed-entrypoint", "health"]
    assert docker["Entrypoint"] == ["edge-embed-entrypoint"] and docker["Cmd"] == ["serve"]
    env = dict(item.split("=", 1) for item in docker["Env"])
    assert env["EDGE_EMBED_BUNDLE"] == "/bundle" and env["EDGE_EMBED_HOST"] == "0.0.0.0"

    facts = containers.podman(
        "run", "--rm", "--network=none", "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024",
        "--health-interval=disable", "--entrypoint", "python3", image, "-c",
        "import importlib.util as u, json, os;"
        "print(json.dumps({'uid': os.getuid(),"
        " 'heavy': [m for m in ('torch', 'transformers', 'onnx', 'optimum', 'pip') if u.find_spec(m)],"
        " 'runtime': [m for m in ('onnxruntime', 'tokenizers', 'grpc', 'numpy') if u.find_spec(m)],"
        " 'secret_left': os.path.exists('/run/secrets/pip-cert'),"
        " 'bundle': sorted(os.listdir('/bundle'))}))",
        timeout=120,
    )
    found = json.loads(facts.stdout.strip().splitlines()[-1])
    assert found["uid"] == 10001
    assert found["heavy"] == [], f"the runtime image carries {found['heavy']}"
    assert found["runtime"] == ["onnxruntime", "tokenizers", "grpc", "numpy"]
    assert not found["secret_left"]
    assert "manifest.json" in found["bundle"] and "model.int8.onnx" in found["bundle"]


def test_cpu_daemonset_memory_passes_the_memory_check_in_the_image(containers, amd64_images):
    """`edge-embed check` run in the image under the CPU DaemonSet's memory limit: it sees the
    limit as the memory available and finds the baked bundle FEASIBLE; the request covers
    what it says the bundle needs."""
    resources = server_container(find("DaemonSet", "edge-embed-cpu"))["resources"]
    limit, request = memory_bytes(resources["limits"]["memory"]), memory_bytes(resources["requests"]["memory"])
    done = containers.podman(
        "run", "--rm", "--network=none", "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024",
        "--health-interval=disable", "--memory", str(limit),
        *[arg for name, value in cpu_pod_env().items() for arg in ("-e", f"{name}={value}")],
        "--entrypoint", "edge-embed", amd64_images["bundle"],
        "check", "/bundle", "--json", timeout=300)
    report = json.loads(done.stdout)
    memory = next(r for r in report["resources"] if r["resource"] == "memory")
    record("cpu_check_in_image", {"required": memory["required"], "available": memory["available"],
                                  "verdict": memory["verdict"], "source": report["models"][0]["source"]})
    assert memory["available"] == limit
    assert memory["verdict"] == "FEASIBLE", report
    assert request >= memory["required"]


def test_amd64_container_answers_embed_calls(amd64_server, amd64_vectors, texts, minilm_bundle, int8_gate):
    import edge_embed

    container, _, metrics_port = amd64_server
    assert container.healthcheck()  # the image's own HEALTHCHECK, through `edge-embed health`
    assert amd64_vectors.shape == (len(texts), 384)
    np.testing.assert_allclose(np.linalg.norm(amd64_vectors, axis=1), 1.0, atol=1e-4)
    with edge_embed.load(minilm_bundle, precision="int8") as provider:
        here = provider.embed(texts)
    cos = np.sum(unit(here) * unit(amd64_vectors), axis=1)
    record("cos_amd64_container_vs_host_min", round(float(cos.min()), 6))
    assert cos.min() >= int8_gate

    metrics = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    rss = next(float(line.split()[1]) for line in metrics.splitlines()
               if line.startswith("process_resident_memory_bytes"))
    record("amd64_server_rss_bytes", int(rss))
    assert rss < cpu_memory_limit_bytes()
    assert "edge_embed_serving 1.0" in metrics


def test_amd64_container_stops_cleanly(amd64_server, amd64_vectors):
    container, _, _ = amd64_server
    assert container.stop() == 0, container.output
    assert "draining" in container.output and "stopped after" in container.output


def test_bundle_can_be_mounted_instead_of_baked(containers, amd64_images, context):
    image = amd64_images["nobundle"]
    missing = containers.podman("run", "--rm", "--network=none", "--ulimit", "nofile=1024:1024", "--ulimit",
                                "nproc=1024:1024", "--health-interval=disable", image, timeout=120, check=False)
    errors = [line for line in missing.stderr.splitlines() if "systemd connection" not in line and line.strip()]
    assert missing.returncode == 3
    assert len(errors) == 1 and errors[0].startswith("edge-embed: error: no bundle at /bundle"), errors

    from edge_embed.client import EmbedClient

    port, http_port = free_port(), free_port()
    options = [*_serve_options(port, free_port()), "-v", f"{context / 'bundle'}:/bundle:ro",
               "-e", f"EDGE_EMBED_HTTP_PORT={http_port}"]
    with running(containers, image, f"edge-embed-test-mounted-{os.getpid()}", timeout=600,
                 options=options) as container:
        container.wait_healthy(180)
        with EmbedClient(f"127.0.0.1:{port}", timeout=60) as client:
            over_grpc = client.embed(["a mounted bundle"])
        assert over_grpc.shape == (1, 384)
        # The OpenAI-compatible HTTP API runs in the image too (aiohttp without its websocket reader).
        request = urllib.request.Request(f"http://127.0.0.1:{http_port}/v1/embeddings",
                                         data=json.dumps({"input": "a mounted bundle"}).encode(),
                                         headers={"Content-Type": "application/json"})
        answer = json.loads(urllib.request.urlopen(request, timeout=60).read())
        assert np.array_equal(np.array(answer["data"][0]["embedding"], dtype=np.float32), over_grpc[0])
        assert container.stop() == 0, container.output


def test_arm64_container_matches_amd64(containers, arm64_image, arm64_server, amd64_vectors, texts, int8_gate):
    from edge_embed.client import EmbedClient

    record("arm64_image_bytes", containers.size(arm64_image))
    container, address, _ = arm64_server
    machine = containers.podman("exec", container.name, "uname", "-m", timeout=60).stdout.strip()
    assert machine == "aarch64"
    wheel = containers.podman("exec", container.name, "sh", "-c",
                              "ls /opt/edge-embed/venv/lib/python3*/site-packages | grep -i '^onnxruntime-.*dist-info'",
                              timeout=60).stdout.strip()
    tag = containers.podman("exec", container.name, "sh", "-c",
                            f"cat /opt/edge-embed/venv/lib/python3*/site-packages/{wheel}/WHEEL", timeout=60).stdout
    assert "aarch64" in tag, tag
    with EmbedClient(address, timeout=300) as client:
        arm64 = client.embed(texts)
    cos = np.sum(unit(arm64) * unit(amd64_vectors), axis=1)
    record("cos_arm64_vs_amd64_min", round(float(cos.min()), 6))
    record("cos_arm64_vs_amd64_mean", round(float(cos.mean()), 6))
    record("int8_gate_cos_min", int8_gate)
    assert cos.min() >= int8_gate, f"arm64 vs amd64: cos min {cos.min():.4f} < INT8 gate {int8_gate}"


def test_arm64_container_stops_cleanly(arm64_server):
    container, _, _ = arm64_server
    assert container.stop(grace=60) == 0, container.output
    assert "stopped after" in container.output


def test_multi_arch_manifest_lists_both_platforms(containers, amd64_images, arm64_image, context):
    name = f"{IMAGE}:multiarch-{context_key(context)}"
    containers.buildah("manifest", "rm", name, check=False)
    containers.buildah("manifest", "create", name)
    try:
        for image in (amd64_images["bundle"], arm64_image):
            containers.buildah("manifest", "add", name, image, timeout=300)
        index = json.loads(containers.buildah("manifest", "inspect", name).stdout)
    finally:
        containers.buildah("manifest", "rm", name, check=False)
    platforms = {(m["platform"]["os"], m["platform"]["architecture"]) for m in index["manifests"]}
    assert platforms == {("linux", "amd64"), ("linux", "arm64")}


def test_dockerfile_defaults_to_a_public_base():
    text = (REPO / "docker" / "Dockerfile").read_text()
    assert "ARG BASE_IMAGE=python:3.11-slim-bookworm" in text
