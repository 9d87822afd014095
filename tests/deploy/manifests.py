"""Reading the fleet manifests in deploy/k8s."""

from __future__ import annotations

import re

import yaml

from .host import REPO

K8S = REPO / "deploy" / "k8s"
_UNITS = {"": 1, "k": 1000, "M": 1000**2, "G": 1000**3, "Ki": 1024, "Mi": 1024**2, "Gi": 1024**3}


def documents() -> list[dict]:
    docs: list[dict] = []
    for path in sorted(K8S.glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def find(kind: str, name: str) -> dict:
    for doc in documents():
        if doc["kind"] == kind and doc["metadata"]["name"] == name:
            return doc
    raise LookupError(f"no {kind} {name} in {K8S}")


def memory_bytes(quantity: str) -> int:
    """A Kubernetes memory quantity ("512Mi", "3Gi", "400M") in bytes."""
    match = re.fullmatch(r"(\d+)([kMG]i?)?", quantity)
    if not match:
        raise ValueError(f"unsupported quantity {quantity!r}")
    return int(match.group(1)) * _UNITS[match.group(2) or ""]


def server_container(daemonset: dict) -> dict:
    return next(c for c in daemonset["spec"]["template"]["spec"]["containers"] if c["name"] == "edge-embed")


def cpu_pod_env() -> dict[str, str]:
    """The environment the CPU DaemonSet gives the server (its token budget among it)."""
    return {e["name"]: e["value"] for e in server_container(find("DaemonSet", "edge-embed-cpu"))["env"]}


def cpu_memory_limit_bytes() -> int:
    return memory_bytes(server_container(find("DaemonSet", "edge-embed-cpu"))["resources"]["limits"]["memory"])
