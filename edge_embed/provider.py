"""The provider contracts and the shared text -> vector pipeline of every backend.

Three contracts, two of them built on the narrow one:

- `ModelRunner` is all the server and embed-corpus use: tokenize (texts, or query and
  document pairs), run exactly the batch it is given, post-process (vectors, or scores).
  Whoever calls `run_batch` decides every batch; a runner never re-plans it.
- `EmbeddingProvider` adds what an application calls in process to embed: `embed` (which
  plans its own batches under the same `BatchLimits`), `count_tokens`, a context manager.
- `Reranker` adds the in-process `rerank`.

Every backend implements all three through `BundleEmbedder`; a loaded model does one task
(`info.task`) and the other task's methods raise WrongTaskError.
"""

from __future__ import annotations

import abc
import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Protocol, runtime_checkable

import numpy as np

from .batching import BatchLimits, plan_batches
from .bundle import Bundle
from .images import EncodedImage, Image
from .vl import VLEncoder, VLInput, describe_parts
from .errors import (
    BackendUnavailableError,
    BundleError,
    EdgeEmbedError,
    InvalidInputError,
    ModelRunError,
    NonFiniteOutputError,
    WrongTaskError,
)
from .manifest import MultiVectorParity, Parity, ScoreParity, check_dimensions
from .parity import (
    Gates,
    alone_vs_batch_cos,
    alone_vs_batch_diff,
    alone_vs_batch_token_cos,
    batch_probe_indices,
    gate_failure,
    measure_parity,
    maxsim,
    measure_multivector_parity,
    measure_score_parity,
    pair_name,
    scores_from_logits,
)
from .platform import usable_cpu_count
from .tokenization import BundleTokenizer, check_query, check_texts

log = logging.getLogger(__name__)

__all__ = ["ModelRunner", "EmbeddingProvider", "Reranker", "RerankResult", "ProviderInfo", "BundleEmbedder",
           "finish_vectors", "wrong_task", "check_top_n"]

DEFAULT_PARITY_PROBES = 32


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
    default_instruction: str | None = None
    # False for a variant whose vectors depend on batch neighbours: it runs one text per batch.
    batch_invariant: bool = True
    # True where the backend compiles shape profiles (TensorRT): batches keep to their row steps.
    stepped_rows: bool = False
    fallback: str | None = None  # why a preferred backend or provider is not the one running
    parity: Parity | ScoreParity | None = None  # boot-time check against the bundle's golden vectors
    parity_ok: bool | None = None  # whether that check met the variant's gate; None: not checked
    task: str = "embed"  # "embed": texts -> vectors; "rerank": (query, document) pairs -> scores
    modalities: tuple[str, ...] = ("text",)  # what `embed` takes: texts, and images where "image" is here
    image_tokens: int | None = None  # what one image costs in the token budget; None: reads no images
    sha256: str | None = None  # the running model file's, from the manifest: which exact artifact this is

    def check_dimensions(self, dimensions: int | None) -> int:
        """The output width for a requested Matryoshka dimension, or InvalidInputError."""
        return check_dimensions(dimensions, model_id=self.model_id, dim=self.dim, min_dim=self.matryoshka_min_dim)

    def batch_limits(self, limits: BatchLimits) -> BatchLimits:
        """`limits` narrowed to what this variant can run: "same text, same vector", and
        batches inside the backend's shape profiles."""
        return dataclasses.replace(limits.for_variant(self.batch_invariant), stepped_rows=self.stepped_rows)


@runtime_checkable
class ModelRunner(Protocol):
    """What the server and embed-corpus need of a loaded model, and nothing more.

    `run_batch` runs exactly the sequences it is given as one batch and returns the raw
    output [len(seqs), dim]; it raises only EdgeEmbedError (foreign exceptions are
    translated at the backend boundary). An embedder's sequences come from `tokenize` and
    `finish` cuts, checks and normalizes its vectors; a reranker's come from
    `tokenize_pairs` and `finish_scores` turns its logits into scores. The half of the
    other task raises WrongTaskError naming both kinds.
    """

    @property
    def info(self) -> ProviderInfo: ...

    def tokenize(
        self, texts: Sequence[str], *, instruction: str | None = None, truncate: bool = True, field: str = "texts"
    ) -> list[np.ndarray]: ...

    def run_batch(self, seqs: Sequence[np.ndarray]) -> np.ndarray: ...

    def finish(self, pooled: np.ndarray, width: int, normalize: bool, *, field: str = "texts") -> np.ndarray: ...

    def tokenize_pairs(self, query: str, documents: Sequence[str], *, instruction: str | None = None,
                       truncate: bool = True, field: str = "documents") -> list[np.ndarray]: ...

    def finish_scores(self, logits: np.ndarray, *, field: str = "documents") -> np.ndarray: ...

    def close(self) -> None: ...


