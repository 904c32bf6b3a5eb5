"""``prune-channels``: structured pruning of an ONNX graph, so it gets smaller dense tensors.

Whole channels (Conv), hidden neurons (Gemm/MatMul chains, transformer FFNs) and attention heads
are removed, with every tensor slice that depends on them: the graph stays dense, only narrower,
so MACs and latency really drop (unlike unstructured sparsity).

Why by hand: no library prunes channels on ONNX graphs. Torch-Pruning (DepGraph) does this for
PyTorch modules only; here the same idea runs on the graph's use-def chains
(:mod:`onnxopt.passes.channel_groups`). Steps:

1. dependency groups: which slices must go together; anything unproved blocks its group;
2. importance of each unit (channel, neuron, head): the L1 or L2 norm of all its weight slices,
   each weight tensor normalized by its mean so layers weigh alike, summed over the group; or,
   with calibration data, what the unit adds to its consumers' outputs
   (:mod:`onnxopt.passes.channel_importance`);
3. selection: the lowest ``ratio`` of units per group (or globally), kept counts rounded up to a
   multiple of ``round_to`` for SIMD-friendly shapes; protected layers keep their groups whole;
4. surgery (:mod:`onnxopt.passes.channel_surgery`), then recovery without retraining
   (:mod:`onnxopt.passes.channel_reconstruction`): each consumer layer is refitted by least
   squares on calibration activations and BatchNorm moments are re-estimated.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
from collections.abc import Callable
from typing import Any, Literal

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common

from onnxopt.metrics import Budget
from onnxopt.passes.channel_groups import ChannelGraph, ChannelGroup, Key, Unit, analyze_channels
from onnxopt.passes.channel_rules import add_initializer
from onnxopt.passes.channel_importance import (activation_importance, channel_rms, consumer_inputs,
                                               dense_consumer, gram_matrices, reconstruction_order,
                                               weight_importance)
from onnxopt.passes.channel_reconstruction import Reconstruction
from onnxopt.passes.channel_surgery import kept_indices, remove_units, removed_atoms
from onnxopt.recipes import register_recipe
from onnxopt.registry import OptPass, option, register
from onnxopt.stats import node_macs

KINDS = ("channels", "neurons", "heads")


@dataclasses.dataclass
class PruneChannelsConfig:
    ratio: float = option(0.5, "Fraction of each group's units (channels, neurons, heads) removed.")
    scope: Literal["per-group", "global"] = option(
        "per-group", "'per-group': every group loses `ratio`; 'global': the lowest-ranked `ratio` "
        "of all units (importance normalized per group), so groups lose different amounts.")
    importance: Literal["l1", "l2", "activation", "reconstruction"] = option(
        "l2", "'l1'/'l2': norm of a unit's weight slices, summed over its group; 'activation': "
        "what it adds to its consumers' outputs on calibration data (||W[:, c]|| * rms(x_c)); "
        "'reconstruction': greedy removal order by output error after least-squares "
        "compensation (dense consumers; else 'activation').")
    round_to: int = option(
        8, "Round kept channel counts up to a multiple of this (1: exact ratio).")
    kinds: list[str] = option(
        list(KINDS), "Groups to prune: channels (Conv), neurons (Gemm/MatMul), heads.")
    protect: list[str] = option(
        [], "Glob patterns of node or weight names whose groups stay whole.")
    include: list[str] = option(
        [], "If given, only groups with a node or weight matching one of these.")
    reconstruct: bool = option(
        True, "Refit consumer layers by least squares on calibration data.")
    recalibrate_bn: bool = option(
        True, "Re-estimate BatchNorm statistics downstream of refitted layers.")
    samples: int = option(8192, "Calibration rows (positions or tokens) per refitted layer.")
    ridge: float = option(1e-3, "Ridge strength, relative to the mean input energy of a layer.")
    min_cosine: float = option(
        0.9, "Budget: cosine of each output vs the unpruned model; 0 disables the check.")

    def __post_init__(self) -> None:
        if not 0.0 <= self.ratio < 1.0:
            raise ValueError(f"ratio must be in [0, 1), got {self.ratio}")
        if self.round_to < 1:
            raise ValueError(f"round_to must be at least 1, got {self.round_to}")
        unknown = sorted(set(self.kinds) - set(KINDS))
        if unknown:
            raise ValueError(f"unknown kinds {unknown} (known: {', '.join(KINDS)})")
        if self.samples < 1:
            raise ValueError("samples must be positive")


@register
class PruneChannelsPass(OptPass):
    name = "prune-channels"
    summary = ("Remove whole channels, neurons and attention heads by dependency groups; refit "
               "consumers by least squares on calibration data.")
    Config = PruneChannelsConfig

    def budget(self) -> Budget:
        if self.config.min_cosine <= 0:
            # Opted out by the user: the accuracy evaluation that follows judges the result.
            return Budget("none")
        return Budget("cosine", min_value=self.config.min_cosine)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        cfg: PruneChannelsConfig = self.config
        _prepare(model)
        channels = analyze_channels(model.graph, model.opset_imports.get("", 17))
        plan, group_notes = _select(channels, cfg, self._scorer(model, channels))
        self.notes.update(groups=group_notes, ratio=cfg.ratio, scope=cfg.scope)
        if not plan:
            _tidy(model)
            self.notes["removed_units"] = 0
            return ir.passes.PassResult(model, False)
        shapes = self._shapes()
        macs_before = _total_macs(model, shapes)
        removed = removed_atoms(plan)
        kept = kept_indices(channels, removed)
        recon = self._reconstruction(model, kept)
        if recon is not None:
            recon.record_targets()
        remove_units(channels, plan)
        if recon is not None:
            self.notes["reconstruction"] = recon.refit()
        _tidy(model)
        macs_after = _total_macs(model, shapes)
        self.notes.update(
            removed_units=len(plan), macs_before=macs_before, macs_after=macs_after,
            macs_ratio=round(macs_after / macs_before, 4) if macs_before else None)
        return ir.passes.PassResult(model, True)

    def _shapes(self) -> dict[str, list[int]] | None:
        """Input shapes to count MACs at: the verification (else calibration) batch's."""
        feeds = (self.context.verify_feeds or self.context.calibration or [None])[0]
        return None if feeds is None else {k: list(v.shape) for k, v in feeds.items()}

    def _scorer(self, model: ir.Model,
                channels: ChannelGraph) -> Callable[[ChannelGroup], np.ndarray]:
        """The importance function the config asks for (data-aware ones need calibration)."""
        cfg: PruneChannelsConfig = self.config
        norm = cfg.importance if cfg.importance in ("l1", "l2") else "l2"
        if cfg.importance in ("l1", "l2"):
            return lambda group: weight_importance(group, norm)
        if not self.context.calibration:
            self.notes["importance"] = f"l2 ({cfg.importance} importance needs calibration data)"
            return lambda group: weight_importance(group, norm)
        eligible = [g for g in channels.groups if _skip_reason(g, cfg) is None]
        inputs = {x.name: (x, axis) for g in eligible for _, x, axis in consumer_inputs(g)}
        rms = channel_rms(model, list(inputs.values()), self.context.calibration) if inputs else {}
        grams: dict[str, np.ndarray] = {}
        if cfg.importance == "reconstruction":
            dense = [d[1] for d in map(dense_consumer, eligible) if d is not None]
            grams = gram_matrices(model, [inputs[x.name] for x in dense],
                                  self.context.calibration) if dense else {}

        def score(group: ChannelGroup) -> np.ndarray:
            limit = None if cfg.scope == "global" else len(group.units) - _keep_count(
                group, int(math.floor(cfg.ratio * len(group.units))), cfg.round_to)
            scores = reconstruction_order(group, grams, cfg.ridge, limit) if grams else None
            if scores is None:
                scores = activation_importance(group, rms)
            return weight_importance(group, norm) if scores is None else scores

        return score

    def _reconstruction(self, model: ir.Model,
                        kept: dict[Key, np.ndarray]) -> Reconstruction | None:
        cfg: PruneChannelsConfig = self.config
        if not (cfg.reconstruct or cfg.recalibrate_bn):
            return None
        if not self.context.calibration:
            self.notes["reconstruction"] = "skipped: no calibration data"
            return None
        consumers = _consumers(kept) if cfg.reconstruct else []
        batchnorms = _batchnorms_downstream(model.graph, [n for n, _ in consumers], kept) \
            if cfg.recalibrate_bn else []
        if not consumers and not batchnorms:
            return None
        return Reconstruction(model, consumers, batchnorms, self.context.calibration,
                              samples=cfg.samples, ridge=cfg.ridge, seed=self.context.seed)


