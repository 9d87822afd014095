"""ONNX Runtime backend: one InferenceSession over the bundle's chosen variant."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import logging
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

import numpy as np

from ..batching import BatchLimits
from ..bundle import Bundle
from ..errors import BackendUnavailableError, BundleError
from ..manifest import variant_format
from ..provider import BundleEmbedder
from ..tokenization import model_inputs
from ..vl import decoder_feeds

__all__ = ["OnnxProvider", "trt_cache_dir", "auto_precision"]

log = logging.getLogger(__name__)

# Which variant runs best where, when the caller says precision="auto".
# int4 runs only when asked for, or when a bundle has nothing else: it trades accuracy for memory.
_CPU_PREFERENCE = ("int8", "fp32", "fp16", "int4")
_GPU_PREFERENCE = ("fp16", "fp32", "int8", "int4")
_GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_REASON_HINTS = ("Failed", "failed", "EP Error", "Require", "Please install", "cannot open")


_ORT_LINE = re.compile(r"^\s*(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+ \[[VIWEF]:onnxruntime:|\*{5,}|EP Error|Falling back to \[)")


@contextlib.contextmanager
def _captured_fds() -> Iterator[list[str]]:
    """Collect what ONNX Runtime writes to fds 1 and 2 while a session is created.

    A provider that cannot load is reported only there, as log lines and a printed
    "EP Error", never as an exception; capturing also keeps that noise out of stdout.
    Whatever else was written meanwhile (the server's own log lines, from other threads)
    is written back to the fd it was meant for once the session exists: late, never lost.
    """
    lines: list[str] = []
    sys.stdout.flush()
    sys.stderr.flush()
    saved = (os.dup(1), os.dup(2))
    with tempfile.TemporaryFile() as out_sink, tempfile.TemporaryFile() as err_sink:
        os.dup2(out_sink.fileno(), 1)
        os.dup2(err_sink.fileno(), 2)
        try:
            yield lines
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd, sink in zip(saved, (out_sink, err_sink)):
                sink.seek(0)
                others = []
                for line in sink.read().decode(errors="replace").splitlines(keepends=True):
                    if _ORT_LINE.match(_ANSI.sub("", line)):
                        lines.append(_ANSI.sub("", line).rstrip("\n"))
                    else:
                        others.append(line)
                if others:
                    os.write(fd, "".join(others).encode())
                os.close(fd)


def _reason(lines: list[str]) -> str:
    picked = [line.strip() for line in lines if any(h in line for h in _REASON_HINTS)]
    return " | ".join(picked[:3]) or "ONNX Runtime gave no reason"


def trt_profile_options(limits: BatchLimits, max_length: int, inputs: tuple[str, ...]) -> dict[str, str]:
    """TensorRT provider options for one optimization profile per `limits.profiles`.

    ONNX Runtime reads an input named again as the next profile. Each profile spans
    (1, 1) to its (rows, width) maximum and is tuned for that maximum, except the
    single-row long-text profile, tuned for a text as long as the token budget.
    """
    profiles = limits.profiles(max_length)

    def shapes(pick) -> str:
        return ",".join(f"{name}:{r}x{w}" for rows, width in profiles for r, w in [pick(rows, width)]
                        for name in inputs)

    return {
        "trt_profile_min_shapes": shapes(lambda rows, width: (1, 1)),
        "trt_profile_opt_shapes": shapes(lambda rows, width: (rows, min(width, limits.max_batch_tokens))),
        "trt_profile_max_shapes": shapes(lambda rows, width: (rows, width)),
    }


def auto_precision(variants, providers: tuple[str, ...] = ("CPUExecutionProvider",),
                   int8_kernels: str | None = None) -> str | None:
    """The ONNX variant precision="auto" runs on these providers; None if the bundle has none.

    On a CPU, a quantized variant the export measured slower than FP32 at every shape, on a
    CPU of this one's int8 kernel class (`int8_kernels`, read from this CPU when None), is
    passed over for FP32: int8 must not be picked for speed where it has none.
    """
    if providers[0] in _GPU_PROVIDERS:
        return next((candidate for candidate in _GPU_PREFERENCE if candidate in variants), None)
    if int8_kernels is None:
        from ..platform import this_cpu

        int8_kernels = this_cpu()[1]
    for candidate in _CPU_PREFERENCE:
        if candidate in variants and not ("fp32" in variants and slower_here(variants[candidate], int8_kernels)):
            return candidate
    return None


def slower_here(variant, int8_kernels: str) -> bool:
    """Whether the export measured this variant slower than FP32 at every shape on a CPU of this int8 kernel class."""
    speed = (getattr(variant, "recipe", None) or {}).get("speed") or {}
    ratios = list((speed.get("vs_fp32") or {}).values())
    return speed.get("int8_kernels") == int8_kernels and bool(ratios) and max(ratios) < 1.0


def trt_cache_dir(bundle: Bundle, precision: str) -> Path:
    """TensorRT engines are only valid for one model file, GPU and TensorRT version."""
    from ..default_model import cache_dir

    try:
        trt_version = metadata.version("tensorrt")
    except metadata.PackageNotFoundError:
        trt_version = os.environ.get("TRT_VERSION", "system")
    gpu = os.environ.get("EDGE_EMBED_GPU_NAME", "gpu0")
    key = f"{bundle.variant(precision).sha256[:16]}-{re.sub(r'[^A-Za-z0-9.]+', '_', gpu)}-trt{trt_version}"
    return cache_dir() / "tensorrt" / key


# Session config entries a variant's recipe may ask for.
SESSION_CONFIG_KEYS = frozenset({"session.x64quantprecision"})


class OnnxProvider(BundleEmbedder):
    """Runs a bundle variant with ONNX Runtime on the execution providers asked for.

    After the session exists, the providers ONNX Runtime really activated are compared
    with the request: ONNX Runtime quietly drops ones it cannot load. With `strict`
    (a forced choice) that is a BackendUnavailableError carrying ONNX Runtime's reason;
    otherwise the fallback is logged and shown in `info.fallback`.
    """

    backend_name = "onnx"

    @staticmethod
    def unavailable_reason() -> str | None:
        if importlib.util.find_spec("onnxruntime") is None:
            return "onnxruntime is not installed (pip install onnxruntime)"
        return None

    def __init__(
        self,
        bundle: Bundle,
        precision: str = "auto",
        *,
        providers: tuple[str, ...] = ("CPUExecutionProvider",),
        strict: bool = True,
        threads: int | None = None,
        limits: BatchLimits = BatchLimits(),
    ):
        reason = self.unavailable_reason()
        if reason:
            raise BackendUnavailableError(reason)
        import onnxruntime as ort

        precision = self._choose_precision(bundle, precision, providers)
        super().__init__(bundle, precision, threads=threads, limits=limits)
        model_path = bundle.verify_variant(precision)
        missing = [p for p in providers if p not in ort.get_available_providers()]
        if missing and strict:
            raise BackendUnavailableError(
                f"ONNX Runtime {ort.__version__} here offers {ort.get_available_providers()}, not {missing}"
            )
        wanted = [p for p in providers if p not in missing] or ["CPUExecutionProvider"]
        if self.manifest.vl is not None and "TensorrtExecutionProvider" in wanted:
            # Its decoder reads 3-row positions and image rows: shape profiles of another kind
            # than a text graph's, not built yet. CUDA (or the CPU) runs it.
            why = "TensorRT shape profiles for a Qwen3-VL decoder are not built yet"
            if strict and providers[0] == "TensorrtExecutionProvider":
                raise BackendUnavailableError(f"{why}; use the cuda backend")
            wanted = [p for p in wanted if p != "TensorrtExecutionProvider"] or ["CPUExecutionProvider"]
            self.fallback = why
        if "TensorrtExecutionProvider" in wanted:
            self.limits = dataclasses.replace(self.limits, stepped_rows=True)
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 2  # warnings carry the reason a provider did not load
        # What the variant's recipe needs of ONNX Runtime (e.g. exact int8 kernels on x86
        # without VNNI); only known keys, so a bundle cannot set arbitrary session options.
        for key, value in bundle.variant(precision).recipe.get("session_config", {}).items():
            if key in SESSION_CONFIG_KEYS:
                options.add_session_config_entry(key, str(value))
        with _captured_fds() as output:
            try:
                self._session = ort.InferenceSession(
                    str(model_path), options, providers=[(p, self._provider_options(p)) for p in wanted]
                )
            except Exception as exc:  # ORT raises its own untyped exceptions
                raise BundleError(f"ONNX Runtime cannot load {model_path.name}: {exc}") from exc
        self._active = tuple(self._session.get_providers())
        # A failed run raises with ORT's message (ModelRunError at the boundary); its log
        # lines would only repeat it on the console.
        self._run_options = ort.RunOptions()
        self._run_options.log_severity_level = 3
        if "TensorrtExecutionProvider" not in self._active:
            self.limits = dataclasses.replace(self.limits, stepped_rows=False)  # no profiles to keep to
        if providers[0] not in self._active:
            why = (f"asked for {providers[0]} but ONNX Runtime activated {list(self._active)}: "
                   f"{self.fallback or _reason(output)}")
            if strict:
                raise BackendUnavailableError(why)
            self.fallback = why
            log.warning("falling back: %s", why)
        names = {i.name for i in self._session.get_inputs()}
        if names != set(self.manifest.graph_inputs):
            raise BundleError(
                f"{model_path.name} takes inputs {sorted(names)} but the manifest lists "
                f"{list(self.manifest.graph_inputs)}"
            )
        self._vision = None
        if self.manifest.image is not None:
            # The vision graph's input is fixed in shape but for the batch: no TensorRT shape
            # profiles of the text graph's kind; it runs on the CUDA or CPU provider.
            vision_path = bundle.verify_vision(precision)
            vision_providers = [p for p in self._active if p != "TensorrtExecutionProvider"]
            try:
                self._vision = ort.InferenceSession(str(vision_path), options, providers=vision_providers)
            except Exception as exc:  # ORT raises its own untyped exceptions
                raise BundleError(f"ONNX Runtime cannot load {vision_path.name}: {exc}") from exc

    def _provider_options(self, name: str) -> dict[str, str]:
        if name != "TensorrtExecutionProvider":
            return {}
        # Engines and timing caches persist, keyed by model, GPU and TensorRT version, and
        # the shape profiles hold every batch the batcher can form (see BatchLimits.profiles):
        # no rebuild on restart, none on an unexpected shape.
        cache = trt_cache_dir(self.bundle, self.precision)
        cache.mkdir(parents=True, exist_ok=True)
        return {
            "trt_fp16_enable": "True",
            "trt_engine_cache_enable": "True",
            "trt_engine_cache_path": str(cache),
            "trt_timing_cache_enable": "True",
            "trt_timing_cache_path": str(cache),
            **trt_profile_options(self.limits, self.manifest.max_length, self.manifest.graph_inputs),
        }

    @staticmethod
    def _choose_precision(bundle: Bundle, precision: str, providers: tuple[str, ...]) -> str:
        if precision != "auto":
            bundle.variant(precision)  # raises BundleError naming what the bundle has
            if variant_format(precision) != "onnx":
                raise BundleError(f"{precision} is an MLX variant; load it with backend='mlx'")
            return precision
        chosen = auto_precision(bundle.manifest.variants, providers)
        if chosen is None:
            raise BundleError(f"bundle {bundle.path} has no ONNX variants")
        return chosen

    @staticmethod
    def auto_precision(variants, providers: tuple[str, ...], int8_kernels: str | None = None) -> str | None:
        return auto_precision(variants, providers, int8_kernels)

    @property
    def execution_providers(self) -> tuple[str, ...]:
        return self._active

    def warm_shapes(self) -> list[tuple[int, int]]:
        """Run each shape profile's largest batch once, so engines exist before the first request."""
        shapes = self.limits.profiles(self.manifest.max_length)
        for r, w in shapes:
            seqs = [np.full(w, self.manifest.pad_token_id + 1, dtype=np.int64) for _ in range(r)]
            self._forward(seqs)
        return shapes

    def _forward(self, seqs: list[np.ndarray]) -> np.ndarray:
        feeds = model_inputs(seqs, self.manifest)
        (pooled,) = self._session.run([self.manifest.graph_output], feeds, self._run_options)
        return pooled

    def _forward_vl(self, seqs) -> np.ndarray:
        feeds = decoder_feeds(seqs, self.manifest, lambda f: tuple(self._vision.run(None, f, self._run_options)))
        (pooled,) = self._session.run([self.manifest.graph_output], feeds, self._run_options)
        return pooled

    def _forward_images(self, pixel_values: np.ndarray) -> np.ndarray:
        (vectors,) = self._vision.run([self.manifest.graph_output], {"pixel_values": pixel_values},
                                      self._run_options)
        return vectors

    def close(self) -> None:
        self._session = None
        self._vision = None
