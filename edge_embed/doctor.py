"""`edge-embed doctor`: what this machine is, what would run on it, and why."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from .check import HEADROOM
from .errors import EdgeEmbedError
from .memory import stored_footprint
from .manifest import variant_format
from .platform import choose_backends, snapshot_platform
from .registry import PROCESS_BASE_BYTES, bundle_estimate

__all__ = ["diagnose", "render"]

_GIB = 1024**3


def diagnose(bundle_path: Path | None, backend: str = "auto", max_batch_tokens: int = 4096) -> dict[str, Any]:
    """A report of detection, candidates, the variant that would run, parity and memory fit."""
    from . import load, load_bundle
    from .default_model import default_bundle_path

    info = snapshot_platform()
    report: dict[str, Any] = {"platform": _platform_dict(info)}
    try:
        candidates = choose_backends(info, backend)
        report["candidates"] = [dataclasses.asdict(c) for c in candidates]
    except EdgeEmbedError as exc:
        report["candidates"] = []
        report["error"] = str(exc)
        return report
    path = bundle_path or default_bundle_path()
    report["bundle"] = {"path": str(path)}
    try:
        bundle = load_bundle(path)
    except EdgeEmbedError as exc:
        report["bundle"]["error"] = str(exc)
        return report
    m = bundle.manifest
    report["bundle"].update({
        "model": m.model_id,
        "task": m.task,
        "variants": {name: {"format": variant_format(name), "bytes": v.bytes, "export": _fidelity(v.parity),
                            "speed": v.recipe.get("speed")}
                     for name, v in m.variants.items()},
    })
    try:
        provider = load(bundle, backend=backend, enforce_parity=False, platform=info)
    except EdgeEmbedError as exc:
        report["would_run"] = {"error": str(exc)}
        return report
    run = provider.info
    needed, figure = _memory_need(bundle, run, max_batch_tokens)
    available = int((info.memory_bytes or 0) * HEADROOM)
    report["would_run"] = {
        "backend": run.backend,
        "execution_providers": list(run.execution_providers),
        "precision": run.precision,
        "fallback": run.fallback,
        "parity": dataclasses.asdict(run.parity) if run.parity else None,
        "parity_summary": _fidelity(run.parity) if run.parity else None,
        "parity_ok": run.parity is not None and provider.parity_passes(),
        "passed_over": _passed_over(m.variants, run, info),
        "memory": {"estimated_bytes": needed, "figure": figure, "usable_bytes": available,
                   "fits": needed <= available,
                   "rule": f"process base + the model <= {HEADROOM:.0%} of memory (as `edge-embed check`)"},
    }
    provider.close()
    return report


def _passed_over(variants, run, info) -> dict[str, str]:
    """Quantized variants `auto` skipped on this CPU because the export measured them slower than FP32."""
    from .backends.onnx import slower_here
    from .platform import int8_kernel_class

    if run.backend != "onnx" or run.execution_providers[0] != "CPUExecutionProvider" or "fp32" not in variants:
        return {}
    kernels = int8_kernel_class(info.cpu_flags, info.is_arm)
    skipped = {}
    for name, variant in variants.items():
        if name != run.precision and slower_here(variant, kernels):
            ratios = ", ".join(f"{shape} {ratio:.2f}x" for shape, ratio in variant.recipe["speed"]["vs_fp32"].items())
            skipped[name] = (f"measured slower than fp32 at export on a CPU with {kernels} int8 kernels "
                             f"({ratios}): fp32 is faster here")
    return skipped


def _memory_need(bundle, run, max_batch_tokens: int) -> tuple[int, str]:
    """The process's need with this model: measured on this device when stored, else estimated."""
    variant = bundle.manifest.variants[run.precision]
    memory, activations = bundle_estimate(bundle.manifest, bundle.path, run.precision, max_batch_tokens)
    stored = stored_footprint(variant.sha256, run.execution_providers[0], max_batch_tokens)
    if stored is not None:
        return PROCESS_BASE_BYTES + stored.total(activations), "measured on this device"
    return PROCESS_BASE_BYTES + memory, "estimate (`edge-embed check BUNDLE` measures it)"


