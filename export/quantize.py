"""Lower-precision variants of an exported FP32 graph: FP16 and INT8 recipes.

Every function here writes a candidate file; none of them decides whether it ships.
That is the pipeline's gate, measured against the PyTorch reference.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import onnx

__all__ = ["to_fp16", "quantize_dynamic_int8", "quantize_weight_only_int8", "quantizable_matmuls"]



class _DropPreprocessHint(logging.Filter):
    """ONNX Runtime's quantizer logs a pre-processing hint on the root logger for every call."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-processing before quantization" not in record.getMessage()


@contextlib.contextmanager
def _quiet_quantizer():
    hint = _DropPreprocessHint()
    logging.getLogger().addFilter(hint)
    try:
        yield
    finally:
        logging.getLogger().removeFilter(hint)


def to_fp16(src: Path, dst: Path) -> dict:
    """FP16 weights and compute with FP32 inputs/outputs (ONNX Runtime's transformer tools).

    onnxconverter-common's converter leaves Cast nodes that ONNX Runtime refuses to load;
    the transformer optimizer's converter produces a loadable graph.
    """
    from onnxruntime.transformers.onnx_model import OnnxModel

    model = OnnxModel(onnx.load(str(src)))
    model.convert_float_to_float16(keep_io_types=True)
    model.save_model_to_file(str(dst))
    return {"method": "onnxruntime.transformers float16", "keep_io_types": True, "batch_invariant": True}


def quantizable_matmuls(path: Path) -> list[str]:
    """Names of MatMul nodes whose second input is a weight (initializer): INT8 candidates."""
    model = onnx.load(str(path), load_external_data=False)
    weights = {init.name for init in model.graph.initializer}
    return [
        node.name
        for node in model.graph.node
        if node.op_type == "MatMul" and len(node.input) == 2 and node.input[1] in weights
    ]


def quantize_dynamic_int8(
    src: Path,
    dst: Path,
    *,
    per_channel: bool,
    reduce_range: bool,
    nodes_to_quantize: list[str] | None = None,
    exclude: tuple[str, ...] = (),
) -> dict:
    """Dynamic INT8: int8 weights, activations quantized at run time with one scale per tensor.

    That scale spans the whole batch, so a text's vector depends on its neighbours
    (measured on MiniLM: cos 0.963 between a text alone and in a batch). The recipe says
    so (`batch_invariant: false`) and the runtime runs such variants one text per batch.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with _quiet_quantizer():
        quantize_dynamic(
            str(src),
            str(dst),
            op_types_to_quantize=["MatMul"],
            per_channel=per_channel,
            reduce_range=reduce_range,
            weight_type=QuantType.QInt8,
            nodes_to_quantize=nodes_to_quantize,
            nodes_to_exclude=list(exclude),
            extra_options={"MatMulConstBOnly": True},
        )
    return {
        "method": "onnxruntime dynamic quantization",
        "weights": "int8 symmetric",
        "activations": "uint8 dynamic, one scale per batch tensor",
        "batch_invariant": False,
        "per_channel": per_channel,
        "reduce_range": reduce_range,
        "excluded_nodes": list(exclude),
    }


def quantize_weight_only_int8(src: Path, dst: Path, *, block_size: int = 32) -> dict:
    """Weight-only 8-bit (MatMulNBits): int8 weights per block, FP32 activations."""
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    config = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=True, bits=8)
    quantizer = MatMulNBitsQuantizer(onnx.load(str(src)), algo_config=config)
    with _quiet_quantizer():
        quantizer.process()
    quantizer.model.save_model_to_file(str(dst))
    return {
        "method": "onnxruntime MatMulNBits weight-only",
        "weights": f"int8 symmetric, blocks of {block_size}",
        "activations": "fp32",
        "batch_invariant": True,
        "excluded_nodes": [],
    }
