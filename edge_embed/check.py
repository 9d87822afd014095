"""`edge-embed check`: can these models run on this device, and if not, what would?

A verdict per resource (memory, GPU memory, disk), each from required vs available by
one headroom rule, then the overall verdict (the worst one) and, when it is not
FEASIBLE, the nearest combinations that are: a lower precision, embedding only instead
of embedding + reranker, or a smaller sibling.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import InvalidInputError
from .memory import Footprint
from .platform import GpuInfo, PlatformInfo
from .registry import (
    PRECISIONS,
    PROCESS_BASE_BYTES,
    REGISTRY,
    Estimate,
    Limits,
    ModelSpec,
    bundle_estimate,
    embedding_for,
    estimate,
    find_model,
    siblings,
)

__all__ = [
    "FEASIBLE",
    "TIGHT",
    "NOT_FEASIBLE",
    "HEADROOM",
    "ModelNeed",
    "ResourceVerdict",
    "CheckReport",
    "check",
    "check_specs",
    "default_precision",
    "DEVICE_PROFILES",
    "render_check",
]

_GiB = 1024**3
# Devices a user plans for from a workstation (`check --device NAME`): what each offers, as
# its vendor sells it; free disk is a typical figure, stated.
DEVICE_PROFILES: dict[str, PlatformInfo] = {
    # One A100 40 GB with a cloud instance's host (GCP a2-highgpu-1g: 12 vCPUs, 85 GB).
    "a100-40gb": PlatformInfo(os="linux", arch="x86_64", cpu_model="profile: A100 40 GB host", cpus=12,
                              memory_bytes=85 * 10**9, disk_free_bytes=200 * 10**9,
                              gpus=(GpuInfo("NVIDIA A100-SXM4-40GB", 40 * _GiB),)),
    "mac-16gb": PlatformInfo(os="darwin", arch="arm64", apple_chip="profile: Apple Silicon Mac, 16 GB", cpus=8,
                             memory_bytes=16 * _GiB, disk_free_bytes=100 * 10**9, runtimes={"mlx": "profile"}),
    "jetson-orin-8gb": PlatformInfo(os="linux", arch="aarch64", jetson_model="profile: Jetson Orin Nano 8 GB",
                                    cpus=6, memory_bytes=8 * _GiB, disk_free_bytes=40 * 10**9,
                                    gpus=(GpuInfo("Orin"),)),
}

FEASIBLE, TIGHT, NOT_FEASIBLE, UNKNOWN = "FEASIBLE", "TIGHT", "NOT FEASIBLE", "UNKNOWN"
_ORDER = {FEASIBLE: 0, UNKNOWN: 1, TIGHT: 2, NOT_FEASIBLE: 3}
HEADROOM = 0.8  # FEASIBLE leaves a fifth of the resource to the OS and the apps beside us
RULE = (f"FEASIBLE when required <= {HEADROOM:.0%} of available (a fifth stays free for the OS and other "
        "apps); TIGHT up to 100%; NOT FEASIBLE above")
_GB = 1e9


@dataclass(frozen=True)
class ModelNeed:
    """One model's share: where its figures come from and what it needs."""

    name: str
    precision: str
    source: str  # "registry estimate", "measured on this device", "bundle estimate"
    memory: int
    disk: int  # still to be written to disk here (0 for a bundle already on it)
    gpu_memory: int
    on_disk: int = 0  # bytes a local bundle already occupies
    kind: str = "embedding"
    fidelity: str = ""  # a local bundle's variant: what its export measured against FP32
    image_note: str = ""  # what one image at the model's largest size costs, beside the text figures


@dataclass(frozen=True)
class ResourceVerdict:
    resource: str
    required: int | None
    available: int | None
    verdict: str
    detail: str = ""


@dataclass(frozen=True)
class CheckReport:
    device: str
    precision: str
    models: tuple[ModelNeed, ...]
    resources: tuple[ResourceVerdict, ...]
    rule: str = RULE
    suggestions: tuple[dict[str, Any], ...] = ()

    @property
    def verdict(self) -> str:
        return max((r.verdict for r in self.resources), key=_ORDER.__getitem__, default=UNKNOWN)

    def as_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["verdict"] = self.verdict
        return data


def judge(required: int, available: int | None) -> str:
    if available is None:
        return UNKNOWN
    if required <= HEADROOM * available:
        return FEASIBLE
    return TIGHT if required <= available else NOT_FEASIBLE


