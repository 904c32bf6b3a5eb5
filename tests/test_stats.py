"""MACs, parameters and sizes on models whose figures are known by hand."""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import onnx
import onnx.parser
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxopt.stats import macs_text, model_stats


def _model(nodes, inputs, outputs, inits) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _vi(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def test_conv_gemm_matmul_macs() -> None:
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "w")
    g = numpy_helper.from_array(rng.standard_normal((8 * 6 * 6, 10)).astype(np.float32), "g")
    m = numpy_helper.from_array(rng.standard_normal((10, 4)).astype(np.float32), "m")
    shape = numpy_helper.from_array(np.array([0, -1], np.int64), "shape")
    model = _model(
        [helper.make_node("Conv", ["x", "w"], ["c"]),  # 1x3x8x8 -> 1x8x6x6
         helper.make_node("Reshape", ["c", "shape"], ["f"]),
         helper.make_node("Gemm", ["f", "g"], ["h"]),
         helper.make_node("MatMul", ["h", "m"], ["y"])],
        [_vi("x", ["N", 3, 8, 8])], [_vi("y", ["N", 4])], [w, g, m, shape])
    stats = model_stats(model)
    assert stats.macs["Conv"] == 8 * 6 * 6 * 3 * 3 * 3
    assert stats.macs["Gemm"] == 288 * 10
    assert stats.macs["MatMul"] == 10 * 4
    assert stats.total_macs == sum(stats.macs.values())
    assert stats.params == 8 * 27 + 2880 + 40 + 2
    assert stats.op_histogram == {"Conv": 1, "Gemm": 1, "MatMul": 1, "Reshape": 1}
    data = ir.serde.serialize_model(ir.serde.deserialize_model(model)).SerializeToString()
    assert stats.size_bytes == len(data)
    # Tensors are deflated one by one (cached); within 1% of deflating the file at once.
    assert abs(stats.zipped_bytes - len(zlib.compress(data, 6))) <= 0.01 * stats.zipped_bytes
    # A batch of 4 quadruples every count.
    assert model_stats(model, {"N": [4]}).total_macs == 4 * stats.total_macs


def test_conv_transpose_and_grouped_conv() -> None:
    wt = numpy_helper.from_array(np.ones((4, 2, 3, 3), np.float32), "wt")  # Cin=4, Cout=2
    wg = numpy_helper.from_array(np.ones((2, 1, 3, 3), np.float32), "wg")  # depthwise, 2 groups
    model = _model(
        [helper.make_node("ConvTranspose", ["x", "wt"], ["t"]),  # 1x4x5x5 -> 1x2x7x7
         helper.make_node("Conv", ["t", "wg"], ["y"], group=2)],  # -> 1x2x5x5
        [_vi("x", [1, 4, 5, 5])], [_vi("y", [1, 2, 5, 5])], [wt, wg])
    stats = model_stats(model)
    assert stats.macs["ConvTranspose"] == 4 * 5 * 5 * 2 * 9
    assert stats.macs["Conv"] == 2 * 5 * 5 * 1 * 9
    assert stats.macs_unknown_nodes == 0


def test_file_sizes_are_as_stored(tmp_path) -> None:
    w = numpy_helper.from_array(np.zeros((64, 64), np.float32), "w")
    model = _model([helper.make_node("MatMul", ["x", "w"], ["y"])], [_vi("x", [1, 64])],
                   [_vi("y", [1, 64])], [w])
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    stats = model_stats(model, file=path)
    assert stats.size_bytes == path.stat().st_size
    assert stats.zipped_bytes < stats.size_bytes / 10  # zeros compress
    # External data counts too.
    ext = tmp_path / "ext.onnx"
    onnx.save(model, ext, save_as_external_data=True, all_tensors_to_one_file=True,
              location="ext.data", size_threshold=0)
    ext_stats = model_stats(onnx.load(ext), file=ext)
    assert ext_stats.size_bytes == ext.stat().st_size + (tmp_path / "ext.data").stat().st_size


def test_attention_macs_through_ort_symbolic_shape_inference() -> None:
    """ONNX shape inference does not know com.microsoft Attention; ORT's symbolic inference
    does, so a fused transformer layer counts its QKV projection and its two S x S products."""
    seq, hidden, heads = 16, 8, 2
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(
        rng.standard_normal((hidden, 3 * hidden)).astype(np.float32), "w")
    bias = numpy_helper.from_array(np.zeros(3 * hidden, np.float32), "b")
    out_w = numpy_helper.from_array(rng.standard_normal((hidden, hidden)).astype(np.float32), "o")
    graph = helper.make_graph(
        [helper.make_node("Attention", ["x", "w", "b"], ["a"], domain="com.microsoft",
                          num_heads=heads, name="attn"),
         helper.make_node("MatMul", ["a", "o"], ["y"], name="proj")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", hidden])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", hidden])],
        [weight, bias, out_w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    stats = model_stats(model, {"x": [1, seq, hidden]})
    assert stats.macs_unknown_nodes == 0
    assert stats.macs == {"Attention": seq * hidden * 3 * hidden + 2 * seq * seq * hidden,
                          "MatMul": seq * hidden * hidden}


def test_failed_symbolic_shape_inference_leaves_the_working_directory_clean(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ORT's symbolic inference saves `sym_shape_infer_temp.onnx` (and external data) in the
    working directory when it cannot finish: an op it does not know makes it do so here."""
    model = onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["" : 17, "com.example" : 1]>
        g (float[N, 4] x) => (float[N, 4] y) {
          h = com.example.Foo(x)
          y = MatMul(h, W)
        }
    """)
    model.graph.initializer.append(
        numpy_helper.from_array(np.ones((4, 4), np.float32), "W"))
    monkeypatch.chdir(tmp_path)
    model_stats(model, shapes={"x": [2, 4]})
    assert list(tmp_path.iterdir()) == []


def test_a_stale_shape_annotation_does_not_decide_the_count() -> None:
    """ONNX's inference keeps a value_info that contradicts the graph (a pass left it behind)
    and counts from it: MatMul(Relu(x)[2, 4], w[4, 3]) is 24 MACs, not 48 from a stale [2, 8]."""
    model = onnx.parser.parse_model("""<ir_version: 8, opset_import: ["" : 17]>
    g (float[2, 4] x) => (float[2, 3] z) <float[4, 3] w = {0,0,0,0,0,0,0,0,0,0,0,0}> {
        y = Relu(x)
        z = MatMul(y, w)
    }""")
    model.graph.value_info.append(onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT,
                                                                     [2, 8]))
    stats = model_stats(model)
    assert stats.total_macs == 2 * 3 * 4
    assert stats.macs_unknown_nodes == 0


def test_a_partial_count_reads_as_a_lower_bound() -> None:
    assert macs_text({"total_macs": 1234, "macs_unknown_nodes": 0}) == "1,234"
    assert macs_text({"total_macs": 1234, "macs_unknown_nodes": 45}) == \
        ">= 1,234 (45 nodes of unknown shape)"
