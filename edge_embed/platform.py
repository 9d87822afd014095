"""Facts about the machine that sizing decisions depend on."""

from __future__ import annotations

import math
import os
from pathlib import Path

__all__ = ["usable_cpu_count", "cgroup_cpu_limit"]


def cgroup_cpu_limit(cpu_max: str | None) -> float | None:
    """CPUs allowed by a cgroup v2 `cpu.max` line ("quota period" or "max period")."""
    if not cpu_max:
        return None
    parts = cpu_max.split()
    if len(parts) != 2 or parts[0] == "max":
        return None
    try:
        quota, period = int(parts[0]), int(parts[1])
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def usable_cpu_count() -> int:
    """CPUs this process may really use: the affinity mask, capped by a cgroup quota.

    Host core counts overstate a CPU-limited container, and oversized thread pools
    there spin and thrash.
    """
    try:
        count = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS has no affinity API
        count = os.cpu_count() or 1
    try:
        limit = cgroup_cpu_limit(Path("/sys/fs/cgroup/cpu.max").read_text())
    except OSError:
        limit = None
    if limit is not None:
        count = min(count, max(1, math.ceil(limit)))
    return max(1, count)
