"""The ``quantize`` pass: exact cases, target types, safety, reuse, accuracy search, formats.

Every test runs the real pass (ORT's quantizer and sessions). Latency measurement is switched off
(``measure_latency=False``) except where the latency decision itself is under test: decisions that
depend on a busy machine's timing would make tests flaky, and no test asserts on wall-clock.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from compression_models import batches, conv_proto, mlp_proto, trained_digits_mlp
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import CalibrationDataReader, quantize_static

import onnxopt
from onnxopt import runner
from onnxopt.errors import InputError, QualityGateError
from onnxopt.evaluation import top1_accuracy
from onnxopt.metrics import cosine_similarity
from onnxopt.passes.quantize.quantize import AccuracyBudgetError
from onnxopt.recipes import load_recipe

QUIET = {"measure_latency": False}


def quantize(model, options=None, **kwargs):
    """Run cleanup + quantize through the pipeline (the user's path); returns (model, notes)."""
    recipe = ["cleanup", {"pass": "quantize", **QUIET, **(options or {})}]
    out, report = onnxopt.optimize(model, recipe, **kwargs)
    return out, report.passes[-1].notes, report


def run(model, feeds, opt_level="all"):
    proto = model if isinstance(model, onnx.ModelProto) else ir.serde.serialize_model(model)
    session = runner.create_session(proto.SerializeToString(), threads=1, opt_level=opt_level)
    return next(iter(runner.run(session, feeds).values()))


def ops(model) -> list[str]:
    proto = model if isinstance(model, onnx.ModelProto) else ir.serde.serialize_model(model)
    return [n.op_type for n in proto.graph.node]


def _model(nodes, inputs, outputs, inits) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.checker.check_model(model, full_check=True)
    return model


# --- exact by construction -------------------------------------------------------------------


def grid_model() -> tuple[onnx.ModelProto, list[dict[str, np.ndarray]]]:
    """y = x @ W with W a permutation scaled by 127/128 and x on a 1/16 grid in [0, 255/16].

    Symmetric int8 weights get scale (127/128)/127 = 2^-7 exactly; uint8 inputs over
    [0, 255/16] get scale 2^-4, zero point 0; outputs span [0, 255*127/2048], scale
    127/2048 exactly: every value sits on its grid, so INT8 reproduces FP32 bit for bit.
    """
    n = 16
    w = np.eye(n, dtype=np.float32)[np.random.default_rng(0).permutation(n)] * np.float32(127 / 128)
    model = _model([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
                   [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", n])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", n])],
                   [numpy_helper.from_array(w, "w")])
    rng = np.random.default_rng(1)
    data = []
    for _ in range(3):
        q = rng.integers(0, 256, size=(8, n))
        q[0, :] = 255  # the calibrated range reaches both ends of the grid
        q[1, :] = 0
        data.append({"x": (q / 16.0).astype(np.float32)})
    return model, data


def test_values_on_the_int8_grid_round_trip_exactly() -> None:
    model, data = grid_model()
    out, notes, _ = quantize(model, {"mode": "static", "target": "x86-vnni"}, calibration=data)
    assert notes["decision"].startswith("INT8")
    assert "QuantizeLinear" in ops(out) and "DequantizeLinear" in ops(out)
    # the output is the MatMul's own (no Quantize/Dequantize pair rounding it)
    assert out.graph.outputs[0].producer().op_type == "MatMul"
    for feeds in data:
        expected = run(model, feeds)
        np.testing.assert_array_equal(run(out, feeds), expected)  # integer kernels
        np.testing.assert_array_equal(run(out, feeds, "disabled"), expected)  # reference Q/DQ


def test_dequantized_weights_equal_grid_weights() -> None:
    model, data = grid_model()
    out, _, _ = quantize(model, {"mode": "static", "target": "x86-vnni"}, calibration=data)
    proto = ir.serde.serialize_model(out)
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    w = numpy_helper.to_array(model.graph.initializer[0])
    dq = next(n for n in proto.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in
              inits and inits[n.input[0]].dtype == np.int8)
    q, scale = inits[dq.input[0]].astype(np.float32), inits[dq.input[1]]
    np.testing.assert_array_equal(q * scale, w)


