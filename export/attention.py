"""Qwen3 attention exported as ONNX Runtime's fused GroupQueryAttention, rotary included.

The exporter spells a decoder's attention as two dozen small ops per layer (rotary
halves, head repeats, the causal mask, Softmax over the padded width). ONNX Runtime's
`com.microsoft.GroupQueryAttention` does all of it in one kernel, on the CPU (FP32 and FP16)
and on CUDA (FP16): rotary on Q and K from cos/sin tables, grouped K/V heads without
copies, causal attention up to each row's length. No optimizer pattern produces it from
Qwen3's graph (its per-head q_norm/k_norm sit between the projections and the rotation),
so the export writes it directly: each Qwen3Attention runs a custom torch op whose ONNX
translation is that node.

The kernel's prompt semantics (ORT >= 1.18, read in `gqa_attention_base.h`): positions are
0..S-1 for every row, and row b's keys stop at `seqlens_k[b]`. That is exactly right
padding, which every Qwen3 bundle now uses; the graph then takes no `position_ids`.
The padded rows' outputs are unspecified, and nothing reads them: a causal model's real
tokens never attend to the padding after them, and pooling reads the last real token.
"""

from __future__ import annotations

import contextlib
import types

import torch
from torch import Tensor

__all__ = ["cannot_fuse", "with_fused_attention", "finish_graph", "FUSED_ATTENTION_OP", "TRANSLATIONS",
           "whole_sequence_attention", "traced_whole_sequence_attention", "WHOLE_SEQUENCE_ATTENTION_OP"]

FUSED_ATTENTION_OP = "GroupQueryAttention"


