"""Deployment files checked without building anything: linters, offline manifest validation,
the fleet manifests against the memory check, the unit's hardening score, and the image
entrypoint's decisions run for real on this host (the Jetson image's engine-build step
included, which cannot run here on TensorRT)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.deploy.host import REPO, VENV_BIN, record, require, run
from tests.deploy.manifests import K8S, documents, find, memory_bytes, server_container

pytestmark = pytest.mark.deploy

ENTRYPOINT = REPO / "docker" / "entrypoint.sh"
SCRIPTS = [ENTRYPOINT, REPO / "deploy" / "install.sh", REPO / "scripts" / "deploy-tools.sh"]
HEADROOM = 0.8  # the memory check: FEASIBLE when required <= 80 % of what the process sees
CUDA_AND_TENSORRT_WORKSPACE = 512 * 1024**2


# --- linters ------------------------------------------------------------------------------


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.jetson"])
def test_dockerfile_is_hadolint_clean(dockerfile):
    hadolint = require("hadolint")["hadolint"]
    done = run([hadolint, str(REPO / "docker" / dockerfile)], 120, check=False)
    assert done.returncode == 0 and not done.stdout.strip(), done.stdout + done.stderr


def test_scripts_are_shellcheck_clean():
    shellcheck = require("shellcheck")["shellcheck"]
    done = run([shellcheck, *map(str, SCRIPTS)], 120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def test_dockerfiles_take_their_base_and_onnxruntime_as_arguments():
    cpu = (REPO / "docker" / "Dockerfile").read_text()
    jetson = (REPO / "docker" / "Dockerfile.jetson").read_text()
    assert re.search(r"^ARG BASE_IMAGE=python:3\.11-slim-bookworm$", cpu, re.MULTILINE)
    assert re.search(r"^ARG L4T_BASE_IMAGE=nvcr\.io/nvidia/l4t-jetpack:r36\.\d+\.\d+$", jetson, re.MULTILINE)
    assert re.search(r"^ARG ORT_INDEX_URL=https://", jetson, re.MULTILINE)
    assert '--onnxruntime "${ONNXRUNTIME}"' in jetson
    assert 'VOLUME ["/var/cache/edge-embed"]' in jetson
    for text in (cpu, jetson):
        assert "--mount=type=secret,id=pip-cert" in text and "ARG PIP_CERT" in text
        assert 'HEALTHCHECK' in text and '"edge-embed-entrypoint", "health"' in text
        assert re.search(r"^USER 10001:10001$", text, re.MULTILINE)


# --- fleet manifests ------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["1.27.0", None])
def test_manifests_validate_offline(version):
    """kubernetes-validate, strict: 1.27 (first with gRPC probes GA, k3s LTS) and the newest it knows."""
    validate = require("kubernetes-validate")["kubernetes-validate"]
    files = sorted(str(p) for p in K8S.glob("*.yaml"))
    args = ["--strict", *(["-k", version] if version else []), *files]
    done = run([validate, *args], 120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("passed") == len(documents())


def _affinity_terms(daemonset: dict) -> list[dict]:
    spec = daemonset["spec"]["template"]["spec"]
    terms = spec.get("affinity", {}).get("nodeAffinity", {}).get("requiredDuringSchedulingIgnoredDuringExecution", {})
    return terms.get("nodeSelectorTerms", [])


def test_daemonsets_split_cpu_nodes_and_jetsons():
    cpu, jetson = find("DaemonSet", "edge-embed-cpu"), find("DaemonSet", "edge-embed-jetson")
    (term,) = _affinity_terms(cpu)
    rules = {e["key"]: (e["operator"], e.get("values")) for e in term["matchExpressions"]}
    assert rules["kubernetes.io/arch"] == ("In", ["arm64", "amd64"])
    assert rules["nvidia.com/gpu.present"] == ("NotIn", ["true"])
    spec = jetson["spec"]["template"]["spec"]
    assert spec["nodeSelector"] == {"kubernetes.io/arch": "arm64", "nvidia.com/gpu.present": "true"}
    assert spec["runtimeClassName"] == "nvidia"
    env = {e["name"]: e["value"] for e in server_container(jetson)["env"]}
    assert env["EDGE_EMBED_BACKEND"] == "tensorrt" and env["EDGE_EMBED_WARM"] == "1"

    service = find("Service", "edge-embed")
    assert service["spec"]["internalTrafficPolicy"] == "Local"
    for daemonset in (cpu, jetson):
        labels = daemonset["spec"]["template"]["metadata"]["labels"]
        assert daemonset["spec"]["selector"]["matchLabels"].items() <= labels.items()
        assert service["spec"]["selector"].items() <= labels.items()


@pytest.mark.parametrize("name", ["edge-embed-cpu", "edge-embed-jetson"])
def test_daemonset_probes_are_grpc_health_and_cache_is_a_volume(name):
    daemonset = find("DaemonSet", name)
    container = server_container(daemonset)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["grpc"] == 50051
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"] == {"port": ports["grpc"]}, probe
    startup = container["startupProbe"]
    budget = startup["periodSeconds"] * startup["failureThreshold"]
    assert budget >= (1800 if name == "edge-embed-jetson" else 300)  # engine builds come first on a Jetson

    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in daemonset["spec"]["template"]["spec"]["volumes"]}
    cache = volumes[mounts["/var/cache/edge-embed"]]  # EDGE_EMBED_CACHE of both images
    if name == "edge-embed-jetson":
        assert cache["hostPath"]["path"] == "/var/lib/edge-embed/engines"  # engines outlive the pod
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False


def _check(bundle: Path, precision: str) -> dict:
    done = run([str(VENV_BIN / "edge-embed"), "check", str(bundle), "--precision", precision, "--no-measure",
                "--json"], 300)
    report = json.loads(done.stdout)
    return next(r for r in report["resources"] if r["resource"] == "memory")


def test_jetson_memory_matches_the_memory_check(minilm_bundle):
    """TensorRT runs FP16 on a Jetson; its unified memory also holds the CUDA context and
    TensorRT's workspace. The Jetson DaemonSet's limit must pass the check's rule with it."""
    required = _check(minilm_bundle, "fp16")["required"]
    resources = server_container(find("DaemonSet", "edge-embed-jetson"))["resources"]
    limit, request = memory_bytes(resources["limits"]["memory"]), memory_bytes(resources["requests"]["memory"])
    record("jetson_check_required_bytes", required)
    assert required + CUDA_AND_TENSORRT_WORKSPACE <= HEADROOM * limit
    assert request >= required