# --- target-aware types --------------------------------------------------------------------


def _zero_points(model) -> dict[str, set[str]]:
    """dtypes of QuantizeLinear zero points (activations) and of quantized weights."""
    proto = ir.serde.serialize_model(model)
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    acts = {str(inits[n.input[2]].dtype) for n in proto.graph.node
            if n.op_type == "QuantizeLinear" and len(n.input) > 2}
    weights = [inits[n.input[0]] for n in proto.graph.node
               if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    return {"activations": acts, "weight_absmax": {int(np.abs(w.astype(int)).max())
                                                   for w in weights if w.ndim == 2}}


@pytest.mark.parametrize(("target", "act", "absmax"), [
    ("x86-vnni", "uint8", 127),  # U8S8, full 8-bit weights
    ("x86-avx2", "uint8", 64),  # U8S8, 7-bit weights against vpmaddubsw saturation
    ("arm64-dotprod", "int8", 127),  # S8S8
])
def test_types_follow_the_target(target: str, act: str, absmax: int) -> None:
    out, notes, _ = quantize(mlp_proto(), {"mode": "static", "target": target},
                             calibration=batches((16,)))
    zp = _zero_points(out)
    assert zp["activations"] == {act}
    assert max(zp["weight_absmax"]) <= absmax and max(zp["weight_absmax"]) >= absmax - 1
    assert notes["target"]["name"] == target and notes["target"]["reason"]


def test_a_foreign_target_is_not_timed_here() -> None:
    _, notes, _ = quantize(mlp_proto(), {"target": "arm64", "measure_latency": True},
                           calibration=batches((16,)))
    assert notes["target"]["latency_measured"] is False
    assert "not this machine" in notes["target"]["latency_note"]
    assert "latency" not in notes


# --- safe by construction -------------------------------------------------------------------


def masked_attention_model() -> onnx.ModelProto:
    """Scores + a constant additive mask holding float32 min, Softmax, then a projection."""
    rng = np.random.default_rng(0)
    mask = np.zeros(8, np.float32)
    mask[[1, 5]] = np.finfo(np.float32).min
    inits = [numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), "wq"),
             numpy_helper.from_array(mask, "mask"),
             numpy_helper.from_array(rng.standard_normal((8, 4)).astype(np.float32), "wo")]
    nodes = [helper.make_node("MatMul", ["x", "wq"], ["scores"], name="qk"),
             helper.make_node("Add", ["scores", "mask"], ["masked"], name="add_mask"),
             helper.make_node("Softmax", ["masked"], ["probs"], name="softmax", axis=-1),
             helper.make_node("MatMul", ["probs", "wo"], ["y"], name="out")]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], inits)


def test_a_float_min_mask_stays_float_and_the_result_matches(tmp_path: Path) -> None:
    model = masked_attention_model()
    data = batches((8,), n=4, batch=32)
    out, notes, _ = quantize(model, {"mode": "static"}, calibration=data)
    unsafe = {t["tensor"] for t in notes["unsafe_tensors"]}
    assert "masked" in unsafe and "sentinel" in notes["unsafe_tensors"][0]["reason"]
    proto = ir.serde.serialize_model(out)
    add = next(n for n in proto.graph.node if n.op_type == "Add")
    assert "mask" in add.input  # the float32-min constant is read as it is
    readers = [n.op_type for n in proto.graph.node if add.output[0] in n.input]
    assert readers == ["Softmax"]  # no QuantizeLinear on the masked scores
    assert "QuantizeLinear" in ops(out)  # while the MatMuls are INT8
    feeds = batches((8,), n=1, batch=64, seed=7)[0]
    assert cosine_similarity(run(model, feeds), run(out, feeds)) > 0.99
    # The trap is real: ORT's defaults quantize the mask and wreck the output.
    naive = tmp_path / "naive.onnx"
    quantize_static(model, naive, _Reader(data))
    assert cosine_similarity(run(model, feeds), run(onnx.load(naive), feeds)) < 0.9


class _Reader(CalibrationDataReader):
    def __init__(self, data: list[dict[str, np.ndarray]]) -> None:
        self._it = iter(data)

    def get_next(self):
        return next(self._it, None)


# --- the calibration table is data ---------------------------------------------------------


