"""The ``fuse`` pass: own rules on inline graphs (Before -> Expected, numerics, idempotence), then
real architectures (the onnx wheel's light models with random weights, PyTorch and Keras exports)
through ``onnxopt.optimize`` at fp32 tolerance."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import onnxopt
from onnxopt import runner
from onnxopt.errors import InputError
from onnxopt.feeds import synthesize_feeds
from onnxopt.passes.fusion.fuse import FusePass, unfolded_batchnorms
from onnxopt.recipes import load_recipe

RTOL, ATOL = 1e-4, 1e-5  # onnxopt.metrics.EXACT


def make_model(signature: str, body: str, inits: dict[str, np.ndarray], opset: int = 17
               ) -> ir.Model:
    """An ``onnx_ir`` model from ONNX text with ``inits`` as float32 initializers."""
    decls = ", ".join(
        (f"float[{','.join(map(str, a.shape))}]" if a.ndim else "float")
        + f" {name} = {{{', '.join(repr(float(v)) for v in a.ravel())}}}"
        for name, a in inits.items())
    text = (f'<ir_version: 8, opset_import: ["" : {opset}]>\n'
            f"g {signature}\n<{decls}>\n{{\n{body}\n}}")
    return ir.serde.deserialize_model(onnx.parser.parse_model(text))


def run(model: ir.Model, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = runner.reference_session(ir.serde.serialize_model(model).SerializeToString())
    return list(runner.run(session, feeds).values())


def fuse(model: ir.Model, **options: object) -> tuple[ir.Model, FusePass, ir.passes.PassResult]:
    """Run the pass on a copy; return the copy, the pass (for its notes) and the result."""
    copy = model.clone()
    fuse_pass = FusePass(FusePass.Config(**options))
    result = fuse_pass(copy)
    onnx.checker.check_model(ir.serde.serialize_model(copy))
    return copy, fuse_pass, result


def ops(model: ir.Model) -> list[str]:
    return [n.op_type for n in model.graph]


def assert_same_outputs(before: ir.Model, after: ir.Model, seed: int = 0,
                        rtol: float = RTOL, atol: float = ATOL) -> None:
    feeds = synthesize_feeds(before, batch=2, seed=seed)
    for ref, out in zip(run(before, feeds), run(after, feeds), strict=True):
        np.testing.assert_allclose(out, ref, rtol=rtol, atol=atol)


def assert_idempotent(fused: ir.Model) -> None:
    again, _, result = fuse(fused)
    assert result.modified is False
    assert ops(again) == ops(fused)


RNG = np.random.default_rng(0)


def rand(*shape: int, low: float = -1.0, high: float = 1.0) -> np.ndarray:
    return RNG.uniform(low, high, shape).astype(np.float32)


# --- own rules on inline graphs -----------------------------------------------------------------

@pytest.mark.parametrize("bias", [True, False])
def test_per_channel_mul_and_add_fold_into_conv(bias: bool) -> None:
    inits = {"w": rand(3, 2, 3, 3), "s": rand(3, 1, 1, low=0.5, high=1.5), "c": rand(1, 3, 1, 1)}
    conv = "Conv <pads = [1, 1, 1, 1]> (x, w, b)" if bias else "Conv <pads = [1, 1, 1, 1]> (x, w)"
    if bias:
        inits["b"] = rand(3)
    before = make_model("(float[N,2,5,5] x) => (float[N,3,5,5] y)",
                        f"t = {conv}\n u = Mul(s, t)\n y = Add(u, c)", inits)
    after, fuse_pass, result = fuse(before)
    assert result.modified is True
    assert ops(after) == ["Conv"]
    assert fuse_pass.notes["rules_fired"] == {"mul-into-conv": 1, "add-into-conv": 1}
    assert_same_outputs(before, after)
    assert_idempotent(after)


def test_spatially_varying_mul_is_not_folded() -> None:
    """A constant that varies over H/W is not a per-channel scale: folding it would be wrong."""
    before = make_model("(float[1,2,4,4] x) => (float[1,3,4,4] y)",
                        "t = Conv <pads = [1, 1, 1, 1]> (x, w)\n y = Mul(t, s)",
                        {"w": rand(3, 2, 3, 3), "s": rand(1, 1, 4, 4)})
    after, _, result = fuse(before)
    assert result.modified is False
    assert ops(after) == ["Conv", "Mul"]


def test_shared_conv_weights_stay_intact() -> None:
    """Two Convs share W; scaling one of them must leave the other's weights alone."""
    before = make_model("(float[1,2,4,4] x) => (float[1,3,4,4] y, float[1,3,4,4] z)",
                        "t = Conv (x, w)\n y = Mul(t, s)\n z = Conv (x, w)",
                        {"w": rand(3, 2, 1, 1), "s": rand(3, 1, 1)})
    after, _, _ = fuse(before)
    assert ops(after) == ["Conv", "Conv"]
    assert_same_outputs(before, after)


