"""Measured memory: what a bundle really costs on this device, and where that is kept.

Estimates (edge_embed.registry) plan; measurements decide. A `Footprint` is measured in
a fresh child process (`python -m edge_embed.memory`), so nothing else in the caller's
heap blurs it:

    resident   RSS growth from before the load to after it (weights, session, the boot
               parity batch), with the runtime's libraries already imported
    load_peak  the high-water mark of RSS during the load, above the same baseline
    batch_peak the high-water mark during one batch that fills the token budget with the
               longest texts the bundle takes, above the resident level

Footprints are stored under $EDGE_EMBED_CACHE/footprints, keyed by the variant's
sha256, the execution provider and the limits, so a bundle directory can stay read-only.
Peaks come from Linux's VmHWM, reset through /proc/self/clear_refs; where that is not
available (macOS) nothing is measured and callers use the estimate.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import BundleError, EdgeEmbedError

__all__ = [
    "Footprint",
    "rss_bytes",
    "peak_rss_bytes",
    "reset_peak_rss",
    "release_free_memory",
    "measure_footprint",
    "stored_footprint",
    "store_footprint",
    "footprint_key",
    "import_runtimes",
]

_STATUS = Path("/proc/self/status")


def _status_field(name: str, pid: int | str = "self") -> int | None:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1]) * 1024
    return None


def rss_bytes(pid: int | str = "self") -> int | None:
    """Resident set size now (Linux), None where /proc is missing."""
    return _status_field("VmRSS", pid)


def peak_rss_bytes(pid: int | str = "self") -> int | None:
    """High-water mark of the resident set since start or the last reset."""
    return _status_field("VmHWM", pid)


def reset_peak_rss() -> bool:
    """Restart the high-water mark at the current RSS (Linux >= 4.0); False if refused."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def release_free_memory() -> None:
    """Hand freed heap pages back to the OS, so an evicted model's memory really leaves RSS."""
    name = ctypes.util.find_library("c")
    if not name or sys.platform != "linux":
        return
    try:
        ctypes.CDLL(name).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


@dataclass(frozen=True)
class Footprint:
    """Measured memory of one bundle variant on one execution provider; bytes."""

    model_id: str
    precision: str
    execution_provider: str
    variant_sha256: str
    max_batch_tokens: int
    resident: int
    load_peak: int
    batch_peak: int | None  # None: only the load was measured (a server load, no full batch)
    batch_shape: tuple[int, int] | None
    measured_at: str

    def total(self, activation_estimate: int) -> int:
        """What admitting this model costs: the larger of the load spike and resident + a
        batch at the budget (measured, else the estimate)."""
        batch = self.batch_peak if self.batch_peak is not None else activation_estimate
        return max(self.load_peak, self.resident + batch)


def footprint_key(variant_sha256: str, execution_provider: str, max_batch_tokens: int) -> str:
    return f"{variant_sha256[:16]}-{execution_provider}-{max_batch_tokens}"


def _store_dir() -> Path:
    from .default_model import cache_dir

    return cache_dir() / "footprints"


def stored_footprint(variant_sha256: str, execution_provider: str | None, max_batch_tokens: int) -> Footprint | None:
    """The stored measurement, or None; execution_provider None takes any provider's."""
    pattern = footprint_key(variant_sha256, execution_provider or "*", max_batch_tokens) + ".json"
    for path in sorted(_store_dir().glob(pattern)):
        try:
            data = json.loads(path.read_text())
            if data.get("batch_shape") is not None:
                data["batch_shape"] = tuple(data["batch_shape"])
            return Footprint(**data)
        except (OSError, ValueError, TypeError, KeyError):
            continue
    return None


