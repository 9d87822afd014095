"""`edge-embed bench`: a bundle's variants measured on this device, as a user decides between
them: warmup steps, measured steps, items/s, latency per batch (mean, std) and peak memory.

Each variant runs in a process of its own, one after another, so its peak RSS is its own
(the high-water mark of a process that loaded nothing else). The inputs are the bundle's
own golden probes (texts, images, or a reranker's query/document pairs): real inputs the
export checked, the same on every device, so reports from two devices compare.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from queue import Empty
from typing import Any

from .bundle import Bundle, load_bundle
from .errors import EdgeEmbedError, InvalidInputError
from .manifest import variant_format

__all__ = ["BenchSettings", "bench_bundle", "format_table", "device_memory_bytes"]

_GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")


@dataclasses.dataclass(frozen=True)
class BenchSettings:
    warmup: int = 3
    steps: int = 10
    text_samples: int = 32
    batch_size: int = 8
    images: int = 0
    backend: str = "auto"
    threads: int | None = None

    def __post_init__(self) -> None:
        for name in ("steps", "text_samples", "batch_size"):
            if getattr(self, name) < 1:
                raise InvalidInputError(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        for name in ("warmup", "images"):
            if getattr(self, name) < 0:
                raise InvalidInputError(f"{name} must not be negative, got {getattr(self, name)}")


def _workloads(bundle: Bundle, settings: BenchSettings) -> list[tuple[str, list[Any]]]:
    """(kind, samples): texts (or a reranker's pairs), and images when asked for."""
    manifest = bundle.manifest
    if manifest.task == "multivector":
        # Queries as a retriever sends them, and pages: the golden images (--images of them,
        # default as many as the text samples), each a matrix of token vectors.
        kinds, parts, _ = bundle.golden_multivector()
        queries = [parts[i] for i, k in enumerate(kinds) if k == "query"]
        pages = [parts[i] for i, k in enumerate(kinds) if k == "document" and not any(isinstance(p, str)
                                                                                        for p in parts[i])]
        count = settings.images or settings.text_samples
        return [("queries", [queries[i % len(queries)] for i in range(settings.text_samples)]),
                ("pages", [pages[i % len(pages)] for i in range(count)])]
    if manifest.task == "rerank":
        queries, documents, groups, _ = bundle.golden_pairs()
        pairs = [(int(groups[i]), queries[i], documents[i]) for i in range(len(queries))]
        return [("pairs", [pairs[i % len(pairs)] for i in range(settings.text_samples)])]
    texts, _ = bundle.golden()
    out: list[tuple[str, list[Any]]] = [("texts", [texts[i % len(texts)] for i in range(settings.text_samples)])]
    if settings.images:
        if "image" not in manifest.modalities:
            raise InvalidInputError(f"{manifest.model_id} reads text only: --images needs a bundle that reads images")
        _, blobs, _ = bundle.golden_images()
        out.append(("images", [blobs[i % len(blobs)] for i in range(settings.images)]))
    return out


def _runner(provider: Any, kind: str) -> Callable[[list[Any]], None]:
    """One batch end to end, as an application calls it: images decoded and preprocessed,
    a reranker's documents scored against their query."""
    from .images import Image

    if kind == "images":
        return lambda batch: provider.embed([Image.open(blob, field="image") for blob in batch])
    if kind in ("queries", "pages"):
        def embed_multi(batch: list[list[Any]]) -> None:
            items = [[p if isinstance(p, str) else Image.open(p.data, field="image") for p in parts] for parts in batch]
            provider.embed_multi([x[0] if len(x) == 1 else x for x in items],
                                 kind="query" if kind == "queries" else "document")
        return embed_multi
    if kind == "pairs":
        def opened(item: Any) -> Any:
            """A golden text as it is; a vision-language reranker's parts with their images read."""
            if isinstance(item, str):
                return item
            return [p if isinstance(p, str) else Image.open(p.data, field="image") for p in item]

        def rerank(batch: list[tuple[int, Any, Any]]) -> None:
            for group in dict.fromkeys(g for g, _, _ in batch):
                rows = [(q, d) for g, q, d in batch if g == group]
                provider.rerank(opened(rows[0][0]), [opened(d) for _, d in rows])
        return rerank
    return lambda batch: provider.embed(batch)


def _peak_rss_bytes() -> int:
    """This process's own high-water mark: Linux's VmHWM belongs to its address space, where
    ru_maxrss keeps the parent's peak across fork and exec (a bench run after an export in
    the same process would report the export's peak for every variant)."""
    from .memory import peak_rss_bytes

    peak = peak_rss_bytes()
    if peak is not None:
        return peak
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # macOS reports bytes, Linux KiB


def device_memory_bytes(pid: int, nvidia_smi_output: str | None = None) -> int | None:
    """GPU memory held by process `pid` as nvidia-smi reports it (ONNX Runtime's CUDA arena
    keeps what it allocated, so at the end of a run this is its peak); None without a GPU."""
    if nvidia_smi_output is None:
        try:
            nvidia_smi_output = subprocess.run(
                ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                capture_output=True, text=True, timeout=10, check=True).stdout
        except (OSError, subprocess.SubprocessError):
            return None
    for line in nvidia_smi_output.splitlines():
        fields = [f.strip() for f in line.split(",")]
        if len(fields) == 2 and fields[0] == str(pid) and fields[1].isdigit():
            return int(fields[1]) * 1024 * 1024  # MiB
    return None


def _measure(path: str, precision: str, backend: str, settings: BenchSettings, queue: Any) -> None:
    """In the variant's own process: load (with the boot parity check), then each workload."""
    import os

    from . import load

    try:
        bundle = load_bundle(path)
        started = time.perf_counter()
        provider = load(bundle, precision=precision, backend=backend, threads=settings.threads)
        row: dict[str, Any] = {"load_s": round(time.perf_counter() - started, 3),
                               "backend": provider.info.backend,
                               "execution_providers": list(provider.info.execution_providers),
                               "threads": provider.info.threads,
                               "parity_cos_min": getattr(provider.info.parity, "cos_min", None),
                               "parity": dataclasses.asdict(provider.info.parity) if provider.info.parity else None,
                               "workloads": []}
        for kind, samples in _workloads(bundle, settings):
            run = _runner(provider, kind)
            batches = [samples[i:i + settings.batch_size] for i in range(0, len(samples), settings.batch_size)]
            for step in range(settings.warmup):
                run(batches[step % len(batches)])
            latencies, items = [], 0
            for step in range(settings.steps):
                batch = batches[step % len(batches)]
                begun = time.perf_counter()
                run(batch)
                latencies.append(time.perf_counter() - begun)
                items += len(batch)
            row["workloads"].append({
                "kind": kind, "items": items, "batch_size": settings.batch_size,
                "items_per_s": round(items / sum(latencies), 3),
                "batch_latency_ms_mean": round(1000 * statistics.fmean(latencies), 3),
                "batch_latency_ms_std": round(1000 * statistics.pstdev(latencies), 3),
            })
        gpu = any(p in _GPU_PROVIDERS for p in provider.info.execution_providers)
        provider.close()
        row["peak_rss_bytes"] = _peak_rss_bytes()
        row["peak_device_bytes"] = device_memory_bytes(os.getpid()) if gpu else None
        queue.put(row)
    except EdgeEmbedError as exc:
        queue.put({"error": str(exc)})
    except Exception as exc:  # noqa: BLE001 - the report names it; the other variants still run
        queue.put({"error": f"{type(exc).__name__}: {exc}"})


def bench_bundle(path: str | Path, precisions: Sequence[str] | None, settings: BenchSettings,
                 progress: Callable[[str], None] = lambda line: None) -> dict[str, Any]:
    """The report: one row per variant (all of the bundle's when `precisions` is None), each
    measured in its own process; a variant that cannot run here gets its error, not a figure."""
    from .platform import snapshot_platform

    bundle = load_bundle(path)
    manifest = bundle.manifest
    wanted = list(precisions) if precisions else list(manifest.variants)
    unknown = [p for p in wanted if p not in manifest.variants]
    if unknown:
        raise InvalidInputError(f"{manifest.model_id} has no {', '.join(unknown)} variant; it has "
                                f"{', '.join(manifest.variants)}")
    workloads = _workloads(bundle, settings)  # bad settings fail here, before any process starts
    info = snapshot_platform()
    context = multiprocessing.get_context("spawn")  # nothing of this process's heap in the measure
    rows = []
    for precision in wanted:
        backend = "mlx" if variant_format(precision) == "mlx" else settings.backend
        shown = ", ".join(f"{len(s)} {k}" for k, s in workloads)
        progress(f"{precision}: loading, then {settings.warmup} warmup and {settings.steps} measured batches of "
                 f"{settings.batch_size} ({shown})")
        queue = context.Queue()
        child = context.Process(target=_measure, args=(str(bundle.path), precision, backend, settings, queue))
        child.start()
        row = None
        while row is None and (child.is_alive() or not queue.empty()):
            try:
                row = queue.get(timeout=1)
            except Empty:  # keep waiting while the child lives
                continue
        child.join()
        if row is None:
            row = {"error": f"the process died (exit code {child.exitcode}) before it reported"}
        rows.append({"variant": precision, **row})
        progress(f"{precision}: {row['error']}" if "error" in row else
                 f"{precision}: " + ", ".join(f"{w['kind']} {w['items_per_s']:.1f} items/s" for w in row["workloads"])
                 + f", peak RSS {row['peak_rss_bytes'] / 2**20:.0f} MiB")
    return {"bundle": str(bundle.path), "model_id": manifest.model_id, "task": manifest.task,
            "device": device_facts(info), "settings": dataclasses.asdict(settings), "rows": rows}


def device_facts(info: Any = None) -> dict[str, Any]:
    """The machine a figure was measured on: OS, CPU, its count and the ISA extensions its
    kernels choose by (vector, matrix and dot-product ones)."""
    if info is None:
        from .platform import snapshot_platform

        info = snapshot_platform()
    return {"os": info.os, "arch": info.arch, "cpu": info.cpu_model, "cpus": info.cpus,
            "isa": sorted(f for f in info.cpu_flags if f.startswith(("avx", "amx", "asimd", "sve", "neon"))
                          or f in ("dotprod", "i8mm"))}


def format_table(report: dict[str, Any]) -> str:
    """The console table: one line per variant and workload."""
    head = ("variant", "backend", "workload", "items/s", "batch ms (mean ± std)", "peak RSS", "load s")
    lines = []
    for row in report["rows"]:
        if "error" in row:
            lines.append((row["variant"], "-", "-", "-", row["error"][:60], "-", "-"))
            continue
        for w in row["workloads"]:
            lines.append((row["variant"], ",".join(row["execution_providers"]) or row["backend"], w["kind"],
                          f"{w['items_per_s']:.1f}", f"{w['batch_latency_ms_mean']:.1f} ± {w['batch_latency_ms_std']:.1f}",
                          f"{row['peak_rss_bytes'] / 2**20:.0f} MiB", f"{row['load_s']:.1f}"))
    widths = [max(len(str(r[i])) for r in [head, *lines]) for i in range(len(head))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join(fmt.format(*r) for r in [head, *lines])
