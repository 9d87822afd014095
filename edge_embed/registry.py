"""Known models and what they cost: parameters, dims and memory/disk per precision.

Every figure is derived from the architecture, never typed in by hand, by one rule
(`Limits` and `estimate` say it in full):

    memory  = process base + per-model runtime + weights + activations at the limits
    weights = parameters x bytes per weight; INT8/INT4 quantize the linear layers only:
              the token-embedding table stays FP32, as edge-embed's INT8 export leaves it
    activations = 2 x (4*T*H + 2*T*I + 2*heads*T*L) x 4 bytes
              (T = padded-token budget of one batch, L = longest text served, H hidden,
              I FFN width: the residual stream, the FFN pair and the attention scores of
              the widest layer, doubled because ONNX Runtime's arena rounds allocations
              up to powers of two and keeps the peak)
    disk    = weights + tokenizer files (the bundle); exporting here also needs the
              source checkpoint and the FP32 ONNX graph

For MiniLM FP32 the rule's 523 MB matches the 523 MB measured on an x86 CPU (see
docs/models.md); for a real bundle the measured figure (`edge_embed.memory`) wins.
Parameter counts, dims and licenses are from the model cards.
"""

from __future__ import annotations

import difflib
import json
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import InvalidInputError, ModelNotFoundError

__all__ = [
    "PRECISIONS",
    "Limits",
    "ModelSpec",
    "Estimate",
    "REGISTRY",
    "estimate",
    "find_model",
    "PROCESS_BASE_BYTES",
    "MODEL_RUNTIME_BYTES",
    "siblings",
    "embedding_for",
    "bundle_spec",
    "bundle_estimate",
]

_MB = 1_000_000
PRECISIONS = ("fp32", "fp16", "int8", "int4")
# Bytes per linear-layer weight; INT4 carries an FP32 scale per block of 32 weights.
_LINEAR_BYTES = {"fp32": 4.0, "fp16": 2.0, "int8": 1.0, "int4": 0.5 + 4 / 32}
# Vocabulary tables: int8 rows (one FP32 scale per row) in both quantized recipes.
_EMBEDDING_BYTES = {"fp32": 4.0, "fp16": 2.0, "int8": 1.0, "int4": 1.0}
# A vision-language model's vision tower: its INT8 and INT4 variants run it per token in
# INT8 where the variant passes its gate so (an export whose tower misses keeps it FP32,
# and its manifest says so: a bundle's own bytes then decide).
_VISION_BYTES = {"fp32": 4.0, "fp16": 2.0, "int8": 1.0, "int4": 1.0}
# Python, numpy, tokenizers, ONNX Runtime and gRPC before any model (measured ~60 MB
# on x86 Linux with ONNX Runtime imported; rounded up for the server's threads).
PROCESS_BASE_BYTES = 100 * _MB
# One loaded model beside its weights: session, graph, tokenizer, the boot parity batch.
MODEL_RUNTIME_BYTES = 80 * _MB
_TOKENIZER_BYTES = 12 * _MB  # a Qwen tokenizer.json is 11 MB; BERT's is under 1 MB


@dataclass(frozen=True)
class Limits:
    """The serving limits an activation allowance is computed at."""

    max_batch_tokens: int = 4096
    max_text_tokens: int = 512


@dataclass(frozen=True, kw_only=True)
class VisionTower:
    """A vision-language model's image tower and the largest image it reads."""

    hidden: int
    layers: int
    heads: int
    intermediate: int
    patch: int
    max_pixels: int
    mergers: int = 4  # the merger to the decoder's width, and one per DeepStack layer (Qwen3-VL: 3)

    def params(self, out_hidden: int) -> int:
        """Its linear weights: per block Q/K/V/O (4·h²) and the FFN pair (2·h·I); per merger
        the 2 x 2 patch concatenation's two layers (4h x 4h, 4h x the decoder's width)."""
        block = 4 * self.hidden**2 + 2 * self.hidden * self.intermediate
        merger = (4 * self.hidden) ** 2 + 4 * self.hidden * out_hidden
        return self.layers * block + self.mergers * merger

    def patches(self, max_pixels: int | None = None) -> int:
        return (max_pixels or self.max_pixels) // (self.patch * self.patch)

    def activation_bytes(self, max_pixels: int | None = None) -> int:
        """One image through the tower, its attention run as flash attention (ONNX Runtime's
        MultiHeadAttention on the CPU holds no [heads, N, N] scores): 2 x (4·N·H + 2·N·I) x 4
        bytes, N its patches: linear in the pixels."""
        n = self.patches(max_pixels)
        return 2 * (4 * n * self.hidden + 2 * n * self.intermediate) * 4