def test_a_saved_table_gives_the_identical_model(tmp_path: Path) -> None:
    table = tmp_path / "table.json"
    options = {"mode": "static", "calib_table": str(table)}
    first, notes1, _ = quantize(mlp_proto(), options, calibration=batches((16,), seed=1))
    assert table.is_file() and "reused" not in notes1["calibration"]
    # Other calibration data: the saved ranges win, so the model is byte-identical.
    second, notes2, _ = quantize(mlp_proto(), options, calibration=batches((16,), seed=2))
    assert notes2["calibration"]["reused"] is True
    assert notes1["model_digest"] == notes2["model_digest"]
    assert (ir.serde.serialize_model(first).SerializeToString(deterministic=True)
            == ir.serde.serialize_model(second).SerializeToString(deterministic=True))
    with pytest.raises(InputError, match="calibration table lacks"):
        quantize(conv_proto(), {"mode": "static", "calib_table": str(table)},
                 calibration=batches((4, 9, 9)))


def test_static_qdq_leaves_outputs_float_and_no_unused_initializer() -> None:
    """The Quantize/Dequantize pair in front of a graph output goes, and with it its scale and
    zero point (ORT warned "Removing initializer ... not used by any node" at every load)."""
    out, _, _ = quantize(mlp_proto(), {"mode": "static"}, calibration=batches((16,), seed=1))
    proto = ir.serde.serialize_model(out)
    last = next(n for n in proto.graph.node if proto.graph.output[0].name in n.output)
    assert last.op_type != "DequantizeLinear"
    read = {name for n in proto.graph.node for name in n.input}
    assert [i.name for i in proto.graph.initializer if i.name not in read] == []


# --- accuracy-aware -------------------------------------------------------------------------


def poisoned_digits_mlp():
    """The trained digits MLP with one huge weight on a pixel that is always 0.

    FP32 accuracy is unchanged (the weight multiplies zeros), but per-tensor INT8 of that layer
    rounds every other weight to 0: a sensitive node the search must find and keep in FP32.
    """
    model, data = trained_digits_mlp()
    dead = int(np.flatnonzero(data.train_flat.max(axis=0) == 0)[0])
    first = next(n for n in model.graph if n.op_type in ("Gemm", "MatMul"))
    weight = first.inputs[1]
    w = weight.const_value.numpy().copy()
    trans_b = first.op_type == "Gemm" and first.attributes.get_int("transB", 0)
    if trans_b:
        w[:, dead] = 500.0
    else:
        w[dead, :] = 500.0
    weight.const_value = ir.tensor(w, name=weight.name)
    return model, data, first.name


@pytest.mark.slow
def test_accuracy_search_falls_back_the_sensitive_layer() -> None:
    model, data, poisoned = poisoned_digits_mlp()
    name = model.graph.inputs[0].name
    calib = [{name: data.train_flat[i:i + 64]} for i in range(0, 256, 64)]
    out, notes, report = quantize(
        model, {"max_drop": 0.5, "per_channel": False}, calibration=calib,
        evaluation=({name: data.val_flat}, data.y_val))
    accuracy = notes["accuracy"]
    assert accuracy["searches"][0]["drop"] > 0.5  # as built, INT8 broke the model
    ranking = notes["sensitivity"]
    assert ranking[0]["node"] == poisoned  # lowest SQNR first
    rows = {r["node"]: r for r in ranking}
    assert rows[poisoned]["int8"] is False and "accuracy" in rows[poisoned]["reason"]
    assert sum(r["int8"] for r in ranking) == len(ranking) - 1
    assert rows[poisoned]["accuracy_effect"] > 0.5
    assert 0 < notes["int8_mac_share"] < 1
    # Held-out test split, measured independently of the pass.
    fp32 = top1_accuracy(ir.serde.serialize_model(model), data.test_flat, data.y_test)
    int8 = top1_accuracy(ir.serde.serialize_model(out), data.test_flat, data.y_test)
    assert fp32 - int8 <= 1.0
    assert report.passes[-1].budget == "unchecked"  # the search on user data is the check


