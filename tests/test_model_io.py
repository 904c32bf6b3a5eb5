"""Loading checks every way a file can be wrong; writing is atomic and never clobbers the input."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import helper

from onnxopt.errors import InputError
from onnxopt.model_io import load_model, save_model, write_bytes_atomic
from onnxopt.runner import reference_session, run


def test_load_returns_ir_model(mlp_path: Path) -> None:
    model = load_model(mlp_path)
    assert isinstance(model, ir.Model)
    assert [v.name for v in model.graph.inputs] == ["x"]


@pytest.mark.parametrize(
    "content, expected",
    [
        (b"this is not a model", "not a readable ONNX model"),
        (b"", "not an ONNX model"),
    ],
)
def test_not_onnx(tmp_path: Path, content: bytes, expected: str) -> None:
    path = tmp_path / "bad.onnx"
    path.write_bytes(content)
    with pytest.raises(InputError, match=expected) as info:
        load_model(path)
    assert str(path) in str(info.value)


def test_missing_and_directory(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such file"):
        load_model(tmp_path / "absent.onnx")
    with pytest.raises(InputError, match="is a directory"):
        load_model(tmp_path)


def test_truncated(tmp_path: Path, mlp_model: onnx.ModelProto) -> None:
    data = mlp_model.SerializeToString()
    path = tmp_path / "trunc.onnx"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError):
        load_model(path)


@pytest.mark.parametrize(
    "body, culprit",
    [
        ("y = Add(x, ghost)", "ghost"),  # dangling input
        ("a = Add(x, b)\n b = Relu(a)\n y = Relu(b)", "'b'"),  # cycle
    ],
)
def test_invalid_graphs(tmp_path: Path, body: str, culprit: str) -> None:
    model = onnx.parser.parse_model(
        f'<ir_version: 8, opset_import: ["" : 17]> g (float[N, 4] x) => (float[N, 4] y) {{ {body} }}')
    path = tmp_path / "bad.onnx"
    onnx.save(model, path)
    with pytest.raises(InputError, match="invalid ONNX model") as info:
        load_model(path)
    message = str(info.value)
    assert culprit in message and "\n" not in message


def test_old_opset_upgraded_with_same_outputs(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    w = helper.make_tensor("w", onnx.TensorProto.FLOAT, [4, 3], rng.standard_normal(12).tolist())
    b = helper.make_tensor("b", onnx.TensorProto.FLOAT, [3], rng.standard_normal(3).tolist())
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w", "b"], ["g"]), helper.make_node("Relu", ["g"], ["y"])],
        "old", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 3])], [w, b])
    old = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)])
    path = tmp_path / "old.onnx"
    onnx.save(old, path)
    model = load_model(path)
    assert model.opset_imports[""] >= 13
    x = {"x": rng.standard_normal((2, 4)).astype(np.float32)}
    before = run(reference_session(old.SerializeToString()), x)["y"]
    after = run(reference_session(ir.serde.serialize_model(model).SerializeToString()), x)["y"]
    np.testing.assert_allclose(after, before, rtol=1e-6)


def test_save_is_atomic_and_protects_input(tmp_path: Path, mlp_path: Path) -> None:
    before = mlp_path.read_bytes()
    model = load_model(mlp_path)
    with pytest.raises(InputError, match="refusing to overwrite"):
        save_model(model, mlp_path, protect=mlp_path)
    assert mlp_path.read_bytes() == before
    out = save_model(model, tmp_path / "sub" / "out.onnx", protect=mlp_path)
    assert out.exists()
    # Nothing but the output is left behind: no staging folders or temporary files.
    assert sorted(os.listdir(out.parent)) == ["out.onnx"]
    onnx.checker.check_model(onnx.load(out))


def test_write_bytes_atomic_replaces(tmp_path: Path) -> None:
    target = tmp_path / "r.json"
    write_bytes_atomic(b"one", target)
    write_bytes_atomic(b"two", target)
    assert target.read_bytes() == b"two"
    assert os.listdir(tmp_path) == ["r.json"]


def test_minus_one_dims_read_as_dynamic(tmp_path: Path, mlp_model: onnx.ModelProto) -> None:
    """paddle2onnx and older converters write -1 for a dynamic dim (ONNX Runtime reads it so):
    the model loads with that dim unknown, and the file stays as it was."""
    proto = onnx.ModelProto()
    proto.CopyFrom(mlp_model)
    proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value = -1
    path = tmp_path / "minus_one.onnx"
    onnx.save(proto, str(path))
    before = path.read_bytes()
    model = load_model(path)
    assert model.graph.inputs[0].shape[0] is None or not isinstance(model.graph.inputs[0].shape[0], int)
    assert path.read_bytes() == before
    proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value = -7
    onnx.save(proto, str(path))
    with pytest.raises(InputError, match="negative dimension"):
        load_model(path)


def _rms_norm_model(op_type: str) -> onnx.ModelProto:
    """An RMSNorm written as ONNX Runtime's default-domain op (the onnxscript rewriter's and ORT's
    fusions write it so for Llama-style decoders), or as an op nobody defines."""
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 8])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 8])
    scale = helper.make_tensor("scale", onnx.TensorProto.FLOAT, [8], np.ones(8, np.float32))
    node = helper.make_node(op_type, ["x", "scale"], ["y"], axis=-1, epsilon=1e-6)
    graph = helper.make_graph([node], "rms", [x], [y], [scale])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_ort_default_domain_op_is_valid(tmp_path: Path) -> None:
    """hf-llama's int8 ended in 'pass fuse-transformer produced an invalid model' because the ONNX
    checker does not know SimplifiedLayerNormalization; ONNX Runtime registers it and runs it."""
    from onnxopt.model_io import check_proto

    model = _rms_norm_model("SimplifiedLayerNormalization")
    check_proto(model)  # raised InputError before
    path = tmp_path / "rms.onnx"
    onnx.save(model, path)
    x = np.arange(16, dtype=np.float32).reshape(2, 8)
    got = run(reference_session(str(path)), {"x": x})["y"]
    np.testing.assert_allclose(got, x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-6), rtol=1e-5)
    with pytest.raises(InputError, match="No Op registered for NotAnOp"):
        check_proto(_rms_norm_model("NotAnOp"))
