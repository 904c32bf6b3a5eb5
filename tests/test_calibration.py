"""Calibration readers: .npz, folders of .npy, arrays, feed batches; streamed and checked."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from onnxopt.calibration import CalibrationData, open_calibration
from onnxopt.errors import InputError

TWO_INPUTS = """
<ir_version: 8, opset_import: ["" : 17]>
two (float[N, 3] a, float[N, 3] b) => (float[N, 3] y) { y = Add(a, b) }
"""
FIXED_BATCH = """
<ir_version: 8, opset_import: ["" : 17]>
fixed (float[4, 3] a) => (float[4, 3] y) { y = Relu(a) }
"""


def _model(text: str) -> ir.Model:
    return ir.serde.deserialize_model(onnx.parser.parse_model(text))


@pytest.fixture
def two() -> ir.Model:
    return _model(TWO_INPUTS)


def _arrays(n: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"a": rng.standard_normal((n, 3)).astype(np.float32),
            "b": rng.standard_normal((n, 3)).astype(np.float32)}


def _joined(data: CalibrationData) -> dict[str, np.ndarray]:
    batches = list(data)
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


@pytest.mark.parametrize("compressed", [False, True])
def test_npz_streams_rows_in_batches(tmp_path: Path, two: ir.Model, compressed: bool) -> None:
    arrays = _arrays(70)
    path = tmp_path / "calib.npz"
    (np.savez_compressed if compressed else np.savez)(path, **arrays)
    data = open_calibration(path, two, batch_size=32)
    assert (len(data), data.num_samples) == (3, 70)
    sizes = [len(b["a"]) for b in data]
    assert sizes == [32, 32, 6]
    joined = _joined(data)
    for k in arrays:
        np.testing.assert_array_equal(joined[k], arrays[k])
    # read again from the file (re-iterable), and a batch by index
    np.testing.assert_array_equal(data[1]["b"], arrays["b"][32:64])
    assert len(list(data)) == 3


def test_npy_folder_one_file_per_input(tmp_path: Path, two: ir.Model) -> None:
    arrays = _arrays(10)
    for k, v in arrays.items():
        np.save(tmp_path / f"{k}.npy", v)
    data = open_calibration(tmp_path, two, batch_size=4)
    assert len(data) == 3 and [len(b["a"]) for b in data] == [4, 4, 2]
    np.testing.assert_array_equal(_joined(data)["a"], arrays["a"])


def test_npy_folder_of_sample_files(tmp_path: Path, mlp_model: onnx.ModelProto) -> None:
    """One-input model: files hold one sample (no batch axis) or a stack of samples."""
    model = ir.serde.deserialize_model(mlp_model)
    rng = np.random.default_rng(1)
    samples = [rng.standard_normal(4).astype(np.float32) for _ in range(3)]
    stack = rng.standard_normal((5, 4)).astype(np.float32)
    for i, s in enumerate(samples):
        np.save(tmp_path / f"s{i}.npy", s)
    np.save(tmp_path / "t_stack.npy", stack)
    data = open_calibration(tmp_path, model, batch_size=3)
    assert data.num_samples == 8
    assert [len(b["x"]) for b in data] == [3, 3, 2]
    expected = np.concatenate([np.stack(samples), stack])
    np.testing.assert_array_equal(_joined(data)["x"], expected)


def test_mapping_list_function_and_iterator(two: ir.Model) -> None:
    arrays = _arrays(9)
    assert [len(b["a"]) for b in open_calibration(arrays, two, batch_size=4)] == [4, 4, 1]
    batches = [{k: v[i:i + 3] for k, v in arrays.items()} for i in range(0, 9, 3)]
    assert len(open_calibration(batches, two)) == 3

    def generate():
        yield from batches

    from_function = open_calibration(generate, two)
    assert len(from_function) == 3 and len(list(from_function)) == 3  # read twice
    from_iterator = open_calibration(iter(batches), two)
    assert len(list(from_iterator)) == 3 and len(list(from_iterator)) == 3


def test_limit_keeps_whole_first_batches(two: ir.Model) -> None:
    data = open_calibration(_arrays(100), two, batch_size=16).limit(40)
    assert len(data) == 3 and data.num_samples == 40
    assert open_calibration(_arrays(10), two).limit(100).num_samples == 10


def test_a_fixed_batch_dimension_sets_the_batch_size() -> None:
    model = _model(FIXED_BATCH)
    data = open_calibration({"a": np.zeros((8, 3), np.float32)}, model, batch_size=32)
    assert [len(b["a"]) for b in data] == [4, 4]


def test_wrong_names_are_input_errors(tmp_path: Path, two: ir.Model) -> None:
    path = tmp_path / "bad.npz"
    np.savez(path, a=np.zeros((2, 3), np.float32), c=np.zeros((2, 3), np.float32))
    with pytest.raises(InputError, match=r"missing input\(s\) \['b'\].*unknown name\(s\) \['c'\]"):
        open_calibration(path, two)
    with pytest.raises(InputError, match="missing input"):
        open_calibration({"a": np.zeros((2, 3), np.float32)}, two)
    np.save(tmp_path / "a.npy", np.zeros((2, 3), np.float32))
    with pytest.raises(InputError, match="one .npy per model input"):
        open_calibration(tmp_path, two)


def test_bad_dtype_sample_counts_and_files(tmp_path: Path, two: ir.Model) -> None:
    arrays = _arrays(4)
    arrays["a"] = arrays["a"].astype(np.float64)
    with pytest.raises(InputError, match="dtype float64"):
        list(open_calibration(arrays, two))
    with pytest.raises(InputError, match="different numbers of samples"):
        open_calibration({"a": np.zeros((2, 3), np.float32), "b": np.zeros((3, 3), np.float32)},
                         two)
    with pytest.raises(InputError, match="no such calibration"):
        open_calibration(tmp_path / "missing.npz", two)
    broken = tmp_path / "broken.npz"
    broken.write_bytes(b"not a zip")
    with pytest.raises(InputError, match="not a readable .npz"):
        open_calibration(broken, two)