# Qwen3-VL's towers (vision_config of the 2B and 8B checkpoints) at Qwen3-VL-Embedding's
# 1800 x 32 x 32 pixels and Qwen3-VL-Reranker's 1280 x 32 x 32.
_QWEN3_VL_2B_VISION = VisionTower(hidden=1024, layers=24, heads=16, intermediate=4096, patch=16, max_pixels=1800 * 1024)
_QWEN3_VL_8B_VISION = VisionTower(hidden=1152, layers=27, heads=16, intermediate=4304, patch=16, max_pixels=1800 * 1024)


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """One model users bring to edge devices, as its model card describes it."""

    name: str
    hf_id: str
    kind: str  # "embedding", "reranker" or "late-interaction"
    modality: str  # "text", "text+image"
    params: int
    dim: int
    max_context: int
    pooling: str
    license: str
    hidden: int
    layers: int
    heads: int
    intermediate: int
    vocab: int
    matryoshka_min_dim: int | None = None
    matryoshka_dims: tuple[int, ...] = ()  # the widths the card names, when it names a set
    source_bytes_per_weight: float = 2.0  # the hub checkpoint's dtype (BF16 for most)
    family: str = ""
    planning_mb: int | None = None  # the product's earlier planning figure, for comparison
    planning_precision: str | None = None
    note: str = ""
    vision: VisionTower | None = None  # for text+image models whose images change the activations

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    def weight_bytes(self, precision: str) -> int:
        _check_precision(precision)
        vision = self.vision.params(self.hidden) if self.vision is not None else 0
        linear = max(self.params - self.embedding_params - vision, 0)
        return int(linear * _LINEAR_BYTES[precision] + self.embedding_params * _EMBEDDING_BYTES[precision]
                   + vision * _VISION_BYTES[precision])

    def activation_bytes(self, limits: Limits = Limits()) -> int:
        t = limits.max_batch_tokens
        length = min(self.max_context, limits.max_text_tokens, t)
        per_layer = 4 * t * self.hidden + 2 * t * self.intermediate + 2 * self.heads * t * length
        return 2 * per_layer * 4

    @property
    def matryoshka(self) -> str:
        if self.matryoshka_dims:
            return ", ".join(str(d) for d in self.matryoshka_dims)
        if self.matryoshka_min_dim:
            return f"{self.matryoshka_min_dim}-{self.dim}"
        return "-"


@dataclass(frozen=True)
class Estimate:
    """What one model at one precision needs; bytes throughout."""

    precision: str
    weights: int
    runtime: int
    activations: int
    disk: int
    export_disk: int  # source checkpoint + FP32 ONNX graph + the variant, to export here
    gpu_memory: int  # on a discrete GPU: weights + activations + CUDA/TensorRT workspace
    measured: bool = False

    @property
    def memory(self) -> int:
        """This model's share of a process: weights, runtime and activations."""
        return self.weights + self.runtime + self.activations


_GPU_WORKSPACE_BYTES = 512 * 1024**2


def estimate(spec: ModelSpec, precision: str, limits: Limits = Limits()) -> Estimate:
    weights = spec.weight_bytes(precision)
    activations = spec.activation_bytes(limits)
    disk = weights + _TOKENIZER_BYTES
    source = int(spec.params * spec.source_bytes_per_weight)
    return Estimate(
        precision=precision,
        weights=weights,
        runtime=MODEL_RUNTIME_BYTES,
        activations=activations,
        disk=disk,
        export_disk=source + spec.weight_bytes("fp32") + disk,
        gpu_memory=weights + activations + _GPU_WORKSPACE_BYTES,
    )


def _check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise InvalidInputError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")


