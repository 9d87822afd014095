"""Graphs past protobuf's 2 GB: weights gathered into one data file beside the graph, written
that way by every step past the limit, run by ONNX Runtime with the same outputs."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from edge_embed.export import onnx_files
from edge_embed.export.onnx_files import data_files, gather_external_data, move_graph, remove_graph, save_graph


def _graph() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    weights = [rng.standard_normal((16, 16)).astype(np.float32) for _ in range(3)]
    nodes, last = [], "x"
    for i in range(3):
        nodes.append(helper.make_node("MatMul", [last, f"w{i}"], [f"h{i}"]))
        last = f"h{i}"
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 16])],
                              [helper.make_tensor_value_info(last, TensorProto.FLOAT, [None, 16])],
                              [numpy_helper.from_array(w, f"w{i}") for i, w in enumerate(weights)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _run(path) -> np.ndarray:
    x = np.arange(32, dtype=np.float32).reshape(2, 16) / 32
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_per_tensor_files_are_gathered_into_one_aligned_data_file(tmp_path):
    inline = tmp_path / "inline.onnx"
    onnx.save(_graph(), str(inline))
    staging = tmp_path / "g.onnx.export"
    staging.mkdir()
    # The exporter's layout past 2 GB: a file per tensor, named after it, beside the graph.
    onnx.save(_graph(), str(staging / "g.onnx"), save_as_external_data=True, all_tensors_to_one_file=False,
              size_threshold=0)
    assert len(list(staging.iterdir())) == 4
    dst = tmp_path / "g.onnx"
    assert gather_external_data(staging / "g.onnx", dst) == ("g.onnx.data",)
    for path in staging.iterdir():
        path.unlink()
    staging.rmdir()
    assert data_files(dst) == ("g.onnx.data",)
    model = onnx.load(str(dst), load_external_data=False)
    offsets = [int(e.value) for t in model.graph.initializer for e in t.external_data if e.key == "offset"]
    assert len(offsets) == 3 and all(o % 4096 == 0 for o in offsets)
    np.testing.assert_array_equal(_run(dst), _run(inline))


def test_a_graph_that_holds_its_weights_is_moved_as_it_is(tmp_path):
    onnx.save(_graph(), str(tmp_path / "src.onnx"))
    expected = _run(tmp_path / "src.onnx")
    assert gather_external_data(tmp_path / "src.onnx", tmp_path / "dst.onnx") == ()
    assert not (tmp_path / "src.onnx").exists() and data_files(tmp_path / "dst.onnx") == ()
    np.testing.assert_array_equal(_run(tmp_path / "dst.onnx"), expected)


def test_save_graph_writes_a_data_file_only_past_the_limit(tmp_path, monkeypatch):
    dst = tmp_path / "g.onnx"
    onnx.save(_graph(), str(tmp_path / "inline.onnx"))
    expected = _run(tmp_path / "inline.onnx")
    monkeypatch.setattr(onnx_files, "EXTERNAL_DATA_BYTES", 1024)  # the three weights are 3 KiB
    save_graph(_graph(), dst)
    assert data_files(dst) == ("g.onnx.data",) and (tmp_path / "g.onnx.data").is_file()
    np.testing.assert_array_equal(_run(dst), expected)
    monkeypatch.setattr(onnx_files, "EXTERNAL_DATA_BYTES", 1 << 20)
    save_graph(_graph(), dst)  # rewritten small: the old data file does not linger
    assert data_files(dst) == () and not (tmp_path / "g.onnx.data").exists()
    np.testing.assert_array_equal(_run(dst), expected)



def test_an_inline_graph_past_the_limit_is_written_with_a_data_file(tmp_path, monkeypatch):
    onnx.save(_graph(), str(tmp_path / "src.onnx"))
    expected = _run(tmp_path / "src.onnx")
    monkeypatch.setattr(onnx_files, "EXTERNAL_DATA_BYTES", 1024)
    assert gather_external_data(tmp_path / "src.onnx", tmp_path / "dst.onnx") == ("dst.onnx.data",)
    assert not (tmp_path / "src.onnx").exists()
    np.testing.assert_array_equal(_run(tmp_path / "dst.onnx"), expected)


def test_a_graph_moves_and_goes_with_its_data_file(tmp_path, monkeypatch):
    monkeypatch.setattr(onnx_files, "EXTERNAL_DATA_BYTES", 1024)
    save_graph(_graph(), tmp_path / "candidate.onnx")
    expected = _run(tmp_path / "candidate.onnx")
    move_graph(tmp_path / "candidate.onnx", tmp_path / "model.int8.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.int8.onnx", "model.int8.onnx.data"]
    assert data_files(tmp_path / "model.int8.onnx") == ("model.int8.onnx.data",)
    np.testing.assert_array_equal(_run(tmp_path / "model.int8.onnx"), expected)
    remove_graph(tmp_path / "model.int8.onnx")
    assert list(tmp_path.iterdir()) == []
    onnx.save(_graph(), str(tmp_path / "small.onnx"))  # one file: moved and removed as it is
    move_graph(tmp_path / "small.onnx", tmp_path / "moved.onnx")
    np.testing.assert_array_equal(_run(tmp_path / "moved.onnx"), expected)
    remove_graph(tmp_path / "moved.onnx")
    assert list(tmp_path.iterdir()) == []
