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

__all__ = ["PooledEncoder", "load_pooled_encoder", "export_onnx", "uses_torchscript", "exporter_name",
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
        positions = torch.arange(attention_mask.shape[1], device=hidden.device)
        last = (attention_mask * positions).argmax(dim=1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


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


def export_onnx(model: PooledEncoder, source: SourceModel, out_path: Path, sample: dict[str, np.ndarray]) -> list[str]:
    """Export with torch.onnx and dynamic batch and sequence axes.

    Returns the names of external-data files written beside the model (none below 2 GB).
    """
    names = list(source.manifest.graph_inputs)
    args = tuple(torch.from_numpy(sample[n]) for n in names)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    external = weight_bytes >= _EXTERNAL_DATA_BYTES
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    # The exporter narrates its steps on stdout; the pipeline reports progress itself.
    with warnings.catch_warnings(), torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        if uses_torchscript(source):
            axes = {n: {0: "batch", 1: "sequence"} for n in names}
            torch.onnx.export(model, args, str(out_path), input_names=names, output_names=["sentence_embedding"],
                              dynamic_axes={**axes, "sentence_embedding": {0: "batch"}},
                              opset_version=ONNX_OPSET, dynamo=False)
            return []
        batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
        program = torch.onnx.export(
            model,
            args,
            input_names=names,
            output_names=["sentence_embedding"],
            dynamic_shapes={n: {0: batch, 1: seq} for n in names},
            opset_version=ONNX_OPSET,
            dynamo=True,
            verbose=False,
        )
    program.save(str(out_path), external_data=external)
    return [out_path.name + ".data"] if external else []