@runtime_checkable
class EmbeddingProvider(ModelRunner, Protocol):
    """Texts in, float32 vectors out; synchronous (the server owns concurrency)."""

    def embed(
        self,
        texts: Sequence[str | Image],
        *,
        instruction: str | None = None,
        dimensions: int | None = None,
        normalize: bool = True,
        truncate: bool = True,
    ) -> np.ndarray: ...

    def count_tokens(self, texts: Sequence[str], *, instruction: str | None = None) -> list[int]: ...

    def __enter__(self) -> EmbeddingProvider: ...

    def __exit__(self, *exc: object) -> None: ...


@dataclass(frozen=True)
class RerankResult:
    """One document's place in a rerank: its index in the request, its score, and the
    document itself when asked for."""

    index: int
    score: float
    document: object | None = None  # a text, or a vision-language reranker's image or parts


@runtime_checkable
class Reranker(ModelRunner, Protocol):
    """(query, documents) in, relevance scores out, in process; what a reranker bundle's
    provider adds to the runner."""

    def rerank(self, query: str | Image | Sequence[str | Image], documents: Sequence[object], *,
               instruction: str | None = None, top_n: int | None = None, return_documents: bool = False,
               truncate: bool = True) -> list[RerankResult]: ...


def _token_matrix(value: np.ndarray, dim: int, field: str) -> np.ndarray:
    """A caller's token vectors, checked: [tokens, dim], finite."""
    if value.ndim != 2 or value.shape[1] != dim or value.shape[0] == 0:
        raise InvalidInputError(f"{field} must be token vectors [tokens, {dim}], got shape {value.shape}")
    if not np.isfinite(value).all():
        raise InvalidInputError(f"{field} holds non-finite values")
    return value.astype(np.float32, copy=False)


def wrong_task(model_id: str, task: str, wanted: str) -> WrongTaskError:
    """The error for a request of one task sent to a model of the other, naming both."""
    kind = {"embed": "an embedding model", "rerank": "a reranker", "multivector": "a multi-vector model"}
    verb = {"embed": "embed texts", "rerank": "rerank documents", "multivector": "give a vector per token"}
    return WrongTaskError(f"{model_id} is {kind[task]} and cannot {verb[wanted]}; send this request to "
                          f"{kind[wanted]}")


def check_top_n(top_n: object) -> int | None:
    """`top_n` itself if it is None or a positive integer, else InvalidInputError: checked
    once, before any work, by every caller that ranks."""
    if top_n is not None and (isinstance(top_n, bool) or not isinstance(top_n, int) or top_n < 1):
        raise InvalidInputError(f"top_n must be a positive integer, got {top_n!r}")
    return top_n


def ranked(scores: np.ndarray, documents: Sequence[str], top_n: int | None,
           return_documents: bool) -> list[RerankResult]:
    """Results best first (ties keep request order), cut to `top_n` (checked by `check_top_n`)."""
    order = np.argsort(-scores, kind="stable")[: top_n or len(scores)]
    return [RerankResult(int(i), float(scores[i]), documents[i] if return_documents else None) for i in order]


def finish_vectors(pooled: np.ndarray, width: int, normalize: bool, *, field: str = "texts",
                   what: str = "the model") -> np.ndarray:
    """Matryoshka cut to `width`, then L2 normalization (the order the models were trained
    in). A non-finite row is never returned: NonFiniteOutputError names its input."""
    finite = np.isfinite(pooled).all(axis=1)
    if not finite.all():
        bad = int(np.flatnonzero(~finite)[0])
        raise NonFiniteOutputError(f"{what} produced a non-finite vector for {field}[{bad}]")
    out = pooled[:, :width]
    if normalize:
        out = out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), np.float32(1e-12))
    return np.ascontiguousarray(out, dtype=np.float32)