def default_precision(info: PlatformInfo) -> str:
    """What edge-embed would run here: FP16 on Apple and NVIDIA GPUs, INT8 on CPUs."""
    return "fp16" if info.is_apple_silicon or info.gpus or info.is_jetson else "int8"


def _gpu_available(info: PlatformInfo) -> tuple[int | None, str] | None:
    """(bytes the GPU may use, why), or None when the GPU shares system memory or is absent."""
    if info.is_apple_silicon and info.memory_bytes:
        share = 2 / 3 if info.memory_bytes <= 36 * 1024**3 else 3 / 4
        return int(info.memory_bytes * share), (
            f"Metal lets the GPU wire about {share:.0%} of unified memory by default "
            "(sysctl iogpu.wired_limit_mb raises it)")
    if info.is_jetson:
        return None
    sized = [g.memory_bytes for g in info.gpus if g.memory_bytes]
    if sized:
        return max(sized), f"{info.gpus[0].name}, the largest GPU"
    return None


def _device(info: PlatformInfo) -> str:
    parts = [info.apple_chip or info.jetson_model or f"{info.os} {info.arch}"]
    if info.memory_bytes:
        kind = "unified memory" if info.is_apple_silicon or info.is_jetson else "memory"
        parts.append(f"{info.memory_bytes / 1024**3:.1f} GiB {kind}")
    if info.disk_free_bytes is not None:
        parts.append(f"{info.disk_free_bytes / _GB:.1f} GB free disk")
    return ", ".join(parts)


def _resources(needs: list[ModelNeed], info: PlatformInfo, export_here: bool) -> tuple[ResourceVerdict, ...]:
    memory = PROCESS_BASE_BYTES + sum(n.memory for n in needs)
    out = [ResourceVerdict("memory", memory, info.memory_bytes, judge(memory, info.memory_bytes),
                           f"process base {PROCESS_BASE_BYTES / 1e6:.0f} MB + the models' weights, runtime "
                           "and activations at the batching limits")]
    gpu = _gpu_available(info)
    if gpu is not None:
        need = sum(n.gpu_memory for n in needs)
        out.append(ResourceVerdict("gpu memory", need, gpu[0], judge(need, gpu[0]), gpu[1]))
    elif info.is_jetson:
        out.append(ResourceVerdict("gpu memory", None, None, FEASIBLE, "shares system memory: counted under memory"))
    disk = sum(n.disk for n in needs)
    detail = ("source checkpoint + FP32 ONNX + the bundle, to export here" if export_here
              else "the bundle download (exported on a workstation)")
    if any(n.on_disk for n in needs):
        detail += f"; {sum(n.on_disk for n in needs) / 1e6:,.0f} MB of bundles already on disk"
    out.append(ResourceVerdict("disk", disk, info.disk_free_bytes, judge(disk, info.disk_free_bytes), detail))
    return tuple(out)


def _need_from_spec(spec: ModelSpec, precision: str, limits: Limits, export_here: bool) -> ModelNeed:
    e: Estimate = estimate(spec, precision, limits)
    return ModelNeed(spec.name, precision, "registry estimate", e.memory, e.export_disk if export_here else e.disk,
                     e.gpu_memory, kind=spec.kind, image_note=image_note(spec))


def image_note(spec: ModelSpec) -> str:
    """One image's vision activations at the model's largest size and at 448 x 448: not in
    the figures above (those are for text), and what decides the image size to pin."""
    tower = spec.vision
    if tower is None:
        return ""
    full, small = tower.activation_bytes(), tower.activation_bytes(448 * 448)
    return (f"one image at {tower.max_pixels:,} pixels ({tower.patches():,} patches) adds ~{full / 1e9:.1f} GB of "
            f"vision activations (~{small / 1e6:,.0f} MB at 448x448): export with --max-pixels to bound it")


def check_specs(specs: list[ModelSpec], precision: str, info: PlatformInfo, limits: Limits = Limits(),
                export_here: bool = False, suggest: bool = True) -> CheckReport:
    """The verdict for registry models (the pure core: tests hand it a PlatformInfo)."""
    needs = [_need_from_spec(s, precision, limits, export_here) for s in specs]
    report = CheckReport(_device(info), precision, tuple(needs), _resources(needs, info, export_here))
    if suggest and report.verdict != FEASIBLE:
        report = dataclasses.replace(report, suggestions=tuple(_suggest(specs, precision, info, limits, export_here)))
    return report


