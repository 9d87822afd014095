"""The bundle manifest: the single source of truth about a bundle.

Code never infers pooling, padding, precision or dimensions from file names; it reads
them here. The manifest is plain JSON (`manifest.json`) so that any tool can inspect it.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import BundleError, InvalidInputError
from .images import ImageSpec

__all__ = ["SCHEMA_VERSION", "PRECISIONS", "ONNX_PRECISIONS", "DEFAULT_EXPORT_PRECISIONS", "MLX_PRECISIONS", "POOLINGS",
           "TASKS", "MODALITIES", "Parity", "VisionGraph", "VLSpec", "MultiVectorSpec", "MultiVectorParity", "RetrievalParity", "ScoreParity", "RerankSpec", "Variant", "Manifest", "variant_format"]

SCHEMA_VERSION = 1
ONNX_PRECISIONS = ("fp32", "fp16", "int8", "int4")
# What an export writes unless asked: int4 is for the large models where memory decides.
DEFAULT_EXPORT_PRECISIONS = ("fp32", "fp16", "int8")
MLX_PRECISIONS = ("mlx-fp32", "mlx-fp16")
PRECISIONS = ONNX_PRECISIONS + MLX_PRECISIONS


def check_dimensions(dimensions: int | None, *, model_id: str, dim: int, min_dim: int | None) -> int:
    """The output width for a requested Matryoshka dimension (None: the full width), or
    InvalidInputError naming what the model allows."""
    if dimensions is None or dimensions == dim:
        return dim
    if isinstance(dimensions, bool) or not isinstance(dimensions, int):
        raise InvalidInputError(f"dimensions must be an integer, got {dimensions!r}")
    if min_dim is None:
        raise InvalidInputError(
            f"dimensions={dimensions} is not allowed: {model_id} has no Matryoshka "
            f"training, only its full {dim} dimensions"
        )
    if not min_dim <= dimensions <= dim:
        raise InvalidInputError(f"dimensions={dimensions} is not allowed: {model_id} allows {min_dim}..{dim}")
    return dimensions


def variant_format(precision: str) -> str:
    """"onnx" or "mlx": which kind of runtime a variant name is for."""
    return "mlx" if precision in MLX_PRECISIONS else "onnx"
# "head": the model pools inside its own graph (CLIP's end-of-text token, SigLIP's heads).
# "tokens": no pooling, every token's vector (a multi-vector model).
POOLINGS = ("mean", "cls", "last_token", "head", "tokens")
# What a bundle's model does: texts -> vectors, or (query, document) pairs -> relevance scores.
# "multivector": inputs -> one vector per token (ColQwen3), scored by MaxSim.
TASKS = ("embed", "rerank", "multivector")
# How a reranker's pair becomes tokens: the model's own prompt template (Qwen3-Reranker), or
# the tokenizer's pair encoding with its special tokens (BERT-family cross-encoders).
PAIR_FORMATS = ("template", "pair")
SCORE_ACTIVATIONS = ("sigmoid", "none")
# What a bundle's model reads: texts, and images where it has a vision graph.
MODALITIES = ("text", "image")


@dataclass(frozen=True, kw_only=True)
class RetrievalParity:
    """How a variant ranks the retrieval probe corpus (queries against passages of many
    domains and lengths) compared with the PyTorch FP32 reference: what users consume from
    an embedder, which a cosine close to 1 can still hide.

    Gated: `topk_kept`, the mean share of each query's top-k passages under the reference
    that stay in the candidate's top-k; `spearman`, the mean rank correlation of the
    scores of each query's reference top 100; `mrr_ratio`, the MRR@k of the passage each
    query was written for, the candidate's over the reference's (`reference_mrr`), judged
    only when the reference retrieves (a random-weight model does not).
    Reported: `top1_rr`, the mean reciprocal rank, in the candidate's ranking, of the
    reference's first passage (near-ties make it move first).
    """

    queries: int
    passages: int
    languages: tuple[str, ...]
    topk: int
    topk_kept: float
    spearman: float
    mrr_ratio: float
    reference_mrr: float
    top1_rr: float
    worst_query: str


@dataclass(frozen=True, kw_only=True)
class Parity:
    """How close a variant's vectors are to the PyTorch FP32 reference on the probe set."""

    probes: int
    cos_min: float
    cos_mean: float
    topk: int
    topk_agreement: float
    worst_text: str
    # A text alone against the same text in a batch of mixed lengths, worst cosine over the
    # probes checked; None for variants that run one text per batch (or older bundles).
    batch_cos_min: float | None = None
    # The ranking of the retrieval probe corpus; None in bundles exported before it was gated.
    retrieval: RetrievalParity | None = None


