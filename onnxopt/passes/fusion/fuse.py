"""``fuse``: portable operator fusion (standard ONNX ops only; runs on any ONNX runtime).

A table of named onnxscript rewrite rules, applied until nothing more matches. Most rules are
onnxscript's own (BatchNorm folding, MatMul+Add -> Gemm, Pad -> Conv, Relu/Clip/Min/Max merging,
Transpose/Reshape collapsing, LayerNormalization, HardSwish); ``onnxopt.passes.fusion._rules`` adds what it lacks
(per-channel Mul/Add folding, standard ``Gelu``). Rules that need a newer opset than the model's
are left out rather than upgrading the model behind the user's back.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import onnx_ir as ir
import onnx_ir.passes.common as common
from onnxscript.rewriter import pattern
from onnxscript.rewriter.rules import common as rules
from onnxscript.rewriter.rules.common import _fuse_batchnorm, _fuse_relus_clips, _min_max_to_clip
from onnxscript.rewriter.rules.common._matmul_add_to_gemm import (
    MatMulAddToGemm,
    TransABMatMulAddToGemm,
    TransAMatMulAddToGemm,
    TransBMatMulAddToGemm,
)
from onnxscript.rewriter.rules.fusion._layer_norm import layer_normalization_rules

from onnxopt.errors import InputError
from onnxopt.passes.fusion._rules import affine_rules, constant_array, standard_gelu_rules
from onnxopt.registry import OptPass, option, register

NamedRules = list[tuple[str, Sequence[pattern.RewriteRule]]]

# Producers a BatchNormalization can be folded into (the pass's postcondition).
FOLDABLE_INTO = ("Conv", "ConvTranspose", "Gemm")


def _inference_only(cls: type) -> type:
    """onnxscript's BatchNorm folding, refusing training-mode BatchNorms (batch statistics)."""

    def check(self, context, x, inbound_out, batchnorm_out):
        node = batchnorm_out.producer()
        if node.attributes.get_int("training_mode", 0) != 0 or len(node.outputs) != 1:
            return pattern.MatchResult().fail("BatchNormalization is in training mode")
        return cls.check(self, context, x, inbound_out, batchnorm_out)

    return type(cls.__name__, (cls,), {"check": check})


def _bias_is_per_column(cls: type) -> type:
    """onnxscript's MatMul+Add -> Gemm, only when the Add operand is a bias Gemm can take.

    Gemm broadcasts ``C`` to ``[M, N]`` one way only; a rank-3 or row-shaped addend would change
    the output's shape or meaning, so only scalars, ``[N]`` and ``[1, N]`` constants qualify.
    """

    def check(self, context, input_a, input_b, input_c=None, **kwargs):
        result = cls.check(self, context, input_a, input_b, **kwargs)
        if not result:
            return result
        c = constant_array(input_c)
        if c is None or c.ndim > 2 or (c.ndim == 2 and c.shape[0] != 1):
            return result.fail("the added operand is not a constant per-column bias", input_c)
        return result

    return type(cls.__name__, (cls,), {"check": check})


def rule_table(opset: int) -> NamedRules:
    """The rules ``fuse`` applies, by name, for a model of default-domain ``opset``."""
    table: NamedRules = [
        ("explicit-conv-pads", [rules.normalize_pad_format_conv_rule]),
        ("pad-into-conv", [rules.fuse_pad_into_conv_rule]),
        ("batchnorm-into-conv", [_inference_only(_fuse_batchnorm.FuseBatchNormIntoConv).rule()]),
        ("batchnorm-into-conv-transpose",
         [_inference_only(_fuse_batchnorm.FuseBatchNormIntoConvTranspose).rule()]),
        ("batchnorm-into-gemm", [_inference_only(_fuse_batchnorm.FuseBatchNormIntoGemm).rule()]),
        *affine_rules().items(),
        ("scalar-affine-into-conv", [rules.affine_conv_fusion_rule]),
        ("matmul-add-to-gemm", [_bias_is_per_column(c).rule() for c in (
            TransABMatMulAddToGemm, TransAMatMulAddToGemm, TransBMatMulAddToGemm,
            MatMulAddToGemm)]),
        ("relu-clip-merge", list(_fuse_relus_clips.rules)),
        ("min-max-to-clip", list(_min_max_to_clip.rules)),
        ("transpose-transpose", [rules.transpose_transpose_rule]),
        ("identity-transpose", [rules.no_op_transpose_rule]),
        ("reshape-reshape", [rules.reshape_reshape_rule]),
        ("unsqueeze-unsqueeze", [rules.unsqueeze_unsqueeze_rule]),
        ("no-op-cast", [rules.no_op_cast_rule]),
        ("no-op-expand", [rules.no_op_expand_rule]),
        ("zero-bias", [rules.remove_optional_bias_from_conv_rule,
                       rules.remove_optional_bias_from_conv_transpose_rule,
                       rules.remove_optional_bias_from_gemm_rule]),
    ]
    if opset >= 14:
        table.append(("hardswish", list(rules.fuse_hardswish_rules())))
    if opset >= 17:
        table.append(("layer-normalization", list(layer_normalization_rules)))
    if opset >= 20:
        table.append(("gelu", list(standard_gelu_rules())))
    return table


