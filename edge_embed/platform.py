"""Facts about the machine that sizing and backend decisions depend on.

Three layers, kept apart so each can be tested alone: parsers that turn captured text
(/proc/cpuinfo, nvidia-smi output, ...) into values; `snapshot_platform`, the one place
that reads a real machine into a `PlatformInfo`; and `choose_backends`, a pure function
from that snapshot to ordered backend candidates, each with the reason it was chosen or
skipped.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import math
import os
import platform as _stdlib_platform
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from .errors import BackendUnavailableError

__all__ = [
    "usable_cpu_count",
    "cgroup_cpu_limit",
    "GpuInfo",
    "PlatformInfo",
    "BackendCandidate",
    "BACKEND_PREFERENCES",
    "parse_cpuinfo",
    "parse_meminfo",
    "parse_nv_tegra_release",
    "parse_nvidia_smi",
    "parse_sysctl",
    "snapshot_platform",
    "choose_backends",
]

log = logging.getLogger(__name__)

TENSORRT_EP = "TensorrtExecutionProvider"
CUDA_EP = "CUDAExecutionProvider"
ACL_EP = "ACLExecutionProvider"
CPU_EP = "CPUExecutionProvider"

BACKEND_PREFERENCES = ("auto", "onnx", "mlx", "cpu", "cuda", "tensorrt", "acl")

# (implementer, part) from the ARM MIDR register, as /proc/cpuinfo prints them.
_ARM_CORES: dict[tuple[str, str], str] = {
    ("0x41", "0xd03"): "Cortex-A53",
    ("0x41", "0xd04"): "Cortex-A35",
    ("0x41", "0xd05"): "Cortex-A55",
    ("0x41", "0xd07"): "Cortex-A57",
    ("0x41", "0xd08"): "Cortex-A72",
    ("0x41", "0xd09"): "Cortex-A73",
    ("0x41", "0xd0a"): "Cortex-A75",
    ("0x41", "0xd0b"): "Cortex-A76",
    ("0x41", "0xd0c"): "Neoverse-N1",
    ("0x41", "0xd0d"): "Cortex-A77",
    ("0x41", "0xd40"): "Neoverse-V1",
    ("0x41", "0xd41"): "Cortex-A78",
    ("0x41", "0xd42"): "Cortex-A78AE",
    ("0x41", "0xd44"): "Cortex-X1",
    ("0x41", "0xd46"): "Cortex-A510",
    ("0x41", "0xd47"): "Cortex-A710",
    ("0x41", "0xd48"): "Cortex-X2",
    ("0x41", "0xd49"): "Neoverse-N2",
    ("0x41", "0xd4d"): "Cortex-A715",
    ("0x41", "0xd4e"): "Cortex-X3",
    ("0x41", "0xd4f"): "Neoverse-V2",
    ("0x41", "0xd80"): "Cortex-A520",
    ("0x41", "0xd81"): "Cortex-A720",
    ("0x41", "0xd82"): "Cortex-X4",
    ("0x41", "0xd84"): "Neoverse-V3",
    ("0x41", "0xd8e"): "Neoverse-N3",
    ("0x48", "0xd01"): "Kunpeng-920",
    ("0x4e", "0x004"): "Carmel",
    ("0x51", "0x001"): "Oryon",
    ("0x61", "0x022"): "Icestorm (Apple M1)",
    ("0x61", "0x023"): "Firestorm (Apple M1)",
    ("0xc0", "0xac3"): "AmpereOne",
}

# L4T release -> JetPack release, for the releases whose JetPack number is not just
# the L4T major (R36 -> 6, R35 -> 5, R32 -> 4).
_JETPACK_BY_L4T = {
    "32.7.1": "4.6.1",
    "32.7.2": "4.6.2",
    "32.7.3": "4.6.3",
    "32.7.4": "4.6.4",
    "32.7.5": "4.6.5",
    "35.1.0": "5.0.2",
    "35.2.1": "5.1",
    "35.3.1": "5.1.1",
    "35.4.1": "5.1.2",
    "35.5.0": "5.1.3",
    "35.6.0": "5.1.4",
    "36.2.0": "6.0 DP",
    "36.3.0": "6.0",
    "36.4.0": "6.1",
    "36.4.3": "6.2",
    "36.4.4": "6.2.1",
}
_JETPACK_BY_L4T_MAJOR = {"32": "4", "35": "5", "36": "6", "38": "7"}

# macOS `sysctl hw.optional` names -> the Linux feature names used in cpu_flags.
_SYSCTL_FLAGS = {
    "hw.optional.neon": "asimd",
    "hw.optional.neon_fp16": "asimdhp",
    "hw.optional.arm.FEAT_DotProd": "asimddp",
    "hw.optional.arm.FEAT_I8MM": "i8mm",
    "hw.optional.arm.FEAT_BF16": "bf16",
    "hw.optional.arm.FEAT_FHM": "asimdfhm",
    "hw.optional.arm.FEAT_SME": "sme",
    "hw.optional.arm.FEAT_SME2": "sme2",
    "hw.optional.avx1_0": "avx",
    "hw.optional.avx2_0": "avx2",
    "hw.optional.fma": "fma",
    "hw.optional.avx512f": "avx512f",
    "hw.optional.avx512bw": "avx512bw",
    "hw.optional.avx512vl": "avx512vl",
    "hw.optional.avx512vnni": "avx512_vnni",
}

# Import name -> distributions that may provide it; the GPU and vendor builds of
# ONNX Runtime install the same `onnxruntime` module under other names.
_RUNTIME_DISTRIBUTIONS = {
    "onnxruntime": (
        "onnxruntime",
        "onnxruntime-gpu",
        "onnxruntime-openvino",
        "onnxruntime-directml",
        "onnxruntime-qnn",
    ),
    "mlx": ("mlx",),
    "tensorrt": ("tensorrt", "tensorrt-cu12", "tensorrt-cu11"),
}

_COMMAND_TIMEOUT_S = 10


# ---------------------------------------------------------------- process CPU limits


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


# ---------------------------------------------------------------- the snapshot


@dataclass(frozen=True)
class GpuInfo:
    """One NVIDIA GPU; memory_bytes is None where the driver does not say (Jetson)."""

    name: str
    memory_bytes: int | None = None


@dataclass(frozen=True, kw_only=True)
class PlatformInfo:
    """What one machine offers, captured once so every decision about it is pure.

    Unknown facts are None or empty rather than guessed. `runtimes` maps an importable
    runtime to its installed version; `ort_providers` is what ONNX Runtime reports as
    available, which is what its build contains, not a promise that a session gets it.
    """

    os: str
    arch: str
    cpu_model: str = ""
    cpu_implementer: str | None = None
    cpu_part: str | None = None
    cpu_flags: frozenset[str] = frozenset()
    cpus: int = 1
    memory_bytes: int | None = None
    disk_free_bytes: int | None = None
    jetson_model: str | None = None
    l4t_release: str | None = None
    gpus: tuple[GpuInfo, ...] = ()
    apple_chip: str | None = None
    runtimes: Mapping[str, str] = field(default_factory=dict, hash=False)
    ort_providers: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # Accept any iterable or mapping but store immutable values, so a snapshot
        # cannot drift after decisions were made from it.
        object.__setattr__(self, "cpu_flags", frozenset(self.cpu_flags))
        object.__setattr__(self, "gpus", tuple(self.gpus))
        object.__setattr__(self, "ort_providers", tuple(self.ort_providers))
        object.__setattr__(self, "runtimes", MappingProxyType(dict(self.runtimes)))

    @property
    def is_arm(self) -> bool:
        return self.arch in ("aarch64", "arm64")

    @property
    def is_x86(self) -> bool:
        return self.arch in ("x86_64", "amd64", "AMD64")

    @property
    def is_jetson(self) -> bool:
        return self.jetson_model is not None or self.l4t_release is not None

    @property
    def is_apple_silicon(self) -> bool:
        return self.os == "darwin" and self.is_arm

    @property
    def cpu_name(self) -> str | None:
        """The ARM core's marketing name ("Neoverse-N1"), None when not known."""
        if self.cpu_implementer is None or self.cpu_part is None:
            return None
        return _ARM_CORES.get((self.cpu_implementer, self.cpu_part))

    @property
    def jetpack(self) -> str | None:
        """The JetPack release matching `l4t_release` ("6.0"), or just its major."""
        if self.l4t_release is None:
            return None
        known = _JETPACK_BY_L4T.get(self.l4t_release)
        return known or _JETPACK_BY_L4T_MAJOR.get(self.l4t_release.split(".")[0])