def _qwen3(name: str, kind: str, params: int, hidden: int, layers: int, heads: int, intermediate: int, **kw) -> ModelSpec:
    defaults = dict(modality="text", max_context=32_768, pooling="last_token", license="Apache-2.0", vocab=151_669,
                    family="qwen3-embedding")
    if kind == "reranker":  # scores a (query, document) pair from the yes/no logits of its last token
        defaults.update(dim=1, pooling="yes/no logit of the last token", family="qwen3-reranker",
                        note="scores (query, document) pairs; output is one relevance score")
    return ModelSpec(name=name, kind=kind, params=params, hidden=hidden, layers=layers, heads=heads,
                     intermediate=intermediate, **{**defaults, **kw})


_QWEN_VL_VOCAB = 151_936
REGISTRY: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        _qwen3("qwen3-embedding-0.6b", "embedding", 595_776_512, 1024, 28, 16, 3072,
               hf_id="Qwen/Qwen3-Embedding-0.6B", dim=1024, matryoshka_min_dim=32),
        _qwen3("qwen3-embedding-4b", "embedding", 4_021_774_336, 2560, 36, 32, 9728,
               hf_id="Qwen/Qwen3-Embedding-4B", dim=2560, matryoshka_min_dim=32),
        _qwen3("qwen3-embedding-8b", "embedding", 7_567_295_488, 4096, 36, 32, 12288,
               hf_id="Qwen/Qwen3-Embedding-8B", dim=4096, matryoshka_min_dim=32),
        _qwen3("qwen3-reranker-0.6b", "reranker", 595_776_512, 1024, 28, 16, 3072,
               hf_id="Qwen/Qwen3-Reranker-0.6B"),
        _qwen3("qwen3-reranker-4b", "reranker", 4_021_774_336, 2560, 36, 32, 9728,
               hf_id="Qwen/Qwen3-Reranker-4B"),
        _qwen3("qwen3-reranker-8b", "reranker", 8_188_515_328, 4096, 36, 32, 12288,
               hf_id="Qwen/Qwen3-Reranker-8B"),
        _qwen3("qwen3-vl-embedding-2b", "embedding", 2_127_532_032, 2048, 28, 16, 6144,
               hf_id="Qwen/Qwen3-VL-Embedding-2B", modality="text+image", dim=2048, vocab=_QWEN_VL_VOCAB,
               matryoshka_dims=(256, 512, 768, 1024, 1536, 2048), family="qwen3-vl-embedding",
               vision=_QWEN3_VL_2B_VISION,
               note="includes the vision tower; activations here are for text inputs"),
        _qwen3("qwen3-vl-embedding-8b", "embedding", 8_767_123_696, 4096, 36, 32, 12288,
               hf_id="Qwen/Qwen3-VL-Embedding-8B", modality="text+image", dim=4096, vocab=_QWEN_VL_VOCAB,
               matryoshka_dims=(256, 512, 768, 1024, 1536, 2048, 3072, 4096), family="qwen3-vl-embedding",
               planning_mb=16_000, planning_precision="fp16", vision=_QWEN3_VL_8B_VISION,
               note="includes the vision tower; activations here are for text inputs"),
        _qwen3("qwen3-vl-reranker-2b", "reranker", 2_127_532_032, 2048, 28, 16, 6144,
               hf_id="Qwen/Qwen3-VL-Reranker-2B", modality="text+image", vocab=_QWEN_VL_VOCAB, family="qwen3-vl-reranker",
               vision=dataclasses.replace(_QWEN3_VL_2B_VISION, max_pixels=1280 * 1024),
               note="scores (query, document) pairs; includes the vision tower"),
        _qwen3("qwen3-vl-reranker-8b", "reranker", 8_767_123_696, 4096, 36, 32, 12288,
               hf_id="Qwen/Qwen3-VL-Reranker-8B", modality="text+image", vocab=_QWEN_VL_VOCAB, family="qwen3-vl-reranker",
               planning_mb=16_000, planning_precision="fp16",
               vision=dataclasses.replace(_QWEN3_VL_8B_VISION, max_pixels=1280 * 1024),
               note="scores (query, document) pairs; includes the vision tower"),
        ModelSpec(name="all-minilm-l6-v2", hf_id="sentence-transformers/all-MiniLM-L6-v2", kind="embedding",
                  modality="text", params=22_713_216, dim=384, max_context=256, pooling="mean",
                  license="Apache-2.0", hidden=384, layers=6, heads=12, intermediate=1536, vocab=30_522,
                  source_bytes_per_weight=4.0, family="minilm", planning_mb=100, planning_precision="fp32"),
        ModelSpec(name="bge-small-en-v1.5", hf_id="BAAI/bge-small-en-v1.5", kind="embedding", modality="text",
                  params=33_360_000, dim=384, max_context=512, pooling="cls", license="MIT", hidden=384, layers=12,
                  heads=12, intermediate=1536, vocab=30_522, source_bytes_per_weight=4.0, family="bge"),
        ModelSpec(name="bge-base-en-v1.5", hf_id="BAAI/bge-base-en-v1.5", kind="embedding", modality="text",
                  params=109_482_240, dim=768, max_context=512, pooling="cls", license="MIT", hidden=768, layers=12,
                  heads=12, intermediate=3072, vocab=30_522, source_bytes_per_weight=4.0, family="bge"),
        ModelSpec(name="bge-m3", hf_id="BAAI/bge-m3", kind="embedding", modality="text", params=567_754_752,
                  dim=1024, max_context=8192, pooling="cls", license="MIT", hidden=1024, layers=24, heads=16,
                  intermediate=4096, vocab=250_002, source_bytes_per_weight=4.0, family="bge",
                  note="dense vectors; the sparse and multi-vector heads are not counted"),
        ModelSpec(name="gte-qwen2-1.5b-instruct", hf_id="Alibaba-NLP/gte-Qwen2-1.5B-instruct", kind="embedding",
                  modality="text", params=1_776_000_000, dim=1536, max_context=32_768, pooling="last_token",
                  license="Apache-2.0", hidden=1536, layers=28, heads=12, intermediate=8960, vocab=151_646,
                  source_bytes_per_weight=4.0, family="gte-qwen2", planning_mb=7_600, planning_precision="fp32"),
        ModelSpec(name="stella-en-1.5b-v5", hf_id="NovaSearch/stella_en_1.5B_v5", kind="embedding",
                  modality="text", params=1_543_268_864, dim=1024, max_context=512, pooling="mean",
                  license="MIT", hidden=1536, layers=28, heads=12, intermediate=8960, vocab=151_646,
                  matryoshka_dims=(256, 768, 1024, 2048, 4096, 6144, 8192), source_bytes_per_weight=4.0,
                  family="stella", planning_mb=7_200, planning_precision="fp32",
                  note="1024 is the default head; the card trains for 512-token inputs"),
        ModelSpec(name="jina-embeddings-v2-base-en", hf_id="jinaai/jina-embeddings-v2-base-en", kind="embedding",
                  modality="text", params=137_368_320, dim=768, max_context=8192, pooling="mean",
                  license="Apache-2.0", hidden=768, layers=12, heads=12, intermediate=3072, vocab=30_528,
                  source_bytes_per_weight=4.0, family="jina-v2", planning_mb=400, planning_precision="fp32"),
        ModelSpec(name="nv-embed-v2", hf_id="nvidia/NV-Embed-v2", kind="embedding", modality="text",
                  params=7_851_016_192, dim=4096, max_context=32_768, pooling="latent attention",
                  license="CC-BY-NC-4.0", hidden=4096, layers=32, heads=32, intermediate=14336, vocab=32_000,
                  source_bytes_per_weight=2.0, family="nv-embed", planning_mb=18_100, planning_precision="fp16",
                  note="non-commercial license"),
        ModelSpec(name="clip-vit-b-32", hf_id="openai/clip-vit-base-patch32", kind="embedding", modality="text+image",
                  params=151_277_313, dim=512, max_context=77, pooling="EOS token (text), CLS (image), projected",
                  license="MIT", hidden=512, layers=12, heads=8, intermediate=2048, vocab=49_408,
                  source_bytes_per_weight=4.0, family="clip", planning_mb=700, planning_precision="fp32",
                  note="text tower figures; the ViT-B/32 image tower is in the parameter count"),
        # ColQwen3: the Qwen3-VL backbone (its parameters) plus the 320-wide projection of
        # every token (hidden x 320 + 320).
        ModelSpec(name="colqwen3-4b", hf_id="TomoroAI/tomoro-colqwen3-embed-4b", kind="late-interaction",
                  modality="text+image", params=4_437_815_808 + 2560 * 320 + 320, dim=320, max_context=32_768,
                  pooling="none: one 320-d vector per token (MaxSim)", license="Apache-2.0", hidden=2560, layers=36,
                  heads=32, intermediate=9728, vocab=_QWEN_VL_VOCAB, family="colqwen3", vision=_QWEN3_VL_2B_VISION,
                  note=f"multi-vector: a page of ~1,300 token vectors is ~{1300 * 320 * 2 / 1e3:.0f} kB in an "
                       "FP16 index"),
        ModelSpec(name="colqwen3-8b", hf_id="TomoroAI/tomoro-colqwen3-embed-8b", kind="late-interaction",
                  modality="text+image", params=8_767_123_696 + 4096 * 320 + 320, dim=320, max_context=32_768,
                  pooling="none: one 320-d vector per token (MaxSim)", license="Apache-2.0", hidden=4096, layers=36,
                  heads=32, intermediate=12288, vocab=_QWEN_VL_VOCAB, family="colqwen3", vision=_QWEN3_VL_8B_VISION,
                  planning_mb=16_800, planning_precision="fp16",
                  note=f"multi-vector: a page of ~1,300 token vectors is ~{1300 * 320 * 2 / 1e3:.0f} kB in an "
                       "FP16 index; its report measures W4A16 (INT4 text tower) at 7.0 GB peak"),
    )
}

