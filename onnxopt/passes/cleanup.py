"""``cleanup``: the semantics-preserving tidy-up every recipe starts with.

Composed entirely of existing passes (onnx_ir's and onnxscript's), in the order onnxscript's own
optimizer uses, minus its fusion rules (those belong to the ``fuse`` pass):
inline functions -> fold constants (Dropout/Identity/no-op arithmetic go too) -> drop unused
nodes -> lift constants to initializers -> share identical initializers -> common subexpressions.
"""

from __future__ import annotations

import dataclasses

import onnx_ir as ir
import onnx_ir.passes.common as common
from onnxscript import rewriter
from onnxscript.optimizer._constant_folding import FoldConstantsPass
from onnxscript.rewriter.rules.common import _no_op

from onnxopt.registry import OptPass, option, register


class ScopedIdentityElimination(common.IdentityEliminationPass):
    """onnx_ir's Identity elimination, except where a subgraph returns an outer-scope value
    through an Identity: eliminating it renames the outer value and makes it that subgraph's
    output, and a second branch returning the same value then fails ("already an output of a
    different graph"; onnx_ir 1.1.0, silero-vad's nested Ifs). Such an Identity stays."""

    def _try_eliminate_identity_node(self, node: ir.Node) -> bool:
        source = node.inputs[0] if len(node.inputs) == 1 else None
        if (node.op_type == "Identity" and source is not None and len(node.outputs) == 1
                and node.outputs[0].is_graph_output() and source.graph is not node.graph):
            return False
        return super()._try_eliminate_identity_node(node)


@dataclasses.dataclass
class CleanupConfig:
    fold_constants: bool = option(True, "Evaluate nodes whose inputs are all constant.")
    fold_size_limit: int = option(
        1 << 20, "Largest tensor (elements) constant folding may create; bigger ones stay computed.")
    deduplicate: bool = option(True, "Share byte-identical initializers (exact weight sharing).")
    cse: bool = option(True, "Merge identical nodes with identical inputs (common subexpressions).")


@register
class CleanupPass(OptPass):
    name = "cleanup"
    summary = "Fold constants; remove unused, Identity and Dropout nodes; share identical weights; CSE."
    Config = CleanupConfig

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        cfg: CleanupConfig = self.config
        steps: list[ir.passes.PassBase] = [common.InlinePass()]
        if cfg.fold_constants:
            steps.append(FoldConstantsPass(
                shape_inference=True, input_size_limit=cfg.fold_size_limit,
                output_size_limit=cfg.fold_size_limit))
        steps += [
            rewriter.RewritePass(_no_op.rules),
            ScopedIdentityElimination(),
            common.RemoveUnusedNodesPass(),
            common.RemoveUnusedFunctionsPass(),
            common.LiftConstantsToInitializersPass(lift_all_constants=False, size_limit=16),
        ]
        if cfg.deduplicate:
            steps.append(common.DeduplicateInitializersPass())
        if cfg.cse:
            steps.append(common.CommonSubexpressionEliminationPass())
        steps += [common.RemoveUnusedNodesPass(), common.RemoveUnusedOpsetsPass()]
        manager = ir.passes.PassManager(steps, steps=2, early_stop=True)
        result = manager(model)
        return ir.passes.PassResult(model, result.modified)
