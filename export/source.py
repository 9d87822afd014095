"""Reading a local Hugging Face model directory into the facts a bundle manifest records.

Everything is decided here, once, from the model's own files (config.json, the
sentence-transformers configs, tokenizer_config.json) and the architecture's known
rules; the runtime later reads only the manifest.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from ..errors import ExportError
from ..manifest import Manifest, RerankSpec
from .dual import DUAL_ARCHITECTURES, read_dual_source
from .vl import MULTIVECTOR_HEADS, VL_ARCHITECTURES, multivector_head, read_vl_source

__all__ = ["SourceModel", "read_source", "ARCHITECTURES"]

QWEN3_QUERY_TEMPLATE = "Instruct: {instruction}\nQuery:{text}"
QWEN3_DEFAULT_TASK = "Given a web search query, retrieve relevant passages that answer the query"
# Qwen3-Reranker's own prompt: a system line, the instruction, query and document, then the
# assistant's turn with an empty think block; the score is P("yes") against P("no") next.
QWEN3_RERANK_TEMPLATE = (
    "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the Instruct "
    "provided. Note that the answer can only be \"yes\" or \"no\".<|im_end|>\n<|im_start|>user\n"
    "<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {document}"
    "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
)
RERANK_OUTPUT = "rerank_logit"
TASKS = ("embed", "rerank", "multivector")


@dataclass(frozen=True)
class ArchitectureRules:
    """What a family needs when its model directory does not say."""

    pooling: str
    padding_side: str
    needs_eos: bool
    graph_inputs: tuple[str, ...]
    matryoshka_min_dim: int | None
    instruction_template: str | None
    default_instruction: str | None
    max_length_cap: int


_BERT = ArchitectureRules(
    pooling="mean",
    padding_side="right",
    needs_eos=False,
    graph_inputs=("input_ids", "attention_mask"),
    matryoshka_min_dim=None,
    instruction_template=None,
    default_instruction=None,
    max_length_cap=512,
)

ARCHITECTURES: dict[str, ArchitectureRules] = {
    "bert": _BERT,
    "roberta": _BERT,
    "xlm-roberta": _BERT,
    "mpnet": _BERT,
    "distilbert": _BERT,
    # Qwen3-Embedding: last-token pooling over an appended EOS, right padding (see
    # read_source), Matryoshka output from 32 dims up, instruction-formatted queries. The 32k
    # context is capped at 8192 by default: attention memory at 32k tokens does not fit an
    # edge device.
    "qwen3": ArchitectureRules(
        pooling="last_token",
        padding_side="right",
        needs_eos=True,
        # No position_ids: with right padding every row's positions are 0..len-1, which the
        # fused attention kernel computes itself (export/attention.py).
        graph_inputs=("input_ids", "attention_mask"),
        matryoshka_min_dim=32,
        instruction_template=QWEN3_QUERY_TEMPLATE,
        default_instruction=QWEN3_DEFAULT_TASK,
        max_length_cap=8192,
    ),
}

_ST_POOLING = {
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_cls_token": "cls",
    "pooling_mode_lasttoken": "last_token",
}
_ST_SUPPORTED_MODULES = {"Transformer", "Pooling", "Normalize"}


@dataclass(frozen=True)
class SourceModel:
    """A Hugging Face model directory and the draft manifest (no files or variants yet)."""

    path: Path
    copied_files: tuple[str, ...]
    manifest: Manifest


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ExportError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ExportError(f"{path} does not hold a JSON object")
    return data


def _optional_json(path: Path) -> dict[str, Any]:
    return _read_json(path) if path.is_file() else {}


def _st_pooling(path: Path) -> str | None:
    """Pooling named by the sentence-transformers config, if the model ships one."""
    modules_file = path / "modules.json"
    if not modules_file.is_file():
        return None
    modules = json.loads(modules_file.read_text(encoding="utf-8"))
    pooling_dir = None
    for module in modules:
        kind = module.get("type", "").rsplit(".", 1)[-1]
        if kind not in _ST_SUPPORTED_MODULES:
            raise ExportError(
                f"{path} uses a sentence-transformers {kind} module; edge-embed exports "
                f"only {sorted(_ST_SUPPORTED_MODULES)}"
            )
        if kind == "Pooling":
            pooling_dir = path / module.get("path", "")
    if pooling_dir is None:
        return None
    config = _read_json(pooling_dir / "config.json")
    chosen = [mode for key, mode in _ST_POOLING.items() if config.get(key)]
    unsupported = [k for k, v in config.items() if k.startswith("pooling_mode") and v and k not in _ST_POOLING]
    if unsupported or len(chosen) != 1:
        raise ExportError(
            f"{pooling_dir}/config.json asks for pooling {unsupported or chosen}; edge-embed "
            f"supports exactly one of {sorted(set(_ST_POOLING.values()))}"
        )
    return chosen[0]


def _token_id(tokenizer: Tokenizer, token: Any) -> int | None:
    if isinstance(token, dict):  # tokenizer_config may hold AddedToken dicts
        token = token.get("content")
    return tokenizer.token_to_id(token) if isinstance(token, str) else None


def read_source(
    source_dir: str | Path,
    *,
    model_id: str | None = None,
    revision: str | None = None,
    max_length: int | None = None,
    task: str | None = None,
    max_pixels: int | None = None,
) -> SourceModel:
    """Decide the task, pooling, padding, EOS, limits and prompts for a local model directory.

    `task` None detects it: a `*ForSequenceClassification` model (or a sentence-transformers
    CrossEncoder) is a reranker, and so is a Qwen3 causal LM that is no sentence-transformers
    embedder (Qwen3-Reranker); a Qwen3-VL model is a reranker when its name (`model_id`, else
    the folder's) says "reranker" (Qwen3-VL-Reranker); everything else embeds.
    """
    path = Path(source_dir).expanduser().resolve()
    if not (path / "config.json").is_file():
        raise ExportError(f"{path} is not a Hugging Face model directory (no config.json)")
    if not (path / "tokenizer.json").is_file():
        raise ExportError(
            f"{path} has no tokenizer.json; edge-embed needs a fast (tokenizers) tokenizer"
        )
    config = _read_json(path / "config.json")
    arch = config.get("model_type")
    if max_pixels is not None and arch not in VL_ARCHITECTURES:
        raise ExportError(f"{path}: max_pixels is for models with dynamic image sizes (Qwen3-VL); a {arch} model "
                          "reads images at one fixed size, or none")
    if arch in DUAL_ARCHITECTURES:
        if task not in (None, "embed"):
            raise ExportError(f"{path}: a {arch} model embeds texts and images; it cannot be a {task} model")
        return read_dual_source(path, config, Tokenizer.from_file(str(path / "tokenizer.json")),
                                _optional_json(path / "tokenizer_config.json"), model_id=model_id,
                                revision=revision, max_length=max_length, copied=_copied_files(path))
    if arch in VL_ARCHITECTURES:
        if task is not None and task not in TASKS:
            raise ExportError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
        head = multivector_head(path)
        if task is None:
            # Qwen3-VL-Embedding and Qwen3-VL-Reranker share one architecture and one
            # checkpoint layout: only the name tells them apart (--task says it outright).
            # A ColQwen3 checkpoint carries its projection head.
            task = "multivector" if head else "rerank" if "reranker" in (model_id or path.name).lower() else "embed"
        if (task == "multivector") != (head is not None):
            raise ExportError(f"{path}: a multi-vector model carries a projection head ({' or '.join(MULTIVECTOR_HEADS)}); "
                              f"this one {'does' if head else 'does not'}, so it cannot be exported as a {task} model")
        return read_vl_source(path, config, Tokenizer.from_file(str(path / "tokenizer.json")),
                              _optional_json(path / "tokenizer_config.json"), model_id=model_id,
                              revision=revision, max_length=max_length, copied=_copied_files(path),
                              max_pixels=max_pixels, task=task)
    if arch not in ARCHITECTURES:
        raise ExportError(
            f"{path}: model_type {arch!r} is not supported; supported: "
            f"{', '.join([*ARCHITECTURES, *DUAL_ARCHITECTURES, *VL_ARCHITECTURES])}"
        )
    rules = ARCHITECTURES[arch]
    tok_config = _optional_json(path / "tokenizer_config.json")
    st_config = _optional_json(path / "sentence_bert_config.json")
    tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
    task = _task(path, config, task)
    if task == "rerank":
        return _reranker(path, config, tok_config, st_config, tokenizer, rules, model_id, revision, max_length)

    pooling = _st_pooling(path) or rules.pooling
    padding_side = tok_config.get("padding_side") or rules.padding_side
    if pooling == "last_token":
        # Right padding, though Qwen3-Embedding's tokenizer config says left: the graph pools
        # the last real token either way, and with the padding after the text a causal
        # model's attention sums run over the same positions alone and in a batch, so a
        # text's vector does not move with its neighbours at all (left padding moved FP32
        # hidden states by ~1e-6, enough to flip per-token INT8 roundings and miss the
        # alone-vs-batch gate at the 0.6B shape).
        padding_side = "right"

    eos_id = _token_id(tokenizer, tok_config.get("eos_token"))
    if eos_id is None and isinstance(config.get("eos_token_id"), int):
        eos_id = config["eos_token_id"]
    append_eos = False
    if rules.needs_eos or pooling == "last_token":
        if eos_id is None:
            raise ExportError(f"{path}: last-token pooling needs an EOS token, and none is configured")
        tokenizer.no_truncation()
        append_eos = tokenizer.encode("probe").ids[-1:] != [eos_id]

    pad_id = _token_id(tokenizer, tok_config.get("pad_token"))
    if pad_id is None:
        pad_id = config.get("pad_token_id") if isinstance(config.get("pad_token_id"), int) else eos_id
    if pad_id is None:
        pad_id = 0

    natural = _max_length(config, tok_config, st_config, rules, max_length)
    dim = int(config["hidden_size"])
    manifest = Manifest(
        model_id=model_id or path.name,
        revision=revision,
        architecture=arch,
        pooling=pooling,
        padding_side=padding_side,
        append_eos=append_eos,
        eos_token_id=eos_id,
        pad_token_id=int(pad_id),
        max_length=int(natural),
        dim=dim,
        matryoshka_min_dim=rules.matryoshka_min_dim if rules.matryoshka_min_dim and rules.matryoshka_min_dim < dim else None,
        instruction_template=rules.instruction_template,
        default_instruction=rules.default_instruction,
        graph_inputs=rules.graph_inputs,
    )
    return SourceModel(path=path, copied_files=_copied_files(path), manifest=manifest)


def _copied_files(path: Path) -> tuple[str, ...]:
    # config.json travels too: the MLX backend builds its encoder from it.
    return tuple(n for n in ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
                 if (path / n).is_file())


def _max_length(config: dict, tok_config: dict, st_config: dict, rules: ArchitectureRules,
                max_length: int | None) -> int:
    """The smallest limit the model's files state, or the caller's within the model's."""
    limits = [rules.max_length_cap, config.get("max_position_embeddings")]
    limits.append(st_config.get("max_seq_length"))
    model_max = tok_config.get("model_max_length")
    if isinstance(model_max, int) and model_max < 1_000_000:
        limits.append(model_max)
    natural = min(x for x in limits if isinstance(x, int) and x > 0)
    if max_length is not None:
        if not 2 <= max_length <= (config.get("max_position_embeddings") or max_length):
            raise ExportError(f"max_length {max_length} is outside what the model supports")
        natural = max_length
    return int(natural)


def _task(path: Path, config: dict[str, Any], asked: str | None) -> str:
    architectures = [a for a in config.get("architectures") or [] if isinstance(a, str)]
    classifier = any(a.endswith("ForSequenceClassification") for a in architectures)
    cross_encoder = _optional_json(path / "config_sentence_transformers.json").get("model_type") == "CrossEncoder"
    causal = any(a.endswith("ForCausalLM") for a in architectures)
    if asked is not None:
        if asked not in TASKS:
            raise ExportError(f"task must be one of {', '.join(TASKS)}, got {asked!r}")
        if asked == "rerank" and not (classifier or cross_encoder or causal):
            raise ExportError(f"{path}: a reranker must be a *ForSequenceClassification model or a Qwen3 causal "
                              f"LM (Qwen3-Reranker); this one is {architectures or 'of no stated architecture'}")
        return asked
    if classifier or cross_encoder:
        return "rerank"
    if causal and config.get("model_type") == "qwen3" and not (path / "modules.json").is_file():
        return "rerank"
    return "embed"


def _reranker(path: Path, config: dict[str, Any], tok_config: dict, st_config: dict, tokenizer: Tokenizer,
              rules: ArchitectureRules, model_id: str | None, revision: str | None,
              max_length: int | None) -> SourceModel:
    """The draft manifest of a reranker: Qwen3-Reranker's yes/no prompt, or a cross-encoder's
    single logit over the tokenizer's pair encoding."""
    arch = config["model_type"]
    pad_id = _token_id(tokenizer, tok_config.get("pad_token"))
    if pad_id is None:
        pad_id = config.get("pad_token_id") if isinstance(config.get("pad_token_id"), int) else 0
    if arch == "qwen3":
        yes, no = tokenizer.token_to_id("yes"), tokenizer.token_to_id("no")
        if yes is None or no is None:
            raise ExportError(f"{path}: a Qwen3 reranker scores the tokens 'yes' and 'no', and this tokenizer "
                              "has no single token for one of them")
        spec = RerankSpec(format="template", template=QWEN3_RERANK_TEMPLATE, default_instruction=QWEN3_DEFAULT_TASK,
                          yes_token_id=yes, no_token_id=no)
        # Right padding, though Qwen's own code pads left: the graph picks the last real token
        # either way, and with the padding after the text a pair's attention sums run over
        # the same positions alone and in a batch. Measured at the 0.6B shape: left padding
        # moves a pair's logit by up to 1.5e-6 in FP32 with its batch neighbours, enough to
        # flip INT8 roundings downstream (0.013 in score); right padding moves it by 0.0.
        pooling, padding_side = "last_token", "right"
    else:
        labels = config.get("num_labels") or len(config.get("id2label") or {}) or 1
        if labels != 1:
            raise ExportError(f"{path}: a cross-encoder reranker has one output logit; this model has {labels} "
                              "labels")
        if tokenizer.post_processor is None:
            raise ExportError(f"{path}: the tokenizer has no post-processor, so it cannot encode a "
                              "(query, document) pair")
        # sentence-transformers applies a sigmoid to one-logit cross-encoders unless the
        # model names another activation.
        named = str((config.get("sentence_transformers") or {}).get("activation_fn", ""))
        spec = RerankSpec(format="pair", activation="none" if named.endswith("Identity") else "sigmoid")
        pooling, padding_side = "cls", "right"
    manifest = Manifest(
        task="rerank",
        model_id=model_id or path.name,
        revision=revision,
        architecture=arch,
        pooling=pooling,
        padding_side=padding_side,
        append_eos=False,
        eos_token_id=None,
        pad_token_id=int(pad_id),
        max_length=_max_length(config, tok_config, st_config, rules, max_length),
        dim=1,
        matryoshka_min_dim=None,
        instruction_template=None,
        default_instruction=None,
        graph_inputs=rules.graph_inputs,
        graph_output=RERANK_OUTPUT,
        rerank=spec,
    )
    return SourceModel(path=path, copied_files=_copied_files(path), manifest=manifest)
