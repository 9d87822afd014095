"""edge-embed: text-embedding models on edge hardware behind one provider interface."""

from __future__ import annotations

from pathlib import Path

from .bundle import Bundle, load_bundle
from .errors import (
    BackendUnavailableError,
    BundleError,
    EdgeEmbedError,
    ExportError,
    GateError,
    InvalidInputError,
    ModelNotFoundError,
    OverloadedError,
    UnauthenticatedError,
)
from .manifest import Manifest
from .provider import BundleEmbedder, EmbeddingProvider, ProviderInfo

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "load",
    "load_bundle",
    "Bundle",
    "Manifest",
    "EmbeddingProvider",
    "BundleEmbedder",
    "ProviderInfo",
    "EdgeEmbedError",
    "InvalidInputError",
    "ModelNotFoundError",
    "UnauthenticatedError",
    "BundleError",
    "BackendUnavailableError",
    "ExportError",
    "GateError",
    "OverloadedError",
]


def load(
    bundle: str | Path | Bundle,
    precision: str = "auto",
    backend: str = "auto",
    **options: object,
) -> BundleEmbedder:
    """Open a bundle and return a ready EmbeddingProvider for it.

    `backend="auto"` is ONNX Runtime on the CPU until platform detection lands; a named
    backend that cannot run raises BackendUnavailableError rather than falling back.
    """
    from .backends import backend_class

    if not isinstance(bundle, Bundle):
        bundle = load_bundle(bundle)
    name = "onnx" if backend == "auto" else backend
    return backend_class(name)(bundle, precision, **options)
