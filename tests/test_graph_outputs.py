"""Graph outputs that are inputs, initializers or repeats survive the converter-backed passes.

The float16 converter and ORT's quantizer both failed on such (valid) graphs: found by the fuzz
corpus. The output names, types and values must come out as they went in.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

import onnxopt

def _model(outputs: list[str], rng: np.random.Generator) -> onnx.ModelProto:
    infos = {
        "x": helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8]),
        "y": helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8]),
        "w": helper.make_tensor_value_info("w", TensorProto.FLOAT, [8, 8]),
    }
    weight = onnx.numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [infos["x"]], [infos[n] for n in outputs], [weight])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _signature(session: ort.InferenceSession) -> list[tuple[str, str]]:
    return [(v.name, v.type) for v in (*session.get_inputs(), *session.get_outputs())]


@pytest.mark.parametrize("outputs", [["y", "x"], ["y", "w"], ["y", "y"], ["x", "y", "w"]],
                         ids=["input", "initializer", "repeat", "all"])
@pytest.mark.parametrize("recipe", ["fp16", "int8"])
def test_outputs_keep_names_types_and_values(outputs: list[str], recipe: str) -> None:
    rng = np.random.default_rng(0)
    proto = _model(outputs, rng)
    given = proto.SerializeToString()
    calibration = [{"x": rng.standard_normal((1, 8)).astype(np.float32)} for _ in range(4)]
    out, _ = onnxopt.optimize(proto, recipe, calibration=calibration,
                              overrides={"quantize.measure_latency": False} if recipe == "int8"
                              else {})
    assert proto.SerializeToString() == given  # the caller's model is not touched
    before = ort.InferenceSession(given)
    after = ort.InferenceSession(ir.serde.serialize_model(out).SerializeToString())
    assert _signature(after) == _signature(before)
    x = rng.standard_normal((1, 8)).astype(np.float32)
    for name, want, got in zip(outputs, before.run(None, {"x": x}), after.run(None, {"x": x})):
        assert got.shape == want.shape, name
        if name == "x":
            np.testing.assert_array_equal(got, want)  # a pass-through stays exact
        else:  # rounded by float16 or INT8: the pipeline checked the pass's budget
            cosine = float(np.dot(got.ravel(), want.ravel())
                           / (np.linalg.norm(got) * np.linalg.norm(want)))
            assert cosine > 0.99, (name, cosine)


@pytest.mark.parametrize("extra", [["--recipe", "fp16"],
                                   ["--recipe", "int8", "--set", "quantize.measure_latency=false"],
                                   ["--recipe", "int8", "--set", "quantize.measure_latency=false",
                                    "--calib", "CALIB"]],
                         ids=["fp16", "int8", "int8-calibrated"])
def test_the_fuzz_finding_is_optimized(extra: list[str], tmp_path) -> None:
    """fuzz_corpus ``unusual`` seed 1002 (outputs ``y``, the input ``x`` and the initializer
    ``w``) failed in fp16, in quantize, and in quantize's cosine (``w`` has no batch axis)."""
    from fuzz_corpus import make_case

    from onnxopt.cli import main

    source = tmp_path / "case.onnx"
    source.write_bytes(make_case("unusual", 1002).data)
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32))
    out = tmp_path / "out.onnx"
    argv = ["optimize", str(source), "-o", str(out),
            *[str(calib) if a == "CALIB" else a for a in extra]]
    assert main(argv) == 0
    before = ort.InferenceSession(str(source))
    assert _signature(ort.InferenceSession(str(out))) == _signature(before)
