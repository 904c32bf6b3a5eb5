"""Models and data shared by the prune / share-weights / deep-compress tests.

Tiny graphs are written with ``onnx.helper`` (Gemm with transB, MatMul+Add, grouped and strided
Conv) so every layout the passes handle is covered in milliseconds; the trained digits MLP comes
from the real trainer and exporter, once per test module.
"""

from __future__ import annotations

import functools

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from onnxopt import runner


def mlp_proto(seed: int = 0, zero_fraction: float = 0.0,
              sizes: tuple[int, int, int, int] = (16, 32, 8, 4)) -> onnx.ModelProto:
    """x[N,16] -> Gemm(transB, 32) -> Relu -> MatMul(8) -> Add -> Relu -> Gemm(4) (no bias)."""
    rng = np.random.default_rng(seed)
    n_in, h1, h2, n_out = sizes
    w1 = rng.standard_normal((h1, n_in)).astype(np.float32)
    w2 = rng.standard_normal((h1, h2)).astype(np.float32)
    w3 = rng.standard_normal((h2, n_out)).astype(np.float32)
    if zero_fraction:
        for w in (w1, w2, w3):
            w[rng.random(w.shape) < zero_fraction] = 0.0
    inits = [numpy_helper.from_array(a, n) for a, n in [
        (w1, "fc1.weight"), (rng.standard_normal(h1).astype(np.float32), "fc1.bias"),
        (w2, "fc2.weight"), (rng.standard_normal(h2).astype(np.float32), "fc2.bias"),
        (w3, "fc3.weight")]]
    nodes = [
        helper.make_node("Gemm", ["x", "fc1.weight", "fc1.bias"], ["h1"], name="fc1", transB=1),
        helper.make_node("Relu", ["h1"], ["r1"], name="relu1"),
        helper.make_node("MatMul", ["r1", "fc2.weight"], ["m2"], name="fc2"),
        helper.make_node("Add", ["m2", "fc2.bias"], ["h2"], name="fc2_bias"),
        helper.make_node("Relu", ["h2"], ["r2"], name="relu2"),
        helper.make_node("Gemm", ["r2", "fc3.weight"], ["y"], name="fc3"),
    ]
    graph = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", n_in])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", n_out])], inits)
    return _finish(graph)


def conv_proto(seed: int = 0) -> onnx.ModelProto:
    """x[N,4,9,9] -> Conv(8, 3x3, pad 1) -> Relu -> Conv(8, group 2, stride 2, dilation 2)."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(a, n) for a, n in [
        (rng.standard_normal((8, 4, 3, 3)).astype(np.float32), "conv1.weight"),
        (rng.standard_normal(8).astype(np.float32), "conv1.bias"),
        (rng.standard_normal((8, 4, 3, 3)).astype(np.float32), "conv2.weight"),
        (rng.standard_normal(8).astype(np.float32), "conv2.bias")]]
    nodes = [
        helper.make_node("Conv", ["x", "conv1.weight", "conv1.bias"], ["c1"], name="conv1",
                         pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "conv2.weight", "conv2.bias"], ["y"], name="conv2",
                         group=2, strides=[2, 2], dilations=[2, 2], pads=[1, 0, 2, 1]),
    ]
    graph = helper.make_graph(
        nodes, "convnet", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 9, 9])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, 4, 3])], inits)
    return _finish(graph)


def _finish(graph: onnx.GraphProto) -> onnx.ModelProto:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    onnx.checker.check_model(model, full_check=True)
    return model


def batches(shape: tuple[int, ...], n: int = 4, batch: int = 16, seed: int = 1,
            name: str = "x") -> list[dict[str, np.ndarray]]:
    """Seeded calibration batches; inputs correlated across features (like real activations)."""
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((shape[0], shape[0])) / np.sqrt(shape[0])
    out = []
    for _ in range(n):
        x = rng.standard_normal((batch, *shape))
        x = np.moveaxis(np.moveaxis(x, 1, -1) @ mix, -1, 1)
        out.append({name: x.astype(np.float32)})
    return out


def run(model: ir.Model | onnx.ModelProto, feeds: dict[str, np.ndarray],
        opt_level: str = "disabled") -> np.ndarray:
    proto = model if isinstance(model, onnx.ModelProto) else ir.serde.serialize_model(model)
    session = runner.create_session(proto.SerializeToString(), threads=1, opt_level=opt_level)
    return next(iter(runner.run(session, feeds).values()))


def optimized_ops(model: ir.Model, path: str) -> list[str]:
    """Op types of the graph ONNX Runtime keeps after its own optimizations (folding)."""
    import onnxruntime as ort

    options = runner.session_options(threads=1, opt_level="basic")
    options.optimized_model_filepath = path
    ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString(), options,
                         providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(path).graph.node]


def trained_digits_mlp(hidden: tuple[int, ...] = (64, 32), epochs: int = 8):
    """A digits MLP trained here and exported with onnxopt's exporter, plus its data split.

    Trained once per test session (about 15 s on a busy 2-core machine); callers get a copy.
    """
    model, data = _trained_digits_mlp(hidden, epochs)
    return model.clone(), data


@functools.lru_cache(maxsize=2)
def _trained_digits_mlp(hidden: tuple[int, ...], epochs: int):
    import torch

    from onnxopt import digits
    from onnxopt.export import export

    data = digits.load_digits_28(seed=0, test_size=0.25, val_size=0.2)
    net = digits.train_torch_mlp(data, hidden=hidden, epochs=epochs)
    model = export(net, (torch.from_numpy(data.test_flat[:2]),))
    return model, data


def trained_digits_cnn(channels: tuple[int, ...] = (16, 32), epochs: int = 3):
    """The small digits CNN (Conv-BN-ReLU-Pool per entry of ``channels``, FC10) trained here
    and exported, plus its data split; trained once per test session, callers get a copy."""
    model, data = _trained_digits_cnn(channels, epochs)
    return model.clone(), data


@functools.lru_cache(maxsize=2)
def _trained_digits_cnn(channels: tuple[int, ...], epochs: int):
    import torch

    from onnxopt import digits
    from onnxopt.export import export

    data = digits.load_digits_28(seed=0, test_size=0.25, val_size=0.2)
    net = digits.train_torch_cnn(data, channels=channels, epochs=epochs)
    model = export(net, (torch.from_numpy(data.test_images[:2]),))
    return model, data