@pytest.mark.parametrize("trans_b", [0, 1])
def test_per_column_mul_and_add_fold_into_gemm(trans_b: int) -> None:
    b = rand(4, 3) if trans_b else rand(3, 4)
    before = make_model(
        "(float[N,3] x) => (float[N,4] y)",
        f"t = Gemm <transB = {trans_b}, beta = 0.5> (x, b, c)\n u = Mul(t, s)\n y = Add(k, u)",
        {"b": b, "c": rand(4), "s": rand(4), "k": rand(1, 4)})
    after, fuse_pass, _ = fuse(before)
    assert ops(after) == ["Gemm"]
    assert fuse_pass.notes["rules_fired"] == {"mul-into-gemm": 1, "add-into-gemm": 1}
    assert_same_outputs(before, after)
    assert_idempotent(after)


def test_mul_after_matmul_folds_then_matmul_add_becomes_gemm() -> None:
    """Keras' Dense + BatchNorm: MatMul -> Mul -> Add  becomes one Gemm."""
    before = make_model("(float[N,3] x) => (float[N,4] y)",
                        "t = MatMul(x, w)\n u = Mul(t, s)\n y = Add(u, c)",
                        {"w": rand(3, 4), "s": rand(4), "c": rand(4)})
    after, fuse_pass, _ = fuse(before)
    assert ops(after) == ["Gemm"]
    assert fuse_pass.notes["rules_fired"] == {"mul-into-matmul": 1, "matmul-add-to-gemm": 1}
    assert_same_outputs(before, after)


def test_matmul_add_with_a_row_shaped_addend_stays() -> None:
    """Gemm broadcasts C one way only; an [M, 1] or rank-3 addend is not a bias."""
    before = make_model("(float[2,3] x) => (float[2,4] y)", "t = MatMul(x, w)\n y = Add(t, c)",
                        {"w": rand(3, 4), "c": rand(2, 1)})
    after, _, result = fuse(before)
    assert result.modified is False and ops(after) == ["MatMul", "Add"]


def test_mul_and_add_fold_into_batchnorm_not_after_conv() -> None:
    """DenseNet's pre-activation BatchNorm (after a Concat) absorbs its Mul/Add and stays."""
    before = make_model(
        "(float[N,2,4,4] x1, float[N,1,4,4] x2) => (float[N,3,4,4] y)",
        "t = Concat <axis = 1> (x1, x2)\n n = BatchNormalization (t, g, b, m, v)\n"
        " u = Mul(n, s)\n y = Add(u, c)",
        {"g": rand(3), "b": rand(3), "m": rand(3), "v": rand(3, low=0.5, high=2.0),
         "s": rand(3, 1, 1), "c": rand(3, 1, 1)})
    after, fuse_pass, _ = fuse(before)
    assert ops(after) == ["Concat", "BatchNormalization"]
    assert fuse_pass.notes["rules_fired"] == {"mul-into-batchnorm": 1, "add-into-batchnorm": 1}
    assert_same_outputs(before, after)
    assert_idempotent(after)


