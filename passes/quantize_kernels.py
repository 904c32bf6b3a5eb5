"""Keep residual LayerNorms out of ONNX Runtime's ``SkipLayerNormalization`` CPU kernel.

ORT fuses ``LayerNormalization(Add(a, b))`` over 3-D tensors into ``SkipLayerNormalization`` when
it loads a model, and its CPU kernel (onnxruntime 1.32) is slow: 0.20 ms for a [1, 128, 384]
input at 1 thread against 0.035 ms for the 2-D ``LayerNormalization`` below, on a quiet machine
(``benchmarks/bench_layer_norm.py``; 5-6x at hidden 256 to 1024, about 2x at 2 threads). Once the
matrix products of MiniLM-L6 run in INT8, its 13 LayerNorms took about a quarter of the time.

Running the sum and the LayerNorm on the tensor flattened to 2-D (``[-1, hidden]``, then back
with the original shape) computes the same values and is outside that fusion (it matches 3-D
``Add`` inputs only), so ORT runs its fast ``LayerNormalization`` kernel. The same applies to a
``SkipLayerNormalization`` written by ``fuse-transformer``. ``fuse-transformer`` (FP32) and the
quantize pass (INT8) time the rewritten model against the unrewritten one and keep it only when
it is faster (:func:`flatten_layer_norms` only builds it).

Rewrites use the onnxscript rewriter; the patterns are ours because no library has this rule.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnxscript.rewriter import pattern

from onnxopt.passes.fusion_rules import constant_array

CONTRIB = "com.microsoft"


def _hidden_size(scale: ir.Value) -> int | None:
    array = constant_array(scale)
    return int(array.shape[0]) if array is not None and array.ndim == 1 else None


def _normalize_flat(op, summed: ir.Value, hidden: int, epsilon: float, scale: ir.Value,
                    bias: ir.Value | None) -> ir.Value:
    """``LayerNormalization`` of ``summed`` over its last axis, computed on a 2-D view."""
    flat = op.Reshape(summed, op.Constant(value=ir.tensor(np.array([-1, hidden], np.int64))))
    inputs = [flat, scale] + ([bias] if bias is not None else [])
    normed = op.LayerNormalization(*inputs, axis=-1, epsilon=epsilon)
    return op.Reshape(normed, op.Shape(summed))


def _only_first_output_used(node: ir.Node) -> bool:
    graph = node.graph
    return not any(out is not None and (out.uses() or (graph is not None and out in graph.outputs))
                   for out in node.outputs[1:])


class _FlatLayerNorm(pattern.RewriteRuleClassBase):
    """``LayerNormalization(Add(a, b))`` over the last axis of 3-D tensors -> the 2-D form."""

    def pattern(self, op, a, b, scale):
        return op.LayerNormalization(op.Add(a, b), scale, _allow_other_inputs=True,
                                     _allow_other_attributes=True, _outputs=["normed"])

    def check(self, context, a, b, scale, normed, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        node = normed.producer()
        summed = node.inputs[0]
        if summed.shape is None or summed.shape.rank() != 3:
            return result.fail("the sum is not known to be 3-D (ORT would not fuse it)")
        if node.attributes.get_int("axis", -1) not in (-1, 2):
            return result.fail("LayerNormalization is not over the last axis")
        if _hidden_size(scale) is None or (len(node.inputs) > 2 and node.inputs[2] is not None
                                            and constant_array(node.inputs[2]) is None):
            return result.fail("scale/bias are not constant vectors")
        if not _only_first_output_used(node):
            return result.fail("mean/inv-std outputs are used")
        return result

    def rewrite(self, op, a, b, scale, normed, **_):
        node = normed.producer()
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        return _normalize_flat(op, op.Add(a, b), _hidden_size(scale),
                               node.attributes.get_float("epsilon", 1e-5), scale, bias)


class _FlatSkipLayerNorm(pattern.RewriteRuleClassBase):
    """com.microsoft ``SkipLayerNormalization(x, skip, gamma[, beta[, bias]])`` whose extra
    outputs are unused -> ``Add`` (and the bias ``Add``) plus the 2-D ``LayerNormalization``."""

    def pattern(self, op, x, skip, gamma):
        return op.SkipLayerNormalization(x, skip, gamma, _domain=CONTRIB,
                                         _allow_other_inputs=True, _allow_other_attributes=True,
                                         _outputs=["normed"])

    def check(self, context, x, skip, gamma, normed, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        node = normed.producer()
        if x.shape is None or skip.shape is None or x.shape.rank() != 3 or skip.shape.rank() != 3:
            return result.fail("input or skip is not known to be 3-D")
        if _hidden_size(gamma) is None or any(
                v is not None and constant_array(v) is None for v in node.inputs[3:5]):
            return result.fail("gamma/beta/bias are not constant vectors")
        if not _only_first_output_used(node):
            return result.fail("mean/inv-std/sum outputs are used")
        return result

    def rewrite(self, op, x, skip, gamma, normed, **_):
        node = normed.producer()
        beta = node.inputs[3] if len(node.inputs) > 3 else None
        bias = node.inputs[4] if len(node.inputs) > 4 else None
        summed = op.Add(x, skip)
        if bias is not None:
            summed = op.Add(summed, bias)
        return _normalize_flat(op, summed, _hidden_size(gamma),
                               node.attributes.get_float("epsilon", 1e-12), gamma, beta)


def flat_layer_norm_rules() -> pattern.RewriteRuleSet:
    """The rules: ``LayerNormalization(Add)`` and ``SkipLayerNormalization`` -> the 2-D form."""
    return pattern.RewriteRuleSet([_FlatLayerNorm.rule(), _FlatSkipLayerNorm.rule()])


def flatten_layer_norms(proto: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """``proto`` with its residual LayerNorms in 2-D form, and how many were rewritten."""
    model = ir.serde.deserialize_model(proto)
    count = flat_layer_norm_rules().apply_to_model(model)
    return ir.serde.serialize_model(model), count
