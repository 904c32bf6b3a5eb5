"""Synthesized feeds follow the signature; ``.npz`` feeds are checked name by name."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from onnxopt.errors import InputError
from onnxopt.feeds import load_feeds, parse_shape_overrides, synthesize_feeds
from onnxopt.model_io import to_ir


def _two_input_model() -> onnx.ModelProto:
    return onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (int64[batch, seq] input_ids, int64[batch, seq] attention_mask) => (int64[batch, seq] y) {
        y = Add(input_ids, attention_mask)
    }""")


def test_synthesize_is_seeded_and_follows_dims() -> None:
    model = to_ir(_two_input_model())
    a = synthesize_feeds(model, batch=3, shapes={"seq": [7]}, seed=1)
    b = synthesize_feeds(model, batch=3, shapes={"seq": [7]}, seed=1)
    assert a["input_ids"].shape == (3, 7) and a["input_ids"].dtype == np.int64
    np.testing.assert_array_equal(a["input_ids"], b["input_ids"])
    assert (a["attention_mask"] == 1).all()  # masks are all ones, not random ids
    whole = synthesize_feeds(model, shapes={"input_ids": [2, 5], "attention_mask": [2, 5]})
    assert whole["input_ids"].shape == (2, 5)


def test_parse_shape_overrides() -> None:
    assert parse_shape_overrides(["x=1x3x224x224", "seq=128"]) == {"x": [1, 3, 224, 224], "seq": [128]}
    for bad in ["x", "x=", "x=1xa", "=3", "x=0"]:
        with pytest.raises(InputError, match="bad --shape"):
            parse_shape_overrides([bad])


@pytest.mark.parametrize(
    "arrays, message",
    [
        ({"wrong": np.zeros((1, 4), np.float32)}, "missing input"),
        ({"x": np.zeros((1, 4), np.float64)}, "dtype float64"),
        ({"x": np.zeros((4,), np.float32)}, "rank 2"),
        ({"x": np.zeros((1, 5), np.float32)}, "expects"),
    ],
)
def test_npz_checked(tmp_path: Path, mlp_path: Path, arrays: dict, message: str) -> None:
    npz = tmp_path / "feeds.npz"
    np.savez(npz, **arrays)
    with pytest.raises(InputError, match=message) as info:
        load_feeds(npz, to_ir(onnx.load(mlp_path)))
    assert str(npz) in str(info.value)


def test_npz_good_and_unreadable(tmp_path: Path, mlp_path: Path) -> None:
    model = to_ir(onnx.load(mlp_path))
    npz = tmp_path / "ok.npz"
    np.savez(npz, x=np.ones((6, 4), np.float32))
    assert load_feeds(npz, model)["x"].shape == (6, 4)
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(InputError, match="not a readable .npz"):
        load_feeds(junk, model)


def test_bert_inputs_are_valid_ids() -> None:
    model = to_ir(onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (int64[b, s] input_ids, int64[b, s] token_type_ids, int64[b, s] attention_mask) => (int64[b, s] y) {
        t = Add(input_ids, token_type_ids)
        y = Add(t, attention_mask)
    }"""))
    feeds = synthesize_feeds(model, batch=2, shapes={"s": [16]})
    assert (feeds["token_type_ids"] == 0).all()  # segment ids index a 2-row table
    assert (feeds["attention_mask"] == 1).all()
    assert 0 <= feeds["input_ids"].min() and feeds["input_ids"].max() < 100


def test_evaluation_set_for_a_fixed_batch_model(tmp_path) -> None:
    """A model exported with batch 1 (the light zoo's, many ONNX files from other tools) still
    takes an evaluation set of stacked samples: axis 0 counts samples, not the batch."""
    import onnx
    from onnx import helper

    from onnxopt.evaluation import predict, session_for
    from onnxopt.feeds import load_evaluation
    from onnxopt.model_io import load_model

    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    path = tmp_path / "fixed.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    model = load_model(path)
    data = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32)
    np.savez(tmp_path / "eval.npz", x=data, labels=np.arange(5))
    feeds, labels = load_evaluation(tmp_path / "eval.npz", model)
    assert feeds["x"].shape == (5, 4) and len(labels) == 5
    np.testing.assert_array_equal(predict(None, feeds, session=session_for(model)),
                                  np.maximum(data, 0))
    np.savez(tmp_path / "bad.npz", x=np.zeros((5, 3), np.float32))
    with pytest.raises(InputError, match="expects"):
        load_evaluation(tmp_path / "bad.npz", model)