@pytest.mark.slow
def test_a_missed_budget_raises_with_the_best_model_kept() -> None:
    model, data, _ = poisoned_digits_mlp()
    name = model.graph.inputs[0].name
    with pytest.raises(AccuracyBudgetError) as info:
        quantize(model, {"max_drop": 0.5, "per_channel": False, "sensitivity_top_k": 0},
                 calibration=[{name: data.train_flat[:128]}],
                 evaluation=({name: data.val_flat}, data.y_val))
    error = info.value
    assert isinstance(error, QualityGateError) and error.exit_code == 1
    assert "no INT8 candidate met the budget" in error.message
    assert "QuantizeLinear" in ops(error.model)  # the best candidate is there to save
    assert error.notes["decision"].startswith("budget NOT met")


# --- formats and modes ----------------------------------------------------------------------


def test_qoperator_format_loads_and_runs() -> None:
    model = mlp_proto()
    out, notes, _ = quantize(model, {"mode": "static", "format": "qoperator"},
                             calibration=batches((16,)))
    kinds = set(ops(out))
    assert kinds & {"QLinearMatMul", "QGemm"} and "DequantizeLinear" in kinds
    feeds = batches((16,), n=1, batch=32, seed=5)[0]
    assert cosine_similarity(run(model, feeds), run(out, feeds)) > 0.99
    assert "QOPERATOR" in notes["decision"]


def test_dynamic_mode_never_quantizes_convolutions() -> None:
    conv = conv_proto()
    gemm_in = helper.make_node("Flatten", ["y"], ["flat"], name="flatten")
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((96, 10))
                                .astype(np.float32), "fc.weight")
    conv.graph.node.extend([gemm_in, helper.make_node("MatMul", ["flat", "fc.weight"], ["z"],
                                                      name="fc")])
    conv.graph.initializer.append(w)
    del conv.graph.output[:]
    conv.graph.output.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", 10]))
    out, notes, _ = quantize(conv, {"mode": "dynamic"})  # no calibration data needed
    kinds = ops(out)
    assert "ConvInteger" not in kinds and kinds.count("Conv") == 2
    assert "MatMulInteger" in kinds
    rows = {r["node"]: r for r in notes["sensitivity"]}
    assert rows["fc"]["int8"] and not rows["conv1"]["int8"]
    assert "ConvInteger" in rows["conv1"]["reason"]