def _alternatives(specs: list[ModelSpec], precision: str) -> list[tuple[str, list[ModelSpec], str]]:
    lower = list(PRECISIONS[PRECISIONS.index(precision) + 1:])
    options: list[tuple[str, list[ModelSpec], str]] = []
    for p in lower:
        options.append((f"the same at {p}", specs, p))
    rerankers = [s for s in specs if s.kind == "reranker"]
    if rerankers and len(specs) > 1:
        alone = [s for s in specs if s.kind != "reranker"]
        for p in [precision, *lower]:
            options.append((f"embedding only ({', '.join(s.name for s in alone)}), no reranker, at {p}", alone, p))
    elif rerankers:
        for r in rerankers:
            embedding = embedding_for(r)
            if embedding is not None:
                options.append((f"embedding only: {embedding.name} instead of the reranker", [embedding], precision))
    dropped = bool(rerankers) and len(specs) > 1
    base = [s for s in specs if s.kind != "reranker"] if dropped else specs
    for i, spec in enumerate(base):
        for smaller in siblings(spec):
            swapped = base[:i] + [smaller] + base[i + 1:]
            for p in [precision, *lower]:
                prefix = "embedding only, with a smaller sibling" if dropped else "a smaller sibling"
                options.append((f"{prefix}: {smaller.name} instead of {spec.name}, at {p}", swapped, p))
    return options


def _suggest(specs, precision, info, limits, export_here) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    for label, option, p in _alternatives(specs, precision):
        report = check_specs(option, p, info, limits, export_here, suggest=False)
        if report.verdict == FEASIBLE:
            found.append({"change": label, "models": [s.name for s in option], "precision": p,
                          "resources": {r.resource: r.required for r in report.resources}})
        if len(found) == 3:
            break
    if not found:
        found.append({"change": "nothing nearby fits; the smallest known models are "
                                "all-minilm-l6-v2 and bge-small-en-v1.5", "models": [], "precision": precision,
                      "resources": {}})
    return found


def _bundle_need(path: Path, precision: str, limits: Limits, measure: bool, backend: str) -> ModelNeed:
    """A local bundle's figures: measured on this device (stored, or measured now) or estimated."""
    from .bundle import load_bundle
    from .memory import measure_footprint, stored_footprint
    from .parity import fidelity_summary

    bundle = load_bundle(path)
    m = bundle.manifest
    kind = "reranker" if m.task == "rerank" else "embedding"
    chosen = precision if precision in m.variants else bundle_default_precision(m.variants)
    variant = m.variants[chosen]
    on_disk = sum(f.stat().st_size for f in bundle.path.iterdir() if f.is_file())
    footprint: Footprint | None = stored_footprint(variant.sha256, None, limits.max_batch_tokens)
    if (footprint is None or footprint.batch_peak is None) and measure:
        footprint = measure_footprint(bundle.path, chosen, backend, max_batch_tokens=limits.max_batch_tokens)
    memory, activations = bundle_estimate(m, bundle.path, chosen, limits.max_batch_tokens)
    fidelity = fidelity_summary(variant.parity)
    if footprint is not None:
        total = footprint.total(activations)
        return ModelNeed(m.model_id, chosen, f"measured on this device ({footprint.execution_provider})",
                         total, 0, total, on_disk=on_disk, kind=kind, fidelity=fidelity)
    return ModelNeed(m.model_id, chosen, "bundle estimate", memory, 0, memory, on_disk=on_disk, kind=kind,
                     fidelity=fidelity)


def bundle_default_precision(variants) -> str:
    """The variant `auto` runs on a CPU (the ONNX backend's own rule), else the first one."""
    from .backends.onnx import auto_precision

    return auto_precision(variants) or next(iter(variants))


