"""Lower-precision variants of an exported FP32 graph: FP16 and INT8 recipes.

Every function here writes a candidate file; none of them decides whether it ships.
That is the pipeline's gate, measured against the PyTorch reference.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
from pathlib import Path

import onnx

from .onnx_files import save_graph

__all__ = ["to_fp16", "quantize_dynamic_int8", "quantize_per_token_int8", "quantize_weight_only_int8",
           "activation_channel_max",
           "quantize_int4", "quantizable_matmuls", "INT4_BLOCK_SIZES", "INT4_ACCURACY_LEVEL"]


class _DropQuantizerChatter(logging.Filter):
    """ONNX Runtime's quantizers log a pre-processing hint on the root logger for every
    call, and the NBits quantizer a line per graph node and an opset notice: detail for
    EDGE_EMBED_LOG_LEVEL=debug, not for the console."""

    def filter(self, record: logging.LogRecord) -> bool:
        if logging.getLogger("edge_embed").isEnabledFor(logging.DEBUG):
            return True
        if record.name.startswith("onnxruntime.quantization"):
            return record.levelno >= logging.ERROR
        return "pre-processing before quantization" not in record.getMessage()


_NBITS_LOGGER = "onnxruntime.quantization.matmul_nbits_quantizer"


@contextlib.contextmanager
def _quiet_quantizer():
    root = logging.getLogger()
    had_handlers = list(root.handlers)
    level = root.level
    # Importing the NBits quantizer calls logging.basicConfig: a root handler at INFO that
    # would print every library's chatter from then on. Undo it.
    import onnxruntime.quantization.matmul_nbits_quantizer  # noqa: F401

    if not had_handlers and root.handlers:
        root.handlers.clear()
        root.setLevel(level)
    chatter = _DropQuantizerChatter()
    loggers = [root, logging.getLogger(_NBITS_LOGGER)]
    for logger in loggers:
        logger.addFilter(chatter)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(chatter)


@contextlib.contextmanager
def _graph_with_lazy_weights(src: Path):
    """`src` without its external weights loaded, and the working directory where ONNX's
    loaders find them by relative name: a quantizer reads one weight at a time instead of
    the whole FP32 model. Whatever is still external on leaving is loaded into the model,
    so the quantized file is self-contained."""
    import os

    model = onnx.load(str(src), load_external_data=False)
    previous = os.getcwd()
    os.chdir(src.parent)
    try:
        yield model
        onnx.load_external_data_for_model(model, ".")
    finally:
        os.chdir(previous)


def _weight_array(tensor: onnx.TensorProto):
    """A weight's values, read from external data into a copy (the model's tensor stays
    empty, so weights read one by one are not all held at once)."""
    from onnx import numpy_helper

    if not any(e.key == "location" for e in tensor.external_data):
        return numpy_helper.to_array(tensor)
    copy = onnx.TensorProto()
    copy.CopyFrom(tensor)
    return numpy_helper.to_array(copy, base_dir=".")


def to_fp16(src: Path, dst: Path) -> dict:
    """FP16 weights and compute with FP32 inputs/outputs (ONNX Runtime's transformer tools).

    onnxconverter-common's converter leaves Cast nodes that ONNX Runtime refuses to load;
    the transformer optimizer's converter produces a loadable graph. Softmax stays FP32:
    its sum runs over the padded width, and in half precision a different width rounds it
    differently (a Qwen3-Reranker pair's score moved by 1.8e-4 with its batch neighbours;
    0.0 with Softmax in FP32).
    """
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST
    from onnxruntime.transformers.onnx_model import OnnxModel

    # Where its symbolic shape inference gives up (SigLIP's heads) the converter prints and
    # logs so, and converts without it: detail, not console output. Over 2 GB it writes
    # temporary files into the working directory and leaves them: a scratch one takes them.
    shape_logger = logging.getLogger("onnxruntime.transformers.onnx_model")
    level = shape_logger.level
    shape_logger.setLevel(logging.ERROR)
    previous = os.getcwd()
    try:
        with tempfile.TemporaryDirectory(prefix="edge-embed-fp16-") as scratch, \
                contextlib.redirect_stdout(io.StringIO()):
            model = OnnxModel(onnx.load(str(Path(src).resolve())))
            os.chdir(scratch)
            model.convert_float_to_float16(keep_io_types=True, op_block_list=[*DEFAULT_OP_BLOCK_LIST, "Softmax"])
            os.chdir(previous)
    finally:
        os.chdir(previous)
        shape_logger.setLevel(level)
    model.topological_sort()
    save_graph(model.model, dst)
    return {"method": "onnxruntime.transformers float16", "keep_io_types": True, "fp32_ops": ["Softmax"],
            "batch_invariant": True}


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
            # Fused contrib ops (BiasGelu, SkipLayerNormalization) have no ONNX shape
            # inference: their outputs are FP32.
            extra_options={"MatMulConstBOnly": True, "DefaultTensorType": onnx.TensorProto.FLOAT},
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



# Tables with fewer rows (positions, token types) are small and stay FP32.
_TABLE_MIN_ROWS = 1024
_TABLE_CHUNK_ROWS = 8192


def _quantize_embedding_tables(model: onnx.ModelProto) -> dict:
    """Vocabulary tables as int8 rows with one FP32 scale per row, in place.

    `Gather(table, ids)` becomes `Cast(Gather(table_int8, ids)) * Gather(row_scales, ids)`:
    plain ONNX ops every execution provider runs, a quarter of the bytes (a Qwen3 table of
    151,669 x 1,024 goes from 621 MB to 156 MB), and the rows a text looks up are rebuilt
    exactly as they were quantized, whatever else is in the batch.
    """
    from onnx import TensorProto, helper, numpy_helper

    import numpy as np

    graph = model.graph
    weights = {init.name: init for init in graph.initializer}
    tables = {}
    nodes = []
    for node in graph.node:
        table = weights.get(node.input[0]) if node.op_type == "Gather" else None
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        if (table is None or axis != 0 or len(table.dims) != 2 or table.dims[0] < _TABLE_MIN_ROWS
                or table.data_type != TensorProto.FLOAT):
            nodes.append(node)
            continue
        if table.name not in tables:
            rows = numpy_helper.to_array(table)
            q = np.empty(rows.shape, dtype=np.int8)
            scale = np.empty((rows.shape[0], 1), dtype=np.float32)
            for start in range(0, rows.shape[0], _TABLE_CHUNK_ROWS):  # bounded temporaries
                chunk = rows[start:start + _TABLE_CHUNK_ROWS].astype(np.float32)
                s = np.maximum(np.abs(chunk).max(axis=1, keepdims=True), 1e-30) / 127.0
                q[start:start + len(chunk)] = np.clip(np.round(chunk / s), -127, 127)
                scale[start:start + len(chunk)] = s
            del rows
            table.ClearField("raw_data")  # the FP32 rows are not kept once quantized
            tables[table.name] = (numpy_helper.from_array(q, f"{table.name}_int8"),
                                  numpy_helper.from_array(scale, f"{table.name}_row_scale"))
        q_table, row_scale = tables[table.name]
        base = f"{node.name or node.output[0]}_int8_rows"
        nodes.extend([
            helper.make_node("Gather", [q_table.name, node.input[1]], [f"{base}_q"], name=f"{base}_Gather", axis=0),
            helper.make_node("Cast", [f"{base}_q"], [f"{base}_f"], name=f"{base}_Cast", to=TensorProto.FLOAT),
            helper.make_node("Gather", [row_scale.name, node.input[1]], [f"{base}_scale"], name=f"{base}_Scale",
                             axis=0),
            helper.make_node("Mul", [f"{base}_f", f"{base}_scale"], [node.output[0]], name=f"{base}_Mul"),
        ])
    if not tables:
        return {}
    kept = [init for init in graph.initializer if init.name not in tables]
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.initializer[:]
    graph.initializer.extend(kept + [t for pair in tables.values() for t in pair])
    shapes = [list(weights[name].dims) for name in tables]
    return {"embedding_tables": f"int8 per row, symmetric ({', '.join('x'.join(map(str, s)) for s in shapes)})"}


# u8 x s8 products are summed in pairs into int16 by AVX2 without VNNI (vpmaddubsw):
# 255 * 127 * 2 overflows, 255 * 63 * 2 does not. 7-bit weights are exact on every ISA.
_WEIGHT_QMAX = {False: 127, True: 63}


_PER_ROW_OPSET = 21  # QuantizeLinear with block_size: one scale per row in one op


def quantize_per_token_int8(src: Path, dst: Path, *, reduce_range: bool = False,
                            exclude: tuple[str, ...] = (), tables: bool = True, gemms: bool = False,
                            smoothing: dict[str, "np.ndarray"] | None = None, smooth_alpha: float = 0.5) -> dict:
    """INT8 that is batch-invariant by construction: activations quantized per token.

    Each weight MatMul `X @ W` becomes MatMulInteger over uint8 activations (zero point
    128) and int8 weights. Every row (token) of X gets its own symmetric scale,
    max|row| / 127, applied by one QuantizeLinear whose block is the whole row (opset 21),
    so no other text in the
    batch, and no padding, can change a token's quantization. W keeps one symmetric scale
    per output column. The rescale is `Cast -> Mul(Mul(row scale, column scale))`, the
    pattern ONNX Runtime fuses into MatMulIntegerToFloat (its integer GEMM kernels; the
    [..., 1] row scale is applied after the GEMM). Rows that share an input are quantized
    once. The graph's opset is raised to 21 for the blocked QuantizeLinear. With `tables`,
    vocabulary tables are stored as int8 rows too.

    Weights use the full +-127 unless `reduce_range` (+-63). u8 x s8 products are summed
    in pairs into int16 by x86 without VNNI (vpmaddubsw), which saturates at +-127; the
    recipe therefore asks the runtime for ONNX Runtime's `session.x64quantprecision`,
    which on exactly those CPUs turns the weights into u8 at load for its exact u8 x u8
    kernel (16-bit products), and changes nothing where u8 x s8 is exact (VNNI, AMX, ARM
    dot-product).

    `smoothing` (SmoothQuant) maps a MatMul input to its per-channel max |x| measured on
    calibration texts: each channel is divided by s = max|x|^a / max|w|^(1-a) before the
    per-token quantization and the weight rows multiplied by s, so a few outlier channels
    no longer set every token's scale.

    With `gemms`, weight Gemms (the exporter's form of a linear layer on a 2-D input, as in
    Qwen3-VL's vision tower, which reads an image's patches as [patches, width]) are first
    written as the MatMul and bias Add they compute, so they are quantized too.
    """
    with _graph_with_lazy_weights(src) as model:
        if gemms:
            _gemms_as_matmuls(model)
        recipe = _per_token_int8(model, reduce_range=reduce_range, exclude=exclude, tables=tables,
                                 smoothing=smoothing or {}, smooth_alpha=smooth_alpha)
    save_graph(model, dst)
    return recipe


def _gemms_as_matmuls(model: onnx.ModelProto) -> None:
    """Each Gemm `A @ op(B) + C` with a constant B (alpha and beta 1, A not transposed) as
    MatMul(A, B or its transpose) and Add(C): the same sums."""
    from onnx import helper, numpy_helper

    graph = model.graph
    weights = {init.name: init for init in graph.initializer}
    rewritten, added = [], []
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if (node.op_type != "Gemm" or node.input[1] not in weights or attrs.get("transA", 0)
                or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0):
            rewritten.append(node)
            continue
        weight = node.input[1]
        if attrs.get("transB", 0):
            transposed = numpy_helper.from_array(_weight_array(weights[weight]).T.copy(), f"{weight}_as_matmul")
            added.append(transposed)
            weight = transposed.name
        product = f"{node.output[0]}_matmul" if len(node.input) > 2 and node.input[2] else node.output[0]
        rewritten.append(helper.make_node("MatMul", [node.input[0], weight], [product], name=f"{node.name}_MatMul"))
        if product != node.output[0]:
            rewritten.append(helper.make_node("Add", [product, node.input[2]], [node.output[0]],
                                              name=f"{node.name}_Bias"))
    del graph.node[:]
    graph.node.extend(rewritten)
    used = {i for n in rewritten for i in n.input}
    kept = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept + added)


def _per_token_int8(model: onnx.ModelProto, *, reduce_range: bool, exclude: tuple[str, ...],
                    tables: bool, smoothing: dict, smooth_alpha: float) -> dict:
    from onnx import TensorProto, helper, numpy_helper

    import numpy as np

    graph = model.graph
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx") and entry.version < _PER_ROW_OPSET:
            entry.version = _PER_ROW_OPSET
    weights = {init.name: init for init in graph.initializer}
    qmax = _WEIGHT_QMAX[reduce_range]
    new_nodes: list = []
    new_inits: list = []
    quantized_inputs: dict[str, tuple[str, str]] = {}  # X -> (uint8 X, row scale)
    names = {n for node in graph.node for n in (node.name, *node.output)}

    def unique(name: str) -> str:
        candidate, k = name, 0
        while candidate in names:
            k += 1
            candidate = f"{name}_{k}"
        names.add(candidate)
        return candidate

    def const(name: str, array) -> str:
        name = unique(name)
        new_inits.append(numpy_helper.from_array(array, name))
        return name

    inv_qmax = const("pt_inv_127", np.array(1.0 / 127.0, dtype=np.float32))
    zero_point = const("pt_a_zero_point", np.array(128, dtype=np.uint8))
    tiny = const("pt_min_scale", np.array(1e-30, dtype=np.float32))
    last_axis = const("pt_last_axis", np.array([-1], dtype=np.int64))

    # Leading dims of each tensor, where the exporter recorded them: inputs with the same
    # leading dims ([batch, sequence] in every encoder layer) have scales of one shape and
    # share one zero-point tensor, built once per run instead of once per input.
    leading = {}
    for info in [*graph.value_info, *graph.input]:
        dims = info.type.tensor_type.shape.dim
        if dims and all(d.dim_param or d.dim_value for d in dims[:-1]):
            leading[info.name] = tuple(d.dim_param or d.dim_value for d in dims[:-1])
    zero_points: dict[tuple, str] = {}

    def eligible(node) -> bool:
        weight = weights.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) == 2 else None
        return weight is not None and node.name not in exclude and len(weight.dims) == 2

    # SmoothQuant: one factor per input channel, shared by every quantized MatMul that
    # reads the input (Q, K and V read one tensor), from their weights' largest rows.
    factors: dict[str, np.ndarray] = {}
    if smoothing:
        weight_rows: dict[str, np.ndarray] = {}
        for node in graph.node:
            if eligible(node) and node.input[0] in smoothing:
                rows = np.abs(_weight_array(weights[node.input[1]])).max(axis=1).astype(np.float64)
                x = node.input[0]
                weight_rows[x] = rows if x not in weight_rows else np.maximum(weight_rows[x], rows)
        for x, rows in weight_rows.items():
            act = np.maximum(np.asarray(smoothing[x], dtype=np.float64), 1e-5)
            factor = act ** smooth_alpha / np.maximum(rows, 1e-5) ** (1.0 - smooth_alpha)
            factors[x] = np.clip(factor, 1e-2, 1e2)

    def quantize_rows(x: str, width: int) -> tuple[str, str]:
        if x in quantized_inputs:
            return quantized_inputs[x]
        base = unique(f"pt_{x}")
        absx, amax, scale, safe, q = (f"{base}_{s}" for s in ("abs", "amax", "scale", "safe_scale", "u8"))
        source = x
        if x in factors:
            source = f"{base}_smoothed"
            inverse = const(f"{base}_inv_smooth", (1.0 / factors[x]).astype(np.float32))
            new_nodes.append(helper.make_node("Mul", [x, inverse], [source], name=f"{base}_Smooth"))
        new_nodes.extend([
            helper.make_node("Abs", [source], [absx], name=f"{base}_Abs"),
            helper.make_node("ReduceMax", [absx, last_axis], [amax], name=f"{base}_ReduceMax", keepdims=1),
            helper.make_node("Mul", [amax, inv_qmax], [scale], name=f"{base}_Scale"),
            helper.make_node("Max", [scale, tiny], [safe], name=f"{base}_SafeScale"),
        ])
        key = leading.get(x) or (x,)
        if key not in zero_points:
            # uint8 with zero point 128: x86's fast integer GEMMs are u8 x s8 (s8 x s8 is
            # several times slower there); a blocked zero point has the scale's shape.
            shape, zero_points[key] = f"{base}_shape", f"{base}_zero_point"
            new_nodes.extend([
                helper.make_node("Shape", [safe], [shape], name=f"{base}_Shape"),
                helper.make_node("ConstantOfShape", [shape], [zero_points[key]], name=f"{base}_ZeroPoint",
                                 value=numpy_helper.from_array(np.array([128], dtype=np.uint8))),
            ])
        new_nodes.append(helper.make_node("QuantizeLinear", [source, safe, zero_points[key]], [q],
                                          name=f"{base}_Quantize", axis=-1, block_size=width))
        quantized_inputs[x] = (q, safe)
        return quantized_inputs[x]

    quantized = []
    rewritten = []
    rescaled: set[str] = set()
    for node in graph.node:
        if not eligible(node):
            rewritten.append(node)
            continue
        weight = weights[node.input[1]]
        w = _weight_array(weight).astype(np.float32)
        if node.input[0] in factors:
            w = w * factors[node.input[0]][:, None].astype(np.float32)
        column_scale = np.maximum(np.abs(w).max(axis=0), 1e-30) / qmax
        w_q = np.clip(np.round(w / column_scale), -qmax, qmax).astype(np.int8)
        w_name = const(f"{weight.name}_int8", w_q)
        w_scale = const(f"{weight.name}_scale", column_scale.astype(np.float32))
        x_q, x_scale = quantize_rows(node.input[0], w.shape[0])
        base = unique(f"pt_{node.name}")
        product, as_float, scale = (f"{base}_{s}" for s in ("int32", "float", "scale"))
        rewritten.extend(new_nodes)
        new_nodes.clear()
        rewritten.extend([
            helper.make_node("MatMulInteger", [x_q, w_name, zero_point], [product], name=f"{base}_MatMulInteger"),
            helper.make_node("Cast", [product], [as_float], name=f"{base}_Cast", to=TensorProto.FLOAT),
            helper.make_node("Mul", [x_scale, w_scale], [scale], name=f"{base}_ScaleProduct"),
            helper.make_node("Mul", [as_float, scale], [node.output[0]], name=f"{base}_Rescale"),
        ])
        rescaled.add(node.output[0])
        quantized.append(node.name)
    biased = [n for n in rewritten if n.op_type == "Add" and set(n.input) & rescaled
              and any(i in weights for i in n.input)]
    if biased:
        # ONNX Runtime (1.32) folds a constant bias Add into the fused MatMulIntegerToFloat
        # and then multiplies the bias by the per-row scale too: wrong vectors. A bias that
        # is computed at run time (times a 1 derived from the input's size, which nothing
        # can fold) stays its own Add.
        size, plus, sign, runtime_one = (unique(f"pt_runtime_one_{s}") for s in ("size", "plus", "sign", "f"))
        one_int = const("pt_one_int", np.array(1, dtype=np.int64))
        prelude = [
            helper.make_node("Size", [graph.input[0].name], [size], name=size),
            helper.make_node("Add", [size, one_int], [plus], name=plus),
            helper.make_node("Sign", [plus], [sign], name=sign),
            helper.make_node("Cast", [sign], [runtime_one], name=runtime_one, to=TensorProto.FLOAT),
        ]
        # All biases ride one run-time Mul and one Split: two ops per run, not one per bias.
        positions = [next(k for k, i in enumerate(n.input) if i in weights) for n in biased]
        biases = [_weight_array(weights[n.input[k]]) for n, k in zip(biased, positions)]
        if all(b.ndim == 1 and b.dtype == np.float32 for b in biases):
            joined, joined_runtime = const("pt_biases", np.concatenate(biases)), unique("pt_biases_runtime")
            sizes = const("pt_bias_sizes", np.array([b.size for b in biases], dtype=np.int64))
            outputs = [unique(f"{n.input[k]}_runtime") for n, k in zip(biased, positions)]
            prelude += [
                helper.make_node("Mul", [joined, runtime_one], [joined_runtime], name=joined_runtime),
                helper.make_node("Split", [joined_runtime, sizes], outputs, name=unique("pt_biases_split"), axis=0),
            ]
            for node, k, output in zip(biased, positions, outputs):
                node.input[k] = output
        else:
            for node, k in zip(biased, positions):
                runtime_bias = unique(f"{node.input[k]}_runtime")
                prelude.append(helper.make_node("Mul", [node.input[k], runtime_one], [runtime_bias],
                                                name=runtime_bias))
                node.input[k] = runtime_bias
        rewritten = prelude + rewritten
    used = {i for n in rewritten for i in n.input}
    kept_inits = [init for init in graph.initializer if init.name in used]
    del graph.node[:]
    graph.node.extend(rewritten)
    del graph.initializer[:]
    graph.initializer.extend(kept_inits + [i for i in new_inits if i.name in used])
    if tables:
        onnx.load_external_data_for_model(model, ".")  # what is left: norms, biases, the vocabulary table
    table_recipe = _quantize_embedding_tables(model) if tables else {}
    exact = {} if reduce_range else {"session_config": {"session.x64quantprecision": "1"}}
    smooth = {"smoothquant_alpha": smooth_alpha, "smoothed_inputs": len(factors)} if factors else {}
    return {
        "method": "per-token dynamic int8 (QuantizeLinear per row, MatMulInteger fused to MatMulIntegerToFloat)",
        "weights": f"int8 symmetric per output channel, +-{qmax}",
        "activations": "uint8 per token: symmetric scale max|row| / 127, zero point 128",
        **exact,
        **smooth,
        "batch_invariant": True,
        "per_channel": True,
        "reduce_range": reduce_range,
        "opset": _PER_ROW_OPSET,
        "quantized_nodes": len(quantized),
        "excluded_nodes": list(exclude),
        **table_recipe,
    }


def activation_channel_max(src: Path, batches, threads: int) -> dict:
    """Per input channel, the largest |x| each weight MatMul of `src` reads, over `batches`
    (graph feeds): SmoothQuant's calibration. The MatMul inputs become extra outputs of a
    copy of the graph written beside `src` (so external weights resolve), removed after."""
    import numpy as np
    import onnxruntime as ort

    model = onnx.load(str(src), load_external_data=False)
    weights = {init.name for init in model.graph.initializer}
    inputs = list(dict.fromkeys(n.input[0] for n in model.graph.node
                                if n.op_type == "MatMul" and len(n.input) == 2 and n.input[1] in weights))
    known = {o.name for o in model.graph.output}
    for name in inputs:
        if name not in known:
            model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    probe = src.with_name(f"{src.stem}.calibration.onnx")
    onnx.save(model, str(probe))
    del model
    try:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.log_severity_level = 3
        session = ort.InferenceSession(str(probe), options, providers=["CPUExecutionProvider"])
        channel_max: dict = {}
        for feeds in batches:
            rows = feeds["attention_mask"].reshape(-1).astype(bool)
            for name, value in zip(inputs, session.run(inputs, feeds)):
                flat = np.abs(value.reshape(-1, value.shape[-1]))
                if flat.shape[0] == rows.shape[0]:
                    flat = flat[rows]  # padding rows carry no text
                top = flat.max(axis=0) if len(flat) else np.zeros(value.shape[-1], np.float32)
                channel_max[name] = top if name not in channel_max else np.maximum(channel_max[name], top)
        del session
    finally:
        probe.unlink(missing_ok=True)
    return channel_max


def quantize_weight_only_int8(src: Path, dst: Path, *, block_size: int = 32) -> dict:
    """Weight-only 8-bit (MatMulNBits): int8 weights per block, FP32 activations."""
    with _graph_with_lazy_weights(src) as model:
        model = _matmul_nbits(model, bits=8, block_size=block_size, accuracy_level=None)
        onnx.load_external_data_for_model(model, ".")
    save_graph(model, dst)
    return {
        "method": "onnxruntime MatMulNBits weight-only",
        "weights": f"int8 symmetric, blocks of {block_size}",
        "activations": "fp32",
        "batch_invariant": True,
        "excluded_nodes": [],
    }


# Measured on MiniLM (x86 AVX-512 VNNI, 2 threads): blocks of 128 and 64 lose the most
# accuracy (cos min 0.72 / 0.76 vs 0.84 at 32 and 0.89 at 16) for little size; the search
# tries 32, then 16.
INT4_BLOCK_SIZES = (32, 16)
# accuracy_level 4: int8 activations inside the kernel, the path KleidiAI accelerates on
# ARM (dot-product / i8mm). On x86 AVX-512 VNNI (MiniLM, 2 threads) it ran one text at a
# time 1.5x faster than level 0 (FP32 activations) and batches of 32 0.9x as fast; the
# edge is one-at-a-time and ARM, so 4 it is.
INT4_ACCURACY_LEVEL = 4


def _matmul_nbits(model: onnx.ModelProto, *, bits: int, block_size: int, accuracy_level: int | None,
                  include: list[str] | None = None, exclude: tuple[str, ...] = ()) -> onnx.ModelProto:
    with _quiet_quantizer():
        from onnxruntime.quantization.matmul_nbits_quantizer import (
            DefaultWeightOnlyQuantConfig,
            MatMulNBitsQuantizer,
        )

    config = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=True, accuracy_level=accuracy_level,
                                          bits=bits, op_types_to_quantize=("MatMul",))
    quantizer = MatMulNBitsQuantizer(model, algo_config=config, nodes_to_include=include,
                                     nodes_to_exclude=list(exclude))
    with _quiet_quantizer():
        quantizer.process()
    return quantizer.model.model


def quantize_int4(src: Path, dst: Path, *, block_size: int = 32, accuracy_level: int = INT4_ACCURACY_LEVEL,
                  keep_8bit: tuple[str, ...] = ()) -> dict:
    """Weight-only INT4 for models where memory decides what fits: MatMulNBits 4-bit blocks.

    Activations stay FP32 (the kernel quantizes them per block internally at
    accuracy_level 4, row by row), so a text's vector does not depend on its batch
    neighbours. MatMuls in `keep_8bit` (the ones 4 bits hurt most) get 8-bit blocks;
    vocabulary tables are int8 rows.
    """
    with _graph_with_lazy_weights(src) as model:
        # The quantizer reads each weight as it reaches it (relative to the working directory).
        model = _matmul_nbits(model, bits=4, block_size=block_size, accuracy_level=accuracy_level,
                              exclude=keep_8bit)
        if keep_8bit:
            model = _matmul_nbits(model, bits=8, block_size=block_size, accuracy_level=accuracy_level,
                                  include=list(keep_8bit))
        onnx.load_external_data_for_model(model, ".")
        table_recipe = _quantize_embedding_tables(model)
    save_graph(model, dst)
    return {
        "method": "onnxruntime MatMulNBits weight-only",
        "weights": f"int4 symmetric, blocks of {block_size}",
        "accuracy_level": accuracy_level,
        "activations": "fp32 (quantized per block inside the kernel)",
        "batch_invariant": True,
        "kept_8bit_nodes": list(keep_8bit),
        **table_recipe,
    }