def apply_rules(model: ir.Model, table: NamedRules, max_rounds: int) -> dict[str, int]:
    """Apply each named rule group in turn, sweeping until a sweep matches nothing.

    Groups are applied one at a time (not as one rule set) so the report can say how often each
    fired; a later group can enable an earlier one, hence the sweeps.
    """
    counts = {name: 0 for name, _ in table}
    for _ in range(max_rounds):
        fired = 0
        for name, group in table:
            n = pattern.RewriteRuleSet(list(group)).apply_to_model(model)
            counts[name] += n
            fired += n
        if not fired:
            break
    return counts


def unfolded_batchnorms(model: ir.Model) -> list[tuple[str, str]]:
    """(node, reason) for each BatchNorm that directly follows a Conv/ConvTranspose/Gemm."""
    kept = []
    for node in model.graph.all_nodes():
        if node.op_type != "BatchNormalization" or node.domain not in ("", "ai.onnx"):
            continue
        producer = node.inputs[0].producer() if node.inputs[0] is not None else None
        if producer is None or producer.op_type not in FOLDABLE_INTO:
            continue
        kept.append((node.name or "?", _why_not_foldable(producer, node)))
    return kept


def _why_not_foldable(producer: ir.Node, bn: ir.Node) -> str:
    """Why BatchNorm folding cannot apply here; empty when it could have (a bug)."""
    if bn.attributes.get_int("training_mode", 0) != 0 or len(bn.outputs) != 1:
        return "training-mode BatchNormalization"
    if len(producer.outputs[0].uses()) > 1 or producer.outputs[0] in producer.graph.outputs:
        return f"the {producer.op_type} output is used elsewhere too"
    params = [v for v in (*producer.inputs[1:], *bn.inputs[1:]) if v is not None]
    if any(constant_array(v) is None for v in params):
        return "weights or statistics are not constant"
    if not all(v.is_initializer() for v in params):
        return "weights or statistics are Constant nodes, not initializers"
    return ""


@dataclasses.dataclass
class FuseConfig:
    skip: list[str] = option(
        [], "Rule names not to apply (the report's notes list them, e.g. 'matmul-add-to-gemm').")
    max_rounds: int = option(8, "Most sweeps over the rule table (stops when one changes nothing).",
                             min=1)


@register
class FusePass(OptPass):
    name = "fuse"
    summary = ("Fold BatchNorm and per-channel Mul/Add into Conv/Gemm, MatMul+Add -> Gemm, Pad -> "
               "Conv, merge Relu/Clip/Min/Max, collapse Transpose/Reshape pairs, LayerNorm, GELU.")
    Config = FuseConfig

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        cfg: FuseConfig = self.config
        opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 1))
        every_rule = [name for name, _ in rule_table(opset=99)]
        unknown = sorted(set(cfg.skip) - set(every_rule))
        if unknown:
            raise InputError(f"pass 'fuse': unknown rule(s) in skip: {', '.join(unknown)} "
                             f"(rules: {', '.join(every_rule)})")
        table = [(n, r) for n, r in rule_table(opset) if n not in set(cfg.skip)]
        # onnxscript's BatchNorm folding wants weights as initializers, not Constant nodes (the
        # cleanup pass leaves small ones as nodes).
        lifted = common.LiftConstantsToInitializersPass(size_limit=1)(model).modified
        # Ranks let the BatchNorm and MatMul rules check broadcasting; inference failures are
        # tolerated (the pass then folds what it can prove without shapes).
        common.ShapeInferencePass(strict_mode=False)(model)
        counts = apply_rules(model, table, cfg.max_rounds)
        fired = {name: n for name, n in counts.items() if n}
        if fired:
            common.RemoveUnusedNodesPass()(model)
            common.RemoveUnusedOpsetsPass()(model)
        self.notes = {
            "rules_fired": fired,
            "rules_available": [name for name, _ in table],
            "batchnorms_kept": [f"{n}: {why}" for n, why in unfolded_batchnorms(model)],
        }
        return ir.passes.PassResult(model, bool(fired) or lifted)

    def ensures(self, model: ir.Model) -> None:
        if any(name.startswith("batchnorm-into-") for name in self.config.skip):
            return
        missed = [name for name, why in unfolded_batchnorms(model) if not why]
        if missed:
            raise ir.passes.PostconditionError(
                f"BatchNormalization still follows a foldable Conv/Gemm: {', '.join(missed[:5])}")