def tiny_conv() -> onnx.ModelProto:
    """1 -> 4 channels, 3x3, on 8x8: microseconds of work, Quantize/Dequantize dominate."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 1, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "b")]
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["y"], name="relu")]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 8, 8])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 8, 8])], inits)


@pytest.mark.slow
def test_auto_keeps_fp32_when_int8_is_slower() -> None:
    model = tiny_conv()
    data = batches((1, 8, 8), n=2, batch=16)
    out, notes, report = quantize(model, {"measure_latency": True, "latency_budget_s": 0.5},
                                  calibration=data)
    assert notes["decision"].startswith("kept FP32")
    assert report.passes[-1].modified is False
    assert "QuantizeLinear" not in ops(out) and notes["int8_mac_share"] == 0
    assert set(notes["latency"]) >= {"fp32", "static QDQ U8S8 per-tensor"}
    feeds = data[0]
    np.testing.assert_array_equal(run(out, feeds), run(model, feeds))


# --- configuration --------------------------------------------------------------------------


def test_static_without_calibration_is_an_input_error() -> None:
    with pytest.raises(InputError, match="static quantization needs calibration data"):
        quantize(mlp_proto(), {"mode": "static"})


def test_bad_options_are_input_errors() -> None:
    with pytest.raises(InputError, match="option 'mode' must be one of"):
        quantize(mlp_proto(), {"mode": "fast"}, calibration=batches((16,)))
    with pytest.raises(InputError, match="unknown target"):
        quantize(mlp_proto(), {"target": "z80"}, calibration=batches((16,)))
    with pytest.raises(InputError, match="has no option 'max_dorp'"):
        load_recipe([{"pass": "quantize", "max_dorp": 1}])


def test_int8_recipe_fuses_before_quantizing() -> None:
    name, steps = load_recipe("int8")
    assert name == "int8"
    assert [s.name for s in steps] == ["cleanup", "fuse", "fuse-transformer", "quantize"]


# --- residual LayerNorms kept out of ORT's SkipLayerNormalization kernel ----------------------


def _residual_block(skip_op: bool, rank: int = 3, bias: bool = False) -> onnx.ModelProto:
    """x -> MatMul [+ bias] -> + x -> LayerNorm (or the fused com.microsoft
    SkipLayerNormalization, which takes the bias as its fifth input)."""
    rng = np.random.default_rng(0)
    shape = [1, 8, 16] if rank == 3 else [8, 16]
    inits = [numpy_helper.from_array(rng.standard_normal((16, 16)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.uniform(0.5, 1.5, 16).astype(np.float32), "gamma"),
             numpy_helper.from_array(rng.normal(0, 0.1, 16).astype(np.float32), "beta"),
             numpy_helper.from_array(rng.normal(0, 0.1, 16).astype(np.float32), "bias")]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"])]
    if skip_op:
        nodes.append(helper.make_node("SkipLayerNormalization",
                                      ["h", "x", "gamma", "beta"] + (["bias"] if bias else []),
                                      ["y"], domain="com.microsoft", epsilon=1e-12))
    else:
        if bias:
            nodes.append(helper.make_node("Add", ["h", "bias"], ["hb"]))
        nodes += [helper.make_node("Add", ["hb" if bias else "h", "x"], ["s"]),
                  helper.make_node("LayerNormalization", ["s", "gamma", "beta"], ["y"],
                                   epsilon=1e-12)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", 1, shape)],
                              [helper.make_tensor_value_info("y", 1, shape)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 9
    return onnx.shape_inference.infer_shapes(model)


def _ort_optimized_ops(proto: onnx.ModelProto, tmp_path: Path) -> list[str]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return ops(onnx.load(str(tmp_path / "optimized.onnx")))


@pytest.mark.parametrize("skip_op", [False, True], ids=["add-layernorm", "skiplayernorm"])
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
def test_split_layer_norm_same_values_and_no_skiplayernorm_kernel(skip_op, bias, tmp_path):
    from onnxopt.passes.fusion._layer_norms import split_layer_norms

    model = _residual_block(skip_op, bias=bias)
    assert "SkipLayerNormalization" in _ort_optimized_ops(model, tmp_path)
    split, count = split_layer_norms(model)
    assert count == 1
    onnx.checker.check_model(split, full_check=True)
    # The residual sum is a Sum; a bias is added to the MatMul's output first (where ORT folds
    # it into a dynamically quantized MatMul), and no Reshape/Shape nodes are needed.
    assert ops(split) == ["MatMul"] + (["Add"] if bias else []) + ["Sum", "LayerNormalization"]
    if bias:
        assert split.graph.node[1].input[0] == "h"
    assert "SkipLayerNormalization" not in _ort_optimized_ops(split, tmp_path)
    x = {"x": np.random.default_rng(1).standard_normal((1, 8, 16)).astype(np.float32)}
    np.testing.assert_allclose(run(split, x), run(model, x, opt_level="disabled"), atol=1e-5)


def test_split_leaves_2d_layer_norms_alone():
    from onnxopt.passes.fusion._layer_norms import split_layer_norms

    # ORT fuses only 3-D sums: a 2-D one already runs the fast LayerNormalization kernel.
    assert split_layer_norms(_residual_block(False, rank=2))[1] == 0


def test_prepare_keeps_the_residual_sum_of_a_split_layer_norm(tmp_path: Path) -> None:
    """``prepare`` writes two-input Sums as Add (quantizable), except a Sum feeding a
    LayerNormalization: that is the split form, which an Add would send back into ORT's slow
    SkipLayerNormalization."""
    from onnxopt.passes.fusion._layer_norms import split_layer_norms
    from onnxopt.passes.quantize._prepare import prepare

    split, _ = split_layer_norms(_residual_block(True, bias=True))
    model = ir.serde.deserialize_model(split)
    other = ir.node("Sum", [model.graph.outputs[0], model.graph.inputs[0]], num_outputs=1)
    model.graph.append(other)
    model.graph.outputs[0] = other.outputs[0]
    prepared = prepare(model, tmp_path)
    assert ops(prepared.proto) == ["MatMul", "Add", "Sum", "LayerNormalization", "Add"]