class BundleEmbedder(abc.ABC):
    """Tokenize, batch by a token budget, run the backend, then Matryoshka and normalize.

    A backend subclasses this and implements `_forward`: padded arrays in, pooled
    (unnormalized) float32 vectors out. Everything a caller can get wrong is checked
    here, once, for every backend, and `run_batch` is the boundary where a backend's own
    exceptions become ModelRunError.
    """

    backend_name: ClassVar[str]

    def __init__(self, bundle: Bundle, precision: str, *, threads: int | None = None,
                 limits: BatchLimits = BatchLimits()):
        self.threads = threads if threads is not None else usable_cpu_count()
        if self.threads < 1:
            raise BackendUnavailableError(f"threads must be at least 1, got {self.threads}")
        self.bundle = bundle
        self.manifest = bundle.manifest
        self.precision = precision
        self.tokenizer = BundleTokenizer(bundle.tokenizer_path, bundle.manifest)
        self._vl = VLEncoder(self.tokenizer, bundle.manifest) if bundle.manifest.vl is not None else None
        # A variant without a vision graph (a vision-language model's MLX weights) runs texts only.
        self.reads_images = bundle.variant(precision).vision is not None
        self.batch_invariant = bool(bundle.variant(precision).recipe.get("batch_invariant", True))
        self.limits = limits.for_variant(self.batch_invariant)
        self.parity: Parity | ScoreParity | None = None
        self.image_parity: Parity | None = None  # the boot check on the golden images, for bundles that read them
        self._judged_by: Gates | None = None  # the gates the last boot check applied
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
            instruction_aware=(m.rerank.takes_instruction if m.rerank is not None
                               else m.instruction_template is not None or (m.vl is not None and m.multivector is None)),
            default_instruction=m.rerank.default_instruction if m.rerank is not None else m.default_instruction,
            batch_invariant=self.batch_invariant,
            stepped_rows=self.limits.stepped_rows,
            fallback=self.fallback,
            parity=self.parity,
            parity_ok=None if self.parity is None else self.parity_passes(),
            task=m.task,
            modalities=m.modalities if self.reads_images else ("text",),
            image_tokens=m.image.tokens if self.reads_images else None,
            sha256=self.bundle.variant(self.precision).sha256,
        )

    @abc.abstractmethod
    def _forward(self, seqs: list[np.ndarray]) -> np.ndarray:
        """Pooled vectors [len(seqs), dim] for one batch of token id sequences."""

    def _forward_images(self, pixel_values: np.ndarray) -> np.ndarray:
        """Vectors [n, dim] for a batch of preprocessed images [n, 3, H, W]; backends that
        run vision graphs implement it."""
        raise InvalidInputError(f"the {self.backend_name} backend does not run images")

    def _forward_vl(self, seqs: list[VLInput]) -> np.ndarray:
        """Vectors for one batch of a vision-language embedder's inputs; backends that run
        its two graphs implement it."""
        raise InvalidInputError(f"the {self.backend_name} backend does not run vision-language models")

    def _forward_inputs(self, seqs: list[np.ndarray | EncodedImage]) -> np.ndarray:
        """One batch of texts and images: texts through the text graph, images through the
        vision graph, vectors back in the batch's order."""
        if self._vl is not None:
            return self._forward_vl(seqs)
        images = [i for i, s in enumerate(seqs) if isinstance(s, EncodedImage)]
        if not images:
            return self._forward(seqs)
        pixels = np.stack([seqs[i].pixel_values for i in images])
        if len(images) == len(seqs):
            return self._forward_images(pixels)
        texts = [i for i, s in enumerate(seqs) if not isinstance(s, EncodedImage)]
        out = np.empty((len(seqs), self.manifest.dim), dtype=np.float32)
        out[texts] = self._forward([seqs[i] for i in texts])
        out[images] = self._forward_images(pixels)
        return out

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
        texts: Sequence[str | Image],
        *,
        instruction: str | None = None,
        truncate: bool = True,
        field: str = "texts",
    ) -> list[np.ndarray | EncodedImage]:
        """Validated inputs -> what the graphs read: token id sequences for texts (the
        instruction template applied), pixel values for images (decoded and preprocessed
        here, one at a time, exactly as the model's processor does)."""
        if self.manifest.task != "embed":
            raise wrong_task(self.manifest.model_id, self.manifest.task, "embed")
        if self._vl is not None:
            return self._encode_vl(texts, instruction, truncate, field)
        if isinstance(texts, Sequence) and not isinstance(texts, (str, bytes)) and any(
                not isinstance(x, str) for x in texts):
            return self._encode_inputs(texts, instruction, truncate, field)
        texts = check_texts(texts, field)
        if not texts:
            return []
        return self.tokenizer.encode(texts, instruction=instruction, truncate=truncate, field=field)

    def _encode_vl(self, inputs: Sequence[object], instruction: str | None, truncate: bool,
                   field: str) -> list[VLInput]:
        """A vision-language embedder: every input (a text, an image or a list of both) is one
        chat through the manifest's template."""
        if isinstance(inputs, (str, bytes)) or not isinstance(inputs, Sequence):
            raise InvalidInputError(f"{field} must be a list of inputs (texts, images or lists of both), got "
                                    f"{type(inputs).__name__}")
        self._check_parts(inputs, field)
        return [self._vl.encode(item, instruction=instruction, truncate=truncate, field=f"{field}[{i}]")
                for i, item in enumerate(inputs)]

    def _check_parts(self, inputs: Sequence[object], field: str) -> None:
        """Every input a text, an image or a list of both, and images only where this variant
        runs them: checked before any image is decoded."""
        for i, item in enumerate(inputs):
            name = field if field == "query" else f"{field}[{i}]"
            parts = item if isinstance(item, (list, tuple)) else [item]
            for part in parts:
                if not isinstance(part, (str, Image)):
                    raise InvalidInputError(f"{name} must be a string, an edge_embed.Image or a list of both, got "
                                            f"{type(part).__name__}")
                if isinstance(part, Image) and not self.reads_images:
                    raise InvalidInputError(
                        f"{name} holds an image, and the {self.precision} variant of {self.manifest.model_id} "
                        "runs its texts only; load one of its ONNX variants (backend='onnx') to read images")

    def _encode_inputs(self, inputs: Sequence[object], instruction: str | None, truncate: bool,
                       field: str) -> list[np.ndarray | EncodedImage]:
        """A mix of texts and images: each checked for what this model reads."""
        spec = self.manifest.image
        for i, item in enumerate(inputs):
            if isinstance(item, Image):
                if not self.reads_images:
                    raise InvalidInputError(f"{field}[{i}] is an image, and {self.manifest.model_id} reads text only")
            elif isinstance(item, (list, tuple)):
                raise InvalidInputError(
                    f"{field}[{i}] mixes parts in one input; {self.manifest.model_id} embeds a text or an image "
                    "(a vision-language model such as Qwen3-VL-Embedding reads mixed inputs)")
            elif not isinstance(item, str):
                raise InvalidInputError(f"{field}[{i}] must be a string or an edge_embed.Image, got "
                                        f"{type(item).__name__}")
        out: list[np.ndarray | EncodedImage | None] = [None] * len(inputs)
        texts = [i for i, item in enumerate(inputs) if isinstance(item, str)]
        for i in texts:
            if not inputs[i].strip():
                raise InvalidInputError(f"{field}[{i}] is empty or only whitespace")
        if texts:
            for i, seq in zip(texts, self.tokenizer.encode([inputs[i] for i in texts], instruction=instruction,
                                                           truncate=truncate, field=field)):
                out[i] = seq
        for i, item in enumerate(inputs):
            if isinstance(item, Image):
                out[i] = spec.encode(item, field=f"{field}[{i}]")
        return out

    def finish(self, pooled: np.ndarray, width: int, normalize: bool, *, field: str = "texts") -> np.ndarray:
        return finish_vectors(pooled, width, normalize, field=field, what=f"the {self.precision} model")

    # -- multi-vector models (ColQwen3) -----------------------------------------------------

    def tokenize_multi(self, items: Sequence[object], *, kind: str = "document", truncate: bool = True,
                       field: str = "items") -> list[VLInput]:
        """Validated inputs of a multi-vector model -> what its graphs read, through its query
        or its document template (`kind`)."""
        if self.manifest.task != "multivector":
            raise wrong_task(self.manifest.model_id, self.manifest.task, "multivector")
        if kind not in ("query", "document"):
            raise InvalidInputError(f"kind must be 'query' or 'document', got {kind!r}")
        if isinstance(items, (str, bytes)) or not isinstance(items, Sequence):
            raise InvalidInputError(f"{field} must be a list of inputs (texts, images or lists of both), got "
                                    f"{type(items).__name__}")
        self._check_parts(items, field)
        return [self._vl.encode(item, instruction=None, truncate=truncate, field=f"{field}[{i}]", kind=kind)
                for i, item in enumerate(items)]

    def run_multi(self, seqs: Sequence[VLInput]) -> list[np.ndarray]:
        """Each input's token vectors [its tokens, dim] (float32, unit length), batched under
        `limits` in input order."""
        out: list[np.ndarray] = [np.empty((0, self.manifest.dim), np.float32)] * len(seqs)
        lengths = [len(s) for s in seqs]
        for batch in plan_batches(lengths, self.limits.max_batch_tokens, self.limits.max_batch_size,
                                  stepped_rows=self.limits.stepped_rows) if seqs else []:
            for i, rows in zip(batch, self.run_multi_batch([seqs[i] for i in batch])):
                out[i] = rows
        return out

    def run_multi_batch(self, seqs: Sequence[VLInput]) -> np.ndarray:
        """Exactly this batch, each input's token vectors cut to its length: an object array
        of [tokens, dim] matrices (what the server's batcher hands back per input)."""
        tokens = self.run_batch(seqs)
        out = np.empty(len(seqs), dtype=object)
        for j, seq in enumerate(seqs):
            rows = np.ascontiguousarray(tokens[j, : len(seq)], dtype=np.float32)
            if not np.isfinite(rows).all():
                raise NonFiniteOutputError(f"the {self.precision} model produced a non-finite token vector")
            out[j] = rows
        return out

    def embed_multi(self, items: Sequence[object], *, kind: str = "document",
                    truncate: bool = True) -> list[np.ndarray]:
        """One matrix per input: a unit vector per token ([tokens, dim] float32), the input read
        as a query or as a document (a page: an image, a text, or both)."""
        return self.run_multi(self.tokenize_multi(items, kind=kind, truncate=truncate))

    def maxsim(self, query: str | np.ndarray, pages: Sequence[object]) -> np.ndarray:
        """MaxSim scores of `query` (a text, or its token vectors) against `pages` (inputs, or
        their token vectors from embed_multi), float32 [len(pages)]."""
        if isinstance(query, np.ndarray):
            query_vectors = _token_matrix(query, self.manifest.dim, "query")
        else:
            (query_vectors,) = self.embed_multi([query], kind="query")
        if isinstance(pages, (str, bytes)) or not isinstance(pages, Sequence):
            raise InvalidInputError(f"pages must be a list, got {type(pages).__name__}")
        matrices = [_token_matrix(p, self.manifest.dim, f"pages[{i}]") if isinstance(p, np.ndarray) else None
                    for i, p in enumerate(pages)]
        rest = [i for i, m in enumerate(matrices) if m is None]
        for i, m in zip(rest, self.embed_multi([pages[i] for i in rest]) if rest else []):
            matrices[i] = m
        return maxsim(query_vectors, matrices)

    def _check_multivector_parity(self, probes: int, enforce: bool, gates: Gates) -> MultiVectorParity:
        """The boot check: the golden queries and pages embedded here (pages spread over the
        set, about `probes` inputs in all), token vectors and MaxSim against the FP32 ones."""
        kinds, parts, reference = self.bundle.golden_multivector()
        queries = [i for i, k in enumerate(kinds) if k == "query"]
        pages = [i for i, k in enumerate(kinds) if k == "document"]
        chosen_pages = sorted({pages[i] for i in np.linspace(0, len(pages) - 1, min(len(pages), max(
            4, probes - len(queries)))).astype(int).tolist()})
        picked = queries + chosen_pages
        opened: dict[str, Image] = {}
        seqs = []
        for i in picked:
            item = [p if isinstance(p, str) else opened.setdefault(p.name, Image.open(p.data, field=f"golden image "
                                                                                                 f"{p.name}"))
                    for p in parts[i]]
            seqs += self.tokenize_multi([item if len(item) > 1 else item[0]], kind=kinds[i], field="golden")
        names = [describe_parts(parts[i]) for i in picked]
        vectors = self.run_multi(seqs)
        batch = None
        if self.batch_invariant:
            sample = seqs[:: max(1, len(seqs) // 8)][:8]
            together = self.run_batch(sample)
            batch = alone_vs_batch_token_cos([self.run_multi([s])[0] for s in sample],
                                             [together[j, : len(s)] for j, s in enumerate(sample)])
        parity = dataclasses.replace(measure_multivector_parity(
            [reference[i] for i in picked], vectors, names, list(range(len(queries))),
            list(range(len(queries), len(picked)))), batch_cos_min=batch)
        if len(chosen_pages) < len(pages):
            # Order figures over a subset of the pages move in bigger steps: judged by the
            # vectors and scores here; the order was judged over every page at export.
            gates = dataclasses.replace(gates, rank_kendall_tau_mean=-1.0, rank_top1_agreement=0.0)
        return self._judge(parity, enforce, gates)

    # -- rerankers ----------------------------------------------------------------------

    def tokenize_pairs(self, query: str | Image | Sequence[str | Image], documents: Sequence[object], *,
                       instruction: str | None = None, truncate: bool = True,
                       field: str = "documents") -> list[np.ndarray | VLInput]:
        """A validated query and documents -> one token id sequence per pair; a long pair
        loses the end of its document, never the query or the template. A vision-language
        reranker's query and documents may each be a text, an image or a list of both."""
        if self.manifest.task != "rerank":
            raise wrong_task(self.manifest.model_id, self.manifest.task, "rerank")
        if self._vl is not None:
            if isinstance(documents, (str, bytes)) or not isinstance(documents, Sequence):
                raise InvalidInputError(f"{field} must be a list of documents (texts, images or lists of both), "
                                        f"got {type(documents).__name__}")
            self._check_parts([query], "query")
            self._check_parts(documents, field)
            return self._vl.encode_pairs(query, documents, instruction=instruction, truncate=truncate, field=field)
        query = check_query(query)
        documents = check_texts(documents, field)
        if not documents:
            return []
        return self.tokenizer.encode_pairs(query, documents, instruction=instruction, truncate=truncate, field=field)

    def finish_scores(self, logits: np.ndarray, *, field: str = "documents") -> np.ndarray:
        """The graph's logit per pair -> the model's relevance score (float32); a non-finite
        score is never returned."""
        logits = np.asarray(logits).reshape(-1)
        finite = np.isfinite(logits)
        if not finite.all():
            bad = int(np.flatnonzero(~finite)[0])
            raise NonFiniteOutputError(f"the {self.precision} model produced a non-finite score for {field}[{bad}]")
        return scores_from_logits(logits, self.manifest.rerank.activation).astype(np.float32)

    def rerank(self, query: str | Image | Sequence[str | Image], documents: Sequence[object], *,
               instruction: str | None = None, top_n: int | None = None, return_documents: bool = False,
               truncate: bool = True) -> list[RerankResult]:
        """The documents' indices and scores, best first (`top_n` of them). A multi-vector
        model scores them by MaxSim of the query's token vectors against theirs."""
        top_n = check_top_n(top_n)
        if self.manifest.task == "multivector":
            if instruction is not None:
                raise InvalidInputError(f"{self.manifest.model_id} takes no instruction")
            if isinstance(documents, (str, bytes)) or not isinstance(documents, Sequence):
                raise InvalidInputError(f"documents must be a list, got {type(documents).__name__}")
            (query_vectors,) = self.embed_multi([query], kind="query", truncate=truncate)
            pages = self.embed_multi(documents, truncate=truncate) if documents else []
            return ranked(maxsim(query_vectors, pages), list(documents), top_n, return_documents)
        seqs = self.tokenize_pairs(query, documents, instruction=instruction, truncate=truncate)
        if not seqs:
            return []
        return ranked(self.finish_scores(self.embed_token_ids(seqs)), list(documents), top_n, return_documents)

    def run_batch(self, seqs: Sequence[np.ndarray]) -> np.ndarray:
        """Run exactly this batch. The backend boundary: its exceptions become ModelRunError."""
        if not seqs:
            return np.empty((0, self.manifest.dim), dtype=np.float32)
        shape = f"{len(seqs)} x {max(len(s) for s in seqs)} tokens"
        try:
            return self._forward_inputs(list(seqs))
        except EdgeEmbedError:
            raise
        except MemoryError as exc:
            raise ModelRunError(f"the {self.precision} model ran out of memory on a batch of {shape}") from exc
        except Exception as exc:  # noqa: BLE001 - the backend boundary: ORT and MLX raise their own types
            raise ModelRunError(
                f"the {self.backend_name} backend failed on a batch of {shape}: {type(exc).__name__}: {exc}"
            ) from exc

    def embed_token_ids(self, seqs: list[np.ndarray]) -> np.ndarray:
        """Raw pooled vectors for tokenized texts, in input order, batched under `limits`."""
        out = np.empty((len(seqs), self.manifest.dim), dtype=np.float32)
        if not seqs:
            return out
        lengths = [len(s) for s in seqs]
        for batch in plan_batches(lengths, self.limits.max_batch_tokens, self.limits.max_batch_size,
                                  stepped_rows=self.limits.stepped_rows):
            out[batch] = self.run_batch([seqs[i] for i in batch])
        return out

    def count_tokens(self, texts: Sequence[str], *, instruction: str | None = None) -> list[int]:
        return [len(s) for s in self.tokenize(texts, instruction=instruction)]

    def warm_shapes(self) -> list[tuple[int, int]]:
        """Build ahead whatever the backend builds per shape (TensorRT engines); the shapes
        run. Backends that build nothing ahead run nothing."""
        return []

    def shipped_gates(self) -> Gates:
        """The gates this variant was exported under: what a device must reproduce."""
        return Gates.recorded(self.precision, self.bundle.variant(self.precision).recipe)

    def parity_passes(self, gates: Gates | None = None) -> bool:
        """Whether the last boot parity check met the variant's gate (on images too, for a
        bundle that reads them)."""
        text_ok = self.parity is not None and gate_failure(
            self.precision, self.parity, gates or self._judged_by or self.shipped_gates()) is None
        if not text_ok or self.image_parity is None:
            return text_ok
        judged, image_gates = self._image_gates()
        return gate_failure(judged, self.image_parity, image_gates) is None

    def _image_gates(self) -> tuple[str, Gates]:
        """The precision and gates images are judged by: a dual encoder's vision graph alone
        by its own; a vision-language model's images, which run through its decoder too, by
        the variant's."""
        variant = self.bundle.variant(self.precision)
        if self.manifest.vl is not None:
            return self.precision, self.shipped_gates()
        return variant.vision.precision, Gates.recorded(variant.vision.precision, variant.vision.recipe)

    def check_parity(self, probes: int = DEFAULT_PARITY_PROBES, *, enforce: bool = True,
                     gates: Gates | None = None) -> Parity:
        """Embed golden probe texts here, on this device, and compare with the FP32 reference.

        An INT8 or FP16 graph can score differently on other CPU kernels or GPUs than where
        it was exported; this is the check that settles it. Below the variant's gate the
        provider is refused (BundleError) unless `enforce` is false. `probes` texts are
        spread evenly over the golden set, plus the export's worst one. A variant that
        claims batch invariance but is not batch-invariant here runs one text per batch.
        """
        gates = gates or self.shipped_gates()
        if self.manifest.task == "rerank":
            return self._check_score_parity(probes, enforce, gates)
        if self.manifest.task == "multivector":
            return self._check_multivector_parity(probes, enforce, gates)
        texts, reference = self.bundle.golden()
        export_worst = self.manifest.variants[self.precision].parity.worst_text
        picked = sorted(set(np.linspace(0, len(texts) - 1, min(probes, len(texts))).astype(int).tolist())
                        | ({texts.index(export_worst)} if export_worst in texts else set()))
        chosen = [texts[i] for i in picked]
        batch_cos = self._alone_vs_batch(self.tokenize(texts)) if self.batch_invariant else None
        if batch_cos is not None and batch_cos < gates.batch_cos_min:
            # This device's kernels make the variant's vectors depend on batch neighbours
            # (an FP32 GEMM that runs one row differently from many flips an int8 rounding
            # downstream). "Same text, same vector" is kept by running it one text per batch.
            log.warning("the %s variant's vectors depend on their batch neighbours on this device (alone vs in "
                        "a batch: cos %.6f < %g): it runs one text per batch here", self.precision, batch_cos,
                        gates.batch_cos_min)
            self.batch_invariant = False
            self.limits = self.limits.for_variant(False)
            batch_cos = None
        vectors = self.embed_token_ids(self.tokenize(chosen))
        if not np.isfinite(vectors).all():
            bad = int(np.flatnonzero(~np.isfinite(vectors).all(axis=1))[0])
            raise BundleError(f"the {self.precision} variant gives a non-finite vector on this device for the "
                              f"golden text {chosen[bad][:60]!r}")
        parity = dataclasses.replace(measure_parity(reference[picked], vectors, chosen), batch_cos_min=batch_cos)
        judged = self._judge(parity, enforce, gates)
        if self.reads_images:
            self._check_image_parity(probes, enforce)
        return judged

    def _check_image_parity(self, probes: int, enforce: bool) -> Parity:
        """The golden images, decoded and preprocessed here, through the vision graph, against
        the FP32 reference: the preprocessing and the vision graph are checked together."""
        vision = self.bundle.variant(self.precision).vision
        names, blobs, reference = self.bundle.golden_images()
        picked = sorted(set(np.linspace(0, len(names) - 1, min(probes, len(names))).astype(int).tolist())
                        | ({names.index(vision.parity.worst_text)} if vision.parity.worst_text in names else set()))
        encoded = self.tokenize([Image.open(blobs[i], field=f"golden image {names[i]}") for i in picked])
        vectors = self.embed_token_ids(encoded)
        batch = encoded[:16]
        alone = np.vstack([self.run_batch([one]) for one in batch])
        parity = dataclasses.replace(measure_parity(reference[picked], vectors, [names[i] for i in picked]),
                                     batch_cos_min=alone_vs_batch_cos(alone, self.run_batch(batch)))
        self.image_parity = parity
        judged, gates = self._image_gates()
        failure = gate_failure(judged, parity, gates)
        if failure is not None and enforce:
            raise BundleError(
                f"the {self.precision} variant's image path (vision graph {vision.precision}) fails its parity gate on this "
                f"device: {failure.figure} {failure.value:.5f} {'>' if failure.above else '<'} {failure.gate} "
                f"against the FP32 reference (worst: {failure.worst_text[:60]!r}); use another variant, or override "
                "the check to accept it")
        return parity

    def _judge(self, parity: Parity | ScoreParity, enforce: bool, gates: Gates) -> Parity | ScoreParity:
        self.parity, self._judged_by = parity, gates
        failure = gate_failure(self.precision, parity, gates)
        if failure is not None and enforce:
            raise BundleError(
                f"the {self.precision} variant fails its parity gate on this device: {failure.figure} "
                f"{failure.value:.5f} {'>' if failure.above else '<'} {failure.gate} against the FP32 reference "
                f"(worst: {failure.worst_text[:60]!r}); use another variant, or override the check to accept it"
            )
        return parity

    def _check_score_parity(self, probes: int, enforce: bool, gates: Gates) -> ScoreParity:
        """The reranker's boot check: whole query groups of the golden pairs (about `probes`
        pairs, plus the export's worst pair's group) scored here against the FP32 scores."""
        queries, documents, groups, reference = self.bundle.golden_pairs()
        names = [pair_name(describe_parts(q), describe_parts(d))
                 for q, d in zip(queries, documents)]
        if self._vl is not None:
            opened: dict[str, Image] = {}  # one decode per golden image, as a query's images are shared
            queries, documents = ([[p if isinstance(p, str) else opened.setdefault(
                p.name, Image.open(p.data, field=f"golden image {p.name}")) for p in x] for x in xs]
                for xs in (queries, documents))
        ids = sorted(set(groups.tolist()))
        per_group = max(1, len(queries) // len(ids))
        chosen_groups = {ids[i] for i in np.linspace(0, len(ids) - 1, min(len(ids), max(2, probes // per_group)))
                         .astype(int).tolist()}
        worst = self.manifest.variants[self.precision].parity.worst_text
        if worst in names:
            chosen_groups.add(int(groups[names.index(worst)]))
        picked = [i for i in range(len(queries)) if int(groups[i]) in chosen_groups]
        seqs: list[np.ndarray] = []
        for g in sorted(chosen_groups):
            rows = [i for i in picked if int(groups[i]) == g]
            seqs += self.tokenize_pairs(queries[rows[0]], [documents[i] for i in rows])
        activation = self.manifest.rerank.activation
        batch_diff = None
        if self.batch_invariant:
            batch_diff = self._alone_vs_batch_scores(seqs, activation)
            if batch_diff > gates.batch_score_diff_max:
                log.warning("the %s variant's scores depend on their batch neighbours on this device (alone vs in "
                            "a batch: |diff| %.6f > %g): it runs one pair per batch here", self.precision,
                            batch_diff, gates.batch_score_diff_max)
                self.batch_invariant = False
                self.limits = self.limits.for_variant(False)
                batch_diff = None
        logits = self.embed_token_ids(seqs)[:, 0]
        if not np.isfinite(logits).all():
            bad = picked[int(np.flatnonzero(~np.isfinite(logits))[0])]
            raise BundleError(f"the {self.precision} variant gives a non-finite score on this device for the "
                              f"golden pair {names[bad][:60]!r}")
        parity = measure_score_parity(reference[picked], logits, groups[picked], [names[i] for i in picked],
                                      activation)
        if len(chosen_groups) < len(ids):
            # Order figures over a few queries move in steps of 1/queries: on a subset the
            # device is judged by its scores; the order was judged over every query at export.
            gates = dataclasses.replace(gates, rank_kendall_tau_mean=-1.0, rank_top1_agreement=0.0)
        return self._judge(dataclasses.replace(parity, batch_diff_max=batch_diff), enforce, gates)

    def _alone_vs_batch_scores(self, seqs: list[np.ndarray | VLInput], activation: str) -> float:
        picked = [seqs[i] for i in batch_probe_indices([len(s) for s in seqs],
                                                        max_tokens=self.limits.max_batch_tokens)]
        alone = np.vstack([self.run_batch([seq]) for seq in picked])
        return alone_vs_batch_diff(alone, self.run_batch(picked), activation)

    def _alone_vs_batch(self, seqs: list[np.ndarray]) -> float:
        """Golden texts alone against the same texts in one batch of 32 mixed lengths, here
        on this device's kernels: "same text, same vector" is checked where it must hold."""
        # Within the token budget: the check must not need more memory than serving does.
        picked = [seqs[i] for i in batch_probe_indices([len(s) for s in seqs],
                                                        max_tokens=self.limits.max_batch_tokens)]
        alone = np.vstack([self.run_batch([seq]) for seq in picked])
        return alone_vs_batch_cos(alone, self.run_batch(picked))

    def close(self) -> None:
        """Release backend resources; the default holds none beyond Python objects."""

    def __enter__(self) -> BundleEmbedder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
