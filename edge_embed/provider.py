"""The EmbeddingProvider contract and the shared text -> vector pipeline of every backend."""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Protocol, runtime_checkable

import numpy as np

from .batching import plan_batches
from .bundle import Bundle
from .errors import BackendUnavailableError, BundleError, EdgeEmbedError
from .manifest import Parity
from .parity import Gates, gate_failure, measure_parity
from .platform import usable_cpu_count
from .tokenization import BundleTokenizer, check_texts

__all__ = ["EmbeddingProvider", "ProviderInfo", "BundleEmbedder", "DEFAULT_MAX_BATCH_TOKENS", "DEFAULT_MAX_BATCH_SIZE"]

DEFAULT_MAX_BATCH_TOKENS = 4096
DEFAULT_PARITY_PROBES = 32
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
    fallback: str | None = None  # why a preferred backend or provider is not the one running
    parity: Parity | None = None  # boot-time check against the bundle's golden vectors


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
        threads: int | None = None,
        max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS,
        max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
    ):
        self.threads = threads if threads is not None else usable_cpu_count()
        if self.threads < 1:
            raise BackendUnavailableError(f"threads must be at least 1, got {self.threads}")
        self.bundle = bundle
        self.manifest = bundle.manifest
        self.precision = precision
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_size = max_batch_size
        self.tokenizer = BundleTokenizer(bundle.tokenizer_path, bundle.manifest)
        if not bundle.variant(precision).recipe.get("batch_invariant", True):
            # Its vectors would depend on batch neighbours (per-batch activation scales):
            # one text per batch keeps "same text, same vector".
            self.max_batch_size = 1
        self.parity: Parity | None = None
        self.fallback: str | None = None

    @property
    @abc.abstractmethod
    def execution_providers(self) -> tuple[str, ...]:
        """Where the model really runs, as the backend reports it (not what was asked for)."""

    @property
    def info(self) -> ProviderInfo:
        m = self.manifest
        return ProviderInfo(
            model_id=m.model_id,
            dim=m.dim,
            matryoshka_min_dim=m.matryoshka_min_dim,
            max_length=m.max_length,
            precision=self.precision,
            backend=self.backend_name,
            execution_providers=self.execution_providers,
            threads=self.threads,
            instruction_aware=m.instruction_template is not None,
            fallback=self.fallback,
            parity=self.parity,
        )

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

    def parity_passes(self, gates: Gates = Gates()) -> bool:
        """Whether the last boot parity check met the variant's gate."""
        return self.parity is not None and gate_failure(self.precision, self.parity, gates) is None

    def check_parity(self, probes: int = DEFAULT_PARITY_PROBES, *, enforce: bool = True,
                     gates: Gates = Gates()) -> Parity:
        """Embed golden probe texts here, on this device, and compare with the FP32 reference.

        An INT8 or FP16 graph can score differently on other CPU kernels or GPUs than where
        it was exported; this is the check that settles it. Below the variant's gate the
        provider is refused (BundleError) unless `enforce` is false. `probes` texts are
        spread evenly over the golden set, plus the export's worst one.
        """
        texts, reference = self.bundle.golden()
        export_worst = self.manifest.variants[self.precision].parity.worst_text
        picked = sorted(set(np.linspace(0, len(texts) - 1, min(probes, len(texts))).astype(int).tolist())
                        | ({texts.index(export_worst)} if export_worst in texts else set()))
        chosen = [texts[i] for i in picked]
        seqs = self.tokenizer.encode(chosen)
        parity = measure_parity(reference[picked], self.embed_token_ids(seqs), chosen)
        self.parity = parity
        failure = gate_failure(self.precision, parity, gates)
        if failure is not None and enforce:
            raise BundleError(
                f"the {self.precision} variant fails its parity gate on this device: {failure.figure} "
                f"{failure.value:.5f} < {failure.gate} against the FP32 reference (worst text: "
                f"{failure.worst_text[:60]!r}); use another variant, or override the check to accept it"
            )
        return parity

    def close(self) -> None:
        """Release backend resources; the default holds none beyond Python objects."""

    def __enter__(self) -> BundleEmbedder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
