"""The EmbeddingProvider contract and the shared text -> vector pipeline of every backend."""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Protocol, runtime_checkable

import numpy as np

from .batching import plan_batches
from .bundle import Bundle
from .errors import EdgeEmbedError
from .tokenization import BundleTokenizer, check_texts

__all__ = ["EmbeddingProvider", "ProviderInfo", "BundleEmbedder", "DEFAULT_MAX_BATCH_TOKENS", "DEFAULT_MAX_BATCH_SIZE"]

DEFAULT_MAX_BATCH_TOKENS = 4096
DEFAULT_MAX_BATCH_SIZE = 64


@dataclass(frozen=True, kw_only=True)
class ProviderInfo:
    """What is running: the model, its limits and where it actually executes."""

    model_id: str
    dim: int
    matryoshka_min_dim: int | None
    max_length: int
    precision: str
    backend: str
    execution_providers: tuple[str, ...]
    threads: int
    instruction_aware: bool


@runtime_checkable
class EmbeddingProvider(Protocol):
    """Texts in, float32 vectors out; synchronous (the server owns concurrency)."""

    @property
    def info(self) -> ProviderInfo: ...

    def embed(
        self,
        texts: Sequence[str],
        *,
        instruction: str | None = None,
        dimensions: int | None = None,
        normalize: bool = True,
        truncate: bool = True,
    ) -> np.ndarray: ...

    def count_tokens(self, texts: Sequence[str], *, instruction: str | None = None) -> list[int]: ...

    def close(self) -> None: ...

    def __enter__(self) -> EmbeddingProvider: ...

    def __exit__(self, *exc: object) -> None: ...


class BundleEmbedder(abc.ABC):
    """Tokenize, batch by a token budget, run the backend, then Matryoshka and normalize.

    A backend subclasses this and implements `_forward`: padded arrays in, pooled
    (unnormalized) float32 vectors out. Everything a caller can get wrong is checked
    here, once, for every backend.
    """

    backend_name: ClassVar[str]

    def __init__(
        self,
        bundle: Bundle,
        precision: str,
        *,
        max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
        max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
    ):
        self.bundle = bundle
        self.manifest = bundle.manifest
        self.precision = precision
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_size = max_batch_size
        self.tokenizer = BundleTokenizer(bundle.tokenizer_path, bundle.manifest)

    @property
    @abc.abstractmethod
    def info(self) -> ProviderInfo: ...

    @abc.abstractmethod
    def _forward(self, seqs: list[np.ndarray]) -> np.ndarray:
        """Pooled vectors [len(seqs), dim] for one batch of token id sequences."""

    def embed(
        self,
        texts: Sequence[str],
        *,
        instruction: str | None = None,
        dimensions: int | None = None,
        normalize: bool = True,
        truncate: bool = True,
    ) -> np.ndarray:
        width = self.manifest.check_dimensions(dimensions)
        seqs = self.tokenize(texts, instruction=instruction, truncate=truncate)
        return self.finish(self.embed_token_ids(seqs), width, normalize)

    def tokenize(
        self,
        texts: Sequence[str],
        *,
        instruction: str | None = None,
        truncate: bool = True,
        field: str = "texts",
    ) -> list[np.ndarray]:
        """Validated texts -> token id sequences, the instruction template applied."""
        texts = check_texts(texts, field)
        if not texts:
            return []
        formatted = self.tokenizer.format(texts, instruction)
        return self.tokenizer.encode(formatted, truncate=truncate, field=field)

    @staticmethod
    def finish(pooled: np.ndarray, width: int, normalize: bool) -> np.ndarray:
        """Matryoshka cut to `width`, then L2 normalization: the order the models were trained in."""
        out = pooled[:, :width]
        if normalize:
            out = out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), np.float32(1e-12))
        return np.ascontiguousarray(out, dtype=np.float32)

    def embed_token_ids(self, seqs: list[np.ndarray]) -> np.ndarray:
        """Raw pooled vectors for tokenized texts, in input order, batched by token budget."""
        out = np.empty((len(seqs), self.manifest.dim), dtype=np.float32)
        if not seqs:
            return out
        lengths = [len(s) for s in seqs]
        for batch in plan_batches(lengths, self.max_batch_tokens, self.max_batch_size):
            out[batch] = self._forward([seqs[i] for i in batch])
        if not np.isfinite(out).all():
            bad = int(np.flatnonzero(~np.isfinite(out).all(axis=1))[0])
            raise EdgeEmbedError(
                f"the {self.precision} model produced a non-finite vector for texts[{bad}]"
            )
        return out

    def count_tokens(self, texts: Sequence[str], *, instruction: str | None = None) -> list[int]:
        return [len(s) for s in self.tokenize(texts, instruction=instruction)]

    def close(self) -> None:
        """Release backend resources; the default holds none beyond Python objects."""

    def __enter__(self) -> BundleEmbedder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
