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
    "bert": ("Attention", "SkipLayerNormalization", "EmbedLayerNormalization", "BiasGelu"),
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
               attention: bool = True, external_data: bool = False) -> dict:
    """Write `src` with its patterns fused to `dst`; returns the recipe entry (fused op counts).

    `attention=False` leaves attention as MatMul/Softmax: the per-token INT8 recipe
    quantizes MatMuls, and a fused Attention would keep its projections in FP32.
    """
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    options = FusionOptions("bert")
    options.enable_attention = attention
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
    return {"fusions": "onnxruntime.transformers optimizer" + ("" if attention else " (attention left unfused)"),
            "fused_ops": fused}
