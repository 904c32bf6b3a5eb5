"""Passes on models with ONNX control flow (``If``, ``Loop``): valid output, loads in ORT, within
the pass's budget of FP32. Tiny models written in ONNX text, and one scripted PyTorch module
through onnxopt's exporter (its TorchScript fallback), as the zoo's ``torch-control-flow``."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

import onnxopt
from onnxopt import runner
from onnxopt.metrics import cosine_similarity
from onnxopt.passes.fp16 import FP16_BUDGET
from onnxopt.passes.fp16.fp16 import Fp16Pass


HEADER = '<ir_version: 8, opset_import: ["" : 17]>\n'
# cond: whether the mean of {0} is positive (x and -x take different branches)
GATE = """  m = ReduceMean <keepdims = 0> ({0})
  zero = Constant <value = float {{0.0}}> ()
  cond = Greater(m, zero)
"""


def _both_branches(model: onnx.ModelProto, weight: str, bias: str, seed: int
                   ) -> list[dict[str, np.ndarray]]:
    """Two batches, x and -x, that take different branches of a GATE on Gemm(x, weight, bias)."""
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    x = np.random.default_rng(seed).standard_normal((4, 16)).astype(np.float32)
    batches = [{"x": x}, {"x": -x}]
    taken = {bool(np.mean(b["x"] @ weights[weight] + weights[bias]) > 0) for b in batches}
    assert taken == {True, False}
    return batches


def _parse(text: str, seed: int, **shapes: tuple[int, ...]) -> onnx.ModelProto:
    """ONNX text plus seeded float32 initializers of the given shapes."""
    rng = np.random.default_rng(seed)
    model = onnx.parser.parse_model(text)
    for name, shape in shapes.items():
        array = rng.normal(0, 1 / np.sqrt(shape[0]), shape).astype(np.float32)
        model.graph.initializer.append(onnx.numpy_helper.from_array(array, name))
    onnx.checker.check_model(model, full_check=True)
    return model


def if_model() -> onnx.ModelProto:
    """A data-dependent If whose branches compute (Gemm) and hold ops that ``arm64`` keeps
    float32 (Neg, Tanh, ReduceMean): the Casts around them belong inside the branches."""
    return _parse(HEADER + """g (float[N,16] x) => (float[N,8] y) {
  h = Gemm(x, w1, b1)
""" + GATE.format("h") + """  z = If(cond) <
    then_branch = then_g () => (float[N,16] t_out) {
      t1 = Gemm(h, w2, b2)
      t_out = Tanh(t1)
    },
    else_branch = else_g () => (float[N,16] e_out) {
      e1 = Gemm(h, w2, b2)
      e2 = Neg(e1)
      e_out = Tanh(e2)
    }
  >
  y = Gemm(z, w3, b3)
}""", 0, w1=(16, 16), b1=(16,), w2=(16, 16), b2=(16,), w3=(16, 8), b3=(8,))


def loop_model() -> onnx.ModelProto:
    """A Loop with a data-dependent trip count, a loop-carried state, outer-scope weights and a
    kept op (Sigmoid) inside the body, and a scan output."""
    return _parse(HEADER + """g (float[N,16] x, int64 steps) => (float[N,16] y, float[K,N,16] trace) {
  cond0 = Constant <value = bool {1}> ()
  y, trace = Loop(steps, cond0, x) <
    body = body_g (int64 i, bool c_in, float[N,16] s_in) => (bool c_out, float[N,16] s_out,
                                                            float[N,16] scan) {
      c_out = Identity(c_in)
      g1 = Gemm(s_in, w, b)
      g2 = Sigmoid(g1)
      s_out = Add(g2, s_in)
      scan = Identity(g1)
    }
  >
}""", 1, w=(16, 16), b=(16,))


def _check_fp16(model: onnx.ModelProto, batches: list[dict[str, np.ndarray]]) -> ir.Model:
    """Run the fp16 recipe; the result is valid ONNX, loads in ORT, computes in float16 inside the
    subgraphs and agrees with FP32 within FP16_BUDGET on every batch (each branch taken)."""
    converted, _ = onnxopt.optimize(model, "fp16", verify_feeds=batches)
    proto = ir.serde.serialize_model(converted)
    onnx.checker.check_model(proto, full_check=True)
    inner = [n for n in ir.traversal.RecursiveGraphIterator(converted.graph)
             if n.graph is not converted.graph]
    assert any(v.dtype == ir.DataType.FLOAT16 for n in inner for v in n.outputs)
    reference = runner.reference_session(model.SerializeToString())
    session = runner.create_session(proto.SerializeToString())
    for feeds in batches:
        ref, out = runner.run(reference, feeds), runner.run(session, feeds)
        for key, value in ref.items():
            assert out[key].dtype == np.float32
            assert cosine_similarity(value, out[key]) >= FP16_BUDGET.min_value
    return converted


def test_fp16_if_casts_stay_inside_their_branch() -> None:
    model = if_model()
    batches = _both_branches(model, "w1", "b1", seed=2)
    converted = _check_fp16(model, batches)
    else_branch = next(n for n in converted.graph if n.op_type == "If").attributes["else_branch"]
    casts = [n for n in else_branch.as_graph() if n.op_type == "Cast"]
    assert len(casts) >= 2  # around the float32 Neg/Tanh, in the branch that holds them


def test_fp16_loop_body_casts_stay_inside_the_body() -> None:
    rng = np.random.default_rng(3)
    batches = [{"x": rng.standard_normal((2, 16)).astype(np.float32),
                "steps": np.array(n, dtype=np.int64)} for n in (1, 4)]
    _check_fp16(loop_model(), batches)


def test_fp16_scripted_torch_control_flow() -> None:
    torch = pytest.importorskip("torch")
    from torch import nn

    from onnxopt.export import export

    class Gated(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(16, 16), nn.Linear(16, 16)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for _ in range(x.shape[0]):  # a data-dependent trip count: an ONNX Loop
                x = torch.tanh(self.a(x)) + x
            if bool(x.mean() > 0):
                x = self.b(x)
            else:
                x = -self.b(x)
            return x

    torch.manual_seed(0)
    rng = np.random.default_rng(4)
    x = rng.standard_normal((3, 16)).astype(np.float32)
    model = export(torch.jit.script(Gated().eval()), (torch.from_numpy(x),))
    proto = ir.serde.serialize_model(model)
    ops = {n.op_type for n in ir.traversal.RecursiveGraphIterator(model.graph)}
    assert {"If", "Loop"} <= ops
    name = model.graph.inputs[0].name
    _check_fp16(proto, [{name: x}, {name: -x}, {name: x[:1]}])


def test_fp16_pass_alone_on_if_is_valid() -> None:
    """The pass itself (no pipeline) writes a model the checker accepts: this was the failure."""
    model = ir.serde.deserialize_model(if_model())
    Fp16Pass()(model)
    onnx.checker.check_model(ir.serde.serialize_model(model), full_check=True)


def two_ifs_returning_an_outer_value() -> onnx.ModelProto:
    """Two Ifs whose else branches return the same outer-scope value through an Identity (as
    silero-vad's nested Ifs do)."""
    return _parse(HEADER + """g (float[N,16] x) => (float[N,16] y) {
  a = Gemm(x, w, b)
""" + GATE.format("a") + """  p = If(cond) <
    then_branch = t1 () => (float[N,16] t1_out) { t1_out = Neg(a) },
    else_branch = e1 () => (float[N,16] e1_out) { e1_out = Identity(a) }
  >
  q = If(cond) <
    then_branch = t2 () => (float[N,16] t2_out) { t2_out = Relu(a) },
    else_branch = e2 () => (float[N,16] e2_out) { e2_out = Identity(a) }
  >
  y = Add(p, q)
}""", 5, w=(16, 16), b=(16,))


def test_cleanup_keeps_identities_that_return_an_outer_value() -> None:
    """onnx_ir's IdentityEliminationPass failed here ('already an output of a different
    graph'), so every recipe failed on silero-vad."""
    model = two_ifs_returning_an_outer_value()
    batches = _both_branches(model, "w", "b", seed=6)
    cleaned, _ = onnxopt.optimize(model, "cleanup", verify_feeds=batches)
    proto = ir.serde.serialize_model(cleaned)
    onnx.checker.check_model(proto, full_check=True)
    reference = runner.reference_session(model.SerializeToString())
    session = runner.create_session(proto.SerializeToString())
    for feeds in batches:
        np.testing.assert_allclose(runner.run(session, feeds)["y"],
                                   runner.run(reference, feeds)["y"], rtol=1e-5, atol=1e-6)
