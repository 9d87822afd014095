"""Backends, registered by import string so that importing one never imports another's deps."""

from __future__ import annotations

import importlib

from ..errors import BackendUnavailableError

__all__ = ["BACKENDS", "backend_class"]

BACKENDS: dict[str, str] = {
    "onnx": "edge_embed.backends.onnx:OnnxProvider",
    "mlx": "edge_embed.backends.mlx:MlxProvider",
}


def backend_class(name: str) -> type:
    """The provider class registered under `name`, imported on demand."""
    try:
        target = BACKENDS[name]
    except KeyError:
        raise BackendUnavailableError(
            f"unknown backend {name!r}; known: {', '.join(BACKENDS)}"
        ) from None
    module_name, _, attr = target.partition(":")
    return getattr(importlib.import_module(module_name), attr)
