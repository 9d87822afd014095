"""Host-side pieces of Qwen3-VL that numpy computes before its graphs run.

M-RoPE: Qwen3-VL rotates each token by three positions (time, height, width). Text tokens
advance all three together, so text alone is ordinary 1-D RoPE; an image's merged patches
take their row and column in the image's grid, offset by where the image starts, and the
text after the image resumes past the image's larger side. These ids are inputs of the
decoder graph, computed per sequence from its token kinds and its images' grids.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np

__all__ = ["mrope_positions", "TEXT_TOKEN", "IMAGE_TOKEN"]

TEXT_TOKEN, IMAGE_TOKEN = 0, 1


def mrope_positions(token_kinds: Sequence[int] | np.ndarray, grids: Sequence[tuple[int, int, int]],
                    merge_size: int) -> np.ndarray:
    """Position ids [3, len(token_kinds)] of one unpadded sequence.

    `token_kinds` marks each token TEXT_TOKEN or IMAGE_TOKEN (the image pad tokens);
    `grids` holds each image's (t, h, w) in patches, in order of appearance; an image's run
    of pad tokens must hold t * h * w / merge_size**2 tokens.
    """
    kinds = np.asarray(token_kinds, dtype=np.int64)
    out = np.empty((3, len(kinds)), dtype=np.int64)
    images = iter(grids)
    current, index = 0, 0
    for kind, run in itertools.groupby(kinds.tolist()):
        length = sum(1 for _ in run)
        if kind == TEXT_TOKEN:
            out[:, index:index + length] = np.arange(current, current + length)
            current += length
        else:
            t, h, w = next(images)
            gh, gw = h // merge_size, w // merge_size
            if t * gh * gw != length:
                raise ValueError(f"an image of grid {(t, h, w)} has {t * gh * gw} tokens, but its run holds {length}")
            tt, hh, ww = np.meshgrid(np.arange(t), np.arange(gh), np.arange(gw), indexing="ij")
            out[0, index:index + length] = tt.reshape(-1) + current
            out[1, index:index + length] = hh.reshape(-1) + current
            out[2, index:index + length] = ww.reshape(-1) + current
            current += max(h, w) // merge_size
        index += length
    return out


def vision_rotary_positions(grid: tuple[int, int, int], merge_size: int) -> np.ndarray:
    """(row, column) of each patch [t * h * w, 2], in the merge-block order the patches
    arrive in: the vision tower's 2-D rotary positions."""
    t, h, w = grid
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    shape = (h // merge_size, merge_size, w // merge_size, merge_size)
    rows = rows.reshape(shape).transpose(0, 2, 1, 3).reshape(-1)
    cols = cols.reshape(shape).transpose(0, 2, 1, 3).reshape(-1)
    return np.tile(np.stack([rows, cols], axis=1), (t, 1)).astype(np.int64)


def _axis_taps(index: np.ndarray, size: int, side: int) -> tuple[np.ndarray, np.ndarray]:
    """Bilinear taps (align_corners) into a `side`-long table for positions on an axis of
    `size`, in float32 as the model computes them."""
    src = index.astype(np.float32) * np.float32(side - 1) / np.float32(max(size - 1, 1))
    floor = np.floor(src)
    offsets = np.arange(2, dtype=np.int64)
    taps = np.clip(floor.astype(np.int64)[:, None] + offsets, 0, side - 1)
    distance = np.abs(src[:, None] - floor[:, None] - offsets.astype(np.float32))
    return taps, np.maximum(np.float32(1) - distance, np.float32(0))


def position_embedding_taps(grid: tuple[int, int, int], merge_size: int, side: int) -> tuple[np.ndarray, np.ndarray]:
    """Where each patch reads the vision tower's learned `side` x `side` position table,
    resampled bilinearly to the image's grid: (indices [n, 4] int64, weights [n, 4] float32)."""
    t, h, w = grid
    within = np.arange(t * h * w, dtype=np.int64) % (h * w)
    blocks_w = w // merge_size
    row = (within // (merge_size * merge_size * blocks_w)) * merge_size + (within // merge_size) % merge_size
    col = ((within // (merge_size * merge_size)) % blocks_w) * merge_size + within % merge_size
    h_taps, h_weights = _axis_taps(row, h, side)
    w_taps, w_weights = _axis_taps(col, w, side)
    indices = (h_taps[:, :, None] * side + w_taps[:, None, :]).reshape(-1, 4)
    weights = (h_weights[:, :, None] * w_weights[:, None, :]).reshape(-1, 4)
    return indices, weights.astype(np.float32)
