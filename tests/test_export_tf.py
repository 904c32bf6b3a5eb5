"""TensorFlow / Keras export through tf2onnx, checked against TensorFlow with ONNX Runtime.

TensorFlow takes seconds to import and Keras models to build, so models are module-scoped.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from onnxopt import runner  # noqa: E402
from onnxopt.errors import InputError  # noqa: E402
from onnxopt.export import ExportCheck, export, export_to_file  # noqa: E402
from onnxopt.model_io import load_model  # noqa: E402

pytestmark = pytest.mark.slow  # TensorFlow's import alone takes ~5 s


@pytest.fixture(scope="module")
def keras_mlp():
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [keras.Input((8,)), keras.layers.Dense(16, activation="relu"), keras.layers.Dense(3)]
    )


@pytest.fixture(scope="module")
def keras_file(keras_mlp, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("keras") / "mlp.keras"
    keras_mlp.save(path)
    return path


def _ort(model: ir.Model, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    session = runner.reference_session(ir.serde.serialize_model(model).SerializeToString())
    return runner.run(session, feeds)


def _assert_matches_keras(model: ir.Model, keras_model, width: int = 8) -> None:
    """ORT at batch 1 and 5 reproduces the Keras model."""
    for batch in (1, 5):
        x = np.random.default_rng(batch).standard_normal((batch, width)).astype(np.float32)
        want = np.asarray(keras_model(x, training=False))
        got = _ort(model, {"input": x})[model.graph.outputs[0].name]
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_keras_sequential(keras_mlp) -> None:
    model = export(keras_mlp)
    assert [v.name for v in model.graph.inputs] == ["input"]
    assert [v.name for v in model.graph.outputs] == ["output"]
    assert list(model.graph.inputs[0].shape) == [ir.SymbolicDim("batch"), 8]
    assert list(model.graph.outputs[0].shape) == [ir.SymbolicDim("batch"), 3]
    check = ExportCheck.from_model(model)
    assert check.exporter == "tf2onnx" and check.status == "passed"
    assert check.reference.startswith("tensorflow ") and check.batch_sizes == (1, 3)
    assert check.max_abs_error <= 1e-5
    _assert_matches_keras(model, keras_mlp)


def test_keras_file_round_trip(keras_mlp, keras_file: Path, tmp_path: Path) -> None:
    out = export_to_file(keras_file, tmp_path / "mlp.onnx")
    model = load_model(out)
    assert ExportCheck.from_model(model).status == "passed"
    _assert_matches_keras(model, keras_mlp)


def test_static_batch_with_examples(keras_mlp) -> None:
    x = np.ones((2, 8), np.float32)
    model = export(keras_mlp, x, dynamic_batch=False, input_names=["features"])
    assert [v.name for v in model.graph.inputs] == ["features"]
    assert list(model.graph.inputs[0].shape) == [2, 8]
    assert ExportCheck.from_model(model).batch_sizes == (2,)


def test_saved_model_directory(keras_mlp, tmp_path: Path) -> None:
    directory = tmp_path / "saved"
    keras_mlp.export(str(directory), verbose=False)
    model = export(directory)
    # Keras names its serving output "output_0": the signature's own name is kept.
    assert [v.name for v in model.graph.outputs] == ["output_0"]
    assert ExportCheck.from_model(model).status == "passed"
    _assert_matches_keras(model, keras_mlp)


def test_functional_model_keeps_named_inputs() -> None:
    keras.utils.set_random_seed(1)
    pixels, extra = keras.Input((5,), name="pixels"), keras.Input((3,), name="extra")
    hidden = keras.layers.Dense(4)(keras.layers.Concatenate()([pixels, extra]))
    model = keras.Model([pixels, extra], [hidden, keras.layers.Dense(1)(hidden)])

    exported = export(model)

    assert [v.name for v in exported.graph.inputs] == ["pixels", "extra"]
    assert [v.name for v in exported.graph.outputs] == ["output_0", "output_1"]
    a = np.random.default_rng(0).standard_normal((4, 5)).astype(np.float32)
    b = np.random.default_rng(1).standard_normal((4, 3)).astype(np.float32)
    want = model([a, b], training=False)
    got = _ort(exported, {"pixels": a, "extra": b})
    np.testing.assert_allclose(got["output_0"], np.asarray(want[0]), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got["output_1"], np.asarray(want[1]), rtol=1e-4, atol=1e-5)


def test_tf_function_with_input_signature() -> None:
    @tf.function(
        input_signature=[
            tf.TensorSpec((None, 4), tf.float32, name="a"),
            tf.TensorSpec((None, 4), tf.float32, name="b"),
        ]
    )
    def gated(a, b):
        gate = tf.nn.sigmoid(a) * tf.tanh(b) + tf.reduce_sum(a * b, axis=1, keepdims=True)
        return gate, tf.reshape(a, [-1])  # the second output's axis 0 is 4 x batch

    model = export(gated)

    assert [v.name for v in model.graph.inputs] == ["a", "b"]
    assert [v.name for v in model.graph.outputs] == ["output_0", "output_1"]
    assert model.graph.inputs[0].shape[0] == ir.SymbolicDim("batch")
    assert model.graph.outputs[0].shape[0] == ir.SymbolicDim("batch")  # seen to follow the batch
    assert model.graph.outputs[1].shape[0] != ir.SymbolicDim("batch")
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((6, 4)).astype(np.float32) for _ in range(2))
    got = _ort(model, {"a": a, "b": b})
    want = gated(a, b)
    np.testing.assert_allclose(got["output_0"], want[0].numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got["output_1"], want[1].numpy())


def test_corrupt_keras_files(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.keras"
    garbage.write_bytes(b"definitely not a zip archive")
    empty_zip = tmp_path / "empty.keras"
    with zipfile.ZipFile(empty_zip, "w") as archive:
        archive.writestr("readme.txt", "no config here")
    for path in (garbage, empty_zip):
        with pytest.raises(InputError, match="not a loadable Keras model file") as err:
            export(path)
        assert err.value.path == str(path)


def test_tf_function_without_signature_needs_examples() -> None:
    double = tf.function(lambda x: x * 2.0)
    with pytest.raises(InputError, match="no input_signature; pass example_inputs"):
        export(double)
    model = export(double, np.ones((2, 3), np.float32))
    assert model.graph.inputs[0].shape[0] == ir.SymbolicDim("batch")
    assert ExportCheck.from_model(model).batch_sizes == (2, 1)


def test_large_keras_weights_route_matches_plain_route(monkeypatch: pytest.MonkeyPatch) -> None:
    """The route for large models (weights fed to tf2onnx as inputs, attached afterwards).

    Forced on a small CNN by lowering its thresholds: every variable, BatchNorm statistics
    included, goes through it, so a mixed-up variable order would change the outputs.
    """
    from onnxopt.export import _tensorflow

    keras.utils.set_random_seed(2)
    cnn = keras.Sequential([
        keras.Input((12, 12, 3)),
        keras.layers.Conv2D(8, 3, activation="relu"),
        keras.layers.BatchNormalization(),
        keras.layers.Flatten(),
        keras.layers.Dense(4),
    ])
    bn = cnn.layers[1]  # non-default statistics, so a swap with gamma/beta would show
    bn.moving_mean.assign(np.linspace(-1, 1, 8).astype(np.float32))
    bn.moving_variance.assign(np.linspace(0.5, 2, 8).astype(np.float32))
    plain = export(cnn)
    monkeypatch.setattr(_tensorflow, "LARGE_WEIGHTS_BYTES", 0)
    monkeypatch.setattr(_tensorflow, "WEIGHT_INPUT_MIN_BYTES", 0)
    fed = export(cnn)

    assert [v.name for v in fed.graph.inputs] == ["input"]
    assert ExportCheck.from_model(fed).status == "passed"
    dense = cnn.layers[-1]  # used as is, so it keeps its variables' names
    assert {dense.kernel.path, dense.bias.path} <= set(fed.graph.initializers)
    for op in ("Conv", "MatMul", "Transpose"):
        assert sum(n.op_type == op for n in fed.graph) == sum(n.op_type == op for n in plain.graph)
    conv = next(node for node in fed.graph if node.op_type == "Conv")
    assert conv.inputs[1].const_value is not None  # the kernel's layout Transpose was folded
    assert tuple(conv.inputs[1].shape) == (8, 3, 3, 3)
    x = np.random.default_rng(3).standard_normal((3, 12, 12, 3)).astype(np.float32)
    want = _ort(plain, {"input": x})["output"]
    np.testing.assert_allclose(_ort(fed, {"input": x})["output"], want, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(want, np.asarray(cnn(x, training=False)), rtol=1e-4, atol=1e-5)