_ALIASES = {spec.hf_id.lower(): spec.name for spec in REGISTRY.values()}


def find_model(name: str) -> ModelSpec:
    """A registry entry by short name or Hugging Face id, case-insensitive."""
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key in REGISTRY:
        return REGISTRY[key]
    close = difflib.get_close_matches(key, list(REGISTRY) + list(_ALIASES), n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else "; `edge-embed models` lists the known ones"
    raise ModelNotFoundError(f"{name!r} is neither a bundle directory nor a known model{hint}")


def siblings(spec: ModelSpec) -> list[ModelSpec]:
    """Smaller models of the same family, largest first."""
    same = [s for s in REGISTRY.values() if s.family == spec.family and s.params < spec.params]
    return sorted(same, key=lambda s: -s.params)


def embedding_for(spec: ModelSpec) -> ModelSpec | None:
    """The embedding model of a reranker's family (for 'embedding only' advice)."""
    if spec.kind != "reranker":
        return None
    family = spec.family.replace("reranker", "embedding")
    options = [s for s in REGISTRY.values() if s.family == family]
    return min(options, key=lambda s: abs(s.params - spec.params)) if options else None


def bundle_spec(manifest: Any, bundle_dir: Path) -> ModelSpec:
    """A bundle described like a registry entry, from its manifest and its config.json."""
    config_path = Path(bundle_dir) / "config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    hidden = int(config.get("hidden_size", manifest.dim))
    return ModelSpec(
        name=manifest.model_id, hf_id=manifest.model_id, kind="embedding", modality="text", params=0,
        dim=manifest.dim, max_context=manifest.max_length, pooling=manifest.pooling, license="", hidden=hidden,
        layers=int(config.get("num_hidden_layers", 1)), heads=int(config.get("num_attention_heads", 1)),
        intermediate=int(config.get("intermediate_size", 4 * hidden)), vocab=0,
    )


def bundle_estimate(manifest: Any, bundle_dir: Path, precision: str, max_batch_tokens: int) -> tuple[int, int]:
    """(memory, activations) of one bundle variant by the rule above: the variant's real
    file size instead of parameters, texts up to the bundle's own token limit, and one
    text per batch for a variant that is not batch invariant (the runtime runs it so)."""
    spec = bundle_spec(manifest, bundle_dir)
    if not manifest.variants[precision].recipe.get("batch_invariant", True):
        max_batch_tokens = min(max_batch_tokens, manifest.max_length)
    activations = spec.activation_bytes(Limits(max_batch_tokens, manifest.max_length))
    return manifest.variants[precision].bytes + MODEL_RUNTIME_BYTES + activations, activations