def _prepare(model: ir.Model) -> None:
    """Constants as initializers, every node named, shapes inferred, small shared constants
    (biases, BN parameters shared by de-duplication) given one copy per user."""
    ir.passes.PassManager([
        common.LiftConstantsToInitializersPass(lift_all_constants=False, size_limit=0),
        common.NameFixPass(),
        common.ShapeInferencePass(),
    ])(model)
    graph = model.graph
    for value in list(graph.initializers.values()):
        if value.const_value is None or len(value.shape or ()) != 1 or value.is_graph_input():
            continue
        users = list(value.uses())
        for use in users[1:]:
            copy = add_initializer(graph, f"{value.name}_{use.node.name}",
                                   value.const_value.numpy().copy())
            use.node.replace_input_with(use.idx, copy)


def _total_macs(model: ir.Model, shapes: dict[str, list[int]] | None) -> int:
    return sum(m for m in node_macs(model, shapes).values() if m)


def _tidy(model: ir.Model) -> None:
    """Re-share the copies :func:`_prepare` made and drop what surgery left unused."""
    ir.passes.PassManager([
        common.DeduplicateInitializersPass(), common.RemoveUnusedNodesPass()])(model)


# ----------------------------------------------------------------------------------------------
# Importance and selection


def _skip_reason(group: ChannelGroup, cfg: PruneChannelsConfig) -> str | None:
    names = group.node_names + [k[0].name or "" for k in group.weight_keys]
    if not group.weight_keys:
        return "no weights"
    if not group.prunable_units:
        return "blocked: " + "; ".join(group.blocked_reasons[:3])
    if group.kind not in cfg.kinds:
        return f"kind '{group.kind}' not selected"
    if cfg.protect and any(fnmatch.fnmatchcase(n, p) for n in names for p in cfg.protect):
        return "protected"
    if cfg.include and not any(fnmatch.fnmatchcase(n, p) for n in names for p in cfg.include):
        return "not included"
    return None


