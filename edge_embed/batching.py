"""Cutting a list of tokenized texts into batches that compute little padding."""

from __future__ import annotations

import dataclasses
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

    `stepped_rows` is for backends that compile shape profiles (TensorRT): a batch then
    has at most as many rows as the largest step (a power of two, or max_batch_size)
    whose profile holds its width, so every batch falls inside one of `profiles()`.
    """

    max_batch_tokens: int = 4096
    max_batch_size: int = 32
    stepped_rows: bool = False

    def __post_init__(self) -> None:
        for name in ("max_batch_tokens", "max_batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidInputError(f"{name} must be a positive integer, got {value!r}")

    def for_variant(self, batch_invariant: bool) -> BatchLimits:
        """These limits, or one text per batch for a variant whose vectors depend on its
        batch neighbours (per-tensor INT8): that keeps "same text, same vector"."""
        return self if batch_invariant else dataclasses.replace(self, max_batch_size=1)

    def row_steps(self) -> tuple[int, ...]:
        """The row counts shape profiles are built for: powers of two below max_batch_size, and it."""
        steps = {self.max_batch_size}
        rows = 1
        while rows < self.max_batch_size:
            steps.add(rows)
            rows *= 2
        return tuple(sorted(steps))

    def rows_for(self, width: int) -> int:
        """The most texts a batch padded to `width` tokens may hold (at least one)."""
        cap = max(1, min(self.max_batch_size, self.max_batch_tokens // max(width, 1)))
        if not self.stepped_rows:
            return cap
        return max(r for r in self.row_steps() if r <= cap)

    def fits(self, rows: int, width: int) -> bool:
        """Whether a batch of `rows` texts padded to `width` tokens is within the limits."""
        return rows * width <= self.max_batch_tokens and rows <= self.rows_for(width)

    def profiles(self, max_length: int) -> list[tuple[int, int]]:
        """(rows, width) maxima of shape profiles that hold every batch these limits form
        for a model of `max_length` tokens, narrowest first.

        Each profile stays within max_batch_tokens (its attention and activations are
        what the budget allows), except the single-row one, which reaches max_length: a
        text longer than the budget runs alone. One (rows x max_length) profile instead
        would size the engine for 32 x 8192 tokens on Qwen3, tens of GB of attention.
        """
        shapes = {(1, max_length)}
        for rows in self.row_steps():
            width = min(max_length, self.max_batch_tokens // rows)
            if width >= 1:
                shapes.add((rows, width))
        # Drop a profile that another holds entirely (more rows and at least its width).
        kept = [s for s in shapes if not any(o != s and o[0] >= s[0] and o[1] >= s[1] for o in shapes)]
        return sorted(kept, key=lambda s: (s[1], -s[0]))


def plan_batches(lengths: Sequence[int], max_tokens: int, max_batch: int, *,
                 stepped_rows: bool = False) -> list[np.ndarray]:
    """Group text indices into batches by a padded-token budget.

    Texts are sorted by length (longest first, so the largest batch shape is met early),
    and a batch grows while `rows * longest_row <= max_tokens`, `rows <= max_batch` and
    the next text is at least half as long as the longest (so a few long texts never
    drag a crowd of short ones up to their width). A text longer than the budget still
    gets a batch of its own. `stepped_rows`: see BatchLimits.
    """
    if max_tokens < 1 or max_batch < 1:
        raise InvalidInputError("max_tokens and max_batch must be positive")
    limits = BatchLimits(max_batch_tokens=max_tokens, max_batch_size=max_batch, stepped_rows=stepped_rows)
    order = np.argsort(-np.asarray(lengths, dtype=np.int64), kind="stable")
    batches: list[np.ndarray] = []
    start = 0
    while start < len(order):
        width = lengths[order[start]]  # the longest row of this batch: order is descending
        stop = min(len(order), start + limits.rows_for(width))
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
