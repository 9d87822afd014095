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
import os
import shutil
from pathlib import Path

from ..errors import ExportError
from .onnx_files import save_graph

__all__ = ["fuse_graph", "FUSED_OPS"]

# The ops a fused graph is expected to hold, by architecture family.
FUSED_OPS = {
    "bert": ("Attention", "MultiHeadAttention", "SkipLayerNormalization", "EmbedLayerNormalization", "BiasGelu"),
    "qwen3": ("GroupQueryAttention", "SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization"),
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
               attention: bool = True, for_quantization: bool = False) -> dict:
    """Write `src` with its patterns fused to `dst`; returns the recipe entry (fused op counts).

    `for_quantization` fuses attention after its Q/K/V projections (MultiHeadAttention),
    which stay MatMuls for the INT8 and INT4 recipes to quantize (a fused Attention op
    would keep them in FP32), and leaves the embedding lookup a Gather. `attention=False`
    leaves attention unfused.

    Weights in external data are never loaded: fusions rewrite nodes, and the fused graph
    points at a copy of `src`'s data file, so fusing a model costs its graph's memory, not
    its weights'.
    """
    import onnx
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    model = onnx.load(str(src), load_external_data=False)
    external = sorted({e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"})
    options = FusionOptions("bert")
    options.enable_attention = attention
    options.use_multi_head_attention = for_quantization
    # EmbedLayerNormalization would take the vocabulary table whole: the quantizers store
    # it as int8 rows behind a Gather instead.
    options.enable_embed_layer_norm = not for_quantization
    options.enable_gelu_approximation = False  # exact GELU: the same function as the source model
    with _quiet(), _working_directory(src.parent):  # where shape inference finds the data file's name
        optimized = optimize_model(model, model_type="bert", num_heads=num_heads, hidden_size=hidden_size,
                                   opt_level=0, optimization_options=options, only_onnxruntime=False)
        fused = optimized.model
        if not external:
            # Shapes of every tensor, the fused contrib ops' outputs included: the per-token
            # INT8 recipe shares one zero point among inputs with the same [batch, sequence].
            # (Exported graphs large enough for external data come from dynamo, which
            # records shapes itself.)
            from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

            del fused.graph.value_info[:]
            fused = SymbolicShapeInference.infer_shapes(fused, auto_merge=True)
    if not any(entry.domain == "com.microsoft" for entry in fused.opset_import):
        fused.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))  # the fused ops' domain
    if not external:
        save_graph(fused, dst)
    else:
        data = dst.name + ".data"
        if len(external) != 1:
            raise ExportError(f"{src.name} keeps its weights in {len(external)} files; expected one")
        # A copy, not a hard link: onnx refuses data files with several links.
        shutil.copyfile(src.parent / external[0], dst.parent / data)
        for tensor in fused.graph.initializer:
            for entry in tensor.external_data:
                if entry.key == "location":
                    entry.value = data
        onnx.save(fused, str(dst))
    counts = collections.Counter(node.op_type for node in fused.graph.node)
    kept = {op: counts[op] for op in FUSED_OPS.get(family, ()) if counts[op]}
    return {"fusions": "onnxruntime.transformers optimizer", "fused_ops": kept}


@contextlib.contextmanager
def _working_directory(path: Path):
    previous = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)
