"""Dynamic INT8 weight by weight (models over the protobuf limit) writes what ORT's
``quantize_dynamic`` writes: the same initializers byte for byte and the same outputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxopt import runner
from onnxopt.passes.quantize._convert import QuantSpec, _dynamic, _dynamic_streamed, convert
from onnxopt.passes.quantize._streamed import covers

WIDTH = 48


def _prepared(folder: Path) -> Path:
    """x -> MatMul(w0) -> Relu -> MatMul(w1) = y, MatMul(x, w0) = z: a shared activation, a
    shared weight and graph outputs written by MatMuls; Gemms with and without transB and bias
    (ORT's dynamic mode splits them into MatMul + Add) and one with alpha it leaves alone.
    Tensors in ``prepared.onnx.data``."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((WIDTH, WIDTH)).astype(np.float32)
                                     * np.float32(0.2), f"w{i}") for i in range(3)]
    inits.append(numpy_helper.from_array(rng.standard_normal(WIDTH).astype(np.float32), "bias"))
    nodes = [helper.make_node("MatMul", ["x", "w0"], ["h"], name="fc0"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "w1"], ["y"], name="fc1"),
             helper.make_node("MatMul", ["x", "w0"], ["z"], name="fc_shared"),
             helper.make_node("Gemm", ["r", "w2", "bias"], ["g"], name="gemm_t", transB=1),
             helper.make_node("Gemm", ["g", "w1"], ["g2"], name="gemm_plain"),
             helper.make_node("Gemm", ["g2", "w2", "bias"], ["g3"], name="gemm_alpha", alpha=0.5)]
    value = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", WIDTH])
             for n in ("y", "z", "g3")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, ["N", WIDTH])], value, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = folder / "prepared.onnx"
    onnx.save(model, path, save_as_external_data=True, location="prepared.onnx.data",
              size_threshold=0)
    return path


def _initializers(proto: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}


@pytest.mark.parametrize("weight_type", ["int8", "uint8"])
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("reduce_range", [False, True])
def test_streamed_dynamic_int8_equals_ort_quantize_dynamic(
        tmp_path: Path, weight_type: str, per_channel: bool, reduce_range: bool) -> None:
    src = _prepared(tmp_path)
    spec = QuantSpec(mode="dynamic", weight_type=weight_type,  # type: ignore[arg-type]
                     per_channel=per_channel, reduce_range=reduce_range,
                     exclude=frozenset({"fc1"}) if reduce_range else frozenset())
    ours = _dynamic_streamed(src, spec)
    assert ours is not None
    _dynamic(src, tmp_path / "ort.onnx", spec)
    theirs = onnx.load(tmp_path / "ort.onnx")

    ours_init, theirs_init = _initializers(ours), _initializers(theirs)
    assert ours_init.keys() == theirs_init.keys()
    for name, array in ours_init.items():
        assert array.dtype == theirs_init[name].dtype and array.shape == theirs_init[name].shape
        np.testing.assert_array_equal(array, theirs_init[name], err_msg=name)
    assert sorted(n.op_type for n in ours.graph.node) == sorted(
        n.op_type for n in theirs.graph.node)
    ops = [n.op_type for n in ours.graph.node]
    assert ops.count("DynamicQuantizeLinear") == 3  # x once for its two MatMuls, r, g
    assert ops.count("MatMulInteger") == (4 if reduce_range else 5)
    assert ops.count("Gemm") == 1 and ops.count("MatMul") == (1 if reduce_range else 0)
    x = np.random.default_rng(1).standard_normal((3, WIDTH)).astype(np.float32)
    got = runner.run(runner.create_session(ours.SerializeToString(), threads=1), {"x": x})
    want = runner.run(runner.create_session(theirs.SerializeToString(), threads=1), {"x": x})
    assert got.keys() == want.keys() == {"y", "z", "g3"}
    for name in want:
        np.testing.assert_array_equal(got[name], want[name])
    assert "w0" not in ours_init and ("w1" in ours_init) == reduce_range  # FP32 weights gone


def test_convert_uses_it_only_for_external_data_and_matmuls(tmp_path: Path) -> None:
    src = _prepared(tmp_path)
    spec = QuantSpec(mode="dynamic", per_channel=True)
    converted = convert(src, spec, None)  # load-checked by ORT
    assert not any(t.data_location == TensorProto.EXTERNAL for t in converted.graph.initializer)
    assert onnx.load(src, load_external_data=False).graph.initializer[0].name == "w0"  # untouched

    inline = tmp_path / "inline"
    inline.mkdir()
    onnx.save(onnx.load(src), inline / "prepared.onnx")
    assert _dynamic_streamed(inline / "prepared.onnx", spec) is None  # fits: ORT's quantizer


def test_covers_only_matmul_and_gemm() -> None:
    node = helper.make_node("Attention", ["x", "w0"], ["a"], domain="com.microsoft")
    graph = helper.make_graph([node], "g", [], [])
    model = ir.serde.deserialize_model(helper.make_model(graph))
    assert covers(model, ("MatMul", "Gemm"))  # Attention not asked for
    assert not covers(model, ("MatMul", "Gemm", "Attention"))


def test_an_excluded_gemm_stays_float_through_ort_too(tmp_path: Path) -> None:
    """ORT's dynamic mode renames a Gemm to ``<name>_MatMul`` before applying exclusions, so
    excluding the Gemm by its name used to leave it quantized (the accuracy search's fallback
    then changed nothing)."""
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), "w")
    bias = numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "b")
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w", "b"], ["h"], name="g1"),
         helper.make_node("Gemm", ["h", "w", "b"], ["y"], name="g2")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])], [weight, bias])
    src = tmp_path / "gemm.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), src)
    _dynamic(src, tmp_path / "out.onnx", QuantSpec(mode="dynamic", exclude=frozenset({"g1"})))
    nodes = {n.name: n.op_type for n in onnx.load(tmp_path / "out.onnx").graph.node}
    assert nodes["g1_MatMul"] == "MatMul"  # float
    assert nodes["g2_MatMul_quant"] == "MatMulInteger"  # the other one is still INT8
