"""Large ONNX graphs keep their weights in one data file beside the graph (`<graph>.data`),
which the bundle lists as the variant's external data.

Two reasons. Protobuf cannot hold more than 2 GB (a 2B-parameter decoder is 7 GB at FP32).
And ONNX Runtime maps a data file whose tensors start on page boundaries, where it parses an
inline graph into a buffer beside the tensors it builds from it: measured on Qwen3-VL-2B's
shape (bench/graph_load.py), the INT4 decoder (1.19 GB) loads at 2.07 GB inline and 1.33
GB mapped, the FP32 vision tower (1.63 GB) at 2.55 GB and 1.71 GB. So every step that writes a graph (the
export, FP16, the quantizers) goes through `save_graph`, and the variant records what
`data_files` finds.
"""

from __future__ import annotations

import os
from pathlib import Path

import onnx

__all__ = ["EXTERNAL_DATA_BYTES", "save_graph", "data_files", "gather_external_data", "move_graph", "remove_graph"]

# Weights past this go to a data file; small graphs stay one file.
EXTERNAL_DATA_BYTES = 256 * 1024**2
# Each tensor starts on a page, so ONNX Runtime can map the file instead of copying it.
_ALIGN = 4096
# Tensors below this stay in the graph (ONNX's own default).
_SMALL = 1024


def _data_path(graph: Path) -> Path:
    return graph.with_name(graph.name + ".data")


def _weight_bytes(model: onnx.ModelProto) -> int:
    return sum(len(t.raw_data) for t in model.graph.initializer)


def _externals(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    return [t for t in model.graph.initializer if any(e.key == "location" for e in t.external_data)]


def save_graph(model: onnx.ModelProto, dst: Path) -> None:
    """Write `model` (its weights loaded) to `dst`: one file when its weights are small, else
    with them in `dst.name + ".data"`, each tensor page-aligned."""
    dst = Path(dst)
    data = _data_path(dst)
    data.unlink(missing_ok=True)
    if _weight_bytes(model) < EXTERNAL_DATA_BYTES:
        onnx.save(model, str(dst))
        return
    offset = 0
    with open(data, "wb") as out:
        for tensor in model.graph.initializer:
            if not tensor.HasField("raw_data") or len(tensor.raw_data) < _SMALL:
                continue
            offset = _append(out, offset, tensor, tensor.raw_data, data.name)
            tensor.ClearField("raw_data")
    onnx.save(model, str(dst))


def _append(out, offset: int, tensor: onnx.TensorProto, blob: bytes, location: str) -> int:
    """Write `blob` at the next page boundary of `out` and point `tensor` at it; returns the
    offset after it."""
    pad = -offset % _ALIGN
    out.write(b"\0" * pad)
    offset += pad
    out.write(blob)
    del tensor.external_data[:]
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(len(blob)))):
        tensor.external_data.add(key=key, value=value)
    tensor.data_location = onnx.TensorProto.EXTERNAL
    return offset + len(blob)


def data_files(graph: Path) -> tuple[str, ...]:
    """The external data files `graph` reads, by name relative to it (none for a graph that
    holds its weights)."""
    model = onnx.load(str(graph), load_external_data=False)
    return tuple(sorted({e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}))


def gather_external_data(src: Path, dst: Path) -> tuple[str, ...]:
    """Move the graph `src` to `dst` as `save_graph` would write it: external weights
    (TorchScript's exporter writes one file per tensor past 2 GB) copied into one
    `dst.name + ".data"` a tensor at a time, an inline graph's large weights moved out.
    Returns the data files `dst` reads. Per-tensor files stay where they were: export into
    a folder of its own and remove it after."""
    model = onnx.load(str(src), load_external_data=False)
    external = _externals(model)
    if not external:
        if _weight_bytes(model) >= EXTERNAL_DATA_BYTES:
            save_graph(model, dst)
            src.unlink()
        else:
            os.replace(src, dst)
        return data_files(dst)
    data = _data_path(dst)
    offset = 0
    with open(data, "wb") as out:
        for tensor in external:
            entry = {e.key: e.value for e in tensor.external_data}
            with open(src.parent / entry["location"], "rb") as fh:
                fh.seek(int(entry.get("offset", 0)))
                blob = fh.read(int(entry["length"])) if "length" in entry else fh.read()
            offset = _append(out, offset, tensor, blob, data.name)
    onnx.save(model, str(dst))
    src.unlink()
    return (data.name,)


def move_graph(src: Path, dst: Path) -> None:
    """Rename a graph written by `save_graph`, its data file with it."""
    files = data_files(src)
    if not files:
        os.replace(src, dst)
        return
    if files != (_data_path(src).name,):
        raise ValueError(f"{src.name} reads {', '.join(files)}; expected its own {_data_path(src).name}")
    model = onnx.load(str(src), load_external_data=False)
    for tensor in _externals(model):
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = _data_path(dst).name
    os.replace(_data_path(src), _data_path(dst))
    onnx.save(model, str(dst))
    src.unlink()


def remove_graph(graph: Path) -> None:
    """Remove a graph and the data files it reads."""
    if graph.is_file():
        for name in data_files(graph):
            (graph.parent / name).unlink(missing_ok=True)
    graph.unlink(missing_ok=True)
