"""How much each unit of a channel group matters: weight norms, or what it adds to its consumers.

``weight_importance``: the L1 or L2 norm of every weight slice of the unit (producer rows,
consumer columns, a head's Q/K/V/O blocks), each weight tensor divided by its mean unit norm so
layers of different scale weigh alike, summed over the group (Torch-Pruning's group importance).

``activation_importance`` (needs calibration data): the energy a unit adds to each consumer's
output, ||W[:, c]|| * rms(x_c), the first-order term of the reconstruction error that removing
it causes (Wanda's score, per channel). Dead or rarely active channels rank low even when their
weights are large, which matters for transformer FFNs.

``reconstruction_order`` (needs calibration data): ThiNet's greedy selection made exact with
Optimal Brain Surgeon algebra. With H = X^T X + lambda I over the consumer's original inputs, the
output error that removing input j adds *after* the least-squares compensation of the others is
||w_j||^2 / [H^-1]_jj; remove the cheapest, update H^-1 and W in closed form, repeat. Correlated
channels then go before merely small ones. Used where a group has one dense consumer
(Gemm/MatMul: MLP hidden layers, transformer FFNs) of at most ``MAX_GRAM`` inputs.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from onnxopt.feeds import Feeds
from onnxopt.passes.prune_channels._groups import ChannelGroup, Key
from onnxopt.passes.prune_channels._reconstruction import capture

UNRANKED = 10.0  # above any relative error a removal order reaches (removing all of X W costs 1)


def weight_importance(group: ChannelGroup, norm: str = "l2") -> np.ndarray:
    """Per unit: per-tensor-normalized L1/L2 norm of its weight slices, summed."""
    contributions = []
    for key in group.weight_keys:
        value, axis = key
        array = value.const_value.numpy()
        others = tuple(a for a in range(array.ndim) if a != axis)
        per_atom = (np.abs(array).sum(axis=others, dtype=np.float64) if norm == "l1"
                    else np.square(array, dtype=np.float64).sum(axis=others))
        contributions.append(_per_unit(group, key, per_atom, squared=norm != "l1"))
    return _normalized_sum(contributions, len(group.units))


def consumer_inputs(group: ChannelGroup) -> list[tuple[Key, ir.Value, int]]:
    """(weight key, input activation, its channel axis) of each layer consuming the group."""
    found = []
    for key in group.weight_keys:
        weight, axis = key
        for use in weight.uses():
            node = use.node
            if use.idx != 1:
                continue
            x = node.inputs[0]
            rank = len(x.shape or ())
            if node.op_type == "Conv" and axis == 1 and node.attributes.get_int("group", 1) == 1:
                found.append((key, x, 1))
            elif (node.op_type == "Gemm" and not node.attributes.get_int("transA", 0)
                  and axis == (1 if node.attributes.get_int("transB", 0) else 0)):
                found.append((key, x, 1))
            elif node.op_type == "MatMul" and len(weight.shape) == 2 and axis == 0 and rank >= 2:
                found.append((key, x, rank - 1))
    return found


def channel_rms(model: ir.Model, inputs: Sequence[tuple[ir.Value, int]],
                calibration: Sequence[Feeds]) -> dict[str, np.ndarray]:
    """Root mean square of every channel of each activation, over the calibration data."""
    axes = {value.name: axis for value, axis in inputs}
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    for outputs in capture(model, list(axes), calibration):
        for name, axis in axes.items():
            x = outputs[name].astype(np.float64)
            reduce = tuple(a for a in range(x.ndim) if a != axis)
            sums[name] = sums.get(name, 0.0) + np.square(x).sum(axis=reduce)
            counts[name] = counts.get(name, 0) + x.size // x.shape[axis]
    return {name: np.sqrt(sums[name] / max(counts[name], 1)) for name in sums}


def activation_importance(group: ChannelGroup, rms: dict[str, np.ndarray]) -> np.ndarray | None:
    """Per unit: ||W[:, c]|| * rms(x_c) over every consumer, normalized per consumer, summed;
    ``None`` when the group has no consumer with measured activations."""
    contributions = []
    for key, x, _ in consumer_inputs(group):
        if x.name not in rms:
            continue
        weight, axis = key
        array = weight.const_value.numpy()
        others = tuple(a for a in range(array.ndim) if a != axis)
        energy = np.square(array, dtype=np.float64).sum(axis=others) * np.square(rms[x.name])
        contributions.append(_per_unit(group, key, energy, squared=True))
    if not contributions:
        return None
    return _normalized_sum(contributions, len(group.units))


MAX_GRAM = 8192  # inputs; the Gram matrix is MAX_GRAM^2 float64 values


def dense_consumer(group: ChannelGroup) -> tuple[Key, ir.Value] | None:
    """The group's single Gemm/MatMul consumer (weight key, input), if every unit is one of its
    inputs; else ``None``."""
    consumers = consumer_inputs(group)
    if len(consumers) != 1:
        return None
    key, x, _ = consumers[0]
    node = next(u.node for u in key[0].uses() if u.idx == 1)
    if node.op_type not in ("Gemm", "MatMul") or key[0].shape[key[1]] > MAX_GRAM:
        return None
    if any(len(u.atoms.get(key, ())) != 1 for u in group.units):
        return None
    return key, x


def gram_matrices(model: ir.Model, inputs: Sequence[tuple[ir.Value, int]],
                  calibration: Sequence[Feeds]) -> dict[str, np.ndarray]:
    """X^T X of each activation (channel axis last, other axes as rows), over calibration."""
    axes = {value.name: axis for value, axis in inputs}
    grams: dict[str, np.ndarray] = {}
    for outputs in capture(model, list(axes), calibration):
        for name, axis in axes.items():
            x = np.moveaxis(outputs[name], axis, -1)
            x = x.reshape(-1, x.shape[-1]).astype(np.float64)
            grams[name] = grams.get(name, 0.0) + x.T @ x
    return grams


def reconstruction_order(group: ChannelGroup, grams: dict[str, np.ndarray], ridge: float = 1e-3,
                         limit: int | None = None) -> np.ndarray | None:
    """Scores from the greedy OBS removal order: the consumer's output error after each removal,
    cumulative and relative to its output energy (so lower = removed earlier, and scores of
    different groups compare: a global ranking then takes most from the layers that lose least).
    Past the ``limit`` first removals all units tie at ``UNRANKED``. ``None`` when the group has no single
    dense consumer with a measured Gram matrix."""
    found = dense_consumer(group)
    if found is None or found[1].name not in grams:
        return None
    (weight, axis), x = found
    w = np.moveaxis(weight.const_value.numpy().astype(np.float64), axis, 0)
    w = w.reshape(w.shape[0], -1)  # rows: the consumer's inputs
    h = grams[x.name]
    energy = max(float(np.sum(w * (h @ w))), 1e-30)  # ||X W||^2 before any removal
    h = h + ridge * max(float(np.trace(h)) / len(h), 1e-12) * np.eye(len(h))
    h_inv = np.linalg.inv(h)
    row_of = np.array([int(u.atoms[(weight, axis)][0]) for u in group.units])
    alive = np.array([not u.blocked for u in group.units])
    scores = np.full(len(group.units), UNRANKED)
    error = 0.0
    steps = int(alive.sum()) - 1 if limit is None else min(limit, int(alive.sum()) - 1)
    for step in range(steps):
        rows = row_of[alive]
        cost = np.einsum("ij,ij->i", w[rows], w[rows]) / np.diag(h_inv)[rows]
        best = int(np.argmin(cost))
        pick = np.flatnonzero(alive)[best]
        r = row_of[pick]
        error += float(cost[best]) / energy
        col = h_inv[:, r] / h_inv[r, r]
        w -= np.outer(col, w[r])
        h_inv -= np.outer(col, h_inv[r])
        h_inv[r, r] = 1.0  # keep the removed row inert
        scores[pick] = error + step * 1e-12  # strictly increasing, even where a removal is free
        alive[pick] = False
    return scores


def _per_unit(group: ChannelGroup, key: Key, per_atom: np.ndarray, squared: bool) -> np.ndarray:
    values = np.array([per_atom[u.atoms[key]].sum() if key in u.atoms else 0.0
                       for u in group.units])
    return np.sqrt(values) if squared else values


def _normalized_sum(contributions: list[np.ndarray], n: int) -> np.ndarray:
    scores = np.zeros(n)
    for contrib in contributions:
        mean = contrib.mean()
        if mean > 0:
            scores += contrib / mean
    return scores
