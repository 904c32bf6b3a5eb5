"""Fusion rules the onnxscript rewriter lacks, written as onnxscript pattern rules.

onnxscript folds BatchNorm into Conv/Gemm and a *scalar* Mul/Add into Conv; Caffe2-era models
(the onnx wheel's Inception, DenseNet) and Keras exports carry *per-channel* Mul/Add after Conv,
Gemm, MatMul or BatchNorm (a BatchNorm split into normalize + scale + shift). And onnxscript
writes GELU only as the com.microsoft contrib op, while opset 20 has a standard ``Gelu`` for the
Erf/Tanh arithmetic that converters emit. Each rule's docstring states its algebra; ``s`` and
``c`` are constants that broadcast along the channel axis only (a scalar counts).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern
from onnxscript.rewriter.ort_fusions.erfgelu import erf_gelu_pattern_1, erf_gelu_pattern_2
from onnxscript.rewriter.ort_fusions.gelu import GeluTanhFusion


def constant_array(value: ir.Value | None) -> np.ndarray | None:
    """The value's constant contents, unless it is not constant or can be fed (a graph input)."""
    if value is None or value.is_graph_input():
        return None
    producer = value.producer()
    if producer is not None and producer.op_type == "Constant" and producer.domain == "":
        attr = producer.attributes.get("value")
        tensor = attr.as_tensor() if attr is not None and attr.type == ir.AttributeType.TENSOR \
            else None
    else:
        tensor = value.const_value if producer is None else None
    return None if tensor is None else tensor.numpy()


def per_channel(value: ir.Value, rank: int, channels: int, axis: int = 1) -> np.ndarray | None:
    """``value`` as a ``[channels]`` vector if it broadcasts only along ``axis`` of a rank-``rank``
    output with ``channels`` channels there (so applying it never changes the output's shape)."""
    array = constant_array(value)
    if array is None or array.ndim > rank or array.dtype.kind != "f":
        return None
    full = array.reshape((1,) * (rank - array.ndim) + array.shape)
    axis = axis % rank
    if any(d != 1 for i, d in enumerate(full.shape) if i != axis):
        return None
    if full.shape[axis] not in (1, channels):
        return None
    return np.broadcast_to(full.reshape(-1), (channels,)).copy()


def _fresh_initializer(op: pattern.RewriterContext, like: ir.Value, suffix: str,
                       array: np.ndarray) -> ir.Value:
    """A new initializer named after ``like`` (never reusing a name: ``like`` may be shared)."""
    taken = like.graph.initializers if like.graph is not None else {}
    base = f"{like.name or 'w'}_{suffix}"
    name, i = base, 1
    while name in taken:
        name, i = f"{base}_{i}", i + 1
    return op.initializer(ir.tensor(array, name=name), name=name)


def _is_inference_batchnorm(node: ir.Node) -> bool:
    return node.attributes.get_int("training_mode", 0) == 0 and len(node.outputs) == 1


