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

__all__ = ["SCHEMA_VERSION", "PRECISIONS", "ONNX_PRECISIONS", "DEFAULT_EXPORT_PRECISIONS", "MLX_PRECISIONS", "POOLINGS",
           "Parity", "Variant", "Manifest", "variant_format"]

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
POOLINGS = ("mean", "cls", "last_token")


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


@dataclass(frozen=True, kw_only=True)
class Variant:
    """One model file of the bundle at one precision: an ONNX graph, or MLX weights."""

    precision: str
    file: str
    sha256: str
    bytes: int
    format: str = "onnx"
    opset: int | None
    min_onnxruntime: str | None
    recipe: dict[str, Any]
    parity: Parity
    external_data: tuple[str, ...] = ()


@dataclass(frozen=True, kw_only=True)
class Manifest:
    """Everything the runtime needs to turn texts into the same vectors as the source model."""

    schema_version: int = SCHEMA_VERSION
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
    files: dict[str, str] = field(default_factory=dict)
    variants: dict[str, Variant] = field(default_factory=dict)
    exporter: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.schema_version != SCHEMA_VERSION:
            raise BundleError(
                f"manifest schema version {self.schema_version} is not supported "
                f"(this edge-embed reads version {SCHEMA_VERSION})"
            )
        if self.pooling not in POOLINGS:
            raise BundleError(f"manifest pooling {self.pooling!r} is not one of {POOLINGS}")
        if self.padding_side not in ("left", "right"):
            raise BundleError(f"manifest padding_side {self.padding_side!r} is not left or right")
        if self.instruction_template is not None and not (
                self.instruction_template.endswith("{text}") and "{instruction}" in self.instruction_template):
            # Truncation cuts from the end: text after {text} would be cut before the text.
            raise BundleError(f"manifest instruction_template {self.instruction_template!r} must contain "
                              "{instruction} and end with {text}")
        for name in self.variants:
            if name not in PRECISIONS:
                raise BundleError(f"manifest variant {name!r} is not one of {PRECISIONS}")

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
                    **{**v, "parity": Parity(**v["parity"]), "external_data": tuple(v.get("external_data", ()))}
                )
                for name, v in data.get("variants", {}).items()
            }
            return cls(**{**data, "variants": variants, "graph_inputs": tuple(data["graph_inputs"])})
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
