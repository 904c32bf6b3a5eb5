"""Recovery after channel pruning, without retraining: least-squares refits and BatchNorm moments.

Channel-pruning reconstruction (He, Zhang, Sun 2017, "Channel Pruning for Accelerating Very Deep
Neural Networks"; Luo, Wu, Lin 2017, "ThiNet"): once a layer has lost input channels, solve its
weights so that its output, computed from the *pruned* network's activations, matches the
*original* network's output on calibration data. Per consumer layer that is a ridge regression

    W* = argmin ||X' W - Y||^2 + lambda ||W - W0||^2 = (X'^T X' + lambda I)^-1 (X'^T Y + lambda W0)

with X' the consumer's inputs in the pruned model (im2col patches for a convolution), Y its
original outputs (at sampled positions), W0 the pruned weights and lambda relative to the mean
diagonal of X'^T X'. Layers are refitted in dependency order ("waves"), so each one also absorbs
the error of the refits above it. A layer whose output runs into a residual join (Add with
another branch: a transformer's FFN, a ResNet block after BN folding) is fitted to the join's
original sum minus the pruned model's other branch, so it also takes out what it can of the error
the residual stream carries from pruned layers upstream. A BatchNormalization downstream of a refit gets its running
mean and variance moved so its output keeps the original first two moments per channel.

Why by hand: no library reconstructs layers of an ONNX graph. Activations come from ONNX Runtime
(the values needed become extra outputs of a serialized copy); the algebra is numpy.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import numpy as np
import onnx_ir as ir

from onnxopt import activations
from onnxopt.feeds import Feeds

StepKind = Literal["conv", "gemm", "matmul", "batchnorm"]


@dataclasses.dataclass
class _Step:
    """One layer to refit, or one BatchNormalization to re-estimate, and its accumulators."""

    node: ir.Node
    kind: StepKind
    kept: np.ndarray | None  # original output channels kept (BN: original channels kept)
    positions: list[Any] = dataclasses.field(default_factory=list)  # per calibration batch
    targets: list[np.ndarray] = dataclasses.field(default_factory=list)
    stats: dict[str, Any] = dataclasses.field(default_factory=dict)
    wave: int = 0
    skip: str | None = None
    join: _Join | None = None


@dataclasses.dataclass
class _Join:
    """A residual join the layer's output runs into: ``sum = layer (+ bias) + other``.

    Fitting the layer to ``sum_original - other_pruned - bias`` rather than to its own original
    output lets it also absorb the error the pruning left in the other branch (the residual
    stream of a transformer or a ResNet), the error that is otherwise carried on unchanged.
    """

    add: ir.Node
    other: ir.Value
    bias: np.ndarray | None  # constant added between the layer and the join


def refittable(node: ir.Node) -> str | None:
    """``None`` when ``node`` can be refitted by least squares, else why not."""
    w = node.inputs[1] if len(node.inputs) > 1 else None
    if w is None or w.const_value is None:
        return "weights are computed"
    if len({id(u.node) for u in w.uses()}) > 1:
        return "weights shared with another layer"
    if node.op_type == "Conv":
        if node.attributes.get_int("group", 1) != 1:
            return "grouped convolution"
        if len(w.shape) != 4:
            return "only 2-D convolutions are refitted"
        if node.attributes.get_string("auto_pad", "NOTSET") not in ("NOTSET", "VALID", "SAME_UPPER",
                                                                      "SAME_LOWER"):
            return "unknown auto_pad"
        return None
    if node.op_type == "Gemm":
        return "transposed input" if node.attributes.get_int("transA", 0) else None
    if node.op_type == "MatMul":
        return None if len(w.shape) == 2 else "batched weights"
    return f"{node.op_type} is not refitted"


class Reconstruction:
    """Collects original targets before pruning, then refits the pruned model in place.

    ``consumers``: (node, original output channels kept or None) of each layer that lost input
    channels; ``batchnorms``: (node, original channels kept or None) of each BatchNormalization
    downstream of a consumer.
    """

    def __init__(self, model: ir.Model, consumers: Sequence[tuple[ir.Node, np.ndarray | None]],
                 batchnorms: Sequence[tuple[ir.Node, np.ndarray | None]],
                 calibration: Sequence[Feeds], *, samples: int = 8192, ridge: float = 1e-3,
                 seed: int = 0) -> None:
        self.model = model
        self.calibration = calibration  # a Sequence: may stream from disk on every pass
        self.samples = samples
        self.ridge = ridge
        self.seed = seed
        self.steps: list[_Step] = []
        for node, kept in consumers:
            reason = refittable(node)
            kind: StepKind = ("conv" if node.op_type == "Conv" else
                              "gemm" if node.op_type == "Gemm" else "matmul")
            self.steps.append(_Step(node, kind, kept, skip=reason))
        for node, kept in batchnorms:
            self.steps.append(_Step(node, "batchnorm", kept))
        active = [s for s in self.steps if s.skip is None]
        level = _assign_waves(model.graph, active)
        for step in active:
            if step.kind != "batchnorm":
                join = _residual_join(step.node)
                # Only when the other branch is final by this step's wave: when both branches
                # hold refitted layers, the later one absorbs the other's error, not both.
                if join is not None and level.get(id(join.other), 0) <= step.wave:
                    step.join = join

    # -- before pruning -------------------------------------------------------------------------

    def record_targets(self) -> None:
        """Run the unpruned model once per batch; keep sampled outputs and BN input moments."""
        active = [s for s in self.steps if s.skip is None]
        names = [_target_name(s) for s in active]
        names += [v.name for s in active if s.join for v in (s.join.add.outputs[0], s.join.other)]
        if not active:
            return
        rows_per_batch = max(1, math.ceil(self.samples / len(self.calibration)))
        for b, outputs in enumerate(capture(self.model, names, self.calibration)):
            for i, step in enumerate(active):
                y = outputs[_target_name(step)]
                if step.kind == "batchnorm":
                    _accumulate_moments(step.stats, "orig", _channels(y, step.kept, axis=1))
                    continue
                if step.join is not None:
                    total = outputs[step.join.add.outputs[0].name]
                    if b == 0 and not total.shape == y.shape == outputs[step.join.other.name].shape:
                        step.join = None  # a broadcasting join: fit the layer's own output
                    else:
                        y = total
                rng = np.random.default_rng([self.seed, i, b])
                positions, rows = _sample_rows(step.kind, y, rows_per_batch, rng)
                if step.kept is not None:
                    rows = rows[:, step.kept]
                step.positions.append(positions)
                step.targets.append(rows.astype(np.float64))

    # -- after pruning --------------------------------------------------------------------------

    def refit(self) -> list[dict[str, Any]]:
        """Refit every step wave by wave on the pruned model; one report entry per step."""
        active = [s for s in self.steps if s.skip is None]  # waves: assigned in __init__
        for wave in sorted({s.wave for s in active}):
            steps = [s for s in active if s.wave == wave]
            names = [s.node.inputs[0].name for s in steps]
            names += [s.join.other.name for s in steps if s.join]
            for b, outputs in enumerate(capture(self.model, names, self.calibration)):
                for step in steps:
                    x = outputs[step.node.inputs[0].name]
                    if step.kind == "batchnorm":
                        _accumulate_moments(step.stats, "new", x)
                        continue
                    y = step.targets[b]
                    if step.join is not None:
                        y = y - _join_offset(step, outputs[step.join.other.name], b)
                    _accumulate_normal_equations(step, x, y, b)
            for step in steps:
                if step.kind == "batchnorm":
                    _update_batchnorm(step)
                else:
                    _solve(step, self.ridge)
        return [_report(s) for s in self.steps]


def _target_name(step: _Step) -> str:
    """What the original model provides: a layer's output, or a BatchNorm's input."""
    value = step.node.inputs[0] if step.kind == "batchnorm" else step.node.outputs[0]
    assert value.name
    return value.name


def capture(model: ir.Model, names: Sequence[str], calibration: Sequence[Feeds]
            ) -> Iterator[dict[str, np.ndarray]]:
    """Per calibration batch, the values of ``names`` (:func:`onnxopt.activations.capture` with
    the settings channel pruning was measured with: basic graph optimizations, ORT's threads)."""
    return activations.capture(model, names, calibration, opt_level="basic", threads=None)


def _residual_join(node: ir.Node) -> _Join | None:
    """The Add that joins ``node``'s output (through a MatMul's bias Add) with another branch."""
    value, bias = node.outputs[0], None
    for _ in range(2):
        uses = value.uses()
        if len(uses) != 1 or value.is_graph_output() or uses[0].node.op_type != "Add":
            return None
        add = uses[0].node
        other = add.inputs[1 - uses[0].idx]
        if other is None:
            return None
        if other.const_value is None:
            return _Join(add, other, bias)
        if node.op_type != "MatMul" or bias is not None:
            return None
        bias, value = other.const_value.numpy().astype(np.float64).reshape(-1), add.outputs[0]
    return None


def _join_offset(step: _Step, other: np.ndarray, batch: int) -> np.ndarray:
    """What the join adds besides the layer, at the sampled rows: the pruned model's other
    branch (and the MatMul's original bias, which the fit's intercept corrects)."""
    assert step.join is not None
    offset = _output_rows(step.kind, other, step.positions[batch]).astype(np.float64)
    if step.join.bias is not None:
        offset = offset + _channels(step.join.bias, step.kept, axis=0)
    return offset


def _assign_waves(graph: ir.Graph, steps: list[_Step]) -> dict[int, int]:
    """Wave of a step = number of steps upstream of it: a wave's inputs are final.

    Returns the level (steps upstream) of every value, by ``id``."""
    by_node = {id(s.node): s for s in steps}
    level: dict[int, int] = {}
    for node in graph:
        lv = max((level.get(id(v), 0) for v in node.inputs if v is not None), default=0)
        step = by_node.get(id(node))
        if step is not None:
            step.wave = lv
            lv += 1
        for out in node.outputs:
            level[id(out)] = lv
    return level


def _channels(x: np.ndarray, kept: np.ndarray | None, axis: int) -> np.ndarray:
    return x if kept is None else np.take(x, kept, axis=axis)


def _accumulate_moments(stats: dict[str, Any], tag: str, x: np.ndarray) -> None:
    axes = tuple(a for a in range(x.ndim) if a != 1)
    x = x.astype(np.float64)
    for name, value in (("sum", x.sum(axis=axes)), ("sumsq", (x * x).sum(axis=axes))):
        stats[f"{tag}_{name}"] = stats.get(f"{tag}_{name}", 0.0) + value
    stats[f"{tag}_count"] = stats.get(f"{tag}_count", 0) + x.size // x.shape[1]


def _sample_rows(kind: StepKind, y: np.ndarray, k: int,
                 rng: np.random.Generator) -> tuple[Any, np.ndarray]:
    """Sampled output rows: (n, oh, ow) positions of a conv, or flat rows of a dense layer."""
    if kind == "conv":
        n, c, oh, ow = y.shape
        flat = rng.choice(n * oh * ow, size=min(k, n * oh * ow), replace=False)
        ni, rest = np.divmod(flat, oh * ow)
        positions: Any = (ni, *np.divmod(rest, ow))
    else:
        count = y.size // y.shape[-1]
        positions = rng.choice(count, size=min(k, count), replace=False)
    return positions, _output_rows(kind, y, positions)


def _output_rows(kind: StepKind, y: np.ndarray, positions: Any) -> np.ndarray:
    """Rows of a layer-output-shaped tensor at sampled positions (channels last)."""
    if kind == "conv":
        ni, hi, wi = positions
        return y[ni, :, hi, wi]
    return y.reshape(-1, y.shape[-1])[positions]


def _conv_pads(node: ir.Node, x_hw: tuple[int, int], y_hw: tuple[int, int],
               kernel: tuple[int, int]) -> list[int]:
    """Explicit (top, left, bottom, right) pads, auto_pad resolved."""
    auto = node.attributes.get_string("auto_pad", "NOTSET")
    strides = node.attributes.get_ints("strides", [1, 1])
    dilations = node.attributes.get_ints("dilations", [1, 1])
    if auto == "NOTSET":
        return list(node.attributes.get_ints("pads", [0, 0, 0, 0]))
    if auto == "VALID":
        return [0, 0, 0, 0]
    pads = [0, 0, 0, 0]
    for i in range(2):
        total = max((y_hw[i] - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - x_hw[i], 0)
        small = total // 2
        pads[i], pads[i + 2] = ((small, total - small) if auto == "SAME_UPPER"
                                else (total - small, small))
    return pads


def _conv_patches(node: ir.Node, x: np.ndarray, positions: Any,
                  y_hw: tuple[int, int]) -> np.ndarray:
    """im2col rows of ``x`` at the sampled output positions, ordered like the weight (c, kh, kw)."""
    w = node.inputs[1].const_value
    kh, kw = w.shape[2], w.shape[3]
    sh, sw = node.attributes.get_ints("strides", [1, 1])
    dh, dw = node.attributes.get_ints("dilations", [1, 1])
    top, left, bottom, right = _conv_pads(node, x.shape[2:], y_hw, (kh, kw))
    xp = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
    ni, oh, ow = positions
    hh = oh[:, None] * sh + np.arange(kh) * dh
    ww = ow[:, None] * sw + np.arange(kw) * dw
    c = np.arange(x.shape[1])
    patches = xp[ni[:, None, None, None], c[None, :, None, None], hh[:, None, :, None],
                 ww[:, None, None, :]]
    return patches.reshape(len(ni), -1)


def _inputs_at(step: _Step, x: np.ndarray, batch: int) -> np.ndarray:
    positions = step.positions[batch]
    if step.kind == "conv":
        y_shape = step.node.outputs[0].shape
        return _conv_patches(step.node, x, positions, (int(y_shape[2]), int(y_shape[3])))
    return x.reshape(-1, x.shape[-1])[positions]


def _accumulate_normal_equations(step: _Step, x: np.ndarray, y: np.ndarray, batch: int) -> None:
    rows = _inputs_at(step, x, batch).astype(np.float64)
    if _intercept(step) is not None:
        rows = np.hstack([rows, np.ones((len(rows), 1))])
    st = step.stats
    st["xtx"] = st.get("xtx", 0.0) + rows.T @ rows
    st["xty"] = st.get("xty", 0.0) + rows.T @ y
    st["yy"] = st.get("yy", 0.0) + float(np.sum(y * y))
    st["rows"] = st.get("rows", 0) + len(rows)


def _intercept(step: _Step) -> ir.Value | None:
    """The bias the fit may adjust: Conv/Gemm's own, or the Add after a MatMul; else None."""
    node = step.node
    if node.op_type in ("Conv", "Gemm"):
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        if bias is None or bias.const_value is None or len({id(u.node) for u in bias.uses()}) > 1:
            return None
        n = node.inputs[1].shape[0 if node.op_type == "Conv" or node.attributes.get_int("transB", 0)
                                 else 1]
        if bias.const_value.size != n or (node.op_type == "Gemm"
                                          and node.attributes.get_float("beta", 1.0) == 0):
            return None
        return bias
    uses = node.outputs[0].uses()
    if len(uses) != 1 or uses[0].node.op_type != "Add" or node.outputs[0].is_graph_output():
        return None
    add = uses[0].node
    other = add.inputs[1 - uses[0].idx]
    n = node.inputs[1].shape[1]
    if (other is None or other.const_value is None or other.const_value.size != n
            or len(other.uses()) != 1):
        return None
    return other


def _current_matrix(step: _Step) -> tuple[np.ndarray, float]:
    """The layer's weights as the (features x outputs) matrix the fit solves for, and the
    Gemm ``alpha`` folded into it."""
    node = step.node
    w = node.inputs[1].const_value.numpy().astype(np.float64)
    if step.kind == "conv":
        return w.reshape(w.shape[0], -1).T, 1.0
    if step.kind == "gemm":
        alpha = node.attributes.get_float("alpha", 1.0)
        return alpha * (w.T if node.attributes.get_int("transB", 0) else w), alpha
    return w, 1.0


def _solve(step: _Step, ridge: float) -> None:
    st = step.stats
    if not st.get("rows"):
        step.skip = "no calibration rows"
        return
    xtx, xty = st["xtx"], st["xty"]
    w0, alpha = _current_matrix(step)
    bias = _intercept(step)
    if bias is not None:
        b = bias.const_value.numpy().astype(np.float64).reshape(1, -1)
        if step.kind == "gemm":
            b = b * step.node.attributes.get_float("beta", 1.0)
        elif step.kind == "matmul":
            b = np.zeros_like(b)  # the fit finds a correction added to the Add's bias
        w0 = np.vstack([w0, b])
    dim = xtx.shape[0]
    lam = ridge * max(float(np.trace(xtx)) / dim, 1e-12)
    solution = np.linalg.solve(xtx + lam * np.eye(dim), xty + lam * w0)
    st["error_before"] = _relative_error(st, w0)
    st["error_after"] = _relative_error(st, solution)
    if st["error_after"] > st["error_before"]:
        solution = w0  # never worse than not refitting (possible when the data is tiny)
        st["error_after"] = st["error_before"]
    _write_back(step, solution, bias, alpha)


def _relative_error(st: dict[str, Any], w: np.ndarray) -> float:
    """||X W - Y|| / ||Y|| from the accumulated normal equations."""
    residual = st["yy"] - 2 * np.sum(w * st["xty"]) + np.sum(w * (st["xtx"] @ w))
    return float(math.sqrt(max(residual, 0.0) / max(st["yy"], 1e-30)))


def _write_back(step: _Step, solution: np.ndarray, bias: ir.Value | None, alpha: float) -> None:
    node = step.node
    weight = node.inputs[1]
    old = weight.const_value.numpy()
    matrix = solution[:-1] if bias is not None else solution
    if step.kind == "conv":
        new = matrix.T.reshape(old.shape)
    elif step.kind == "gemm":
        new = (matrix.T if node.attributes.get_int("transB", 0) else matrix) / alpha
    else:
        new = matrix
    weight.const_value = ir.Tensor(new.astype(old.dtype), name=weight.name)
    if bias is None:
        return
    row = solution[-1]
    b_old = bias.const_value.numpy()
    if step.kind == "gemm":
        row = row / node.attributes.get_float("beta", 1.0)
    elif step.kind == "matmul":
        row = b_old.reshape(-1).astype(np.float64) + row
    bias.const_value = ir.Tensor(row.reshape(b_old.shape).astype(b_old.dtype), name=bias.name)


def _update_batchnorm(step: _Step) -> None:
    """Move the running moments so the BN output keeps its original per-channel mean and spread."""
    st = step.stats
    if not st.get("new_count") or not st.get("orig_count"):
        step.skip = "no calibration data"
        return
    mu_o = st["orig_sum"] / st["orig_count"]
    var_o = np.maximum(st["orig_sumsq"] / st["orig_count"] - mu_o**2, 0.0)
    mu_n = st["new_sum"] / st["new_count"]
    var_n = np.maximum(st["new_sumsq"] / st["new_count"] - mu_n**2, 0.0)
    node = step.node
    mean_v, var_v = node.inputs[3], node.inputs[4]
    if any(v.const_value is None or len(v.uses()) > 1 for v in (mean_v, var_v)):
        step.skip = "running statistics are shared or computed"
        return
    eps = node.attributes.get_float("epsilon", 1e-5)
    mean = mean_v.const_value.numpy().astype(np.float64)
    var = var_v.const_value.numpy().astype(np.float64)
    scale = np.where(var_o > 1e-12, np.sqrt((var_n + 1e-12) / (var_o + 1e-12)), 1.0)
    new_mean = mu_n + scale * (mean - mu_o)
    new_var = scale**2 * (var + eps) - eps
    st["max_mean_shift"] = float(np.max(np.abs(new_mean - mean) / np.sqrt(var + eps)))
    mean_v.const_value = ir.Tensor(new_mean.astype(np.float32), name=mean_v.name)
    var_v.const_value = ir.Tensor(np.maximum(new_var, 0.0).astype(np.float32), name=var_v.name)


def _report(step: _Step) -> dict[str, Any]:
    entry: dict[str, Any] = {"layer": step.node.name, "kind": step.kind}
    if step.skip:
        entry["skipped"] = step.skip
        return entry
    st = step.stats
    if step.kind == "batchnorm":
        entry["max_mean_shift_in_std"] = round(st.get("max_mean_shift", 0.0), 6)
    else:
        if step.join is not None:
            entry["target"] = f"residual sum {step.join.add.name}"
        entry.update(rows=int(st.get("rows", 0)),
                     rel_error_before=round(st.get("error_before", float("nan")), 6),
                     rel_error_after=round(st.get("error_after", float("nan")), 6))
    return entry