class _Affine(pattern.RewriteRuleClassBase):
    """Shared matching of ``Mul(producer(...), s)`` / ``Add(producer(...), c)``."""

    binary: str = "Mul"
    producer_op: str = "Conv"

    def pattern(self, op, x, k):
        inner = getattr(op, self.producer_op)(x, _allow_other_inputs=True,
                                              _allow_other_attributes=True, _outputs=["inner"])
        return getattr(op, self.binary)(inner, k)

    def _vector(self, inner: ir.Value, k: ir.Value) -> np.ndarray | None:
        raise NotImplementedError

    def check(self, context, x, k, inner, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        node = inner.producer()
        for weight in node.inputs[1:]:
            if weight is not None and constant_array(weight) is None:
                return result.fail(f"{self.producer_op} input '{weight.name}' is not constant")
        if node.inputs[1] is None or constant_array(node.inputs[1]) is None:
            return result.fail(f"{self.producer_op} weight is not constant")
        self._k = self._vector(inner, k)
        if self._k is None:
            return result.fail(f"{self.binary} operand is not a per-channel constant", k)
        return result


class ConvMulFusion(_Affine):
    """``Mul(Conv(x, W, b), s) -> Conv(x, W * s[:, None, ...], b * s)``.

    Conv is linear in its weights per output channel ``o``: ``s_o * (W_o * x + b_o)`` equals
    ``(s_o W_o) * x + s_o b_o``.
    """

    def _vector(self, inner, k):
        w = constant_array(inner.producer().inputs[1])
        return per_channel(k, w.ndim, w.shape[0])

    def rewrite(self, op, x, k, inner, **_):
        node = inner.producer()
        w = constant_array(node.inputs[1])
        s = self._k.astype(w.dtype)
        inputs = [x, _fresh_initializer(op, node.inputs[1], "scaled",
                                        w * s.reshape((-1,) + (1,) * (w.ndim - 1)))]
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            inputs.append(_fresh_initializer(op, node.inputs[2], "scaled",
                                             constant_array(node.inputs[2]) * s))
        return op.Conv(*inputs, **node.attributes)


class ConvAddFusion(_Affine):
    """``Add(Conv(x, W, b), c) -> Conv(x, W, b + c)`` (``b = 0`` when absent)."""

    binary = "Add"

    def _vector(self, inner, k):
        w = constant_array(inner.producer().inputs[1])
        return per_channel(k, w.ndim, w.shape[0])

    def rewrite(self, op, x, k, inner, **_):
        node = inner.producer()
        w_value = node.inputs[1]
        c = self._k.astype(constant_array(w_value).dtype)
        has_bias = len(node.inputs) > 2 and node.inputs[2] is not None
        bias = constant_array(node.inputs[2]) + c if has_bias else c
        named_after = node.inputs[2] if has_bias else w_value
        return op.Conv(x, w_value, _fresh_initializer(op, named_after, "shifted", bias),
                       **node.attributes)


def _gemm_columns(node: ir.Node) -> int:
    b = constant_array(node.inputs[1])
    return b.shape[0] if node.attributes.get_int("transB", 0) else b.shape[1]


class GemmMulFusion(_Affine):
    """``Mul(Gemm(A, B, C), s) -> Gemm(A, B * s (per output column), beta * C * s, beta=1)``.

    ``s_n * (alpha * (A B)_{:,n} + beta * C_{:,n}) = alpha * (A (B s))_{:,n} + (beta C s)_{:,n}``.
    """

    producer_op = "Gemm"

    def _vector(self, inner, k):
        return per_channel(k, 2, _gemm_columns(inner.producer()))

    def rewrite(self, op, x, k, inner, **_):
        node = inner.producer()
        b = constant_array(node.inputs[1])
        s = self._k.astype(b.dtype)
        trans_b = node.attributes.get_int("transB", 0)
        scaled_b = b * (s[:, None] if trans_b else s[None, :])
        attributes = {k_: v for k_, v in node.attributes.items() if k_ != "beta"}
        inputs = [x, _fresh_initializer(op, node.inputs[1], "scaled", scaled_b)]
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            beta = node.attributes.get_float("beta", 1.0)
            c = constant_array(node.inputs[2])
            inputs.append(_fresh_initializer(op, node.inputs[2], "scaled",
                                             (beta * c * s).astype(b.dtype)))
        return op.Gemm(*inputs, **attributes)


class GemmAddFusion(_Affine):
    """``Add(Gemm(A, B, C), c) -> Gemm(A, B, beta * C + c, beta=1)`` (``C = 0`` when absent)."""

    producer_op = "Gemm"
    binary = "Add"

    def _vector(self, inner, k):
        return per_channel(k, 2, _gemm_columns(inner.producer()))

    def rewrite(self, op, x, k, inner, **_):
        node = inner.producer()
        dtype = constant_array(node.inputs[1]).dtype
        attributes = {k_: v for k_, v in node.attributes.items() if k_ != "beta"}
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            beta = node.attributes.get_float("beta", 1.0)
            bias = beta * constant_array(node.inputs[2]) + self._k
            named_after = node.inputs[2]
        else:
            bias, named_after = self._k, node.inputs[1]
        return op.Gemm(x, node.inputs[1],
                       _fresh_initializer(op, named_after, "shifted", bias.astype(dtype)),
                       **attributes)


class MatMulMulFusion(_Affine):
    """``Mul(MatMul(x, W), s) -> MatMul(x, W * s)`` for a constant matrix ``W`` ([K, N]).

    ``s_n * sum_k x_k W_kn = sum_k x_k (W_kn s_n)``; ``s`` may vary along the last axis only.
    Keras exports Dense + BatchNorm this way, leaving the MatMul+Add -> Gemm rule a plain pair.
    """

    producer_op = "MatMul"

    def pattern(self, op, x, k):
        return op.Mul(op.MatMul(x, _allow_other_inputs=True, _outputs=["inner"]), k)

    def _vector(self, inner, k):
        w = constant_array(inner.producer().inputs[1])
        x = inner.producer().inputs[0]
        array = constant_array(k)
        if w is None or w.ndim != 2 or array is None:
            return None
        max_rank = x.shape.rank() if x.shape is not None else 1
        if array.ndim > max_rank:
            return None
        return per_channel(k, max(array.ndim, 1), w.shape[1], axis=-1)

    def rewrite(self, op, x, k, inner, **_):
        weight = inner.producer().inputs[1]
        w = constant_array(weight)
        return op.MatMul(x, _fresh_initializer(op, weight, "scaled",
                                               w * self._k.astype(w.dtype)[None, :]))


class _BatchNormAffine(_Affine):
    producer_op = "BatchNormalization"

    def check(self, context, x, k, inner, **kwargs) -> pattern.MatchResult:
        result = pattern.MatchResult()
        node = inner.producer()
        if not _is_inference_batchnorm(node):
            return result.fail("BatchNormalization is in training mode")
        if inner.shape is None and x.shape is None:
            return result.fail("rank of the BatchNormalization output is unknown")
        return super().check(context, x, k, inner, **kwargs)

    def _vector(self, inner, k):
        node = inner.producer()
        shape = inner.shape if inner.shape is not None else node.inputs[0].shape
        return per_channel(k, shape.rank(), constant_array(node.inputs[1]).shape[0])


class BatchNormMulFusion(_BatchNormAffine):
    """``Mul(BatchNorm(x, g, b, m, v), s) -> BatchNorm(x, g * s, b * s, m, v)``.

    ``s * (g * (x - m) / sqrt(v + eps) + b) = (g s) * (x - m) / sqrt(v + eps) + b s``.
    """

    def rewrite(self, op, x, k, inner, **_):
        node = inner.producer()
        g, b = constant_array(node.inputs[1]), constant_array(node.inputs[2])
        s = self._k.astype(g.dtype)
        return op.BatchNormalization(
            x, _fresh_initializer(op, node.inputs[1], "scaled", g * s),
            _fresh_initializer(op, node.inputs[2], "scaled", b * s),
            node.inputs[3], node.inputs[4], **node.attributes)


class BatchNormAddFusion(_BatchNormAffine):
    """``Add(BatchNorm(x, g, b, m, v), c) -> BatchNorm(x, g, b + c, m, v)``."""

    binary = "Add"

    def rewrite(self, op, x, k, inner, **_):
        node = inner.producer()
        b = constant_array(node.inputs[2])
        return op.BatchNormalization(
            x, node.inputs[1], _fresh_initializer(op, node.inputs[2], "shifted",
                                                  b + self._k.astype(b.dtype)),
            node.inputs[3], node.inputs[4], **node.attributes)


# GELU as the standard op (opset >= 20). The patterns are onnxscript's (its ORT fusions emit the
# com.microsoft contrib op instead); only the replacement differs.

def _standard_gelu(op, x):
    """``0.5 * x * (1 + erf(x / sqrt(2))) -> Gelu(x)`` (the exact, erf form)."""
    return op.Gelu(x)


def _erf_gelu_times_inverse_sqrt2(op, x):
    return 0.5 * (x * (op.Erf(x * (1.0 / math.sqrt(2.0))) + 1.0))


class TanhGeluFusion(GeluTanhFusion):
    """``0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 x^3))) -> Gelu(x, approximate="tanh")``."""

    def rewrite(self, op, x):
        return op.Gelu(x, approximate="tanh")


def standard_gelu_rules() -> Sequence[pattern.RewriteRule]:
    """GELU written out in arithmetic (erf or tanh form) -> ONNX ``Gelu`` (opset 20)."""
    rules: list[pattern.RewriteRule] = []
    for target in (erf_gelu_pattern_1, erf_gelu_pattern_2, _erf_gelu_times_inverse_sqrt2):
        rules += pattern.RewriteRule(target, _standard_gelu, name="StandardGelu").commute()
    rules += TanhGeluFusion.rule().commute()
    return rules


def affine_rules() -> dict[str, Sequence[pattern.RewriteRule]]:
    """The per-channel Mul/Add folding rules by name, each in both operand orders."""
    return {
        "mul-into-conv": ConvMulFusion.rule().commute(),
        "add-into-conv": ConvAddFusion.rule().commute(),
        "mul-into-gemm": GemmMulFusion.rule().commute(),
        "add-into-gemm": GemmAddFusion.rule().commute(),
        "mul-into-matmul": MatMulMulFusion.rule().commute(),
        "mul-into-batchnorm": BatchNormMulFusion.rule().commute(),
        "add-into-batchnorm": BatchNormAddFusion.rule().commute(),
    }



# com.microsoft ops whose output is [B, S, D] whatever the value they replaced was annotated with.
_THREE_D_OUTPUTS = frozenset({"Attention", "MultiHeadAttention", "GroupQueryAttention"})


def gemm_inputs_to_2d(model: ir.Model) -> int:
    """Put back the 2-D view in front of each ``Gemm`` whose input an attention fusion made 3-D;
    returns how many.

    GPT-2's Conv1D is ``addmm`` on ``x.view(-1, D)``, and the exporter folds the heads' merge
    ``[B, S, H, Dh] -> [B, S, D]`` and that view into one Reshape to ``[B*S, D]``. onnxscript's
    MultiHeadAttention fusion takes that Reshape for the ``[B, S, D]`` one without checking its
    target ("TODO: verify Reshapes", mha.py) and hands the Gemm its 3-D output (keeping the
    stale 2-D annotation), which ONNX Runtime refuses to load. ``Reshape(., [-1, K])`` restores
    exactly what the Reshape computed.
    """
    fixed = 0
    for node in list(model.graph):
        if node.op_type != "Gemm" or node.domain not in ("", "ai.onnx"):
            continue
        a, b = node.inputs[0], node.inputs[1]
        producer = a.producer() if a is not None else None
        three_d = producer is not None and producer.domain == "com.microsoft" \
            and producer.op_type in _THREE_D_OUTPUTS
        if not three_d and (a is None or a.shape is None or a.shape.rank() == 2):
            continue
        if node.attributes.get_int("transA", 0) or b is None or b.shape is None \
                or not isinstance(b.shape[0], int) or not isinstance(b.shape[1], int):
            continue
        depth = b.shape[1] if node.attributes.get_int("transB", 0) else b.shape[0]
        if three_d:
            a.shape = None  # the annotation of the value the fusion replaced
        target = ir.Value(name=f"{node.name}_view_shape",
                          const_value=ir.tensor(np.array([-1, depth], dtype=np.int64)))
        target.shape, target.type = ir.Shape([2]), ir.TensorType(ir.DataType.INT64)
        model.graph.register_initializer(target)
        view = ir.node("Reshape", inputs=[a, target], name=f"{node.name}_view")
        view.outputs[0].name = f"{node.name}_view"
        view.outputs[0].type = a.type
        model.graph.insert_before(node, view)
        node.replace_input_with(0, view.outputs[0])
        fixed += 1
    return fixed
