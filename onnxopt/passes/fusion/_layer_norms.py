"""Keep residual LayerNorms out of ONNX Runtime's ``SkipLayerNormalization`` CPU kernel.

ORT fuses ``LayerNormalization(Add(a, b))`` over 3-D tensors into ``SkipLayerNormalization`` when
it loads a model, and its CPU kernel (onnxruntime 1.32) is slow: 0.20 ms for a [1, 128, 384]
input at 1 thread against 0.033 ms for the form below, on a quiet machine
(``benchmarks/bench_layer_norm.py``; 5.6-6.6x at hidden 256 to 1024, 3.4-5.0x at 2 threads).
Once the matrix products of MiniLM-L6 run in INT8, its 13 LayerNorms took about a quarter of
the time.

Writing the residual sum as ``Sum`` instead of ``Add`` computes the same values and is outside
that fusion (it matches ``Add`` only), so ORT runs its fast ``LayerNormalization`` kernel. A
``SkipLayerNormalization`` written by ``fuse-transformer`` becomes ``LayerNormalization(Sum(
Add(x, bias), skip))``: the bias joins the sublayer's MatMul output first, where ORT folds it
into the matrix product of a dynamically quantized model (``DynamicQuantizeMatMul`` takes a
bias). An earlier form ran the LayerNorm on a 2-D view (Reshape, LayerNormalization, Reshape
back to the Shape of the sum); this one needs none of those nodes, and MiniLM-L6's INT8 model
ran 1.5-1.8% faster with it at 1 thread and 3.7-4.6% at 2 (``benchmarks/RESULTS.md``,
"Residual LayerNorms as Sum").
``fuse-transformer`` (FP32) and the quantize pass (INT8) time the rewritten model against the
unrewritten one and keep it only when it is faster (:func:`split_layer_norms` only builds it).

Rewrites use the onnxscript rewriter; the patterns are ours because no library has this rule.
"""

from __future__ import annotations

import onnx
import onnx_ir as ir
from onnxscript.rewriter import pattern

CONTRIB = "com.microsoft"


def _only_first_output_used(node: ir.Node) -> bool:
    graph = node.graph
    return not any(out is not None and (out.uses() or (graph is not None and out in graph.outputs))
                   for out in node.outputs[1:])


def _is_rank_3(*values: ir.Value) -> bool:
    return all(v.shape is not None and v.shape.rank() == 3 for v in values)


class _SplitLayerNorm(pattern.RewriteRuleClassBase):
    """``LayerNormalization(Add(a, b))`` over the last axis of 3-D tensors ->
    ``LayerNormalization(Sum(a, b))``."""

    def pattern(self, op, a, b):
        return op.LayerNormalization(op.Add(a, b), _allow_other_inputs=True,
                                     _allow_other_attributes=True, _outputs=["normed"])

    def check(self, context, a, b, normed, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        node = normed.producer()
        if not _is_rank_3(node.inputs[0]):
            return result.fail("the sum is not known to be 3-D (ORT would not fuse it)")
        if node.attributes.get_int("axis", -1) not in (-1, 2):
            return result.fail("LayerNormalization is not over the last axis")
        if not _only_first_output_used(node):
            return result.fail("mean/inv-std outputs are used")
        return result

    def rewrite(self, op, a, b, normed, **_):
        node = normed.producer()
        attributes = {name: attr.value for name, attr in node.attributes.items()}
        return op.LayerNormalization(op.Sum(a, b), *node.inputs[1:], **attributes)


class _SplitSkipLayerNorm(pattern.RewriteRuleClassBase):
    """com.microsoft ``SkipLayerNormalization(x, skip, gamma[, beta[, bias]])`` whose extra
    outputs are unused -> ``LayerNormalization(Sum(Add(x, bias), skip), gamma, beta)``."""

    def pattern(self, op, x, skip, gamma):
        return op.SkipLayerNormalization(x, skip, gamma, _domain=CONTRIB,
                                         _allow_other_inputs=True, _allow_other_attributes=True,
                                         _outputs=["normed"])

    def check(self, context, x, skip, gamma, normed, **_) -> pattern.MatchResult:
        result = pattern.MatchResult()
        if not _is_rank_3(x, skip):
            return result.fail("input or skip is not known to be 3-D")
        if not _only_first_output_used(normed.producer()):
            return result.fail("mean/inv-std/sum outputs are used")
        return result

    def rewrite(self, op, x, skip, gamma, normed, **_):
        node = normed.producer()
        beta = node.inputs[3] if len(node.inputs) > 3 else None
        bias = node.inputs[4] if len(node.inputs) > 4 else None
        if _made_by_matmul(skip) and not _made_by_matmul(x):
            x, skip = skip, x  # the bias goes on the sublayer's output, where ORT can fold it
        if bias is not None:
            x = op.Add(x, bias)
        return op.LayerNormalization(op.Sum(x, skip), gamma, *([] if beta is None else [beta]),
                                     axis=-1, epsilon=node.attributes.get_float("epsilon", 1e-12))


def _made_by_matmul(value: ir.Value) -> bool:
    producer = value.producer()
    return producer is not None and producer.op_type == "MatMul"


def split_layer_norm_rules() -> pattern.RewriteRuleSet:
    """The rules: ``LayerNormalization(Add)`` and ``SkipLayerNormalization`` -> the Sum form."""
    return pattern.RewriteRuleSet([_SplitLayerNorm.rule(), _SplitSkipLayerNorm.rule()])


def split_layer_norms(proto: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """``proto`` with its residual LayerNorms in the Sum form, and how many were rewritten."""
    model = ir.serde.deserialize_model(proto)
    count = split_layer_norm_rules().apply_to_model(model)
    return ir.serde.serialize_model(model), count