# ---------------------------------------------------------------- parsers


def _hex_id(value: str, width: int) -> str | None:
    try:
        return f"0x{int(value, 16):0{width}x}"
    except ValueError:
        return None


def parse_cpuinfo(text: str) -> dict:
    """The fields of /proc/cpuinfo that decisions use, for x86 and ARM layouts.

    Returns model, implementer, part, flags and processors. On big.LITTLE SoCs the
    cores differ; the highest-numbered core's ids are kept, which there are the big
    cores. ARM kernels print no model name; model is then "".
    """
    model = ""
    implementer = part = None
    flags: frozenset[str] = frozenset()
    processors = 0
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key, value = key.strip(), value.strip()
        if key == "processor":
            processors += 1
        elif key in ("model name", "Processor") and not model:
            model = value
        elif key in ("flags", "Features") and not flags:
            flags = frozenset(value.split())
        elif key == "CPU implementer":
            implementer = _hex_id(value, 2) or implementer
        elif key == "CPU part":
            part = _hex_id(value, 3) or part
    return {
        "model": model,
        "implementer": implementer,
        "part": part,
        "flags": flags,
        "processors": processors,
    }


def parse_meminfo(text: str) -> dict[str, int]:
    """/proc/meminfo as name -> value, with "kB" values converted to bytes."""
    values: dict[str, int] = {}
    for line in text.splitlines():
        key, sep, rest = line.partition(":")
        fields = rest.split()
        if not sep or not fields:
            continue
        try:
            number = int(fields[0])
        except ValueError:
            continue
        unit = fields[1] if len(fields) > 1 else ""
        values[key.strip()] = number * 1024 if unit == "kB" else number
    return values


