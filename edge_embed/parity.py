"""Fidelity figures of a variant against the FP32 reference, and the gates they must pass.

Used twice: by the export before a variant is written, and by the runtime at load, on
the device, against the bundle's golden vectors.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import GateError
from .manifest import Parity

__all__ = ["Gates", "measure_parity", "gate_failure", "check_gate", "batch_probe_indices", "alone_vs_batch_cos"]

BATCH_PROBES = 32


@dataclass(frozen=True, kw_only=True)
class Gates:
    """Minimum cosine similarity to the PyTorch FP32 reference, per precision."""

    fp32_cos_min: float = 0.9999
    fp16_cos_min: float = 0.999
    int8_cos_mean: float = 0.995
    int8_cos_min: float = 0.98
    # Weight-only 4-bit, for the large models where memory decides what fits.
    int4_cos_mean: float = 0.98
    int4_cos_min: float = 0.95
    # A text alone vs inside a batch of mixed lengths: the "same text, same vector" promise.
    batch_cos_min: float = 0.99999

    def record(self, precision: str) -> dict[str, float]:
        """The figures a variant was exported under, kept in its recipe so every device
        judges it by the gate it was shipped with."""
        return {**self.limits(precision), "batch_cos_min": self.batch_cos_min}

    @classmethod
    def recorded(cls, precision: str, recipe: dict) -> Gates:
        """The gates a variant was exported under; bundles that predate the record were
        shipped under the INT8 gate of their time (cos mean 0.99, min 0.97)."""
        kept = recipe.get("gate")
        if not kept:
            return cls(int8_cos_mean=0.99, int8_cos_min=0.97)
        prefix = {"fp32": "fp32", "mlx-fp32": "fp32", "fp16": "fp16", "mlx-fp16": "fp16", "int4": "int4"}.get(
            precision, "int8")
        values = {f"{prefix}_{figure}": value for figure, value in kept.items() if figure != "batch_cos_min"}
        if "batch_cos_min" in kept:
            values["batch_cos_min"] = kept["batch_cos_min"]
        return cls(**values)

    def limits(self, precision: str) -> dict[str, float]:
        """The figures a precision is judged by: {"cos_min": x, ...}."""
        if precision in ("fp32", "mlx-fp32"):
            return {"cos_min": self.fp32_cos_min}
        if precision in ("fp16", "mlx-fp16"):
            return {"cos_min": self.fp16_cos_min}
        if precision == "int4":
            return {"cos_mean": self.int4_cos_mean, "cos_min": self.int4_cos_min}
        return {"cos_mean": self.int8_cos_mean, "cos_min": self.int8_cos_min}


def _unit(v: np.ndarray) -> np.ndarray:
    v = v.astype(np.float64)
    return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)


def measure_parity(reference: np.ndarray, candidate: np.ndarray, texts: list[str], topk: int = 10) -> Parity:
    """Cosine to the reference per text, and how often each text keeps its top-k neighbours."""
    ref, cand = _unit(reference), _unit(candidate)
    cos = np.sum(ref * cand, axis=1)
    k = max(1, min(topk, len(texts) - 1))
    agreement = 1.0
    if len(texts) > 1:
        sim_ref, sim_cand = ref @ ref.T, cand @ cand.T
        np.fill_diagonal(sim_ref, -np.inf)
        np.fill_diagonal(sim_cand, -np.inf)
        top_ref = np.argsort(-sim_ref, axis=1)[:, :k]
        top_cand = np.argsort(-sim_cand, axis=1)[:, :k]
        agreement = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(top_ref, top_cand)]))
    worst = int(np.argmin(cos))
    return Parity(
        probes=len(texts),
        cos_min=round(float(cos[worst]), 6),
        cos_mean=round(float(cos.mean()), 6),
        topk=k,
        topk_agreement=round(agreement, 4),
        worst_text=texts[worst],
    )


def batch_probe_indices(lengths: list[int], count: int = BATCH_PROBES, max_tokens: int | None = None) -> list[int]:
    """`count` texts spread from the shortest to the longest: a batch of mixed lengths, so
    most rows carry padding (left or right, as the model pads). With `max_tokens`, only
    texts short enough that the padded batch stays within it (a device's token budget)."""
    limit = max_tokens // count if max_tokens is not None else None
    allowed = [i for i, n in enumerate(lengths) if limit is None or n <= limit] or [int(np.argmin(lengths))]
    order = [allowed[k] for k in np.argsort(np.asarray([lengths[i] for i in allowed]), kind="stable")]
    picks = np.linspace(0, len(order) - 1, min(count, len(order))).round().astype(int)
    return [int(order[i]) for i in sorted(set(picks.tolist()))]


def alone_vs_batch_cos(alone: np.ndarray, batched: np.ndarray) -> float:
    """The worst cosine between each text's vector alone and in the batch."""
    return round(float(np.sum(_unit(alone) * _unit(batched), axis=1).min()), 7)


def gate_failure(precision: str, parity: Parity, gates: Gates) -> GateError | None:
    """The error for the first figure below its gate, or None when the variant passes."""
    for figure, limit in gates.limits(precision).items():
        value = getattr(parity, figure)
        if value < limit:
            return GateError(precision, figure, value, limit, parity.worst_text)
    if parity.batch_cos_min is not None and parity.batch_cos_min < gates.batch_cos_min:
        return GateError(precision, "batch_cos_min (alone vs in a batch)", parity.batch_cos_min,
                         gates.batch_cos_min, parity.worst_text)
    return None


def check_gate(precision: str, parity: Parity, gates: Gates) -> None:
    failure = gate_failure(precision, parity, gates)
    if failure is not None:
        raise failure