def store_footprint(footprint: Footprint) -> Footprint:
    """Keep the larger figures of this and any earlier measurement (a load that comes
    first in a process touches library pages a later one finds resident)."""
    old = stored_footprint(footprint.variant_sha256, footprint.execution_provider, footprint.max_batch_tokens)
    if old is not None:
        footprint = dataclasses.replace(
            footprint,
            resident=max(old.resident, footprint.resident),
            load_peak=max(old.load_peak, footprint.load_peak),
            batch_peak=max((p for p in (old.batch_peak, footprint.batch_peak) if p is not None), default=None),
            batch_shape=footprint.batch_shape or old.batch_shape,
        )
    folder = _store_dir()
    folder.mkdir(parents=True, exist_ok=True)
    key = footprint_key(footprint.variant_sha256, footprint.execution_provider, footprint.max_batch_tokens)
    tmp = folder / f".{key}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(dataclasses.asdict(footprint), indent=2) + "\n")
    tmp.replace(folder / f"{key}.json")
    return footprint


def measure_footprint(
    bundle: str | Path,
    precision: str = "auto",
    backend: str = "auto",
    *,
    max_batch_tokens: int = 4096,
    timeout_s: float = 900.0,
    store: bool = True,
) -> Footprint:
    """Load `bundle` in a child process, run one batch at the token budget, and return
    (and by default store) what it cost."""
    argv = [sys.executable, "-m", "edge_embed.memory", str(Path(bundle).resolve()), precision, backend, str(max_batch_tokens)]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, env=env, cwd="/")
    except subprocess.TimeoutExpired:
        raise EdgeEmbedError(f"measuring {bundle} took over {timeout_s:.0f} s") from None
    if done.returncode != 0:
        lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
        reason = lines[-1] if lines else f"exit code {done.returncode}"
        raise BundleError(f"could not measure {bundle}: {reason}")
    data = json.loads(done.stdout.strip().splitlines()[-1])
    data["batch_shape"] = tuple(data["batch_shape"])
    footprint = Footprint(**data)
    return store_footprint(footprint) if store else footprint


def import_runtimes(variants) -> None:
    """Import the runtimes these variants need, so their libraries count as process base
    rather than as the first model's cost."""
    import importlib

    from .manifest import variant_format

    modules = {"onnx": "onnxruntime", "mlx": "mlx.core"}
    for fmt in {variant_format(name) for name in variants}:
        try:
            importlib.import_module(modules[fmt])
        except ImportError:
            pass  # the load that follows says why it cannot run


def _measure_here(bundle: str, precision: str, backend: str, max_batch_tokens: int) -> Footprint:
    import numpy as np

    from . import load, load_bundle
    from .batching import BatchLimits

    opened = load_bundle(bundle)
    import_runtimes(opened.manifest.variants)
    if not reset_peak_rss():
        raise EdgeEmbedError("this system cannot reset the RSS high-water mark (/proc/self/clear_refs)")
    before = rss_bytes()
    provider = load(opened, precision=precision, backend=backend,
                    limits=BatchLimits(max_batch_tokens=max_batch_tokens))
    resident = rss_bytes() - before
    load_peak = peak_rss_bytes() - before
    m = provider.manifest
    length = min(m.max_length, max_batch_tokens)
    rows = min(max(1, max_batch_tokens // length), provider.limits.max_batch_size)
    special = {m.pad_token_id, m.eos_token_id}
    token = next(i for i in range(100, 10_000) if i not in special)
    seqs = [np.full(length, token, dtype=np.int64) for _ in range(rows)]
    settled = rss_bytes()
    reset_peak_rss()
    provider.embed_token_ids(seqs)
    batch_peak = peak_rss_bytes() - settled
    info = provider.info
    variant = m.variants[info.precision]
    provider.close()
    return Footprint(
        model_id=m.model_id, precision=info.precision, execution_provider=info.execution_providers[0],
        variant_sha256=variant.sha256, max_batch_tokens=max_batch_tokens, resident=resident,
        load_peak=load_peak, batch_peak=batch_peak, batch_shape=(rows, length),
        measured_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )


if __name__ == "__main__":
    path, precision_arg, backend_arg, tokens = sys.argv[1:5]
    try:
        result = _measure_here(path, precision_arg, backend_arg, int(tokens))
    except EdgeEmbedError as exc:
        print(exc, file=sys.stderr)
        sys.exit(exc.exit_code)
    print(json.dumps(dataclasses.asdict(result)))
