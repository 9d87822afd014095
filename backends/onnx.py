"""ONNX Runtime backend: one InferenceSession over the bundle's chosen variant."""

from __future__ import annotations

import importlib.util
import logging

import numpy as np

from ..bundle import Bundle
from ..errors import BackendUnavailableError, BundleError
from ..manifest import variant_format
from ..platform import usable_cpu_count
from ..provider import BundleEmbedder, ProviderInfo
from ..tokenization import model_inputs

__all__ = ["OnnxProvider"]

log = logging.getLogger(__name__)

# Which variant runs best where, when the caller says precision="auto".
_CPU_PREFERENCE = ("int8", "fp32", "fp16")
_GPU_PREFERENCE = ("fp16", "fp32", "int8")
_GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


class OnnxProvider(BundleEmbedder):
    """Runs a bundle variant with ONNX Runtime on the execution providers asked for.

    After the session exists, the providers ONNX Runtime really activated are compared
    with the request: ONNX Runtime quietly drops ones it cannot load, and a silent CPU
    fallback is exactly the kind of surprise this class refuses.
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
        threads: int | None = None,
        **batching: int,
    ):
        reason = self.unavailable_reason()
        if reason:
            raise BackendUnavailableError(reason)
        import onnxruntime as ort

        precision = self._choose_precision(bundle, precision, providers)
        super().__init__(bundle, precision, **batching)
        model_path = bundle.verify_variant(precision)
        self.threads = threads if threads is not None else usable_cpu_count()
        if self.threads < 1:
            raise BackendUnavailableError(f"threads must be at least 1, got {self.threads}")
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        missing = [p for p in providers if p not in ort.get_available_providers()]
        if missing:
            raise BackendUnavailableError(
                f"ONNX Runtime {ort.__version__} here offers {ort.get_available_providers()}, "
                f"not {missing}"
            )
        try:
            self._session = ort.InferenceSession(str(model_path), options, providers=list(providers))
        except Exception as exc:  # ORT raises its own untyped exceptions
            raise BundleError(f"ONNX Runtime cannot load {model_path.name}: {exc}") from exc
        active = tuple(self._session.get_providers())
        if providers[0] not in active:
            raise BackendUnavailableError(
                f"asked for {providers[0]} but ONNX Runtime activated only {active}"
            )
        self._active = active
        names = {i.name for i in self._session.get_inputs()}
        if names != set(self.manifest.graph_inputs):
            raise BundleError(
                f"{model_path.name} takes inputs {sorted(names)} but the manifest lists "
                f"{list(self.manifest.graph_inputs)}"
            )

    @staticmethod
    def _choose_precision(bundle: Bundle, precision: str, providers: tuple[str, ...]) -> str:
        if precision != "auto":
            bundle.variant(precision)  # raises BundleError naming what the bundle has
            if variant_format(precision) != "onnx":
                raise BundleError(f"{precision} is an MLX variant; load it with backend='mlx'")
            return precision
        order = _GPU_PREFERENCE if providers[0] in _GPU_PROVIDERS else _CPU_PREFERENCE
        for candidate in order:
            if candidate in bundle.manifest.variants:
                return candidate
        raise BundleError(f"bundle {bundle.path} has no model variants")

    @property
    def info(self) -> ProviderInfo:
        m = self.manifest
        return ProviderInfo(
            model_id=m.model_id,
            dim=m.dim,
            matryoshka_min_dim=m.matryoshka_min_dim,
            max_length=m.max_length,
            precision=self.precision,
            backend=self.backend_name,
            execution_providers=self._active,
            threads=self.threads,
            instruction_aware=m.instruction_template is not None,
        )

    def _forward(self, seqs: list[np.ndarray]) -> np.ndarray:
        feeds = model_inputs(seqs, self.manifest)
        (pooled,) = self._session.run([self.manifest.graph_output], feeds)
        return pooled

    def close(self) -> None:
        self._session = None
