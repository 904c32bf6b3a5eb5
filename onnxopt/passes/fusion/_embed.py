"""BERT's embedding block -> ONNX Runtime's ``EmbedLayerNormalization`` (com.microsoft).

onnxscript's ORT fusions cover attention, skip-LayerNorm and GELU but not the embeddings, and
ORT's own transformers optimizer fused no EmbedLayerNormalization on the dynamo export of
MiniLM-L6 (``benchmarks/bench_fusion.py`` runs it as a peer). This rule is written for what the
dynamo exporter emits for ``BertEmbeddings``::

    LayerNorm(Gather(W, ids) + Gather(T, seg) + Gather(P, Slice(arange(max_len), 0, S)))
      -> EmbedLayerNormalization(int32(ids), int32(seg), W, P, T, gamma, beta)

The contrib op looks position ``s`` up as row ``s`` of ``P`` when no position ids are given, which
is what slicing ``arange`` from 0 to the sequence length means. Its id inputs must be int32
(token ids of vocabularies below 2**31 convert exactly).
"""

from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter import pattern

from onnxopt.passes.fusion._rules import constant_array

CONTRIB = "com.microsoft"


class _EmbedLayerNormBase(pattern.RewriteRuleClassBase):
    """Checks shared by the variants with and without token-type (segment) embeddings."""

    def _check_common(self, context, input_ids: ir.Value, tables: list[ir.Value],
                      position_ids: ir.Value, starts: ir.Value, ends: ir.Value, gamma: ir.Value,
                      beta: ir.Value, normed: ir.Value) -> pattern.MatchResult:
        result = pattern.MatchResult()
        for node in context.nodes:
            if node.op_type == "Gather" and node.attributes.get_int("axis", 0) != 0:
                return result.fail("a Gather is not a row lookup (axis != 0)")
            if node.op_type == "Slice" and not _slices_last_axis_by_one(node):
                return result.fail("positions are not sliced along their last axis in steps of 1")
        for table in tables:
            array = constant_array(table)
            if array is None or array.ndim != 2:
                return result.fail("an embedding table is not a constant matrix", table)
        if input_ids.dtype not in (ir.DataType.INT32, ir.DataType.INT64):
            return result.fail("token ids are not int32/int64", input_ids)
        positions = constant_array(position_ids)
        if positions is None or positions.reshape(-1).tolist() != list(range(positions.size)):
            return result.fail("position ids are not a constant arange", position_ids)
        start = constant_array(starts)
        if start is None or start.reshape(-1).tolist() != [0]:
            return result.fail("positions are not sliced from 0", starts)
        if not _is_sequence_length(ends, input_ids):
            return result.fail("positions are not sliced to the sequence length", ends)
        norm = normed.producer()
        rank = norm.inputs[0].shape.rank() if norm.inputs[0].shape is not None else 3
        if norm.attributes.get_int("axis", -1) not in (-1, rank - 1):
            return result.fail("LayerNormalization is not over the last axis")
        if any(constant_array(v) is None for v in (gamma, beta)):
            return result.fail("LayerNormalization scale/bias are not constant")
        if any(out.uses() or out in out.graph.outputs for out in norm.outputs[1:]
               if out is not None and out.graph is not None):
            return result.fail("LayerNormalization mean/inv-std outputs are used")
        self._epsilon = norm.attributes.get_float("epsilon", 1e-5)
        return result

    @staticmethod
    def _int32(op, ids: ir.Value) -> ir.Value:
        return ids if ids.dtype == ir.DataType.INT32 else op.Cast(ids, to=ir.DataType.INT32)


def _slices_last_axis_by_one(node: ir.Node) -> bool:
    """The Slice of the position ids runs along their last axis with step 1."""
    positions = constant_array(node.inputs[0])
    if positions is None:
        return False
    last = positions.ndim - 1
    axes = constant_array(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] else None
    steps = constant_array(node.inputs[4]) if len(node.inputs) > 4 and node.inputs[4] else None
    if len(node.inputs) > 3 and node.inputs[3] is not None and axes is None:
        return False
    axis = [0] if axes is None else [a % positions.ndim for a in axes.reshape(-1).tolist()]
    if axis != [last]:
        return False
    has_steps = len(node.inputs) > 4 and node.inputs[4] is not None
    return not has_steps or (steps is not None and steps.reshape(-1).tolist() == [1])