_TEGRA_RELEASE = re.compile(r"^#\s*R(\d+)\s*\(release\),\s*REVISION:\s*(\d+)(?:\.(\d+))?", re.M)


def parse_nv_tegra_release(text: str) -> str | None:
    """The L4T release ("36.3.0") from /etc/nv_tegra_release, None if absent."""
    match = _TEGRA_RELEASE.search(text)
    if match is None:
        return None
    major, minor, patch = match.group(1), match.group(2), match.group(3) or "0"
    return f"{major}.{minor}.{patch}"


def parse_nvidia_smi(text: str) -> tuple[GpuInfo, ...]:
    """GPUs from `nvidia-smi --query-gpu=name,memory.total --format=csv,noheader,nounits`.

    Memory is reported in MiB; Jetson's driver says "[N/A]", kept as None. Lines that
    are not "name, number" (driver error messages) are ignored.
    """
    gpus = []
    for line in text.splitlines():
        name, sep, memory = line.rpartition(",")
        name, memory = name.strip(), memory.strip()
        if not sep or not name:
            continue
        if memory.isdigit():
            gpus.append(GpuInfo(name, int(memory) * 1024 * 1024))
        elif memory.strip("[]") == "N/A":
            gpus.append(GpuInfo(name, None))
    return tuple(gpus)


def parse_sysctl(text: str) -> dict[str, str]:
    """`sysctl NAME...` output ("name: value" lines) as a dict."""
    values = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip():
            values[key.strip()] = value.strip()
    return values


def _parse_cpu_list(text: str) -> int:
    """How many CPUs a kernel cpu list ("0-3,8,10-11") names."""
    count = 0
    for chunk in text.strip().split(","):
        if not chunk.strip():
            continue
        low, sep, high = chunk.partition("-")
        try:
            count += int(high) - int(low) + 1 if sep else 1
        except ValueError:
            return 0
    return count


