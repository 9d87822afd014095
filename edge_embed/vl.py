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