def check(
    targets: list[str],
    precision: str | None = None,
    *,
    info: PlatformInfo | None = None,
    limits: Limits = Limits(),
    export_here: bool = False,
    measure: bool = True,
    backend: str = "auto",
    device: str | None = None,
) -> CheckReport:
    """Verdicts for registry names, Hugging Face ids or bundle directories on this device, or
    on one of DEVICE_PROFILES (`device`), where bundles are estimated, not measured."""
    from .default_model import cache_dir
    from .platform import snapshot_platform

    if not targets:
        raise InvalidInputError("name at least one model or bundle to check")
    if device is not None:
        if device not in DEVICE_PROFILES:
            raise InvalidInputError(f"device {device!r} is not one of {', '.join(DEVICE_PROFILES)}")
        info, measure = DEVICE_PROFILES[device], False
    if info is None:
        disk = cache_dir()
        while not disk.exists() and disk != disk.parent:
            disk = disk.parent
        info = snapshot_platform(disk_path=disk)
    wanted = precision or default_precision(info)
    bundles = [Path(t) for t in targets if Path(t).is_dir()]
    if not bundles:
        return check_specs([find_model(t) for t in targets], wanted, info, limits, export_here)
    needs = []
    for target in targets:
        path = Path(target)
        if path.is_dir():
            need = _bundle_need(path, wanted, limits, measure, backend)
        else:
            need = _need_from_spec(find_model(target), wanted, limits, export_here)
        needs.append(need)
    report = CheckReport(_device(info), wanted, tuple(needs), _resources(needs, info, export_here))
    embedders = [n for n in needs if n.kind != "reranker"]
    if report.verdict != FEASIBLE and embedders and len(embedders) < len(needs):
        alone = _resources(embedders, info, export_here)
        verdict = max((r.verdict for r in alone), key=_ORDER.__getitem__, default=UNKNOWN)
        if verdict == FEASIBLE:
            report = dataclasses.replace(report, suggestions=({
                "change": f"embedding only ({', '.join(n.name for n in embedders)}), no reranker",
                "models": [n.name for n in embedders], "precision": wanted,
                "resources": {r.resource: r.required for r in alone}},))
    return report


def _size(resource: str, value: int | None, missing: str) -> str:
    """Memory in GiB (as devices are sold), disk in GB (as file systems report free space)."""
    if value is None:
        return missing
    return f"{value / _GB:.1f} GB" if resource == "disk" else f"{value / 1024**3:.1f} GiB"


def render_check(report: CheckReport) -> str:
    """The report as a table a newcomer can read top to bottom."""
    names = " + ".join(n.name for n in report.models)
    lines = [f"{names} on {report.device}", ""]
    lines.append(f"  {'model':<40} {'kind':<16} {'precision':<9} {'memory MB':>10} {'disk MB':>9}  figures")
    for n in report.models:
        lines.append(f"  {n.name[:40]:<40} {n.kind:<16} {n.precision:<9} {n.memory / 1e6:>10,.0f} "
                     f"{n.disk / 1e6:>9,.0f}  {n.source}")
    for n in report.models:
        if n.fidelity:
            lines.append(f"  {n.name} {n.precision} against FP32 at export: {n.fidelity}")
    lines.append("")
    lines.append(f"  {'resource':<11} {'required':>10} {'available':>10}  verdict")
    for r in report.resources:
        required, available = _size(r.resource, r.required, "-"), _size(r.resource, r.available, "unknown")
        lines.append(f"  {r.resource:<11} {required:>10} {available:>10}  {r.verdict:<12} {r.detail}")
    for n in report.models:
        if n.image_note:
            lines.append(f"  {n.name}: {n.image_note}")
    lines.append(f"  rule: {report.rule}")
    lines.append("")
    lines.append(f"Verdict: {report.verdict}")
    if report.suggestions:
        lines.append("What would fit:")
        for s in report.suggestions:
            figures = ", ".join(f"{k} {_size(k, v, '-')}" for k, v in s["resources"].items() if v is not None)
            lines.append(f"  - {s['change']}" + (f" ({figures})" if figures else ""))
    return "\n".join(lines)


def registry_rows(limits: Limits = Limits()) -> list[dict[str, Any]]:
    """Every known model with its estimates per precision, for `edge-embed models`."""
    rows = []
    for spec in REGISTRY.values():
        estimates = {p: estimate(spec, p, limits) for p in PRECISIONS}
        rows.append({
            "name": spec.name, "hf_id": spec.hf_id, "kind": spec.kind, "modality": spec.modality,
            "params": spec.params, "dim": spec.dim, "matryoshka": spec.matryoshka, "max_context": spec.max_context,
            "pooling": spec.pooling, "license": spec.license,
            "memory_bytes": {p: PROCESS_BASE_BYTES + e.memory for p, e in estimates.items()},
            "weight_bytes": {p: e.weights for p, e in estimates.items()},
            "disk_bytes": {p: e.disk for p, e in estimates.items()},
            "planning_mb": spec.planning_mb, "planning_precision": spec.planning_precision, "note": spec.note,
        })
    return rows
