"""``prune-channels``: structured pruning of an ONNX graph, so it gets smaller dense tensors.

Whole channels (Conv), hidden neurons (Gemm/MatMul chains, transformer FFNs) and attention heads
are removed, with every tensor slice that depends on them: the graph stays dense, only narrower,
so MACs and latency really drop (unlike unstructured sparsity).

Why by hand: no library prunes channels on ONNX graphs. Torch-Pruning (DepGraph) does this for
PyTorch modules only; here the same idea runs on the graph's use-def chains
(:mod:`onnxopt.passes.prune_channels._groups`). Steps:

1. dependency groups: which slices must go together; anything unproved blocks its group;
2. importance of each unit (channel, neuron, head): the L1 or L2 norm of all its weight slices,
   each weight tensor normalized by its mean so layers weigh alike, summed over the group; or,
   with calibration data, what the unit adds to its consumers' outputs
   (:mod:`onnxopt.passes.prune_channels._importance`);
3. selection: the lowest ``ratio`` of units per group (or globally), kept counts rounded up to a
   multiple of ``round_to`` for SIMD-friendly shapes; protected layers keep their groups whole;
4. surgery (:mod:`onnxopt.passes.prune_channels._surgery`), then recovery without retraining
   (:mod:`onnxopt.passes.prune_channels._reconstruction`): each consumer layer is refitted by least
   squares on calibration activations and BatchNorm moments are re-estimated.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common

from onnxopt import runner
from onnxopt.errors import InputError
from onnxopt.evaluation import session_for
from onnxopt.feeds import Feeds, synthesize_feeds
from onnxopt.metrics import Budget, cosine_similarity
from onnxopt.passes.prune_channels._groups import ChannelGraph, ChannelGroup, Key, Unit, analyze_channels
from onnxopt.passes.prune_channels._rules import add_initializer
from onnxopt.passes.prune_channels._importance import (activation_importance, channel_rms, consumer_inputs,
                                               dense_consumer, gram_matrices, reconstruction_order,
                                               weight_importance)
from onnxopt.passes.prune_channels._reconstruction import Reconstruction
from onnxopt.passes.prune_channels._surgery import kept_indices, remove_units, removed_atoms
from onnxopt.registry import OptPass, option, register
from onnxopt.stats import node_macs

KINDS = ("channels", "neurons", "heads")
FIT_RETRIES = 3  # halvings of the ratio tried when the pruned model misses min_cosine
FIT_MARGIN = 0.25  # aim this share of (1 - min_cosine) above the floor: verification data differ
FIT_SEED = 7919  # added to the context's seed for synthesized check inputs
# A group's unit scores, and whether they are relative output errors (comparable across groups).
Scores = tuple[np.ndarray, bool]


@dataclasses.dataclass
class PruneChannelsConfig:
    ratio: float = option(0.5, "Fraction of each group's units (channels, neurons, heads) removed.",
                          max=1)
    scope: Literal["per-group", "global"] = option(
        "per-group", "'per-group': every group loses `ratio`; 'global': the lowest-ranked `ratio` "
        "of all units, so groups lose different amounts (importance normalized per group; with "
        "'reconstruction', each layer's relative output error, which compares as it is).")
    importance: Literal["l1", "l2", "activation", "reconstruction"] = option(
        "l2", "'l1'/'l2': norm of a unit's weight slices, summed over its group; 'activation': "
        "what it adds to its consumers' outputs on calibration data (||W[:, c]|| * rms(x_c)); "
        "'reconstruction': greedy removal order by output error after least-squares "
        "compensation (dense consumers; else 'activation').")
    round_to: int = option(
        8, "Round kept channel counts up to a multiple of this (1: exact ratio).", min=1)
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
    samples: int = option(8192, "Calibration rows (positions or tokens) per refitted layer.", min=1)
    ridge: float = option(1e-3, "Ridge strength, relative to the mean input energy of a layer.")
    min_cosine: float = option(
        0.9, "Budget: cosine of each output vs the unpruned model; 0 disables the check.", max=1)
    fit_budget: bool = option(
        True, "When the pruned model misses min_cosine on inputs the refit did not see (the "
        "last calibration batch, else synthesized ones), halve the ratio and retry (up to 3 "
        "times; else leave the model unpruned); the notes list every try.")

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
        result = self._call(model)
        if not result.modified:  # said on the console (the CLI prints notes["warning"])
            self.notes["warning"] = "nothing pruned: " + (
                self.notes.get("unchanged") or nothing_to_prune(self.notes.get("groups", []),
                                                                self.config))
        return result

    def _call(self, model: ir.Model) -> ir.passes.PassResult:
        cfg: PruneChannelsConfig = self.config
        _prepare(model)
        # fit: the calibration batches fitting may use (all, or all but a held-out one)
        fit: Sequence[Feeds] = self.context.calibration or ()
        source, check = ("", [])
        if cfg.min_cosine > 0 and cfg.fit_budget:
            source, check, fit = self._check_feeds(model)
        if not check:
            return ir.passes.PassResult(model, self._prune(model, cfg, self.notes, fit))
        # Budget fitting: prune a copy, measure it, halve the ratio while the cosine is short.
        # A copy, because this pass works in place and a miss must leave the model as it was.
        reference = _outputs(model, check)
        target = cfg.min_cosine + FIT_MARGIN * (1.0 - cfg.min_cosine)
        tries: list[dict[str, Any]] = []
        ratio = cfg.ratio
        for _ in range(FIT_RETRIES + 1):
            trial, notes = model.clone(), {}
            if not self._prune(trial, dataclasses.replace(cfg, ratio=ratio), notes, fit):
                break
            cosine = _worst_cosine(reference, _outputs(trial, check))
            tries.append({"ratio": ratio, "cosine": round(cosine, 6),
                          "macs_ratio": notes.get("macs_ratio")})
            if cosine >= target:
                model.graph = trial.graph
                self.notes.update(notes, fit={"target_cosine": round(target, 6),
                                              "on": source, "tries": tries})
                return ir.passes.PassResult(model, True)
            ratio /= 2
        self.notes.update(notes, removed_units=0, ratio=cfg.ratio,
                          fit={"target_cosine": round(target, 6), "on": source,
                               "tries": tries})
        if tries:
            self.notes["unchanged"] = (f"no ratio from {cfg.ratio} down to {tries[-1]['ratio']} "
                                       f"kept the output cosine >= {target:.4f}")
        _tidy(model)
        return ir.passes.PassResult(model, False)

    def _prune(self, model: ir.Model, cfg: PruneChannelsConfig, notes: dict[str, Any],
               fit: Sequence[Feeds]) -> bool:
        """Prune ``model`` (prepared) in place at ``cfg``, fitting on ``fit``; fill ``notes``;
        whether it changed."""
        channels = analyze_channels(model.graph, model.opset_imports.get("", 17))
        plan, group_notes = _select(channels, cfg, self._scorer(model, channels, cfg, notes, fit))
        notes.update(groups=group_notes, ratio=cfg.ratio, scope=cfg.scope)
        if not plan:
            _tidy(model)
            notes["removed_units"] = 0
            return False
        shapes = self._shapes(fit)
        macs_before = _total_macs(model, shapes)
        removed = removed_atoms(plan)
        kept = kept_indices(channels, removed)
        recon = self._reconstruction(model, kept, notes, fit)
        if recon is not None:
            recon.record_targets()
        remove_units(channels, plan)
        if recon is not None:
            notes["reconstruction"] = recon.refit()
        _tidy(model)
        macs_after = _total_macs(model, shapes)
        notes.update(
            removed_units=len(plan), macs_before=macs_before, macs_after=macs_after,
            macs_ratio=round(macs_after / macs_before, 4) if macs_before else None)
        return True

    def _check_feeds(self, model: ir.Model
                     ) -> tuple[str, list[dict[str, np.ndarray]], Sequence[Feeds]]:
        """Held-out inputs the budget is fitted on, what they are, and the batches left to fit.

        Never data the refit saw: a least-squares refit on one image matches that image almost
        exactly (cosine 1.0 on light densenet121, 0.77 on other inputs). With several
        calibration batches the last one is held out of fitting; with one, the check runs on
        seeded synthesized inputs (the pipeline verifies on the first calibration batch).
        """
        calibration = self.context.calibration
        if calibration and len(calibration) > 1:
            return ("last calibration batch (held out of fitting)", [calibration[-1]],
                    _Head(calibration, len(calibration) - 1))
        batch = next(iter(calibration[0].values())).shape[0] if calibration else 2
        fit = calibration or ()
        try:
            feeds = synthesize_feeds(model, batch=batch, seed=self.context.seed + FIT_SEED)
        except InputError:  # inputs with free dimensions other than the batch
            return "verification feeds", list(self.context.verify_feeds or []), fit
        return "synthesized inputs", [feeds], fit

    def _shapes(self, fit: Sequence[Feeds]) -> dict[str, list[int]] | None:
        """Input shapes to count MACs at: the verification (else calibration) batch's."""
        feeds = (self.context.verify_feeds or fit or [None])[0]
        return None if feeds is None else {k: list(v.shape) for k, v in feeds.items()}

    def _scorer(self, model: ir.Model, channels: ChannelGraph, cfg: PruneChannelsConfig,
                notes: dict[str, Any], fit: Sequence[Feeds]) -> Callable[[ChannelGroup], Scores]:
        """The importance function the config asks for (data-aware ones need calibration)."""
        norm = cfg.importance if cfg.importance in ("l1", "l2") else "l2"
        if cfg.importance in ("l1", "l2"):
            return lambda group: (weight_importance(group, norm), False)
        if not fit:
            notes["importance"] = f"l2 ({cfg.importance} importance needs calibration data)"
            return lambda group: (weight_importance(group, norm), False)
        eligible = [g for g in channels.groups if _skip_reason(g, cfg) is None]
        inputs = {x.name: (x, axis) for g in eligible for _, x, axis in consumer_inputs(g)}
        rms = channel_rms(model, list(inputs.values()), fit) if inputs else {}
        grams: dict[str, np.ndarray] = {}
        if cfg.importance == "reconstruction":
            dense = [d[1] for d in map(dense_consumer, eligible) if d is not None]
            grams = gram_matrices(model, [inputs[x.name] for x in dense],
                                  fit) if dense else {}

        def score(group: ChannelGroup) -> Scores:
            limit = None if cfg.scope == "global" else _group_removal(group, cfg)
            scores = reconstruction_order(group, grams, cfg.ridge, limit) if grams else None
            if scores is not None:
                return scores, True
            scores = activation_importance(group, rms)
            return (weight_importance(group, norm) if scores is None else scores), False

        return score

    def _reconstruction(self, model: ir.Model, kept: dict[Key, np.ndarray],
                        notes: dict[str, Any], fit: Sequence[Feeds]) -> Reconstruction | None:
        cfg: PruneChannelsConfig = self.config
        if not (cfg.reconstruct or cfg.recalibrate_bn):
            return None
        if not fit:
            notes["reconstruction"] = "skipped: no calibration data"
            return None
        consumers = _consumers(kept) if cfg.reconstruct else []
        batchnorms = _batchnorms_downstream(model.graph, [n for n, _ in consumers], kept) \
            if cfg.recalibrate_bn else []
        if not consumers and not batchnorms:
            return None
        return Reconstruction(model, consumers, batchnorms, fit,
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


class _Head(Sequence[Feeds]):
    """The first ``n`` batches of a calibration sequence, without loading them (it may stream
    from disk)."""

    def __init__(self, batches: Sequence[Feeds], n: int) -> None:
        self.batches, self.n = batches, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Feeds:  # type: ignore[override]
        if not -self.n <= i < self.n:
            raise IndexError(i)
        return self.batches[i % self.n]


def _outputs(model: ir.Model, feeds: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
    session = session_for(model, opt_level="basic")
    return [runner.run(session, f) for f in feeds]


def _worst_cosine(reference: list[dict[str, np.ndarray]],
                  outputs: list[dict[str, np.ndarray]]) -> float:
    """The lowest cosine of any model output, each over all check batches together."""
    worst = 1.0
    for name in reference[0]:
        ref = np.concatenate([r[name].reshape(-1) for r in reference])
        out = np.concatenate([o[name].reshape(-1) for o in outputs])
        worst = min(worst, cosine_similarity(ref, out))
    return worst


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


def nothing_to_prune(group_notes: list[dict[str, Any]], cfg: PruneChannelsConfig) -> str:
    """Why no unit was removed, from the groups' notes: what blocked or skipped them, most
    frequent first (a blocked group names the op or the model input/output that fixed its
    channels)."""
    if not group_notes:
        return ("no prunable group found: no Conv, ConvTranspose, Gemm or MatMul with a constant "
                "weight and static channel sizes")
    reasons: dict[str, int] = {}
    for note in group_notes:
        why = note.get("skipped") or (
            f"ratio {cfg.ratio:g} removes no unit of {note['units']} after rounding kept counts "
            f"up to a multiple of {cfg.round_to}")
        reasons[why] = reasons.get(why, 0) + 1
    listed = sorted(reasons.items(), key=lambda r: -r[1])
    text = "; ".join(f"{why} ({n} group{'s' * (n > 1)})" for why, n in listed[:3])
    more = f"; and {len(listed) - 3} other reasons" if len(listed) > 3 else ""
    count = len(group_notes)
    return f"no prunable group found ({count} group{'s' * (count > 1)} analysed): {text}{more}"


def _partitions(group: ChannelGroup) -> list[list[int]]:
    """Unit indices grouped by the tensors they touch: one part per Concat branch (a densenet
    block has one per layer feeding its chain), a single part for a plain group.

    Why: a Concat group mixes branches of different widths and scales; ranked as one pool, a
    whole branch can lose every channel and leave a zero-width convolution. Each part is
    therefore pruned by ``ratio`` on its own and always keeps at least one unit.
    """
    parts: dict[frozenset[Key], list[int]] = {}
    for i, unit in enumerate(group.units):
        parts.setdefault(frozenset(unit.atoms), []).append(i)
    return list(parts.values())


def _keep_count(total: int, blocked: int, remove: int, round_to: int, unit_width: int) -> int:
    """Units kept out of ``total``: rounded up to ``round_to`` for single-channel units, never
    below what is blocked, never zero."""
    keep = total - remove
    if round_to > 1 and unit_width == 1 and total > round_to:
        keep = min(total, math.ceil(keep / round_to) * round_to)
    return max(keep, blocked, 1)


def _group_removal(group: ChannelGroup, cfg: PruneChannelsConfig) -> int:
    """Units ``per-group`` selection removes from ``group`` (the sum over its parts)."""
    return sum(len(part) - _part_keep(group, part, int(math.floor(cfg.ratio * len(part))), cfg)
               for part in _partitions(group))


def _part_keep(group: ChannelGroup, part: list[int], remove: int, cfg: PruneChannelsConfig) -> int:
    blocked = sum(group.units[i].blocked for i in part)
    return _keep_count(len(part), blocked, remove, cfg.round_to, group.unit_width)


def _emptied(group: ChannelGroup, chosen: list[Unit], dims: dict[Key, int]) -> str | None:
    """Why removing ``chosen`` is unsafe (a tensor would lose every index), else ``None``."""
    removed: dict[Key, int] = {}
    for unit in chosen:
        for key, idx in unit.atoms.items():
            removed[key] = removed.get(key, 0) + len(idx)
    for key, count in removed.items():
        if count >= dims.get(key, count + 1):
            return f"would remove every index of '{key[0].name}' axis {key[1]}"
    return None


def _select(channels: ChannelGraph, cfg: PruneChannelsConfig,
            score: Callable[[ChannelGroup], Scores]) -> tuple[list[Unit], list[dict[str, Any]]]:
    """The units to remove, and one note per group (a group that cannot be cut safely is
    skipped with its reason). Globally, relative output errors pool as they are; other scores
    are divided by their group's mean first, so layers of different scale weigh alike."""
    notes: list[dict[str, Any]] = []
    eligible: list[tuple[ChannelGroup, np.ndarray]] = []
    scale: list[float] = []
    for group in channels.groups:
        reason = _skip_reason(group, cfg)
        if reason is None:
            scores, relative = score(group)
            eligible.append((group, scores))
            scale.append(1.0 if relative else max(float(scores.mean()), 1e-30))
        else:
            notes.append(_group_note(group, len(group.units), reason))
    parts = [_partitions(group) for group, _ in eligible]
    if cfg.scope == "global" and eligible:
        pooled = [(s / scale[gi], gi, ui)
                  for gi, (group, scores) in enumerate(eligible)
                  for ui, (s, unit) in enumerate(zip(scores, group.units)) if not unit.blocked]
        pooled.sort()
        quota = int(math.floor(cfg.ratio * sum(len(g.units) for g, _ in eligible)))
        part_of = {(gi, ui): pi for gi, group_parts in enumerate(parts)
                   for pi, part in enumerate(group_parts) for ui in part}
        wanted = [[0] * len(p) for p in parts]
        for _, gi, ui in pooled[:quota]:
            wanted[gi][part_of[gi, ui]] += 1
    else:
        wanted = [[int(math.floor(cfg.ratio * len(part))) for part in p] for p in parts]
    plan: list[Unit] = []
    for (group, scores), group_parts, group_wanted in zip(eligible, parts, wanted):
        chosen: list[Unit] = []
        kept = 0
        for part, want in zip(group_parts, group_wanted):
            keep = _part_keep(group, part, want, cfg)
            order = [i for i in sorted(part, key=lambda i: (scores[i], i))
                     if not group.units[i].blocked]
            chosen.extend(group.units[i] for i in order[:len(part) - keep])
            kept += keep
        unsafe = _emptied(group, chosen, channels.dims)
        if unsafe:
            notes.append(_group_note(group, len(group.units), unsafe))
            continue
        plan.extend(chosen)
        notes.append(_group_note(group, kept, None))
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
