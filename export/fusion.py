"""Fusing the exported FP32 graph into ONNX Runtime's transformer kernels.

An exported graph spells attention, layer norms and GELU as dozens of small ops each.
ONNX Runtime's transformer optimizer rewrites known patterns into single kernels
(Attention, SkipLayerNormalization, EmbedLayerNormalization, BiasGelu for BERT;
SimplifiedLayerNormalization and SkipSimplifiedLayerNormalization for Qwen3's RMSNorm),
which CPU and CUDA both implement. The fused graph is saved in the bundle, so every
device runs the same graph the gates measured.
"""

from __future__ import annotations

import collections
import contextlib
import logging
from pathlib import Path

__all__ = ["fuse_graph", "FUSED_OPS"]

# The ops a fused graph is expected to hold, by architecture family.
FUSED_OPS = {
    "bert": ("Attention", "MultiHeadAttention", "SkipLayerNormalization", "EmbedLayerNormalization", "BiasGelu"),
    "qwen3": ("SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization"),
}


@contextlib.contextmanager
def _quiet():
    """The optimizer reports each fusion at INFO/WARNING on its own loggers: debug detail."""
    logger = logging.getLogger("onnxruntime.transformers")
    level = logger.level
    if not logging.getLogger("edge_embed").isEnabledFor(logging.DEBUG):
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def fuse_graph(src: Path, dst: Path, *, family: str, num_heads: int, hidden_size: int,
               attention: bool = True, for_quantization: bool = False, external_data: bool = False) -> dict:
    """Write `src` with its patterns fused to `dst`; returns the recipe entry (fused op counts).

    `for_quantization` fuses attention after its Q/K/V projections (MultiHeadAttention),
    which stay MatMuls for the INT8 and INT4 recipes to quantize (a fused Attention op
    would keep them in FP32), and leaves the embedding lookup a Gather. `attention=False`
    leaves attention unfused.
    """
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    options = FusionOptions("bert")
    options.enable_attention = attention
    options.use_multi_head_attention = for_quantization
    # EmbedLayerNormalization would take the vocabulary table whole: the quantizers store
    # it as int8 rows behind a Gather instead.
    options.enable_embed_layer_norm = not for_quantization
    options.enable_gelu_approximation = False  # exact GELU: the same function as the source model
    with _quiet():
        optimized = optimize_model(str(src), model_type="bert", num_heads=num_heads, hidden_size=hidden_size,
                                   opt_level=0, optimization_options=options, only_onnxruntime=False)
        # Shapes of every tensor, the fused contrib ops' outputs included: the per-token
        # INT8 recipe shares one zero point among inputs with the same [batch, sequence].
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

        del optimized.model.graph.value_info[:]
        optimized.model = SymbolicShapeInference.infer_shapes(optimized.model, auto_merge=True)
        optimized.save_model_to_file(str(dst), use_external_data_format=external_data)
    counts = collections.Counter(node.op_type for node in optimized.model.graph.node)
    fused = {op: counts[op] for op in FUSED_OPS.get(family, ()) if counts[op]}
    return {"fusions": "onnxruntime.transformers optimizer", "fused_ops": fused}
