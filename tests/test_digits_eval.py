"""The digits data, the torch trainers, and accuracy/fidelity measured through ONNX Runtime."""

from __future__ import annotations

import numpy as np
import onnx
import onnx.parser
import pytest

from onnxopt import digits
from onnxopt.errors import InputError
from onnxopt.evaluation import fidelity, predict, session_for, top1_accuracy


@pytest.fixture(scope="module")
def data() -> digits.DigitsData:
    return digits.load_digits_28(seed=0)


@pytest.fixture(scope="module")
def mlp_and_onnx(data: digits.DigitsData):
    torch = pytest.importorskip("torch")
    from onnxopt.export import export

    net = digits.train_torch_mlp(data)
    return net, export(net, (torch.from_numpy(data.train_flat[:4]),))


def _parse(text: str) -> onnx.ModelProto:
    model = onnx.parser.parse_model(text)
    onnx.checker.check_model(model)
    return model


def test_digits_shapes_dtypes_and_range(data: digits.DigitsData) -> None:
    assert data.train_images.shape == (1347, 1, 28, 28)
    assert data.test_images.shape == (450, 1, 28, 28)
    assert data.train_flat.shape == (1347, 784) and data.test_flat.shape == (450, 784)
    assert data.train_images.dtype == np.float32 and data.train_flat.dtype == np.float32
    assert data.y_train.dtype == np.int64 and data.y_test.dtype == np.int64
    assert data.train_images.min() == 0.0 and data.train_images.max() == 1.0
    assert np.shares_memory(data.train_flat, data.train_images)  # a view, not a copy
    assert data.val_images.shape == (0, 1, 28, 28) and data.y_val.shape == (0,)


def test_digits_split_is_stratified(data: digits.DigitsData) -> None:
    all_counts = np.bincount(np.concatenate([data.y_train, data.y_test]), minlength=10)
    test_counts = np.bincount(data.y_test, minlength=10)
    assert np.all(np.abs(test_counts - all_counts * 0.25) <= 1)


def test_digits_are_deterministic_per_seed(data: digits.DigitsData) -> None:
    again = digits.load_digits_28(seed=0)
    other = digits.load_digits_28(seed=1)
    for name in ("train_images", "y_train", "test_images", "y_test"):
        assert np.array_equal(getattr(data, name), getattr(again, name))
    assert not np.array_equal(data.y_test, other.y_test)


def test_validation_split_comes_from_training_part() -> None:
    split = digits.load_digits_28(seed=0, val_size=0.1)
    assert len(split.y_test) == 450
    assert len(split.y_train) + len(split.y_val) == 1347
    assert abs(len(split.y_val) - 180) <= 1
    assert split.val_flat.shape == (len(split.y_val), 784)
    assert set(np.unique(split.y_val)) == set(range(10))


@pytest.mark.slow
def test_exported_torch_mlp_accuracy_matches_torch(data: digits.DigitsData, mlp_and_onnx) -> None:
    net, model = mlp_and_onnx
    onnx_acc = top1_accuracy(model, data.test_flat, data.y_test)
    torch_acc = digits.torch_accuracy(net, data.test_flat, data.y_test)
    assert onnx_acc >= 90.0
    assert abs(onnx_acc - torch_acc) <= 0.5


def test_torch_training_is_deterministic(data: digits.DigitsData) -> None:
    torch = pytest.importorskip("torch")
    state = torch.get_rng_state()
    a = digits.train_torch_mlp(data, hidden=(16,), epochs=1, seed=3)
    b = digits.train_torch_mlp(data, hidden=(16,), epochs=1, seed=3)
    c = digits.train_torch_mlp(data, hidden=(16,), epochs=1, seed=4)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a[1].weight, c[1].weight)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG is untouched