@pytest.mark.parametrize("form", [
    "h = Div(x, sqrt2)\n e = Erf(h)\n p = Add(e, one)\n q = Mul(x, p)\n y = Mul(half, q)",
    "h = Mul(x, inv_sqrt2)\n e = Erf(h)\n p = Add(e, one)\n q = Mul(x, p)\n y = Mul(half, q)",
])
def test_erf_gelu_becomes_standard_gelu_at_opset_20(form: str) -> None:
    inits = {"sqrt2": np.array(np.sqrt(2.0), np.float32), "one": np.array(1.0, np.float32),
             "half": np.array(0.5, np.float32),
             "inv_sqrt2": np.array(1 / np.sqrt(2.0), np.float32)}
    signature = "(float[N,8] x) => (float[N,8] y)"
    before = make_model(signature, form, inits, opset=20)
    after, fuse_pass, _ = fuse(before)
    assert ops(after) == ["Gelu"]
    assert fuse_pass.notes["rules_fired"] == {"gelu": 1}
    assert_same_outputs(before, after)
    # Below opset 20 there is no standard Gelu: the pattern stays.
    old, _, result = fuse(make_model(signature, form, inits, opset=18))
    assert result.modified is False and "Gelu" not in ops(old)


def test_transpose_pairs_and_reshape_pairs_collapse() -> None:
    before = make_model(
        "(float[2,3,4] x) => (float[4,6] y)",
        "a = Transpose <perm = [1, 0, 2]> (x)\n b = Transpose <perm = [0, 2, 1]> (a)\n"
        " c = Reshape(b, s1)\n y = Reshape(c, s2)", {})
    shapes = {"s1": np.array([3, 8], np.int64), "s2": np.array([4, 6], np.int64)}
    for name, array in shapes.items():
        before.graph.initializers[name] = ir.Value(name=name, const_value=ir.tensor(array))
    for node in before.graph:
        if node.op_type == "Reshape":
            node.replace_input_with(1, before.graph.initializers["s1" if node.inputs[0].name == "b"
                                                                  else "s2"])
    after, fuse_pass, _ = fuse(before)
    assert Counter(ops(after)) == Counter({"Transpose": 1, "Reshape": 1})
    assert {"transpose-transpose", "reshape-reshape"} <= set(fuse_pass.notes["rules_fired"])
    assert_same_outputs(before, after)


def test_reused_onnxscript_rules_fire_through_the_table() -> None:
    """Pad -> Conv, Min/Max -> Clip, Relu/Clip merging, ConvTranspose + BN: onnxscript's rules."""
    before = make_model(
        "(float[1,2,4,4] x) => (float[1,2,12,12] y)",
        "p = Pad(x, pads)\n c = Conv (p, w)\n lo = Max(c, zero)\n hi = Min(lo, six)\n"
        " r = Relu(hi)\n t = ConvTranspose <strides = [2, 2]> (r, wt)\n"
        " y = BatchNormalization (t, g, b, m, v)",
        {"w": rand(3, 2, 3, 3), "zero": np.array(0.0, np.float32),
         "six": np.array(6.0, np.float32), "wt": rand(3, 2, 2, 2), "g": rand(2), "b": rand(2),
         "m": rand(2), "v": rand(2, low=0.5, high=1.5)})
    pads = np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64)
    value = ir.Value(name="pads", const_value=ir.tensor(pads, name="pads"))
    before.graph.node(0).replace_input_with(1, value)
    before.graph.register_initializer(value)
    after, fuse_pass, _ = fuse(before)
    assert ops(after) == ["Conv", "Clip", "ConvTranspose"]
    assert {"pad-into-conv", "min-max-to-clip", "relu-clip-merge",
            "batchnorm-into-conv-transpose"} <= set(fuse_pass.notes["rules_fired"])
    assert_same_outputs(before, after)
    assert_idempotent(after)


@settings(max_examples=12, deadline=None)
@given(groups=st.sampled_from([1, 2]), bias=st.booleans(), channels=st.sampled_from([2, 4]),
       residual=st.booleans(), seed=st.integers(0, 1000))
