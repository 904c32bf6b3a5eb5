"""Export from ONNX sources (check, opset upgrade, ORT load) and the bad-input cases of export()."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxopt import runner
from onnxopt.errors import InputError
from onnxopt.export import ExportCheck, export, export_to_file
from onnxopt.model_io import load_model

LIGHT = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"


def _opset9_model() -> onnx.ModelProto:
    """Conv, BatchNorm, Upsample (gone after opset 9), MaxPool, Gemm, Softmax; random weights."""
    rng = np.random.default_rng(7)

    def init(name: str, *shape: int, positive: bool = False) -> TensorProto:
        values = rng.uniform(0.5, 1.5, shape) if positive else rng.standard_normal(shape)
        return numpy_helper.from_array(values.astype(np.float32), name)

    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "s", "bb", "m", "v"], ["n"]),
        helper.make_node("Relu", ["n"], ["r"]),
        helper.make_node("Upsample", ["r", "scales"], ["u"], mode="nearest"),
        helper.make_node("MaxPool", ["u"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Flatten", ["p"], ["f"], axis=1),
        helper.make_node("Gemm", ["f", "gw", "gb"], ["g"]),
        helper.make_node("Softmax", ["g"], ["y"], axis=1),
    ]
    inits = [
        init("w", 4, 3, 3, 3),
        init("b", 4),
        init("s", 4),
        init("bb", 4),
        init("m", 4),
        init("v", 4, positive=True),
        init("gw", 4 * 6 * 6, 5),
        init("gb", 5),
        numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales"),
    ]
    graph = helper.make_graph(
        nodes,
        "opset9",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)])
    model.ir_version = 4
    onnx.checker.check_model(model)
    return model


def _ort(model: ir.Model | onnx.ModelProto | Path, feeds: dict) -> dict:
    if isinstance(model, Path):
        return runner.run(runner.reference_session(str(model)), feeds)
    proto = model if isinstance(model, onnx.ModelProto) else ir.serde.serialize_model(model)
    return runner.run(runner.reference_session(proto.SerializeToString()), feeds)


def test_opset9_model_is_upgraded_and_computes_the_same(tmp_path: Path) -> None:
    original = _opset9_model()
    path = tmp_path / "old.onnx"
    onnx.save(original, path)
    before = path.read_bytes()

    model = export(path)

    assert model.opset_imports[""] >= 13
    assert "Upsample" not in {n.op_type for n in model.graph}
    feeds = {"x": np.random.default_rng(0).standard_normal((2, 3, 6, 6)).astype(np.float32)}
    want, got = _ort(original, feeds)["y"], _ort(model, feeds)["y"]
    assert want.std() > 0.01  # a real signal, not a constant
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    check = ExportCheck.from_model(model)
    assert check is not None and check.status == "loaded" and check.exporter == "onnx"
    assert path.read_bytes() == before  # the input file is untouched


def test_light_squeezenet_from_the_onnx_wheel_is_upgraded() -> None:
    path = LIGHT / "light_squeezenet.onnx"
    assert onnx.load(str(path)).opset_import[0].version == 9
    model = export(path)
    assert model.opset_imports[""] >= 13
    feeds = {
        "data_0": np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    }
    want, got = _ort(path, feeds), _ort(model, feeds)
    assert want.keys() == got.keys()
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-7)


def test_proto_and_ir_inputs_are_copied_not_modified() -> None:
    proto = _opset9_model()
    snapshot = proto.SerializeToString()
    from_proto = export(proto)
    assert proto.SerializeToString() == snapshot
    assert from_proto.opset_imports[""] >= 13

    user_ir = ir.serde.deserialize_model(proto)
    from_ir = export(user_ir, input_names=["image"], output_names=["probs"])
    assert from_ir is not user_ir
    assert [v.name for v in user_ir.graph.inputs] == ["x"]
    assert not any(k.startswith("onnxopt.") for k in user_ir.metadata_props)
    assert [v.name for v in from_ir.graph.inputs] == ["image"]
    assert [v.name for v in from_ir.graph.outputs] == ["probs"]


def test_onnxopt_export_stays_callable_after_the_package_is_imported() -> None:
    import onnxopt
    import onnxopt.export  # rebinds the attribute onnxopt.export to this package

    assert onnxopt.export(_opset9_model()).opset_imports[""] >= 13


def test_export_to_file_writes_metadata_and_protects_the_input(tmp_path: Path) -> None:
    src = tmp_path / "old.onnx"
    onnx.save(_opset9_model(), src)
    out = export_to_file(src, tmp_path / "sub" / "new.onnx")
    assert out == tmp_path / "sub" / "new.onnx"
    reloaded = load_model(out)
    assert reloaded.opset_imports[""] >= 13
    assert ExportCheck.from_model(reloaded).status == "loaded"

    with pytest.raises(InputError, match="refusing to overwrite the input"):
        export_to_file(src, src)
    assert onnx.load(str(src)).opset_import[0].version == 9
    export_to_file(src, src, force=True)
    assert onnx.load(str(src)).opset_import[0].version >= 13


@pytest.mark.parametrize(
    ("name", "content", "problem"),
    [
        ("missing.onnx", None, "no such file or directory"),
        ("model.txt", b"hello", "unknown model file type '.txt'"),
        ("weights.pt", b"\x80\x02", "holds weights, not a model's code"),
        ("truncated.onnx", b"\x08\x07\x12\x03abc\x3a\xff\xff", "not a readable ONNX model"),
        ("not_a_saved_model", "dir", "not a TensorFlow SavedModel"),
    ],
)
def test_bad_paths_name_the_path_and_the_problem(
    tmp_path: Path, name: str, content: bytes | str | None, problem: str
) -> None:
    path = tmp_path / name
    if content == "dir":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(InputError) as err:
        export(path)
    assert err.value.path == str(path)
    assert problem in err.value.message


def test_bad_factory_strings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "badfactories.py").write_text(
        "NOT_CALLABLE = 3\n\ndef three():\n    return 1, 2, 3\n"
    )
    (tmp_path / "brokenmod.py").write_text("def oops(:\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cases = {
        "no_such_module_xyz:make": "cannot import module 'no_such_module_xyz'",
        "brokenmod:make": "cannot import module 'brokenmod'",
        "badfactories:missing": "has no attribute 'missing'",
        "badfactories:NOT_CALLABLE": "not a callable factory",
        "badfactories:three": "tuple of 3",
    }
    for spec, problem in cases.items():
        with pytest.raises(InputError, match=problem) as err:
            export(spec)
        assert err.value.path == spec


def test_bad_arguments() -> None:
    proto = _opset9_model()
    with pytest.raises(InputError, match="cannot export a builtins.int"):
        export(42)
    with pytest.raises(InputError, match="unknown exporter 'jit'"):
        export(proto, exporter="jit")  # type: ignore[arg-type]
    with pytest.raises(
        InputError, match=r"exporter='torchscript' cannot export this source \(onnx\)"
    ):
        export(proto, exporter="torchscript")
    with pytest.raises(InputError, match="got 2 input name"):
        export(proto, input_names=["a", "b"])


def test_core_needs_no_framework_and_a_missing_one_says_what_to_install(tmp_path: Path) -> None:
    """In a fresh interpreter: ONNX export imports neither torch nor TensorFlow, and a blocked
    torch import turns into an InputError naming the extra."""
    (tmp_path / "m.pt2").write_bytes(b"not really")
    script = f"""
import sys
from onnxopt.export import export
from onnxopt.errors import InputError
export({str(LIGHT / "light_squeezenet.onnx")!r})
assert "torch" not in sys.modules and "tensorflow" not in sys.modules, "framework imported"
sys.modules["torch"] = None  # what an environment without torch looks like to import
try:
    export({str(tmp_path / "m.pt2")!r})
except InputError as exc:
    print("ERR", exc)
"""
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True
    )
    assert "ERR" in result.stdout and "install onnxopt[torch]" in result.stdout, result.stderr
