"""Platform detection: parsers on captured machine files, snapshots of captured file
trees under tests/platforms/<device>/, and the backend verdicts for each device.

A device folder mirrors the paths snapshot_platform reads (proc/, sys/, etc/); its
commands/ folder holds the output of the commands it runs, replayed by `replay`.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import os
import platform as stdlib_platform
import subprocess
import sys
from pathlib import Path

import pytest

from edge_embed.errors import BackendUnavailableError
from edge_embed.platform import (
    BACKEND_PREFERENCES,
    BackendCandidate,
    GpuInfo,
    PlatformInfo,
    choose_backends,
    parse_cpuinfo,
    parse_meminfo,
    parse_nv_tegra_release,
    parse_nvidia_smi,
    parse_sysctl,
    snapshot_platform,
)

PLATFORMS = Path(__file__).parent / "platforms"
MiB = 1024 * 1024
GiB = 1024 * MiB

TRT, CUDA, ACL, CPU = (
    "TensorrtExecutionProvider",
    "CUDAExecutionProvider",
    "ACLExecutionProvider",
    "CPUExecutionProvider",
)
ORT_CPU_ONLY = {
    "runtimes": {"onnxruntime": "1.31.1"},
    "ort_providers": ("AzureExecutionProvider", CPU),
}
ORT_GPU = {"runtimes": {"onnxruntime": "1.31.1"}, "ort_providers": (TRT, CUDA, CPU)}
ORT_CUDA_ONLY = {"runtimes": {"onnxruntime": "1.31.1"}, "ort_providers": (CUDA, CPU)}
ORT_ACL = {"runtimes": {"onnxruntime": "1.31.1"}, "ort_providers": (ACL, CPU)}
ORT_AND_MLX = {
    "runtimes": {"onnxruntime": "1.31.1", "mlx": "0.32.4"},
    "ort_providers": ("CoreMLExecutionProvider", "AzureExecutionProvider", CPU),
}
NO_RUNTIMES = {"runtimes": {}, "ort_providers": ()}


def fixture_text(device: str, relative: str) -> str:
    return (PLATFORMS / device / relative).read_text()


def replay(device: str, calls: list | None = None):
    """A stand-in for subprocess.run that answers from <device>/commands/<argv>.txt."""

    def run(argv, **kwargs):
        if not kwargs.get("timeout"):
            raise AssertionError(f"{argv[0]} was run without a timeout")
        if calls is not None:
            calls.append(argv)
        name = "-".join([argv[0], *(arg for arg in argv[1:] if not arg.startswith("-"))])
        path = PLATFORMS / device / "commands" / f"{name}.txt"
        if not path.is_file():
            raise FileNotFoundError(2, "No such file or directory", argv[0])
        return subprocess.CompletedProcess(argv, 0, stdout=path.read_text(), stderr="")

    return run


def captured(device: str, **overrides) -> PlatformInfo:
    """The snapshot of a captured device, with runtimes swapped in as a test needs."""
    if device.startswith("apple-"):
        info = snapshot_platform(
            PLATFORMS / device, replay(device), system="Darwin", machine="arm64"
        )
    else:
        info = snapshot_platform(PLATFORMS / device, replay(device))
    return dataclasses.replace(info, **overrides)


def chosen(candidates: list[BackendCandidate]) -> list[BackendCandidate]:
    return [c for c in candidates if c.chosen]


def skipped_with(candidates: list[BackendCandidate], first_provider: str) -> BackendCandidate:
    (match,) = [c for c in candidates if not c.chosen and c.providers[:1] == (first_provider,)]
    return match


# ---------------------------------------------------------------- parsers


@pytest.mark.parametrize(
    ("device", "model", "implementer", "part", "processors", "present", "absent"),
    [
        ("jetson-orin-nano-jp6", "", "0x41", "0xd42", 6, {"asimd", "asimddp"}, {"i8mm", "sve"}),
        ("jetson-orin-nx-jp5", "", "0x41", "0xd42", 8, {"asimddp"}, {"i8mm"}),
        ("jetson-agx-orin-jp6", "", "0x41", "0xd42", 12, {"asimddp"}, {"sve"}),
        ("ampere-altra", "", "0x41", "0xd0c", 80, {"asimddp", "ssbs"}, {"sve", "i8mm"}),
        ("aws-graviton3", "", "0x41", "0xd40", 8, {"sve", "i8mm", "bf16", "svei8mm"}, {"sve2"}),
        ("raspberry-pi-5", "", "0x41", "0xd0b", 4, {"asimddp"}, {"i8mm"}),
        (
            "x86-rtx4090",
            "AMD Ryzen 9 7950X 16-Core Processor",
            None,
            None,
            32,
            {"avx2", "avx512f", "avx512_vnni", "avx512_bf16"},
            {"avx_vnni", "amx_int8"},
        ),
        (
            "x86-avx2",
            "Intel(R) Core(TM) i7-8700 CPU @ 3.20GHz",
            None,
            None,
            12,
            {"avx2", "fma"},
            {"avx512f", "avx512_vnni", "ept_x_only"},  # ept_x_only is a "vmx flags" entry
        ),
        (
            "container-limited",
            "Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz",
            None,
            None,
            32,
            {"avx512f", "avx512_vnni"},
            {"amx_int8"},
        ),
    ],
)
def test_parse_cpuinfo(device, model, implementer, part, processors, present, absent):
    parsed = parse_cpuinfo(fixture_text(device, "proc/cpuinfo"))
    assert parsed["model"] == model
    assert parsed["implementer"] == implementer
    assert parsed["part"] == part
    assert parsed["processors"] == processors
    assert present <= parsed["flags"]
    assert not absent & parsed["flags"]


def test_parse_cpuinfo_normalises_ids_and_keeps_the_big_cores():
    # An RK3588-style big.LITTLE listing: four Cortex-A55 then four Cortex-A76.
    block = (
        "processor\t: {n}\nFeatures\t: fp asimd asimddp\n"
        "CPU implementer\t: {implementer}\nCPU part\t: {part}\n\n"
    )
    text = "".join(block.format(n=n, implementer="0X41", part="0xD05") for n in range(4))
    text += "".join(block.format(n=n, implementer="0x41", part="0xd0b") for n in range(4, 8))
    parsed = parse_cpuinfo(text)
    assert (parsed["implementer"], parsed["part"], parsed["processors"]) == ("0x41", "0xd0b", 8)


def test_parse_cpuinfo_of_nothing():
    assert parse_cpuinfo("") == {
        "model": "",
        "implementer": None,
        "part": None,
        "flags": frozenset(),
        "processors": 0,
    }


def test_parse_meminfo_converts_kilobytes():
    values = parse_meminfo(fixture_text("jetson-orin-nano-jp6", "proc/meminfo"))
    assert values["MemTotal"] == 7802772 * 1024
    assert values["CmaTotal"] == 262144 * 1024
    assert values["HugePages_Total"] == 0  # a count, not kB
    assert parse_meminfo("garbage\nMemTotal: lots kB\n") == {}


@pytest.mark.parametrize(
    ("device", "release"),
    [
        ("jetson-orin-nano-jp6", "36.3.0"),
        ("jetson-orin-nx-jp5", "35.4.1"),
        ("jetson-agx-orin-jp6", "36.4.3"),
    ],
)
def test_parse_nv_tegra_release(device, release):
    assert parse_nv_tegra_release(fixture_text(device, "etc/nv_tegra_release")) == release


def test_parse_nv_tegra_release_without_a_release_line():
    assert parse_nv_tegra_release("TARGET_USERSPACE_LIB_DIR=nvidia\n") is None
    assert parse_nv_tegra_release("") is None


def test_parse_nvidia_smi():
    assert parse_nvidia_smi(fixture_text("x86-rtx4090", "commands/nvidia-smi.txt")) == (
        GpuInfo("NVIDIA GeForce RTX 4090", 24564 * MiB),
    )
    assert parse_nvidia_smi(fixture_text("jetson-orin-nano-jp6", "commands/nvidia-smi.txt")) == (
        GpuInfo("Orin (nvgpu)", None),
    )
    assert parse_nvidia_smi("NVIDIA A100-SXM4-80GB, 81920\nNVIDIA A100-SXM4-80GB, 81920\n") == (
        GpuInfo("NVIDIA A100-SXM4-80GB", 81920 * MiB),
    ) * 2


def test_parse_nvidia_smi_ignores_driver_errors():
    message = (
        "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. "
        "Make sure that the latest NVIDIA driver is installed and running.\n"
    )
    assert parse_nvidia_smi(message) == ()
    assert parse_nvidia_smi("") == ()


def test_parse_sysctl():
    values = parse_sysctl(fixture_text("apple-m4", "commands/sysctl-hw.txt"))
    assert values["hw.memsize"] == str(16 * GiB)
    assert values["hw.optional.arm.FEAT_SME2"] == "1"
    assert values["hw.osenvironment"] == ""


# ---------------------------------------------------------------- snapshots of captured devices


@pytest.mark.parametrize(
    ("device", "arch", "cpus", "memory_bytes", "cpu_name"),
    [
        ("jetson-orin-nano-jp6", "aarch64", 6, 7802772 * 1024, "Cortex-A78AE"),
        ("jetson-orin-nx-jp5", "aarch64", 8, 15655596 * 1024, "Cortex-A78AE"),
        ("jetson-agx-orin-jp6", "aarch64", 12, 64335836 * 1024, "Cortex-A78AE"),
        ("ampere-altra", "aarch64", 80, 263607908 * 1024, "Neoverse-N1"),
        ("aws-graviton3", "aarch64", 8, 12 * GiB, "Neoverse-V1"),  # systemd MemoryMax=12G
        ("raspberry-pi-5", "aarch64", 4, 8245536 * 1024, "Cortex-A76"),
        ("x86-rtx4090", "x86_64", 32, 65011288 * 1024, None),
        ("x86-avx2", "x86_64", 12, 32768940 * 1024, None),
        ("container-limited", "x86_64", 2, 2 * GiB, None),
    ],
)
def test_snapshot_of_captured_linux_devices(device, arch, cpus, memory_bytes, cpu_name):
    info = captured(device)
    assert (info.os, info.arch) == ("linux", arch)
    assert info.cpus == cpus
    assert info.memory_bytes == memory_bytes
    assert info.cpu_name == cpu_name
    assert info.apple_chip is None
    assert not info.is_apple_silicon
    assert info.disk_free_bytes is not None and info.disk_free_bytes >= 0


@pytest.mark.parametrize(
    ("device", "model", "l4t", "jetpack", "gpus"),
    [
        (
            "jetson-orin-nano-jp6",
            "NVIDIA Jetson Orin Nano Developer Kit",
            "36.3.0",
            "6.0",
            (GpuInfo("Orin (nvgpu)", None),),
        ),
        # JetPack 5's device tree does not say "Jetson"; the L4T release file does.
        ("jetson-orin-nx-jp5", "NVIDIA Orin NX Developer Kit", "35.4.1", "5.1.2", ()),
        (
            "jetson-agx-orin-jp6",
            "NVIDIA Jetson AGX Orin Developer Kit",
            "36.4.3",
            "6.2",
            (GpuInfo("Orin (nvgpu)", None),),
        ),
    ],
)
def test_snapshot_of_jetsons(device, model, l4t, jetpack, gpus):
    info = captured(device)
    assert info.is_jetson
    assert (info.jetson_model, info.l4t_release) == (model, l4t)
    assert (info.jetpack, info.gpus) == (jetpack, gpus)
    assert (info.cpu_implementer, info.cpu_part) == ("0x41", "0xd42")


def test_a_raspberry_pi_device_tree_is_not_a_jetson():
    info = captured("raspberry-pi-5")
    assert not info.is_jetson
    assert info.jetson_model is None and info.l4t_release is None


def test_snapshot_of_the_gpu_workstation_runs_nvidia_smi_with_a_timeout():
    calls: list = []
    info = snapshot_platform(PLATFORMS / "x86-rtx4090", replay("x86-rtx4090", calls))
    assert info.gpus == (GpuInfo("NVIDIA GeForce RTX 4090", 24564 * MiB),)
    assert calls == [
        ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"]
    ]
    assert info.cpu_model == "AMD Ryzen 9 7950X 16-Core Processor"
    assert {"avx512_vnni", "avx2"} <= info.cpu_flags


@pytest.mark.parametrize(
    "failure",
    [
        subprocess.TimeoutExpired(["nvidia-smi"], 10),
        PermissionError(13, "Permission denied"),
        subprocess.CompletedProcess(["nvidia-smi"], 9, stdout="", stderr="driver not loaded"),
    ],
)
def test_a_failing_nvidia_smi_means_no_gpus(failure):
    def run(argv, **kwargs):
        if isinstance(failure, BaseException):
            raise failure
        return failure

    assert snapshot_platform(PLATFORMS / "x86-rtx4090", run).gpus == ()


def test_an_empty_root_leaves_facts_unknown(tmp_path):
    info = snapshot_platform(tmp_path, replay("none"), system="Linux", machine="riscv64")
    assert (info.os, info.arch) == ("linux", "riscv64")
    assert info.cpu_model == "" and info.cpu_flags == frozenset()
    assert info.memory_bytes is None
    assert info.cpus >= 1
    assert not info.is_jetson and info.gpus == ()


@pytest.mark.parametrize(
    ("device", "chip", "cpus", "present", "absent"),
    [
        ("apple-m1", "Apple M1", 8, {"asimd", "asimddp", "asimdhp"}, {"i8mm", "bf16", "sme"}),
        ("apple-m4", "Apple M4", 10, {"asimddp", "i8mm", "bf16", "sme", "sme2"}, set()),
    ],
)
def test_snapshot_of_apple_silicon_from_sysctl(device, chip, cpus, present, absent):
    calls: list = []
    info = snapshot_platform(
        PLATFORMS / device, replay(device, calls), system="Darwin", machine="arm64"
    )
    assert (info.os, info.arch, info.apple_chip, info.cpu_model) == ("darwin", "arm64", chip, chip)
    assert info.is_apple_silicon and not info.is_jetson
    assert info.cpus == cpus
    assert info.memory_bytes == 16 * GiB
    assert present <= info.cpu_flags
    assert not absent & info.cpu_flags
    assert all(argv[0] == "sysctl" for argv in calls)  # no nvidia-smi on a Mac


# ---------------------------------------------------------------- the snapshot value


def test_platform_info_is_an_immutable_value():
    info = PlatformInfo(
        os="linux",
        arch="aarch64",
        cpu_flags=["asimd"],
        gpus=[GpuInfo("Orin (nvgpu)")],
        runtimes={"onnxruntime": "1.31.1"},
        ort_providers=[CPU],
    )
    assert info.cpu_flags == frozenset({"asimd"})
    assert info.gpus == (GpuInfo("Orin (nvgpu)"),) and info.ort_providers == (CPU,)
    with pytest.raises(TypeError):
        info.runtimes["mlx"] = "0.32.4"
    with pytest.raises(dataclasses.FrozenInstanceError):
        info.cpus = 4
    assert hash(info) == hash(dataclasses.replace(info))
    with pytest.raises(TypeError):
        PlatformInfo("linux", "aarch64")  # keyword-only


@pytest.mark.parametrize(
    ("implementer", "part", "name"),
    [
        ("0x41", "0xd0b", "Cortex-A76"),
        ("0x41", "0xd0c", "Neoverse-N1"),
        ("0x41", "0xd40", "Neoverse-V1"),
        ("0x41", "0xd4f", "Neoverse-V2"),
        ("0x41", "0xd42", "Cortex-A78AE"),
        ("0x41", "0xd08", "Cortex-A72"),
        ("0x41", "0xd03", "Cortex-A53"),
        ("0xc0", "0xac3", "AmpereOne"),
        ("0x41", "0xfff", None),
        (None, None, None),
    ],
)
def test_cpu_name(implementer, part, name):
    info = PlatformInfo(os="linux", arch="aarch64", cpu_implementer=implementer, cpu_part=part)
    assert info.cpu_name == name


# ---------------------------------------------------------------- choosing backends


def test_orin_nano_with_tensorrt_runs_tensorrt_then_cuda_then_cpu():
    candidates = choose_backends(captured("jetson-orin-nano-jp6", **ORT_GPU))
    first = candidates[0]
    assert (first.backend, first.providers, first.precision, first.chosen) == (
        "onnx",
        (TRT, CUDA, CPU),
        "fp16",
        True,
    )
    assert "JetPack 6.0 (L4T R36.3.0)" in first.reason
    assert [c.providers[0] for c in chosen(candidates)] == [TRT, CUDA, CPU]


def test_orin_nano_without_the_tensorrt_ep_uses_cuda_and_says_why():
    candidates = choose_backends(captured("jetson-orin-nano-jp6", **ORT_CUDA_ONLY))
    first = candidates[0]
    assert first.chosen and first.providers == (CUDA, CPU)
    assert "TensorrtExecutionProvider is missing" in first.reason
    assert "L4T R36.3.0" in first.reason
    trt = skipped_with(candidates, TRT)
    assert "TensorrtExecutionProvider is missing" in trt.reason
    assert "JetPack 6.0 (L4T R36.3.0)" in trt.reason


def test_orin_nx_on_jetpack5_with_cpu_only_onnxruntime_falls_to_cpu_with_reasons():
    candidates = choose_backends(captured("jetson-orin-nx-jp5", **ORT_CPU_ONLY))
    first = candidates[0]
    assert first.chosen and first.providers == (CPU,) and first.precision == "int8"
    assert "CUDAExecutionProvider is missing" in first.reason
    assert "JetPack 5.1.2 (L4T R35.4.1)" in first.reason
    assert "dot-product (asimddp) int8 kernels" in first.reason
    assert len(chosen(candidates)) == 1
    for provider in (TRT, CUDA):
        assert "JetPack 5.1.2 (L4T R35.4.1)" in skipped_with(candidates, provider).reason


def test_forced_tensorrt_on_a_jetson_without_it_raises():
    info = captured("jetson-orin-nx-jp5", **ORT_CPU_ONLY)
    missing_trt = r"TensorrtExecutionProvider is missing.*R35\.4\.1"
    with pytest.raises(BackendUnavailableError, match=missing_trt):
        choose_backends(info, "tensorrt")
    with pytest.raises(BackendUnavailableError, match="CUDAExecutionProvider is missing"):
        choose_backends(info, "cuda")


def test_agx_orin_forced_cpu_uses_only_the_cpu():
    info = captured("jetson-agx-orin-jp6", **ORT_GPU)
    assert choose_backends(info)[0].providers == (TRT, CUDA, CPU)
    candidates = choose_backends(info, "cpu")
    assert [c.providers for c in chosen(candidates)] == [(CPU,)]
    assert "excludes" in skipped_with(candidates, TRT).reason
    with pytest.raises(BackendUnavailableError, match="ACLExecutionProvider is not in onnxruntime"):
        choose_backends(info, "acl")


def test_ampere_with_an_acl_build_runs_acl_then_cpu():
    candidates = choose_backends(captured("ampere-altra", **ORT_ACL))
    assert [c.providers for c in chosen(candidates)] == [(ACL, CPU), (CPU,)]
    assert "Neoverse-N1" in candidates[0].reason


def test_ampere_with_stock_onnxruntime_runs_int8_on_the_cpu():
    candidates = choose_backends(captured("ampere-altra", **ORT_CPU_ONLY))
    first = candidates[0]
    assert (first.providers, first.precision) == ((CPU,), "int8")
    assert "Neoverse-N1 (80 usable CPUs)" in first.reason
    assert "dot-product (asimddp) int8 kernels" in first.reason
    assert "--use_acl" in skipped_with(candidates, ACL).reason


def test_graviton3_mentions_i8mm_and_refuses_cuda():
    info = captured("aws-graviton3", **ORT_CPU_ONLY)
    first = choose_backends(info)[0]
    assert first.providers == (CPU,) and "i8mm" in first.reason and "Neoverse-V1" in first.reason
    with pytest.raises(BackendUnavailableError, match="no NVIDIA GPU found"):
        choose_backends(info, "cuda")


def test_raspberry_pi_5_runs_int8_with_dot_product_kernels():
    candidates = choose_backends(captured("raspberry-pi-5", **ORT_CPU_ONLY))
    assert [c.providers for c in chosen(candidates)] == [(CPU,)]
    assert "Cortex-A76 (4 usable CPUs)" in candidates[0].reason
    assert "dot-product (asimddp)" in candidates[0].reason


def test_a_core_without_dot_product_still_runs_int8_but_says_so():
    info = PlatformInfo(
        os="linux",
        arch="aarch64",
        cpu_implementer="0x41",
        cpu_part="0xd08",
        cpu_flags={"fp", "asimd", "crc32"},
        cpus=4,
        **ORT_CPU_ONLY,
    )
    first = choose_backends(info)[0]
    assert first.precision == "int8"
    assert "dot-product" not in first.reason and "lacks asimddp" in first.reason


def test_x86_with_an_nvidia_gpu_and_onnxruntime_gpu_runs_on_the_gpu():
    candidates = choose_backends(captured("x86-rtx4090", **ORT_GPU))
    assert [c.providers[0] for c in chosen(candidates)] == [TRT, CUDA, CPU]
    assert "NVIDIA GeForce RTX 4090" in candidates[0].reason
    assert candidates[0].precision == "fp16"


def test_x86_with_an_nvidia_gpu_but_cpu_only_onnxruntime_says_what_to_install():
    info = captured("x86-rtx4090", **ORT_CPU_ONLY)
    candidates = choose_backends(info)
    assert [c.providers for c in chosen(candidates)] == [(CPU,)]
    assert "AVX-512 VNNI dot-product int8 kernels" in candidates[0].reason
    cuda = skipped_with(candidates, CUDA)
    assert "onnxruntime-gpu" in cuda.reason and "RTX 4090" in cuda.reason
    with pytest.raises(BackendUnavailableError, match="onnxruntime-gpu"):
        choose_backends(info, "cuda")


def test_x86_with_avx2_only_runs_int8_without_claiming_dot_product():
    info = captured("x86-avx2", **ORT_CPU_ONLY)
    first = choose_backends(info)[0]
    assert (first.providers, first.precision) == ((CPU,), "int8")
    assert "AVX2" in first.reason and "dot-product" not in first.reason
    with pytest.raises(BackendUnavailableError, match="no NVIDIA GPU found"):
        choose_backends(info, "tensorrt")
    with pytest.raises(BackendUnavailableError, match="Apple Silicon"):
        choose_backends(info, "mlx")


@pytest.mark.parametrize(("flag", "words"), [("avx_vnni", "AVX-VNNI"), ("amx_int8", "AMX")])
def test_x86_vnni_and_amx_are_named(flag, words):
    info = PlatformInfo(os="linux", arch="x86_64", cpu_flags={"avx2", flag}, **ORT_CPU_ONLY)
    reason = choose_backends(info)[0].reason
    assert words in reason and "dot-product int8 kernels" in reason


def test_a_cpu_limited_container_sizes_by_its_quota():
    info = captured("container-limited", **ORT_CPU_ONLY)
    assert (info.cpus, info.memory_bytes) == (2, 2 * GiB)
    assert "(2 usable CPUs)" in choose_backends(info)[0].reason


def test_apple_m1_with_mlx_runs_mlx_first_then_onnx_cpu_and_never_coreml():
    candidates = choose_backends(captured("apple-m1", **ORT_AND_MLX))
    first, second = chosen(candidates)
    assert (first.backend, first.providers, first.precision) == ("mlx", (), "mlx-fp16")
    assert "Apple M1" in first.reason
    assert (second.backend, second.providers) == ("onnx", (CPU,))
    assert "dot-product (asimddp)" in second.reason and "i8mm" not in second.reason
    assert not any("CoreMLExecutionProvider" in c.providers for c in candidates)


def test_apple_m4_onnx_cpu_uses_i8mm():
    candidates = choose_backends(captured("apple-m4", **ORT_AND_MLX), "onnx")
    first = candidates[0]
    assert (first.backend, first.providers) == ("onnx", (CPU,))
    assert "i8mm" in first.reason and "Apple M4" in first.reason
    mlx = [c for c in candidates if c.backend == "mlx"][0]
    assert not mlx.chosen and "excludes" in mlx.reason


def test_apple_silicon_without_mlx_falls_to_onnx_and_forced_mlx_raises():
    info = captured("apple-m1", **ORT_CPU_ONLY)
    candidates = choose_backends(info)
    assert [c.backend for c in chosen(candidates)] == ["onnx"]
    mlx = [c for c in candidates if c.backend == "mlx"][0]
    assert "pip install mlx" in mlx.reason
    with pytest.raises(BackendUnavailableError, match="mlx is not installed"):
        choose_backends(info, "mlx")
    with pytest.raises(BackendUnavailableError, match="does not run on macOS"):
        choose_backends(info, "cuda")


def test_rosetta_python_on_apple_silicon_is_told_to_use_arm64():
    info = PlatformInfo(os="darwin", arch="x86_64", apple_chip="Apple M2 Pro", **ORT_AND_MLX)
    with pytest.raises(BackendUnavailableError, match="Rosetta"):
        choose_backends(info, "mlx")


def test_without_onnxruntime_every_onnx_candidate_is_skipped():
    info = captured("x86-rtx4090", **NO_RUNTIMES)
    candidates = choose_backends(info)
    assert chosen(candidates) == []
    onnx = [c for c in candidates if c.backend == "onnx"]
    assert len(onnx) == 4
    assert all("onnxruntime is not installed" in c.reason for c in onnx)
    for preference in ("onnx", "cpu", "cuda"):
        with pytest.raises(BackendUnavailableError, match="onnxruntime is not installed"):
            choose_backends(info, preference)


def test_an_onnxruntime_that_failed_to_import_is_not_used():
    info = PlatformInfo(os="linux", arch="x86_64", runtimes={"onnxruntime": "1.31.1"})
    with pytest.raises(BackendUnavailableError, match="listed no execution providers"):
        choose_backends(info, "cpu")


def test_an_unknown_preference_is_refused():
    with pytest.raises(BackendUnavailableError, match="unknown backend preference 'coreml'"):
        choose_backends(captured("x86-avx2", **ORT_CPU_ONLY), "coreml")


@pytest.mark.parametrize("device", sorted(p.name for p in PLATFORMS.iterdir()))
@pytest.mark.parametrize("runtimes", [ORT_CPU_ONLY, ORT_GPU, ORT_ACL, ORT_AND_MLX, NO_RUNTIMES])
def test_every_verdict_is_complete_and_ordered(device, runtimes):
    """Chosen candidates come first; every candidate appears once with a reason; a
    forced preference either chooses something or raises, while "auto" may choose
    nothing and leave the refusal to its caller."""
    candidates = choose_backends(captured(device, **runtimes))
    flags = [c.chosen for c in candidates]
    assert flags == sorted(flags, reverse=True)
    assert sorted((c.backend, c.providers[:1]) for c in candidates) == sorted(
        [("mlx", ()), ("onnx", (TRT,)), ("onnx", (CUDA,)), ("onnx", (ACL,)), ("onnx", (CPU,))]
    )
    assert all(c.reason for c in candidates)
    for preference in BACKEND_PREFERENCES:
        try:
            forced = choose_backends(captured(device, **runtimes), preference)
        except BackendUnavailableError as exc:
            assert str(exc)
        else:
            assert forced[0].chosen or (preference == "auto" and not any(flags))


# ---------------------------------------------------------------- this machine


def test_snapshot_of_this_machine():
    before = set(sys.modules)
    info = snapshot_platform()
    assert info.arch == stdlib_platform.machine()
    assert info.os == stdlib_platform.system().lower()
    assert 1 <= info.cpus <= (os.cpu_count() or 1)
    assert info.memory_bytes is not None and info.memory_bytes > 0
    assert info.disk_free_bytes is not None and info.disk_free_bytes > 0
    assert CPU in info.ort_providers
    assert info.runtimes["onnxruntime"] == importlib.metadata.version("onnxruntime")
    new_modules = {name.split(".")[0] for name in set(sys.modules) - before}
    heavy = new_modules & {"mlx", "torch", "tensorrt"}
    assert heavy == set()
    assert choose_backends(info)[0].chosen


def test_the_pool_charges_the_variant_a_load_would_really_run():
    """precision=auto picks FP16 on an NVIDIA GPU and INT8 on a CPU: the memory charge
    must price that same variant, not the CPU rule everywhere."""
    from edge_embed import planned_precision
    from tests.fakes import FAKE_MANIFEST

    manifest = dataclasses.replace(FAKE_MANIFEST, variants={p: None for p in ("fp32", "fp16", "int8")})
    assert planned_precision(manifest, "auto", "auto", captured("jetson-orin-nano-jp6", **ORT_GPU)) == "fp16"
    assert planned_precision(manifest, "auto", "auto", captured("x86-avx2", **ORT_CPU_ONLY)) == "int8"
    assert planned_precision(manifest, "fp32", "auto", captured("jetson-orin-nano-jp6", **ORT_GPU)) == "fp32"
    only_fp32 = dataclasses.replace(manifest, variants={"fp32": None})
    assert planned_precision(only_fp32, "auto", "auto", captured("jetson-orin-nano-jp6", **ORT_GPU)) == "fp32"