@pytest.mark.parametrize("build, params", [
    (lambda: digits.torch_mlp((300, 100)), 784 * 300 + 300 + 300 * 100 + 100 + 100 * 10 + 10),
    (lambda: digits.torch_lenet5(), 156 + 2416 + 48120 + 10164 + 850),
    # Deep Compression's LeNet-5: "431K" weights
    (lambda: digits.torch_lenet5_caffe(), 520 + 25050 + 400500 + 5010),
    # conv 1->16 (160) + BN (32), conv 16->32 (4640) + BN (64), FC 32*7*7 -> 10 (15690)
    (lambda: digits.torch_cnn((16, 32)), 160 + 32 + 4640 + 64 + 15690),
])
def test_architectures(build, params: int) -> None:
    torch = pytest.importorskip("torch")
    net = build().eval()
    assert sum(p.numel() for p in net.parameters()) == params
    with torch.no_grad():
        out = net(torch.zeros(3, 1, 28, 28))
    assert out.shape == (3, 10)


def test_cnn_trains_on_images(data: digits.DigitsData) -> None:
    pytest.importorskip("torch")
    net = digits.train_torch_cnn(data, channels=(4,), epochs=1)
    assert digits.torch_accuracy(net, data.test_images, data.y_test) > 50.0


@pytest.mark.slow
def test_predict_batching_equals_one_batch(data: digits.DigitsData, mlp_and_onnx) -> None:
    _, model = mlp_and_onnx
    session = session_for(model)
    whole = predict(None, data.test_flat, batch_size=10_000, session=session)
    pieces = predict(model, data.test_flat, batch_size=7)
    assert whole.shape == (450, 10)
    np.testing.assert_array_equal(pieces, whole)
    by_name = predict(model, {"input": data.test_flat[:5]})
    np.testing.assert_array_equal(by_name, whole[:5])


def test_predict_pads_a_fixed_batch() -> None:
    model = _parse("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[4, 3] x) => (float[4, 3] y) { y = Relu(x) }
    """)
    x = np.random.default_rng(0).standard_normal((10, 3)).astype(np.float32)
    out = predict(model, x, batch_size=256)
    np.testing.assert_array_equal(out, np.maximum(x, 0))


def test_fidelity_measures_the_difference() -> None:
    base = """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 3] x) => (float[N, 3] y) {{ two = Constant <value = float {{2.0}}> ()
          y0 = Mul(x, two)  off = Constant <value = float {{{offset}}}> ()  y = Add(y0, off) }}
    """
    a, b = _parse(base.format(offset=0.0)), _parse(base.format(offset=0.5))
    x = np.random.default_rng(0).standard_normal((20, 3)).astype(np.float32)
    same = fidelity(a, a, x, batch_size=6)
    assert same["y"]["max_abs"] == 0.0 and same["y"]["cosine"] == pytest.approx(1.0)
    moved = fidelity(a, b, x)
    assert moved["y"]["max_abs"] == pytest.approx(0.5)
    assert moved["y"]["cosine"] < 1.0


def test_top1_accuracy_counts_argmax_and_checks_labels() -> None:
    model = _parse("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 3] x) => (float[N, 3] y) { y = Identity(x) }
    """)
    x = np.eye(3, dtype=np.float32)[[0, 1, 2, 2]]
    assert top1_accuracy(model, x, np.array([0, 1, 2, 0])) == 75.0
    with pytest.raises(InputError, match="labels"):
        top1_accuracy(model, x, np.array([0, 1]))


def test_predict_needs_input_name_for_several_inputs() -> None:
    model = _parse("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 3] a, float[N, 3] b) => (float[N, 3] y) { y = Add(a, b) }
    """)
    x = np.ones((2, 3), np.float32)
    with pytest.raises(InputError, match="inputs"):
        predict(model, x)
    with pytest.raises(InputError, match="samples"):
        predict(model, {"a": x, "b": x[:1]})
    np.testing.assert_array_equal(predict(model, {"a": x, "b": x}), 2 * x)