@dataclass(frozen=True, kw_only=True)
class ScoreParity:
    """How close a reranker variant's scores are to the PyTorch FP32 reference on the probe
    pairs: the score itself, and the order it gives each query's documents."""

    probes: int
    queries: int
    score_diff_max: float
    score_diff_mean: float
    kendall_tau_min: float
    kendall_tau_mean: float
    top1_agreement: float
    worst_pair: str
    # A pair alone against the same pair in a batch of mixed lengths, worst |score diff|;
    # None for variants that run one pair per batch.
    batch_diff_max: float | None = None

    @property
    def worst_text(self) -> str:
        return self.worst_pair


@dataclass(frozen=True, kw_only=True)
class RerankSpec:
    """What turns a (query, document) pair into the graph's logit, and that into a score.

    `template` (format "template") holds {query}, {document} and optionally {instruction};
    documents are truncated, never the template or the query. `yes_token_id`/`no_token_id`
    record which logits the graph's difference was taken from (Qwen3-Reranker's "yes" vs
    "no"); the graph outputs that one logit, and the score is its sigmoid.
    """

    format: str
    template: str | None = None
    default_instruction: str | None = None
    yes_token_id: int | None = None
    no_token_id: int | None = None
    activation: str = "sigmoid"

    def __post_init__(self) -> None:
        if self.format not in PAIR_FORMATS:
            raise BundleError(f"manifest rerank format {self.format!r} is not one of {PAIR_FORMATS}")
        if self.activation not in SCORE_ACTIVATIONS:
            raise BundleError(f"manifest rerank activation {self.activation!r} is not one of {SCORE_ACTIVATIONS}")
        if self.format == "template":
            t = self.template or ""
            if not ("{query}" in t and "{document}" in t and t.index("{query}") < t.index("{document}")):
                raise BundleError(f"manifest rerank template {self.template!r} must hold {{query}} before "
                                  "{document}")

    @property
    def takes_instruction(self) -> bool:
        return self.format == "template" and "{instruction}" in (self.template or "")


@dataclass(frozen=True, kw_only=True)
class MultiVectorParity:
    """How close a multi-vector variant is to the PyTorch FP32 reference on the probe set:
    each token's vector (cosine, over every token of every probe), and what users consume,
    the MaxSim scores of the probe queries against the probe pages and the order they give
    each query's pages."""

    probes: int
    tokens: int
    cos_min: float
    cos_mean: float
    queries: int
    pages: int
    maxsim_rel_diff_max: float
    kendall_tau_min: float
    kendall_tau_mean: float
    top1_agreement: float
    worst_text: str
    # An input alone against the same input in a batch, worst token cosine.
    batch_cos_min: float | None = None


@dataclass(frozen=True, kw_only=True)
class MultiVectorSpec:
    """A late-interaction model (ColQwen3): every token of an input becomes a `dim`-wide unit
    vector (the backbone's last hidden states through the projection `head`, L2-normalized),
    and a query scores a page by MaxSim. Queries and documents (pages) each have their
    template around {content}."""

    query_template: str
    document_template: str
    head: str  # the projection's weight name in the source checkpoint

    def __post_init__(self) -> None:
        for name in ("query_template", "document_template"):
            if getattr(self, name).count("{content}") != 1:
                raise BundleError(f"manifest multivector {name} must hold {{content}} once")


@dataclass(frozen=True, kw_only=True)
class VLSpec:
    """How a vision-language embedder (Qwen3-VL-Embedding) reads one input: every input,
    text, image or a mix, is one chat turn of `template` ({instruction} in the system turn,
    {content} the user's parts in order), an image being `vision_start`, its visual tokens
    as `image_token` and `vision_end`. The pooled token is the template's last one, so the
    user content is what truncation cuts, never the template. A vision-language reranker
    (Qwen3-VL-Reranker) fills {content} with its rerank template: the instruction, the
    query's parts and the document's parts, of which only the document's text is cut.

    The vision graph runs one image at a time (its merged features and one feature set per
    DeepStack layer); the decoder graph reads them by row, with 3-row M-RoPE positions
    (edge_embed/vl.py computes both on the host).
    """

    template: str
    image_token: str
    vision_start: str
    vision_end: str
    merge_size: int
    position_table_side: int
    deepstack_layers: int
    # The decoder's width (an image row's); None: the manifest's dim, which an embedder's is.
    hidden_size: int | None = None

    def __post_init__(self) -> None:
        t = self.template
        if "{content}" not in t or ("{instruction}" in t and t.index("{instruction}") > t.index("{content}")):
            raise BundleError(f"manifest vl template {t!r} must hold {{content}} (and any {{instruction}} before it)")