def test_conv_batchnorm_family_folds_exactly(groups: int, bias: bool, channels: int,
                                             residual: bool, seed: int) -> None:
    """Conv -> BN (-> + x) over a small family: BN always folds, outputs agree, idempotent."""
    rng = np.random.default_rng(seed)
    inits = {"w": rng.normal(0, 0.5, (channels, channels // groups, 3, 3)).astype(np.float32),
             "g": rng.uniform(0.5, 1.5, channels).astype(np.float32),
             "b": rng.normal(0, 0.1, channels).astype(np.float32),
             "m": rng.normal(0, 0.1, channels).astype(np.float32),
             "v": rng.uniform(0.5, 2.0, channels).astype(np.float32)}
    conv_inputs = "x, w, cb" if bias else "x, w"
    if bias:
        inits["cb"] = rng.normal(0, 0.1, channels).astype(np.float32)
    body = (f"t = Conv <group = {groups}, pads = [1, 1, 1, 1]> ({conv_inputs})\n"
            "n = BatchNormalization (t, g, b, m, v)\n")
    body += "y = Add(n, x)" if residual else "y = Relu(n)"
    c = channels
    before = make_model(f"(float[N,{c},5,5] x) => (float[N,{c},5,5] y)", body, inits)
    after, fuse_pass, _ = fuse(before)
    assert "BatchNormalization" not in ops(after)
    assert fuse_pass.notes["rules_fired"]["batchnorm-into-conv"] == 1
    assert_same_outputs(before, after, seed=seed)
    assert_idempotent(after)


def test_batchnorm_after_a_shared_conv_output_is_kept_and_reported() -> None:
    """Conv output used twice: folding would change the other use, so BN stays (with a reason)."""
    before = make_model(
        "(float[1,2,4,4] x) => (float[1,2,4,4] y, float[1,2,4,4] z)",
        "t = Conv (x, w)\n y = BatchNormalization (t, g, b, m, v)\n z = Relu(t)",
        {"w": rand(2, 2, 1, 1), "g": rand(2), "b": rand(2), "m": rand(2),
         "v": rand(2, low=0.5, high=1.5)})
    after, fuse_pass, _ = fuse(before)
    assert "BatchNormalization" in ops(after)
    assert len(unfolded_batchnorms(after)) == 1
    assert "used elsewhere" in fuse_pass.notes["batchnorms_kept"][0]


def test_recipes_registered() -> None:
    assert [s.name for s in load_recipe("default")[1]] == ["cleanup", "fuse"]
    assert [s.name for s in load_recipe("fuse")[1]] == ["cleanup", "fuse"]


# --- real architectures -------------------------------------------------------------------------

def _batchnorms_after_conv(model: ir.Model) -> int:
    return sum(1 for n in model.graph if n.op_type == "BatchNormalization"
               and n.inputs[0].producer() is not None
               and n.inputs[0].producer().op_type in ("Conv", "ConvTranspose", "Gemm"))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet50", "inception_v2", "densenet121", "shufflenet"])
def test_light_models_fuse_at_fp32_tolerance(name: str) -> None:
    """cleanup + fuse on ~100 MB architectures; outputs checked against the untouched original.

    The passes run directly here: ``optimize`` would verify the same, but its per-pass statistics
    (zlib over the whole model) cost ~10 s per step on these models. Shufflenet goes through
    ``optimize`` below.
    """
    from onnxopt.passes.cleanup import CleanupPass
    from onnxopt.zoo import light_model

    model = light_model(name)
    foldable = _batchnorms_after_conv(model)
    assert foldable > 0
    fused = model.clone()
    CleanupPass()(fused)
    fused, fuse_pass, result = fuse(fused)
    assert result.modified
    assert _batchnorms_after_conv(fused) == 0
    assert fuse_pass.notes["rules_fired"]["batchnorm-into-conv"] == foldable
    assert len(list(fused.graph)) < len(list(model.graph))
    assert_same_outputs(model, fused, seed=7)


@pytest.mark.slow
def test_light_model_through_optimize() -> None:
    from onnxopt.zoo import light_model

    model = light_model("shufflenet")
    fused, report = onnxopt.optimize(model, "default")  # verifies every pass at EXACT
    assert [p.name for p in report.passes] == ["cleanup", "fuse"]
    assert report.passes[-1].notes["rules_fired"]["batchnorm-into-conv"] == 49
    assert report.after["op_histogram"].get("BatchNormalization", 0) == 0
    assert all(m["max_abs"] <= ATOL + RTOL for m in report.passes[-1].fidelity.values())


@pytest.mark.slow
def test_exported_pytorch_cnn() -> None:
    torch = pytest.importorskip("torch")
    from onnxopt.export import export

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.MaxPool2d(2), torch.nn.Conv2d(8, 16, 3, padding=1, bias=False),
        torch.nn.BatchNorm2d(16), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(16 * 49, 10),
        torch.nn.BatchNorm1d(10))
    with torch.no_grad():
        for bn in (net[1], net[5], net[9]):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.2, 0.2)
    net.eval()
    x = torch.randn(2, 1, 14, 14)
    model = export(net, (x,))
    fused, report = onnxopt.optimize(model, ["cleanup", "fuse"])
    assert "BatchNormalization" not in ops(fused)
    assert not unfolded_batchnorms(fused)
    (out,) = run(fused, {fused.graph.inputs[0].name: x.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(out, net(x).numpy(), rtol=RTOL, atol=ATOL)


@pytest.mark.slow
def test_exported_keras_model() -> None:
    keras = pytest.importorskip("keras")
    from onnxopt.export import export

    keras.utils.set_random_seed(0)
    inputs = keras.Input((12, 12, 1))
    x = keras.layers.Conv2D(8, 3, padding="same")(inputs)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dense(16)(x)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.ReLU()(x)
    net = keras.Model(inputs, keras.layers.Dense(10)(x))
    rng = np.random.default_rng(0)
    for layer in net.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            n = layer.get_weights()[0].shape
            layer.set_weights([rng.uniform(0.5, 1.5, n), rng.uniform(-0.2, 0.2, n),
                               rng.uniform(-0.5, 0.5, n), rng.uniform(0.5, 2.0, n)])
    sample = rng.standard_normal((2, 12, 12, 1)).astype(np.float32)
    model = export(net, (sample,))
    fused, report = onnxopt.optimize(model, ["cleanup", "fuse"])
    notes = report.passes[-1].notes
    # tf2onnx folds BatchNorm into Conv itself; Dense + BatchNorm arrives as MatMul, Mul, Add.
    assert notes["rules_fired"].get("mul-into-matmul") == 1
    assert notes["rules_fired"].get("matmul-add-to-gemm") == 1
    assert "Mul" not in ops(fused) and "Gemm" in ops(fused)
    (out,) = run(fused, {fused.graph.inputs[0].name: sample})
    np.testing.assert_allclose(out, np.asarray(net(sample)), rtol=RTOL, atol=ATOL)


def test_skip_names_a_rule_or_fails() -> None:
    before = make_model("(float[N,3] x) => (float[N,4] y)", "t = MatMul(x, w)\n y = Add(t, c)",
                        {"w": rand(3, 4), "c": rand(4)})
    after, _, result = fuse(before, skip=["matmul-add-to-gemm"])
    assert result.modified is False and ops(after) == ["MatMul", "Add"]
    with pytest.raises(InputError, match="unknown rule.*matmul-add-to-gem\\b"):
        fuse(before, skip=["matmul-add-to-gem"])


def test_weights_in_constant_nodes_fold_too() -> None:
    """cleanup leaves small constants as Constant nodes; BatchNorm must fold all the same."""
    text = """<ir_version: 8, opset_import: ["" : 17]>
g (float[1,2,4,4] x) => (float[1,3,4,4] y) {
  w = Constant <value = float[3,2,1,1] {1, 2, 3, 4, 5, 6}> ()
  g = Constant <value = float[3] {1, 2, 3}> ()
  b = Constant <value = float[3] {0.1, 0.2, 0.3}> ()
  m = Constant <value = float[3] {0, 0, 1}> ()
  v = Constant <value = float[3] {1, 2, 3}> ()
  t = Conv(x, w)
  y = BatchNormalization(t, g, b, m, v)
}"""
    before = ir.serde.deserialize_model(onnx.parser.parse_model(text))
    fused, report = onnxopt.optimize(before, "default")
    assert ops(fused) == ["Conv"]
    assert report.passes[-1].notes["rules_fired"] == {"batchnorm-into-conv": 1}