def _keep_count(group: ChannelGroup, remove: int, round_to: int) -> int:
    """Units kept: rounded up to ``round_to`` for single-channel units, never below what is
    blocked, never zero."""
    total = len(group.units)
    keep = total - remove
    if round_to > 1 and group.unit_width == 1 and total > round_to:
        keep = min(total, math.ceil(keep / round_to) * round_to)
    blocked = total - len(group.prunable_units)
    return max(keep, blocked, 1)


def _select(channels: ChannelGraph, cfg: PruneChannelsConfig,
            score: Callable[[ChannelGroup], np.ndarray]) -> tuple[list[Unit], list[dict[str, Any]]]:
    """The units to remove, and one note per group."""
    notes: list[dict[str, Any]] = []
    eligible: list[tuple[ChannelGroup, np.ndarray]] = []
    for group in channels.groups:
        reason = _skip_reason(group, cfg)
        if reason is None:
            eligible.append((group, score(group)))
        else:
            notes.append(_group_note(group, len(group.units), reason))
    if cfg.scope == "global" and eligible:
        pooled = [(s / max(scores.mean(), 1e-30), gi, ui)
                  for gi, (group, scores) in enumerate(eligible)
                  for ui, (s, unit) in enumerate(zip(scores, group.units)) if not unit.blocked]
        pooled.sort()
        quota = int(math.floor(cfg.ratio * sum(len(g.units) for g, _ in eligible)))
        wanted = [0] * len(eligible)
        for _, gi, _ in pooled[:quota]:
            wanted[gi] += 1
    else:
        wanted = [int(math.floor(cfg.ratio * len(g.units))) for g, _ in eligible]
    plan: list[Unit] = []
    for (group, scores), want in zip(eligible, wanted):
        keep = _keep_count(group, want, cfg.round_to)
        remove = len(group.units) - keep
        order = [i for i in np.argsort(scores, kind="stable") if not group.units[i].blocked]
        plan.extend(group.units[i] for i in order[:remove])
        notes.append(_group_note(group, keep, None))
    notes.sort(key=lambda n: n["index"])
    return plan, notes


def _group_note(group: ChannelGroup, kept: int, skipped: str | None) -> dict[str, Any]:
    note: dict[str, Any] = {"index": group.index, "group": group.describe(), "kind": group.kind,
                            "units": len(group.units), "kept": kept}
    if group.unit_width > 1:
        note["unit_width"] = group.unit_width
    if skipped:
        note["skipped"] = skipped
    return note


# ----------------------------------------------------------------------------------------------
# What reconstruction needs to know about the plan


def _consumers(kept: dict[Key, np.ndarray]) -> list[tuple[ir.Node, np.ndarray | None]]:
    """Layers that lost input channels, with the original output channels they keep."""
    found: dict[int, tuple[ir.Node, np.ndarray | None]] = {}
    for value, axis in kept:
        if value.const_value is None:
            continue
        for use in value.uses():
            node = use.node
            if use.idx != 1 or not _is_input_axis(node, value, axis):
                continue
            out = node.outputs[0]
            out_axis = 1 if node.op_type in ("Conv", "Gemm") else len(out.shape or (0,)) - 1
            found[id(node)] = (node, kept.get((out, out_axis)))
    return list(found.values())


def _is_input_axis(node: ir.Node, weight: ir.Value, axis: int) -> bool:
    """Whether ``axis`` of ``weight`` is the input-feature axis of ``node``."""
    if node.op_type == "Conv":
        return axis == 1 and node.attributes.get_int("group", 1) == 1
    if node.op_type == "Gemm":
        return axis == (1 if node.attributes.get_int("transB", 0) else 0)
    if node.op_type == "MatMul":
        return len(weight.shape) == 2 and axis == 0
    return False


def _batchnorms_downstream(graph: ir.Graph, consumers: list[ir.Node],
                           kept: dict[Key, np.ndarray]) -> list[tuple[ir.Node, np.ndarray | None]]:
    """BatchNormalizations whose input changes when the consumers are refitted."""
    changed = {id(o) for n in consumers for o in n.outputs}
    found = []
    for node in graph:
        if any(v is not None and id(v) in changed for v in node.inputs):
            changed.update(id(o) for o in node.outputs)
            if node.op_type == "BatchNormalization":
                found.append((node, kept.get((node.inputs[0], 1))))
    return found


register_recipe("prune-channels", ["cleanup", "fuse", "prune-channels"])
