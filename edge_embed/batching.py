"""Cutting a list of tokenized texts into batches that compute little padding."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .errors import InvalidInputError

__all__ = ["BatchLimits", "plan_batches", "padded_share"]


@dataclass(frozen=True, kw_only=True)
class BatchLimits:
    """The one home of the batch limits: what one model run may hold.

    `max_batch_tokens` bounds rows x padded width (activation memory scales with it);
    `max_batch_size` bounds the rows. The server's batcher, in-process `embed`, the
    model pool's memory charges and the TensorRT profiles all read the same value.
    """

    max_batch_tokens: int = 4096
    max_batch_size: int = 32

    def __post_init__(self) -> None:
        for name in ("max_batch_tokens", "max_batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidInputError(f"{name} must be a positive integer, got {value!r}")

    def for_variant(self, batch_invariant: bool) -> BatchLimits:
        """These limits, or one text per batch for a variant whose vectors depend on its
        batch neighbours (per-tensor INT8): that keeps "same text, same vector"."""
        return self if batch_invariant else BatchLimits(max_batch_tokens=self.max_batch_tokens, max_batch_size=1)

    def fits(self, rows: int, width: int) -> bool:
        """Whether a batch of `rows` texts padded to `width` tokens is within the limits."""
        return rows <= self.max_batch_size and rows * width <= self.max_batch_tokens


def plan_batches(lengths: Sequence[int], max_tokens: int, max_batch: int) -> list[np.ndarray]:
    """Group text indices into batches by a padded-token budget.

    Texts are sorted by length (longest first, so the largest batch shape is met early),
    and a batch grows while `rows * longest_row <= max_tokens`, `rows <= max_batch` and
    the next text is at least half as long as the longest (so a few long texts never
    drag a crowd of short ones up to their width). A text longer than the budget still
    gets a batch of its own.
    """
    if max_tokens < 1 or max_batch < 1:
        raise InvalidInputError("max_tokens and max_batch must be positive")
    order = np.argsort(-np.asarray(lengths, dtype=np.int64), kind="stable")
    batches: list[np.ndarray] = []
    start = 0
    while start < len(order):
        width = lengths[order[start]]  # the longest row of this batch: order is descending
        stop = min(len(order), start + max(1, min(max_batch, max_tokens // max(width, 1))))
        end = start + 1
        while end < stop and 2 * lengths[order[end]] >= width:
            end += 1
        batches.append(order[start:end])
        start = end
    return batches


def padded_share(lengths: Sequence[int], batches: Sequence[Sequence[int]]) -> float:
    """The share of computed token slots that are padding under a batch plan."""
    real = padded = 0
    for batch in batches:
        rows = [lengths[i] for i in batch]
        real += sum(rows)
        padded += max(rows) * len(rows)
    return 0.0 if padded == 0 else 1.0 - real / padded