# --- the unit's hardening --------------------------------------------------------------------


def _exposure(unit_dir: Path) -> tuple[float, str]:
    systemd_analyze = require("systemd-analyze")["systemd-analyze"]
    done = run([systemd_analyze, "security", "--offline=yes", "--no-pager", str(unit_dir / "edge-embed.service")],
               120, check=False)
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+) (\w+)", done.stdout)
    assert match, done.stdout + done.stderr
    return float(match.group(1)), match.group(2)


def test_unit_hardening_scores_ok_with_and_without_the_jetson_drop_in(tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "edge-embed.service").write_text((REPO / "deploy/systemd/edge-embed.service").read_text())
    score, level = _exposure(plain)
    jetson_score, jetson_level = _exposure(REPO / "deploy" / "systemd")  # picks up edge-embed.service.d/
    record("systemd_security_exposure_jetson", f"{jetson_score} {jetson_level}")
    assert level in {"PERFECT", "SAFE", "OK"}, (score, level)
    assert jetson_level in {"PERFECT", "SAFE", "OK"}, (jetson_score, jetson_level)
    assert jetson_score > score  # the drop-in really loosened the device sandbox


# --- the entrypoint, for real, on this host --------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def entrypoint_env(**values: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EDGE_EMBED_", "NOTIFY_SOCKET", "WATCHDOG"))}
    env["PATH"] = f"{VENV_BIN}:{env.get('PATH', '/usr/bin:/bin')}"
    env.update(values)
    return env


def entrypoint(*args: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["sh", str(ENTRYPOINT), *args], env=entrypoint_env(**env), capture_output=True, text=True,
                          timeout=timeout, cwd="/", check=False)