def _memory_limit(text: str | None) -> int | None:
    """Bytes allowed by a cgroup memory.max or memory.limit_in_bytes value."""
    if not text:
        return None
    try:
        value = int(text.strip())
    except ValueError:  # "max"
        return None
    return value if value > 0 else None


# ---------------------------------------------------------------- reading a machine


def _read(path: Path) -> str | None:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return None


def _cgroup_paths(root: Path) -> dict[str, str]:
    """Controller -> this process's cgroup path ("" is the cgroup v2 hierarchy)."""
    text = _read(root / "proc/self/cgroup")
    if text is None:
        return {"": "/"}
    paths = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        for controller in parts[1].split(",") if parts[1] else [""]:
            paths[controller] = parts[2]
    return paths


def _cgroup_dirs(mount: Path, path: str) -> list[Path]:
    """The process's cgroup and its ancestors under one mount, innermost first.

    Limits are hierarchical, so the tightest one anywhere up the tree applies. Without
    a cgroup namespace the path names the host's view, which may not exist inside the
    container; missing levels are skipped and the mount root, the container's own
    cgroup there, is always kept.
    """
    parts = [p for p in path.split("/") if p]
    dirs = [mount.joinpath(*parts[:depth]) for depth in range(len(parts), 0, -1)]
    return [d for d in dirs if d.is_dir()] + [mount]


def _cgroup_limits(root: Path) -> tuple[float | None, int | None]:
    """(CPU limit, memory limit in bytes) from cgroup v2, or v1 where v2 is absent."""
    cgroup_root = root / "sys/fs/cgroup"
    paths = _cgroup_paths(root)
    cpu_limits: list[float] = []
    memory_limits: list[int] = []
    if (cgroup_root / "cgroup.controllers").exists():
        for directory in _cgroup_dirs(cgroup_root, paths.get("", "/")):
            cpu = cgroup_cpu_limit(_read(directory / "cpu.max"))
            memory = _memory_limit(_read(directory / "memory.max"))
            cpu_limits += [cpu] if cpu is not None else []
            memory_limits += [memory] if memory is not None else []
    else:
        cpu_mounts = [m for m in (cgroup_root / "cpu", cgroup_root / "cpu,cpuacct") if m.is_dir()]
        for directory in _cgroup_dirs(cpu_mounts[0], paths.get("cpu", "/")) if cpu_mounts else []:
            quota = _read(directory / "cpu.cfs_quota_us")
            period = _read(directory / "cpu.cfs_period_us")
            if quota and period:
                cpu = cgroup_cpu_limit(f"{quota.strip()} {period.strip()}")
                cpu_limits += [cpu] if cpu is not None else []
        memory_mount = cgroup_root / "memory"
        if memory_mount.is_dir():
            for directory in _cgroup_dirs(memory_mount, paths.get("memory", "/")):
                memory = _memory_limit(_read(directory / "memory.limit_in_bytes"))
                memory_limits += [memory] if memory is not None else []
    return (min(cpu_limits, default=None), min(memory_limits, default=None))


def _affinity_count(root: Path) -> int:
    """CPUs in this process's affinity mask, as its /proc status lists them."""
    status = _read(root / "proc/self/status") or ""
    for line in status.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "Cpus_allowed_list":
            count = _parse_cpu_list(value)
            if count:
                return count
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS and Windows have no affinity API
        return os.cpu_count() or 1


