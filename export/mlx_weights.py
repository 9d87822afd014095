"""Weights for the MLX backend: the source model's own tensors, as safetensors."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import BundleError, ExportError
from ..manifest import Manifest

__all__ = ["save_mlx_weights", "mlx_encoder"]

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


def save_mlx_weights(encoder: torch.nn.Module, path: Path, precision: str) -> dict:
    """Write the encoder's state dict under its Hugging Face names at `precision`."""
    from safetensors.torch import save_file

    dtype = _DTYPES[precision]
    tensors = {
        name: (t.detach().to(dtype) if t.is_floating_point() else t.detach()).contiguous()
        for name, t in encoder.state_dict().items()
    }
    save_file(tensors, str(path), metadata={"format": "edge-embed-mlx"})
    return {"method": "safetensors of the source weights", "dtype": precision, "names": "huggingface",
            "batch_invariant": True}


def mlx_encoder(work: Path, weights: Path, manifest: Manifest):
    """The MLX backend's encoder over candidate weights (feeds -> pooled vectors): what the
    export gates an MLX variant with."""
    from ..backends.mlx import MlxEncoder

    try:
        return MlxEncoder(work / "config.json", weights, manifest)
    except BundleError as exc:
        raise ExportError(f"MLX cannot run the exported weights: {exc}") from exc