def test_entrypoint_refuses_to_start_without_a_bundle(tmp_path):
    done = entrypoint(EDGE_EMBED_BUNDLE=str(tmp_path / "none"))
    assert done.returncode == 3
    assert done.stderr.splitlines() == [
        (f"edge-embed: error: no bundle at {tmp_path / 'none'}: bake one in (--build-arg BUNDLE=DIR) "
         f"or mount one (-v DIR:{tmp_path / 'none'}:ro)")]
    done = entrypoint("prepare", EDGE_EMBED_BUNDLE="", EDGE_EMBED_BUNDLE_HINT="install one")
    assert done.returncode == 3
    assert done.stderr.strip() == "edge-embed: error: no bundle at (EDGE_EMBED_BUNDLE is unset): install one"


def test_entrypoint_rejects_a_bad_warm_setting(minilm_bundle):
    done = entrypoint("prepare", EDGE_EMBED_BUNDLE=str(minilm_bundle), EDGE_EMBED_WARM="sometimes")
    assert done.returncode == 2 and "EDGE_EMBED_WARM must be 1, 0 or auto" in done.stderr


def test_entrypoint_builds_engines_first_for_tensorrt_and_stops_if_it_cannot(minilm_bundle):
    """auto + backend tensorrt (the Jetson image's setting) runs `edge-embed warm` before serving;
    with no TensorRT here the forced backend fails, clearly, and the server never starts."""
    port = free_port()
    done = entrypoint("serve", EDGE_EMBED_BUNDLE=str(minilm_bundle), EDGE_EMBED_BACKEND="tensorrt",
                      EDGE_EMBED_WARM="auto", EDGE_EMBED_PORT=str(port), timeout=300)
    assert done.returncode == 4, done.stdout + done.stderr
    (line,) = [line for line in done.stderr.splitlines() if line.startswith("edge-embed: error:")]
    assert "TensorrtExecutionProvider" in line or "tensorrt" in line.lower()
    assert "serving" not in done.stdout + done.stderr


def test_entrypoint_prepare_does_nothing_on_a_cpu_host_by_default(minilm_bundle):
    started = time.monotonic()
    done = entrypoint("prepare", EDGE_EMBED_BUNDLE=str(minilm_bundle))
    assert done.returncode == 0 and done.stdout == "" and done.stderr == ""
    assert time.monotonic() - started < 5  # no model was loaded


def test_entrypoint_warms_then_serves_and_health_answers(minilm_bundle):
    """The Jetson image's sequence on the CPU: warm (EDGE_EMBED_WARM=1), then serve with flags
    passed through, the HEALTHCHECK command, an Embed call, SIGTERM."""
    from edge_embed.client import EmbedClient

    port = free_port()
    env = entrypoint_env(EDGE_EMBED_BUNDLE=str(minilm_bundle), EDGE_EMBED_WARM="1", EDGE_EMBED_BACKEND="cpu",
                         EDGE_EMBED_HOST="127.0.0.1")
    before = entrypoint("health", EDGE_EMBED_HOST="127.0.0.1", EDGE_EMBED_PORT=str(port))
    assert before.returncode != 0  # nothing serves yet

    process = subprocess.Popen(["sh", str(ENTRYPOINT), "--port", str(port)], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, cwd="/")
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            health = entrypoint("health", EDGE_EMBED_HOST="0.0.0.0", EDGE_EMBED_PORT=str(port))
            if health.returncode == 0:
                break
            assert process.poll() is None, process.stdout.read()
            time.sleep(0.5)
        assert health.returncode == 0 and health.stdout.strip() == "SERVING", health.stderr
        with EmbedClient(f"127.0.0.1:{port}", timeout=60) as client:
            assert client.embed(["warmed, then served"]).shape == (1, 384)
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0
        output = process.stdout.read()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(30)
        process.stdout.close()
    lines = output.splitlines()
    warmed = next(i for i, line in enumerate(lines) if line.startswith("warmed "))
    serving = next(i for i, line in enumerate(lines) if "edge_embed.server: serving" in line)
    assert warmed < serving, output  # the warm step finished before the server started
    assert "stopped after" in output


def test_entrypoint_runs_other_commands_as_given():
    done = entrypoint("edge-embed", "--help")
    assert done.returncode == 0 and "serve" in done.stdout