def _platform_dict(info) -> dict[str, Any]:
    data = {f.name: getattr(info, f.name) for f in dataclasses.fields(info)}
    data["cpu_flags"] = sorted(info.cpu_flags)
    data["runtimes"] = dict(info.runtimes)
    data["gpus"] = [dataclasses.asdict(g) for g in info.gpus]
    data["ort_providers"] = list(info.ort_providers)
    data["cpu_name"] = info.cpu_name
    data["is_jetson"], data["is_apple_silicon"] = info.is_jetson, info.is_apple_silicon
    return data


def render(report: dict[str, Any]) -> str:
    """The report as text a newcomer can read top to bottom."""
    p = report["platform"]
    lines = ["Platform"]
    cpu = p.get("cpu_name") or p.get("cpu_model") or "unknown CPU"
    lines.append(f"  {p['os']} {p['arch']}, {cpu}, {p['cpus']} usable CPUs, "
                 f"{(p.get('memory_bytes') or 0) / _GIB:.1f} GiB memory, "
                 f"{(p.get('disk_free_bytes') or 0) / _GIB:.1f} GiB free disk")
    if p.get("jetson_model"):
        lines.append(f"  Jetson: {p['jetson_model']} (L4T {p.get('l4t_release')})")
    if p.get("apple_chip"):
        lines.append(f"  Apple chip: {p['apple_chip']}")
    for gpu in p.get("gpus") or ():
        memory = f"{gpu['memory_bytes'] / _GIB:.1f} GiB" if gpu.get("memory_bytes") else "shared memory"
        lines.append(f"  GPU: {gpu['name']} ({memory})")
    runtimes = ", ".join(f"{k} {v}" for k, v in p["runtimes"].items()) or "none"
    lines.append(f"  runtimes: {runtimes}; ONNX Runtime providers: {', '.join(p['ort_providers']) or 'none'}")
    lines.append("Backend candidates (in order)")
    for c in report["candidates"]:
        mark = "use " if c["chosen"] else "skip"
        providers = f" [{', '.join(c['providers'])}]" if c["providers"] else ""
        lines.append(f"  [{mark}] {c['backend']}{providers} {c['precision']}: {c['reason']}")
    if "error" in report:
        lines.append(f"Error: {report['error']}")
    bundle = report.get("bundle")
    if bundle:
        lines.append(f"Bundle {bundle['path']}")
        if "error" in bundle:
            lines.append(f"  cannot open: {bundle['error']}")
        for name, v in bundle.get("variants", {}).items():
            lines.append(f"  {name} ({v['format']}): {v['bytes'] / 1e6:.1f} MB, export {v['export']}")
            if v.get("speed"):
                ratios = ", ".join(f"{shape} {ratio:.2f}x" for shape, ratio in v["speed"]["vs_fp32"].items())
                lines.append(f"    speed against fp32 at export: {ratios} ({v['speed']['cpu']}, "
                             f"{v['speed']['int8_kernels']} int8 kernels)")
    run = report.get("would_run")
    if run:
        lines.append("Would run")
        if "error" in run:
            lines.append(f"  nothing: {run['error']}")
        else:
            lines.append(f"  {run['backend']} on {run['execution_providers'][0]}, {run['precision']}")
            if run["fallback"]:
                lines.append(f"  fallback: {run['fallback']}")
            for name, why in run.get("passed_over", {}).items():
                lines.append(f"  not {name}: {why}")
            if run["parity"]:
                verdict = "passes" if run["parity_ok"] else "FAILS its gate"
                lines.append(f"  parity here: {run['parity_summary']} over {run['parity']['probes']} golden "
                             f"{'pairs' if 'score_diff_max' in run['parity'] else 'texts'}, {verdict}")
            mem = run["memory"]
            fits = "fits" if mem["fits"] else "does NOT fit"
            lines.append(f"  memory: ~{mem['estimated_bytes'] / 1e6:.0f} MB needed ({mem['figure']}), "
                         f"{mem['usable_bytes'] / 1e6:.0f} MB usable ({mem['rule']}): {fits}")
    return "\n".join(lines)


def _fidelity(parity) -> str:
    from .parity import fidelity_summary

    return fidelity_summary(parity)
