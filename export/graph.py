"""The PyTorch side: the source model with pooling on top, run eagerly or exported to ONNX."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

import numpy as np
import torch

from ..errors import ExportError
from .source import SourceModel

__all__ = ["PooledEncoder", "RerankScorer", "load_pooled_encoder", "load_reference_model", "export_onnx", "uses_torchscript", "exporter_name",
           "ONNX_OPSET", "MIN_ONNXRUNTIME"]

ONNX_OPSET = 18
MIN_ONNXRUNTIME = "1.17"
_EXTERNAL_DATA_BYTES = 2 * 1024**3  # protobuf's hard limit for one file


class PooledEncoder(torch.nn.Module):
    """The encoder plus pooling, so the graph's only output is `sentence_embedding`.

    Last-token pooling picks the highest position whose mask is 1, which is right for
    left and right padding alike.
    """

    def __init__(self, encoder: torch.nn.Module, source: SourceModel):
        super().__init__()
        self.encoder = encoder
        self.pooling = source.manifest.pooling
        self.takes_positions = "position_ids" in source.manifest.graph_inputs

    def forward(self, input_ids, attention_mask, position_ids=None):
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self.takes_positions:
            kwargs["position_ids"] = position_ids
        hidden = self.encoder(**kwargs).last_hidden_state
        if self.pooling == "mean":
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        if self.pooling == "cls":
            return hidden[:, 0]
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), _last_positions(attention_mask)]


def _last_positions(attention_mask):
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (attention_mask * positions).argmax(dim=1)


class RerankScorer(torch.nn.Module):
    """A reranker with only what its score needs, so the graph's one output is one logit
    per pair (`rerank_logit`).

    Qwen3-Reranker: the hidden state of the last real token times the difference of the LM
    head's "yes" and "no" rows, which is logit(yes) - logit(no), without the
    vocabulary-wide logits. Cross-encoders: the classifier's one logit, with segment ids
    derived in the graph (1 after the first separator), so the runtime feeds ids and mask.
    """

    def __init__(self, model: torch.nn.Module, source: SourceModel, separator_id: int | None):
        super().__init__()
        spec = source.manifest.rerank
        self.takes_positions = "position_ids" in source.manifest.graph_inputs
        self.causal = spec.format == "template"
        if self.causal:
            self.body = model.model
            weight = model.get_output_embeddings().weight.detach()
            self.register_buffer("direction", (weight[spec.yes_token_id] - weight[spec.no_token_id]).clone())
        else:
            self.model = model
        self.separator_id = separator_id

    def forward(self, input_ids, attention_mask, position_ids=None):
        if self.causal:
            kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
            if self.takes_positions:
                kwargs["position_ids"] = position_ids
            hidden = self.body(**kwargs).last_hidden_state
            last = hidden[torch.arange(hidden.shape[0], device=hidden.device), _last_positions(attention_mask)]
            return (last @ self.direction).unsqueeze(-1)
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self.separator_id is not None:
            sep = (input_ids == self.separator_id).to(torch.int64)
            kwargs["token_type_ids"] = ((torch.cumsum(sep, dim=1) - sep) > 0).to(torch.int64)
        return self.model(**kwargs).logits[:, :1]


def _pair_separator(source: SourceModel) -> int | None:
    """The token after which a pair's second segment starts, where the model has segment
    ids (BERT); None where the tokenizer gives every token segment 0 (RoBERTa)."""
    from tokenizers import Tokenizer

    encoding = Tokenizer.from_file(str(source.path / "tokenizer.json")).encode("a", "b")
    second = [i for i, t in enumerate(encoding.type_ids) if t == 1]
    return encoding.ids[second[0] - 1] if second else None


def load_reference_model(source: SourceModel) -> torch.nn.Module:
    """The source model in FP32, eval mode, with what makes its graph output: pooling for an
    embedder, the score head for a reranker. The reference for every gate."""
    if source.manifest.task == "embed":
        return load_pooled_encoder(source)
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    causal = source.manifest.rerank.format == "template"
    extra = {"attn_implementation": "eager"} if uses_torchscript(source) else {}
    loader = AutoModelForCausalLM if causal else AutoModelForSequenceClassification
    try:
        model = loader.from_pretrained(source.path, dtype=torch.float32, **extra)
    except (OSError, ValueError) as exc:
        raise ExportError(f"transformers cannot load {source.path}: {exc}") from exc
    return RerankScorer(model, source, None if causal else _pair_separator(source)).eval()


def load_pooled_encoder(source: SourceModel) -> PooledEncoder:
    """The source model in FP32, eval mode, with its pooling: the reference for every gate."""
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the pipeline reports progress itself
    # BERT-family graphs are exported from the eager attention: its MatMul/Softmax pattern
    # is the one ONNX Runtime fuses into its Attention kernel (SDPA's is not).
    extra = {"attn_implementation": "eager"} if uses_torchscript(source) else {}
    try:
        encoder = AutoModel.from_pretrained(source.path, dtype=torch.float32, **extra)
    except (OSError, ValueError) as exc:
        raise ExportError(f"transformers cannot load {source.path}: {exc}") from exc
    return PooledEncoder(encoder, source).eval()


def uses_torchscript(source: SourceModel) -> bool:
    """BERT-family encoders go through the TorchScript exporter, whose graph ONNX Runtime's
    transformer optimizer fuses completely; Qwen3 through dynamo."""
    return source.manifest.architecture != "qwen3"


def exporter_name(source: SourceModel) -> str:
    return "TorchScript" if uses_torchscript(source) else "dynamo"


def export_onnx(model: torch.nn.Module, source: SourceModel, out_path: Path, sample: dict[str, np.ndarray]) -> list[str]:
    """Export with torch.onnx and dynamic batch and sequence axes.

    Returns the names of external-data files written beside the model (none below 2 GB).
    """
    names = list(source.manifest.graph_inputs)
    output = source.manifest.graph_output
    args = tuple(torch.from_numpy(sample[n]) for n in names)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    external = weight_bytes >= _EXTERNAL_DATA_BYTES
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    # The exporter narrates its steps on stdout; the pipeline reports progress itself.
    with warnings.catch_warnings(), torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        if uses_torchscript(source):
            axes = {n: {0: "batch", 1: "sequence"} for n in names}
            torch.onnx.export(model, args, str(out_path), input_names=names, output_names=[output],
                              dynamic_axes={**axes, output: {0: "batch"}},
                              opset_version=ONNX_OPSET, dynamo=False)
            return []
        model, translations = _fuse_attention(model, source)
        batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
        program = torch.onnx.export(
            model,
            args,
            input_names=names,
            output_names=[output],
            dynamic_shapes={n: {0: batch, 1: seq} for n in names},
            opset_version=ONNX_OPSET,
            dynamo=True,
            verbose=False,
            custom_translation_table=translations,
        )
    program.save(str(out_path), external_data=external)
    if translations:
        from .attention import finish_graph

        finish_graph(out_path)
    return [out_path.name + ".data"] if external else []


def _fuse_attention(model: torch.nn.Module, source: SourceModel) -> tuple[torch.nn.Module, dict]:
    """A Qwen3 model with its attention written as ONNX Runtime's fused kernel (see
    export/attention.py), and the translation the exporter needs for it; any other model,
    or a Qwen3 the kernel cannot run, as it is."""
    if source.manifest.architecture != "qwen3":
        return model, {}
    from transformers import AutoConfig

    from .attention import TRANSLATIONS, cannot_fuse, with_fused_attention

    config = AutoConfig.from_pretrained(source.path)
    reason = cannot_fuse(config, source.manifest.padding_side)
    if reason is not None:
        logging.getLogger(__name__).warning("%s: attention stays unfused: %s", source.manifest.model_id, reason)
        return model, {}
    return with_fused_attention(model, config, source.manifest.max_length), TRANSLATIONS