def _run_text(run: Callable, argv: list[str]) -> str | None:
    """stdout of a command, or None when it is missing, fails or hangs."""
    try:
        result = run(argv, capture_output=True, text=True, timeout=_COMMAND_TIMEOUT_S, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        log.debug("%s unavailable: %s", argv[0], exc)
        return None
    if result.returncode != 0:
        log.debug("%s exited %s: %s", argv[0], result.returncode, (result.stderr or "").strip())
        return None
    return result.stdout


def _nvidia_gpus(run: Callable) -> tuple[GpuInfo, ...]:
    text = _run_text(
        run, ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"]
    )
    return parse_nvidia_smi(text) if text else ()


def _installed_runtimes() -> dict[str, str]:
    """Importable runtimes and their versions, found without importing them."""
    runtimes = {}
    for module, distributions in _RUNTIME_DISTRIBUTIONS.items():
        try:
            if importlib.util.find_spec(module) is None:
                continue
        except (ImportError, ValueError):
            continue
        version = "unknown"
        for distribution in distributions:
            try:
                version = importlib.metadata.version(distribution)
                break
            except importlib.metadata.PackageNotFoundError:
                continue
        runtimes[module] = version
    return runtimes


def _onnxruntime_providers() -> tuple[str, ...]:
    """ONNX Runtime's available providers; empty when it fails to import."""
    try:
        import onnxruntime
    except Exception as exc:  # a broken GPU build can fail with any error on import
        log.warning("onnxruntime is installed but failed to import: %s", exc)
        return ()
    return tuple(onnxruntime.get_available_providers())


def _device_tree_text(root: Path, name: str) -> str | None:
    for base in ("proc/device-tree", "sys/firmware/devicetree/base"):
        text = _read(root / base / name)
        if text is not None:
            return text
    return None


def _disk_free(path: Path) -> int | None:
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def _snapshot_linux(root: Path, run: Callable, arch: str) -> dict:
    cpuinfo = parse_cpuinfo(_read(root / "proc/cpuinfo") or "")
    meminfo = parse_meminfo(_read(root / "proc/meminfo") or "")
    cpu_limit, memory_limit = _cgroup_limits(root)
    cpus = _affinity_count(root)
    if cpu_limit is not None:
        cpus = min(cpus, max(1, math.ceil(cpu_limit)))
    memory_total = meminfo.get("MemTotal")
    memories = [m for m in (memory_total, memory_limit) if m is not None]

    l4t_text = _read(root / "etc/nv_tegra_release")
    l4t_release = parse_nv_tegra_release(l4t_text) if l4t_text else None
    model = (_device_tree_text(root, "model") or "").strip("\x00\n ")
    compatible = _device_tree_text(root, "compatible") or ""
    tegra = l4t_release is not None or "nvidia,tegra" in compatible or "jetson" in model.lower()

    return {
        "cpu_model": cpuinfo["model"],
        "cpu_implementer": cpuinfo["implementer"] if arch in ("aarch64", "arm64") else None,
        "cpu_part": cpuinfo["part"] if arch in ("aarch64", "arm64") else None,
        "cpu_flags": cpuinfo["flags"],
        "cpus": max(1, cpus),
        "memory_bytes": min(memories) if memories else None,
        "jetson_model": (model or None) if tegra else None,
        "l4t_release": l4t_release,
        "gpus": _nvidia_gpus(run),
    }


def _snapshot_darwin(run: Callable) -> dict:
    values = parse_sysctl(_run_text(run, ["sysctl", "hw"]) or "")
    values.update(parse_sysctl(_run_text(run, ["sysctl", "machdep.cpu"]) or ""))
    brand = values.get("machdep.cpu.brand_string", "")
    flags = frozenset(flag for name, flag in _SYSCTL_FLAGS.items() if values.get(name) == "1")
    cpus = values.get("hw.activecpu") or values.get("hw.logicalcpu") or ""
    memory = values.get("hw.memsize", "")
    return {
        "cpu_model": brand,
        "cpu_flags": flags,
        "cpus": int(cpus) if cpus.isdigit() else (os.cpu_count() or 1),
        "memory_bytes": int(memory) if memory.isdigit() else None,
        "apple_chip": brand if brand.startswith("Apple") else None,
    }


def snapshot_platform(
    root: Path = Path("/"),
    run: Callable[..., subprocess.CompletedProcess] = subprocess.run,
    *,
    disk_path: Path | None = None,
    system: str | None = None,
    machine: str | None = None,
) -> PlatformInfo:
    """Read this machine (or a captured file tree under `root`) into a PlatformInfo.

    Files are read relative to `root` and commands go through `run`, so tests can
    replay captured machines. `system`/`machine` override uname; by default Linux
    answers from `root`/proc/sys/kernel and other systems from the platform module.
    Free disk is measured at `disk_path` (default `root`). Any fact that cannot be
    read is left unknown; nothing here raises for a missing file or command.
    """
    root = Path(root)
    if system is None:
        ostype = _read(root / "proc/sys/kernel/ostype")
        system = ostype.strip() if ostype else _stdlib_platform.system()
    system = system.lower()
    if machine is None:
        kernel_arch = _read(root / "proc/sys/kernel/arch") if system == "linux" else None
        machine = kernel_arch.strip() if kernel_arch else _stdlib_platform.machine()

    if system == "darwin":
        facts = _snapshot_darwin(run)
    elif system == "linux":
        facts = _snapshot_linux(root, run, machine)
    else:
        facts = {
            "cpu_model": _stdlib_platform.processor(),
            "cpus": _affinity_count(root),
            "gpus": _nvidia_gpus(run),
        }

    runtimes = _installed_runtimes()
    providers = _onnxruntime_providers() if "onnxruntime" in runtimes else ()
    return PlatformInfo(
        os=system,
        arch=machine,
        disk_free_bytes=_disk_free(disk_path if disk_path is not None else root),
        runtimes=runtimes,
        ort_providers=providers,
        **facts,
    )


# ---------------------------------------------------------------- choosing backends


@dataclass(frozen=True)
class BackendCandidate:
    """One way to run a model here: a backend, its ONNX Runtime providers in priority
    order (empty for mlx), the precision to ask for, and why it was chosen or skipped."""

    backend: str
    providers: tuple[str, ...]
    precision: str
    chosen: bool
    reason: str


@dataclass(frozen=True)
class _Verdict:
    key: str
    backend: str
    providers: tuple[str, ...]
    precision: str
    usable: bool
    reason: str

    def candidate(self, chosen: bool, reason: str) -> BackendCandidate:
        return BackendCandidate(self.backend, self.providers, self.precision, chosen, reason)


# Which candidates each preference allows, in priority order overall.
_PRIORITY = ("mlx", "tensorrt", "cuda", "acl", "cpu")
_ALLOWED = {
    "auto": set(_PRIORITY),
    "onnx": {"tensorrt", "cuda", "acl", "cpu"},
    "mlx": {"mlx"},
    "cpu": {"cpu"},
    "cuda": {"cuda"},
    "tensorrt": {"tensorrt"},
    "acl": {"acl"},
}


def _jetpack_label(info: PlatformInfo) -> str:
    if info.l4t_release is None:
        return "an unknown L4T release"
    if info.jetpack is None:
        return f"L4T R{info.l4t_release}"
    return f"JetPack {info.jetpack} (L4T R{info.l4t_release})"


def _cpu_label(info: PlatformInfo) -> str:
    return info.apple_chip or info.cpu_name or info.cpu_model or info.arch


def _ort_missing(info: PlatformInfo) -> str | None:
    """Why no ONNX Runtime candidate can run at all, or None."""
    if "onnxruntime" not in info.runtimes:
        return "onnxruntime is not installed (pip install onnxruntime)"
    if not info.ort_providers:
        return (
            f"onnxruntime {info.runtimes['onnxruntime']} is installed but listed no "
            "execution providers; importing it may have failed"
        )
    return None


def _ep_missing(info: PlatformInfo, provider: str) -> str:
    version = info.runtimes.get("onnxruntime", "?")
    if info.is_jetson:
        return (
            f"{provider} is missing from onnxruntime {version} on {info.jetson_model or 'Jetson'} "
            f"with {_jetpack_label(info)}; install the onnxruntime-gpu wheel built for "
            f"JetPack {info.jetpack or '?'}"
        )
    return (
        f"{provider} is missing from onnxruntime {version} although {info.gpus[0].name} "
        "is present; onnxruntime-gpu provides it"
    )


def _judge_mlx(info: PlatformInfo) -> _Verdict:
    def verdict(usable: bool, reason: str) -> _Verdict:
        return _Verdict("mlx", "mlx", (), "mlx-fp16", usable, reason)

    if info.os != "darwin":
        if info.os == "linux" and "mlx" in info.runtimes:
            return verdict(True, f"mlx {info.runtimes['mlx']} CPU build on {info.os}/{info.arch}: correct but "
                                 "slower than ONNX Runtime here, so only used when forced")
        return verdict(False, f"mlx is not installed; it runs on Apple Silicon Macs (and as mlx[cpu] on Linux, "
                              f"for tests); this is {info.os}/{info.arch}")
    if not info.is_apple_silicon:
        if info.apple_chip:
            return verdict(
                False,
                f"this Python is {info.arch} under Rosetta on an {info.apple_chip}; "
                "mlx needs a native arm64 Python",
            )
        return verdict(False, f"mlx needs Apple Silicon; this Mac has {_cpu_label(info)}")
    if "mlx" not in info.runtimes:
        return verdict(
            False, f"mlx is not installed (pip install mlx); {_cpu_label(info)} could run it"
        )
    return verdict(
        True,
        f"mlx {info.runtimes['mlx']} on {_cpu_label(info)}: "
        "Metal GPU on unified memory, fp16 weights",
    )


def _judge_gpu(info: PlatformInfo, key: str, providers: tuple[str, ...]) -> _Verdict:
    def verdict(usable: bool, reason: str) -> _Verdict:
        return _Verdict(key, "onnx", providers, "fp16", usable, reason)

    missing_runtime = _ort_missing(info)
    if missing_runtime:
        return verdict(False, missing_runtime)
    if info.os == "darwin":
        return verdict(False, f"{providers[0]} does not run on macOS")
    if not info.is_jetson and not info.gpus:
        return verdict(False, f"no NVIDIA GPU found for {providers[0]} (nvidia-smi listed none)")
    if providers[0] not in info.ort_providers:
        return verdict(False, _ep_missing(info, providers[0]))
    if info.is_jetson:
        where = f"{info.jetson_model or 'Jetson'} GPU with {_jetpack_label(info)}"
    else:
        where = ", ".join(gpu.name for gpu in info.gpus)
    if key == "tensorrt":
        return verdict(
            True, f"TensorRT on {where}: fp16 engines, CUDA then CPU for nodes it cannot take"
        )
    reason = f"CUDA on {where}, fp16"
    if TENSORRT_EP not in info.ort_providers:
        reason += f"; TensorRT not used: {_ep_missing(info, TENSORRT_EP)}"
    return verdict(True, reason)


def _judge_acl(info: PlatformInfo) -> _Verdict:
    def verdict(usable: bool, reason: str) -> _Verdict:
        return _Verdict("acl", "onnx", (ACL_EP, CPU_EP), "auto", usable, reason)

    missing_runtime = _ort_missing(info)
    if missing_runtime:
        return verdict(False, missing_runtime)
    if not info.is_arm:
        return verdict(False, f"{ACL_EP} needs an ARM CPU; this is {info.arch}")
    if ACL_EP not in info.ort_providers:
        return verdict(
            False,
            f"{ACL_EP} is not in onnxruntime {info.runtimes['onnxruntime']}; "
            "only builds made with --use_acl have it",
        )
    return verdict(True, f"Arm Compute Library kernels on {_cpu_label(info)}, CPU for the rest")


def int8_kernel_class(flags: frozenset[str] | set[str], is_arm: bool) -> str:
    """Which kind of integer GEMM ONNX Runtime runs on a CPU with these flags: what decides
    whether int8 beats FP32 there ("amx", "vnni", "avx2" without VNNI, "arm-i8mm",
    "arm-dot", "arm-neon", "other")."""
    if is_arm:
        if "i8mm" in flags and "asimddp" in flags:
            return "arm-i8mm"
        return "arm-dot" if "asimddp" in flags else "arm-neon"
    if "amx_int8" in flags:
        return "amx"
    if "avx512_vnni" in flags or "avx_vnni" in flags:
        return "vnni"
    return "avx2" if "avx2" in flags else "other"


def this_cpu() -> tuple[str, str]:
    """(model name, int8 kernel class) of the CPU this process runs on."""
    machine = _stdlib_platform.machine().lower()
    if sys.platform == "darwin":
        facts = _snapshot_darwin(subprocess.run)
        model, flags = facts["cpu_model"], facts["cpu_flags"]
    else:
        cpuinfo = parse_cpuinfo(_read(Path("/proc/cpuinfo")) or "")
        model, flags = cpuinfo["model"], cpuinfo["flags"]
    return model or machine, int8_kernel_class(flags, machine in ("arm64", "aarch64"))


def _int8_kernels(info: PlatformInfo) -> str:
    flags = info.cpu_flags
    if info.is_arm:
        if "i8mm" in flags and "asimddp" in flags:
            return "i8mm and dot-product (asimddp) int8 kernels"
        if "asimddp" in flags:
            return "dot-product (asimddp) int8 kernels"
        return "plain NEON int8 kernels (this core lacks asimddp)"
    if "amx_int8" in flags:
        return "AMX and VNNI dot-product int8 kernels"
    if "avx512_vnni" in flags:
        return "AVX-512 VNNI dot-product int8 kernels"
    if "avx_vnni" in flags:
        return "AVX-VNNI dot-product int8 kernels"
    if "avx2" in flags:
        return "AVX2 int8 kernels (no VNNI)"
    return "int8 kernels without AVX2"


def _judge_cpu(info: PlatformInfo) -> _Verdict:
    def verdict(usable: bool, reason: str) -> _Verdict:
        return _Verdict("cpu", "onnx", (CPU_EP,), "int8", usable, reason)

    missing_runtime = _ort_missing(info)
    if missing_runtime:
        return verdict(False, missing_runtime)
    if CPU_EP not in info.ort_providers:
        version = info.runtimes["onnxruntime"]
        return verdict(False, f"{CPU_EP} is missing from onnxruntime {version}")
    plural = "CPU" if info.cpus == 1 else "CPUs"
    reason = (
        f"ONNX Runtime CPU on {_cpu_label(info)} ({info.cpus} usable {plural}): "
        f"{_int8_kernels(info)}"
    )
    if info.is_jetson and CUDA_EP not in info.ort_providers:
        reason += f"; Jetson GPU unused: {_ep_missing(info, CUDA_EP)}"
    return verdict(True, reason)


def _judge_all(info: PlatformInfo) -> list[_Verdict]:
    return [
        _judge_mlx(info),
        _judge_gpu(info, "tensorrt", (TENSORRT_EP, CUDA_EP, CPU_EP)),
        _judge_gpu(info, "cuda", (CUDA_EP, CPU_EP)),
        _judge_acl(info),
        _judge_cpu(info),
    ]


def choose_backends(info: PlatformInfo, preference: str = "auto") -> list[BackendCandidate]:
    """Every way to run here, usable ones first in priority order, then skipped ones.

    `preference` narrows what may be chosen: "onnx" any ONNX Runtime candidate, "cpu"
    ONNX Runtime on the CPU, "cuda"/"tensorrt"/"acl" that provider, "mlx" mlx. A forced
    preference that cannot run raises BackendUnavailableError saying why; it never
    falls back. With "auto" the list may hold no chosen candidate; the caller decides.
    """
    if preference not in _ALLOWED:
        raise BackendUnavailableError(
            f"unknown backend preference {preference!r}; known: {', '.join(BACKEND_PREFERENCES)}"
        )
    allowed = _ALLOWED[preference]
    verdicts = _judge_all(info)
    chosen: list[BackendCandidate] = []
    skipped: list[BackendCandidate] = []
    for verdict in verdicts:
        if preference == "auto" and verdict.key == "mlx" and verdict.usable and not info.is_apple_silicon:
            skipped.append(verdict.candidate(False, verdict.reason))
        elif verdict.key in allowed and verdict.usable:
            chosen.append(verdict.candidate(True, verdict.reason))
        elif verdict.usable:
            reason = f"usable, but preference {preference!r} excludes it ({verdict.reason})"
            skipped.append(verdict.candidate(False, reason))
        else:
            skipped.append(verdict.candidate(False, verdict.reason))

    if preference != "auto" and not chosen:
        reasons = []
        for verdict in verdicts:
            if verdict.key in allowed and verdict.reason not in reasons:
                reasons.append(verdict.reason)
        raise BackendUnavailableError(
            f"backend {preference!r} cannot run on this {info.os}/{info.arch} machine: "
            + "; ".join(reasons)
        )
    return chosen + skipped
