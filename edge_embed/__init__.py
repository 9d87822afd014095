"""edge-embed: embedding models (texts and images) on edge hardware behind one provider interface."""

from __future__ import annotations

from .batching import BatchLimits
from .bundle import Bundle, load_bundle
from .corpus import check_same_bundle, embed_corpus
from .errors import (
    BackendUnavailableError,
    BundleError,
    CorpusError,
    EdgeEmbedError,
    ExportError,
    GateError,
    InvalidInputError,
    MemoryBudgetError,
    ModelNotFoundError,
    ModelNotReadyError,
    InputRunError,
    ModelRunError,
    NonFiniteOutputError,
    OverloadedError,
    RequestTimeoutError,
    UnauthenticatedError,
    WorkerStoppedError,
    WrongTaskError,
)
from .images import Image
from .loading import load, planned_precision
from .manifest import Manifest
from .provider import (
    BundleEmbedder,
    EmbeddingProvider,
    ModelRunner,
    ProviderInfo,
    Reranker,
    RerankResult,
)

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "load",
    "planned_precision",
    "load_bundle",
    "Image",
    "Bundle",
    "Manifest",
    "EmbeddingProvider",
    "Reranker",
    "RerankResult",
    "ModelRunner",
    "BatchLimits",
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
    "ModelNotReadyError",
    "MemoryBudgetError",
    "ModelRunError",
    "InputRunError",
    "NonFiniteOutputError",
    "RequestTimeoutError",
    "WorkerStoppedError",
    "CorpusError",
    "WrongTaskError",
    "embed_corpus",
    "check_same_bundle",
]