@torch.library.custom_op("edge_embed::rotary_gqa", mutates_args=())
def rotary_gqa(query: Tensor, key: Tensor, value: Tensor, seqlens_k: Tensor, cos: Tensor, sin: Tensor,
               num_heads: int, kv_heads: int, scale: float) -> Tensor:
    """What GroupQueryAttention computes in a prompt with do_rotary=1 (half-split rotary):
    query [B, S, heads*D], key/value [B, S, kv_heads*D] -> [B, S, heads*D]."""
    batch, seq, _ = query.shape
    dim = query.shape[-1] // num_heads
    half = dim // 2
    cos_s = torch.cat([cos[:seq], cos[:seq]], -1)[None, None]
    sin_s = torch.cat([sin[:seq], sin[:seq]], -1)[None, None]

    def rotate(x: Tensor) -> Tensor:
        return x * cos_s + torch.cat([-x[..., half:], x[..., :half]], -1) * sin_s

    q = rotate(query.view(batch, seq, num_heads, dim).transpose(1, 2))
    k = rotate(key.view(batch, seq, kv_heads, dim).transpose(1, 2)).repeat_interleave(num_heads // kv_heads, 1)
    v = value.view(batch, seq, kv_heads, dim).transpose(1, 2).repeat_interleave(num_heads // kv_heads, 1)
    positions = torch.arange(seq, device=query.device)
    allowed = (positions[None, :] <= positions[:, None])[None] & \
        (positions[None, None, :] <= seqlens_k.long()[:, None, None])
    scores = (q @ k.transpose(-1, -2) * scale).masked_fill(~allowed[:, None], float("-inf"))
    return (torch.softmax(scores, -1) @ v).transpose(1, 2).reshape(batch, seq, num_heads * dim)


@rotary_gqa.register_fake
def _(query, key, value, seqlens_k, cos, sin, num_heads, kv_heads, scale):
    return torch.empty_like(query)


def _register_schema() -> None:
    """onnxscript builds a node only for an op whose schema it finds; ONNX Runtime's contrib
    schemas are not in onnx's registry, so the inputs and outputs used here are declared."""
    import onnx
    from onnx.defs import OpSchema

    if onnx.defs.has(FUSED_ATTENTION_OP, "com.microsoft"):
        return
    param, optional = OpSchema.FormalParameter, OpSchema.FormalParameterOption.Optional
    attribute, kind = OpSchema.Attribute, OpSchema.AttrType
    onnx.defs.register_schema(OpSchema(
        FUSED_ATTENTION_OP, "com.microsoft", 1,
        inputs=[param("query", "T"), param("key", "T", param_option=optional),
                param("value", "T", param_option=optional), param("past_key", "T", param_option=optional),
                param("past_value", "T", param_option=optional), param("seqlens_k", "M"),
                param("total_sequence_length", "M"), param("cos_cache", "T", param_option=optional),
                param("sin_cache", "T", param_option=optional)],
        outputs=[param("output", "T"), param("present_key", "T", param_option=optional),
                 param("present_value", "T", param_option=optional)],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)"], ""), ("M", ["tensor(int32)"], "")],
        attributes=[attribute("num_heads", kind.INT, required=True),
                    attribute("kv_num_heads", kind.INT, required=True),
                    attribute("scale", kind.FLOAT, required=False),
                    attribute("do_rotary", kind.INT, required=False),
                    attribute("rotary_interleaved", kind.INT, required=False)],
    ))


def _rotary_gqa_onnx(query, key, value, seqlens_k, cos, sin, num_heads: int, kv_heads: int, scale: float):
    """The custom op's ONNX translation: one GroupQueryAttention node."""
    from onnxscript import opset18 as op
    from onnxscript.values import Op, Opset

    _register_schema()
    gqa = Op(Opset("com.microsoft", 1), FUSED_ATTENTION_OP)
    total = op.Squeeze(op.Cast(op.Shape(query, start=1, end=2), to=6), op.Constant(value_ints=[0]))  # int32 scalar
    output, _, _ = gqa(query, key, value, None, None, seqlens_k, total, cos, sin, num_heads=num_heads,
                       kv_num_heads=kv_heads, scale=scale, do_rotary=1, rotary_interleaved=0, _num_outputs=3)
    return output


TRANSLATIONS = {torch.ops.edge_embed.rotary_gqa.default: _rotary_gqa_onnx}


# -- attention over a whole sequence (an image's patches) ---------------------------------------

WHOLE_SEQUENCE_ATTENTION_OP = "MultiHeadAttention"


@torch.library.custom_op("edge_embed::whole_sequence_attention", mutates_args=())
def whole_sequence_attention(query: Tensor, key: Tensor, value: Tensor, num_heads: int, scale: float) -> Tensor:
    """What MultiHeadAttention computes with no mask, bias or past: every position attends to
    every position. query/key/value [B, S, heads*D] -> [B, S, heads*D].

    A vision tower's attention over one image's patches is this. Spelled op by op, ONNX
    Runtime materializes each layer's [heads, S, S] scores (7,200 patches: 3.3 GB per layer
    of a 2B model); its CPU MultiHeadAttention kernel runs MLAS's flash attention instead
    when, as here, there is no mask, bias or past (read in `multihead_attention.cc`)."""
    batch, seq, _ = query.shape
    dim = query.shape[-1] // num_heads
    q, k, v = (t.reshape(batch, seq, num_heads, dim).transpose(1, 2) for t in (query, key, value))
    out = torch.softmax(q @ k.transpose(-1, -2) * scale, -1) @ v
    return out.transpose(1, 2).reshape(batch, seq, num_heads * dim)


@whole_sequence_attention.register_fake
def _(query, key, value, num_heads, scale):
    return torch.empty_like(query)


def _whole_sequence_symbolic(g, query, key, value, num_heads, scale):
    """TorchScript's translation of the custom op: one com.microsoft MultiHeadAttention node."""
    from torch.onnx import symbolic_helper

    out = g.op(f"com.microsoft::{WHOLE_SEQUENCE_ATTENTION_OP}", query, key, value,
               num_heads_i=symbolic_helper._get_const(num_heads, "i", "num_heads"),
               scale_f=symbolic_helper._get_const(scale, "f", "scale"))
    out.setType(query.type())
    return out


@contextlib.contextmanager
def traced_whole_sequence_attention(opset: int):
    """While exporting with TorchScript, the custom op becomes one MultiHeadAttention node."""
    name = "edge_embed::whole_sequence_attention"
    torch.onnx.register_custom_op_symbolic(name, _whole_sequence_symbolic, opset)
    try:
        yield
    finally:
        torch.onnx.unregister_custom_op_symbolic(name, opset)


def _rope_theta(config) -> float | None:
    """The default RoPE's base, or None for any other RoPE (scaled, YaRN...): those keep the
    exporter's own ops."""
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if params.get("rope_type", params.get("type", "default")) != "default":
        return None
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    return float(theta) if theta is not None else None


def cannot_fuse(config, padding_side: str) -> str | None:
    """Why this Qwen3 model keeps the exporter's attention ops; None when it can be fused."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if padding_side != "right":
        return "the kernel's positions assume right padding"
    if _rope_theta(config) is None:
        return "its RoPE is not the default one"
    if getattr(config, "use_sliding_window", False) and getattr(config, "sliding_window", None):
        return "it uses sliding-window attention"
    if head_dim % 16:
        return f"head size {head_dim} is not a multiple of 16"
    if config.num_attention_heads % config.num_key_value_heads:
        return "its query heads are not a multiple of its key/value heads"
    return None


class _FusedAttentionGraph(torch.nn.Module):
    """The model to export, with one cos/sin table for all layers and each row's last key
    (`seqlens_k`) computed once from the attention mask."""

    def __init__(self, model: torch.nn.Module, state: types.SimpleNamespace, cos: Tensor, sin: Tensor):
        super().__init__()
        self.model = model
        self._state = state
        self.register_buffer("rotary_cos", cos, persistent=False)
        self.register_buffer("rotary_sin", sin, persistent=False)

    def forward(self, input_ids, attention_mask, *rest):
        self._state.seqlens_k = (attention_mask.sum(dim=1) - 1).to(torch.int32)
        self._state.cos, self._state.sin = self.rotary_cos, self.rotary_sin
        return self.model(input_ids, attention_mask, *rest)


def _fused_forward(self, hidden_states, position_embeddings=None, attention_mask=None, *args, **kwargs):
    """Qwen3Attention.forward for export: projections and per-head norms as before, then
    the fused kernel in place of rotary, mask and attention."""
    heads = (*hidden_states.shape[:-1], -1, self.head_dim)
    query = self.q_norm(self.q_proj(hidden_states).view(heads)).flatten(-2)
    key = self.k_norm(self.k_proj(hidden_states).view(heads)).flatten(-2)
    value = self.v_proj(hidden_states)
    state = self._fused_state
    out = torch.ops.edge_embed.rotary_gqa(query, key, value, state.seqlens_k, state.cos, state.sin,
                                          self.config.num_attention_heads, self.config.num_key_value_heads,
                                          float(self.scaling))
    return self.o_proj(out), None


def with_fused_attention(model: torch.nn.Module, config, max_positions: int) -> torch.nn.Module:
    """`model` (an embedder or reranker over a Qwen3 decoder) with every Qwen3Attention
    running the fused op, wrapped to feed it; call only when `cannot_fuse` says None.
    The model's own modules are changed: use it for the export only."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    inv_freq = 1.0 / (_rope_theta(config) ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    angles = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
    state = types.SimpleNamespace()
    patched = 0
    for module in model.modules():
        if type(module).__name__ == "Qwen3Attention":
            module._fused_state = state
            module.forward = types.MethodType(_fused_forward, module)
            patched += 1
    if not patched:
        raise ValueError("the model holds no Qwen3Attention to fuse")
    return _FusedAttentionGraph(model, state, angles.cos(), angles.sin())


def finish_graph(path) -> int:
    """Unname GroupQueryAttention's present key/value outputs, which a prompt-only graph
    never reads (the kernel then does not write them, and shape inference does not need
    their shapes). Returns the number of fused attention nodes."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    used = {name for node in model.graph.node for name in node.input} | {o.name for o in model.graph.output}
    nodes = [node for node in model.graph.node if node.op_type == FUSED_ATTENTION_OP]
    for node in nodes:
        while len(node.output) > 1 and node.output[-1] not in used:
            node.output.pop()
    onnx.save(model, str(path))
    return len(nodes)