def _is_sequence_length(ends: ir.Value, input_ids: ir.Value) -> bool:
    """``ends`` is the sequence length: ``Shape(ids)[1:2]`` of a [batch, seq] id tensor, or the
    constant equal to the static sequence axis of ``input_ids``."""
    constant = constant_array(ends)
    if constant is not None:
        static = input_ids.shape[1] if input_ids.shape is not None and \
            input_ids.shape.rank() == 2 else None
        return isinstance(static, int) and constant.reshape(-1).tolist() == [static]
    node = ends.producer()
    if node is None or node.op_type != "Shape":
        return False
    source = node.inputs[0]
    rank_ok = source is not None and source.shape is not None and source.shape.rank() == 2
    return (rank_ok and node.attributes.get_int("start", 0) == 1
            and node.attributes.get_int("end", 2) == 2
            and source.dtype in (ir.DataType.INT32, ir.DataType.INT64))


class EmbedLayerNormFusion(_EmbedLayerNormBase):
    """``LayerNorm(W[ids] + T[seg] + P[0:S]) -> EmbedLayerNormalization(ids, seg, W, P, T, ..)``."""

    def __init__(self, positions_last: bool) -> None:
        super().__init__(f"EmbedLayerNorm{'PositionsLast' if positions_last else 'SegmentLast'}")
        self._positions_last = positions_last

    def pattern(self, op, input_ids, segment_ids, word_table, segment_table, position_table,
                position_ids, starts, ends, gamma, beta):
        word = op.Gather(word_table, input_ids)
        segment = op.Gather(segment_table, segment_ids)
        positions = op.Gather(position_table, op.Slice(position_ids, starts, ends,
                                                       _allow_other_inputs=True))
        total = (word + segment) + positions if self._positions_last else \
            (word + positions) + segment
        return op.LayerNormalization(total, gamma, beta, _allow_other_attributes=True,
                                     _outputs=["normed"])

    def check(self, context, input_ids, segment_ids, word_table, segment_table, position_table,
              position_ids, starts, ends, gamma, beta, normed, **_) -> pattern.MatchResult:
        tables = [word_table, segment_table, position_table]
        result = self._check_common(context, input_ids, tables, position_ids, starts, ends,
                                    gamma, beta, normed)
        if result and segment_ids.dtype not in (ir.DataType.INT32, ir.DataType.INT64):
            return result.fail("segment ids are not int32/int64", segment_ids)
        return result

    def rewrite(self, op, input_ids, segment_ids, word_table, segment_table, position_table,
                position_ids, starts, ends, gamma, beta, normed, **_):
        output, _mask_index = op.EmbedLayerNormalization(
            self._int32(op, input_ids), self._int32(op, segment_ids), word_table,
            position_table, segment_table, gamma, beta, epsilon=self._epsilon,
            _domain=CONTRIB, _outputs=2)
        return output


class EmbedLayerNormNoSegmentFusion(_EmbedLayerNormBase):
    """``LayerNorm(W[ids] + P[0:S]) -> EmbedLayerNormalization(ids, -, W, P, -, g, b)``."""

    def pattern(self, op, input_ids, word_table, position_table, position_ids, starts, ends,
                gamma, beta):
        word = op.Gather(word_table, input_ids)
        positions = op.Gather(position_table, op.Slice(position_ids, starts, ends,
                                                       _allow_other_inputs=True))
        return op.LayerNormalization(word + positions, gamma, beta, _allow_other_attributes=True,
                                     _outputs=["normed"])

    def check(self, context, input_ids, word_table, position_table, position_ids, starts, ends,
              gamma, beta, normed, **_) -> pattern.MatchResult:
        return self._check_common(context, input_ids, [word_table, position_table],
                                  position_ids, starts, ends, gamma, beta, normed)

    def rewrite(self, op, input_ids, word_table, position_table, position_ids, starts, ends,
                gamma, beta, normed, **_):
        output, _mask_index = op.EmbedLayerNormalization(
            self._int32(op, input_ids), None, word_table, position_table, None, gamma, beta,
            epsilon=self._epsilon, _domain=CONTRIB, _outputs=2)
        return output


def embed_layer_norm_rules() -> pattern.RewriteRuleSet:
    """Both variants, in every operand order of the additions."""
    return pattern.RewriteRuleSet(
        [EmbedLayerNormFusion.rule(positions_last=True),
         EmbedLayerNormFusion.rule(positions_last=False), EmbedLayerNormNoSegmentFusion.rule()],
        commute=True)