@dataclass(frozen=True, kw_only=True)
class VisionGraph:
    """A variant's second graph, for bundles that read images: `pixel_values` in,
    `sentence_embedding` out, in the same vector space as the text graph. Its precision
    may differ from the variant's (the vision tower stays FP32 where its INT8 form misses
    the variant's gate); `parity` is on the golden images. A large graph keeps its weights
    in `external_data`, files listed (and hashed) in the manifest's `files`."""

    file: str
    sha256: str
    bytes: int
    precision: str
    parity: Parity
    recipe: dict[str, Any] = field(default_factory=dict)
    external_data: tuple[str, ...] = ()


@dataclass(frozen=True, kw_only=True)
class Variant:
    """One model file of the bundle at one precision: an ONNX graph, or MLX weights (and,
    for a bundle that reads images, its vision graph)."""

    precision: str
    file: str
    sha256: str
    bytes: int
    format: str = "onnx"
    opset: int | None
    min_onnxruntime: str | None
    recipe: dict[str, Any]
    parity: Parity | ScoreParity | MultiVectorParity
    external_data: tuple[str, ...] = ()
    vision: VisionGraph | None = None

    @property
    def data_files(self) -> tuple[str, ...]:
        """The external data of its graph and of its vision graph."""
        return (*self.external_data, *(self.vision.external_data if self.vision is not None else ()))

    @property
    def files(self) -> tuple[str, ...]:
        """Every file loading it reads: its graph, its vision graph, their data files."""
        return (self.file, *((self.vision.file,) if self.vision is not None else ()), *self.data_files)


@dataclass(frozen=True, kw_only=True)
class Manifest:
    """Everything the runtime needs to turn texts into the same vectors (or pairs into the
    same scores) as the source model."""

    schema_version: int = SCHEMA_VERSION
    # Bundles written before rerankers existed have no task: they are embedders.
    task: str = "embed"
    model_id: str
    revision: str | None
    architecture: str
    pooling: str
    padding_side: str
    append_eos: bool
    eos_token_id: int | None
    pad_token_id: int
    max_length: int
    dim: int
    matryoshka_min_dim: int | None
    instruction_template: str | None
    default_instruction: str | None
    graph_inputs: tuple[str, ...]
    graph_output: str = "sentence_embedding"
    rerank: RerankSpec | None = None
    modalities: tuple[str, ...] = ("text",)
    # How an image becomes the vision graph's pixel_values; only bundles that read images.
    image: ImageSpec | None = None
    # Texts padded to max_length, without an attention mask (SigLIP's text tower was trained so).
    pad_to_max_length: bool = False
    # A vision-language embedder's chat template and vision facts; only such bundles have one.
    vl: VLSpec | None = None
    # A multi-vector model's templates; only such bundles have one.
    multivector: MultiVectorSpec | None = None
    files: dict[str, str] = field(default_factory=dict)
    variants: dict[str, Variant] = field(default_factory=dict)
    exporter: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.schema_version != SCHEMA_VERSION:
            raise BundleError(
                f"manifest schema version {self.schema_version} is not supported "
                f"(this edge-embed reads version {SCHEMA_VERSION})"
            )
        if self.task not in TASKS:
            raise BundleError(f"manifest task {self.task!r} is not one of {TASKS}")
        if (self.task == "rerank") != (self.rerank is not None):
            raise BundleError("manifest of a reranker needs its rerank section, and only a reranker has one")
        if (self.task == "multivector") != (self.multivector is not None) or (
                self.multivector is not None and self.vl is None):
            raise BundleError("manifest of a multi-vector model needs its multivector and vl sections, and only such "
                              "a model has a multivector section")
        if self.pooling not in POOLINGS:
            raise BundleError(f"manifest pooling {self.pooling!r} is not one of {POOLINGS}")
        if self.padding_side not in ("left", "right"):
            raise BundleError(f"manifest padding_side {self.padding_side!r} is not left or right")
        if self.append_eos and (isinstance(self.eos_token_id, bool) or not isinstance(self.eos_token_id, int)):
            # The runtime appends this id to every text: without it no text can be encoded.
            raise BundleError(f"manifest append_eos is true but eos_token_id is {self.eos_token_id!r}, "
                              "not a token id")
        if self.instruction_template is not None and not (
                self.instruction_template.endswith("{text}") and "{instruction}" in self.instruction_template):
            # Truncation cuts from the end: text after {text} would be cut before the text.
            raise BundleError(f"manifest instruction_template {self.instruction_template!r} must contain "
                              "{instruction} and end with {text}")
        for name in self.variants:
            if name not in PRECISIONS:
                raise BundleError(f"manifest variant {name!r} is not one of {PRECISIONS}")
        if not self.modalities or any(m not in MODALITIES for m in self.modalities):
            raise BundleError(f"manifest modalities {self.modalities!r} must be some of {MODALITIES}")
        reads_images = "image" in self.modalities
        if reads_images != (self.image is not None):
            raise BundleError("manifest of a bundle that reads images needs its image spec, and only such a "
                              "bundle has one")
        if self.vl is not None and self.rerank is not None and not (
                self.rerank.format == "template" and (self.rerank.template or "").endswith("{document}")):
            # The document is the user turn's last content: truncation cuts its end only.
            raise BundleError("manifest of a vision-language reranker needs a rerank template (the user turn's "
                              "content) that ends with {document}")
        for name, variant in self.variants.items():
            if reads_images and variant.format == "onnx" and variant.vision is None:
                raise BundleError(f"manifest variant {name!r} has no vision graph, and the bundle reads images")

    def check_dimensions(self, dimensions: int | None) -> int:
        """The output width for a requested Matryoshka dimension, or InvalidInputError."""
        return check_dimensions(dimensions, model_id=self.model_id, dim=self.dim, min_dim=self.matryoshka_min_dim)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, ensure_ascii=False) + "\n"

    def write(self, path: Path) -> None:
        Path(path).write_text(self.to_json(), encoding="utf-8")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        try:
            variants = {
                name: Variant(
                    **{**v, "parity": _parity(v["parity"]), "external_data": tuple(v.get("external_data", ())),
                       "vision": _vision(v.get("vision"))}
                )
                for name, v in data.get("variants", {}).items()
            }
            rerank = RerankSpec(**data["rerank"]) if data.get("rerank") is not None else None
            image = data.get("image")
            if image is not None:
                image = ImageSpec(**{**image, "mean": tuple(image["mean"]), "std": tuple(image["std"])})
            vl = VLSpec(**data["vl"]) if data.get("vl") is not None else None
            multivector = MultiVectorSpec(**data["multivector"]) if data.get("multivector") is not None else None
            return cls(**{**data, "variants": variants, "graph_inputs": tuple(data["graph_inputs"]),
                          "rerank": rerank, "modalities": tuple(data.get("modalities", ("text",))),
                          "image": image, "vl": vl, "multivector": multivector})
        except (TypeError, KeyError) as exc:
            raise BundleError(f"manifest is malformed: {exc}") from exc

    @classmethod
    def read(cls, path: Path) -> Manifest:
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise BundleError(f"{path} is missing: not an edge-embed bundle") from exc
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BundleError(f"{path} cannot be read as JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise BundleError(f"{path} does not hold a JSON object")
        return cls.from_dict(data)


def _vision(data: dict[str, Any] | None) -> VisionGraph | None:
    return None if data is None else VisionGraph(**{**data, "parity": _parity(data["parity"]),
                                                    "external_data": tuple(data.get("external_data", ()))})


def _parity(data: dict[str, Any]) -> Parity | ScoreParity | MultiVectorParity:
    if "score_diff_max" in data:
        return ScoreParity(**data)
    if "maxsim_rel_diff_max" in data:
        return MultiVectorParity(**data)
    retrieval = data.get("retrieval")
    if retrieval is not None:
        retrieval = RetrievalParity(**{**retrieval, "languages": tuple(retrieval["languages"])})
    return Parity(**{**data, "retrieval": retrieval})
