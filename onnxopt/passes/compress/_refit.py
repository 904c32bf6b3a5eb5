"""Layer-wise least-squares refits on calibration activations: recovery without retraining.

Pruning or clustering a layer moves its outputs. Instead of retraining, the parameters a layer keeps
are solved so that its outputs on calibration data match those of the model the pass received: the
layer-wise reconstruction of Optimal Brain Compression / SparseGPT for pruning, and a least-squares
fit of the centroids in place of Deep Compression's centroid fine-tuning. Layers go in graph order
and each one reads the activations of the already compressed layers before it, so a later layer
absorbs the error of earlier ones.

Per layer only sufficient statistics are kept, per group of a grouped Conv: ``H = [X 1]^T [X 1]``,
``G = [X 1]^T Y`` and ``sum(Y^2)``, where ``X`` holds the layer's input rows in the compressed model
(Conv: image patches) and ``Y = X_ref W_ref^T + b_ref`` the target outputs. Solves use the normal
equations in float64 with a ridge term ``damp * mean(diag H)`` pulling towards the starting values
(SparseGPT's dampening), so inputs never seen in calibration (a blank pixel) keep their weights.

numpy does the algebra (no library solves a masked least-squares per output row); ONNX Runtime
computes the activations: the wanted values become extra graph outputs for one session.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator, Sequence

import numpy as np
import onnx_ir as ir
from numpy.lib.stride_tricks import sliding_window_view
from onnxopt.passes.compress._layers import Layer

from onnxopt import activations
from onnxopt.feeds import Feeds


@contextlib.contextmanager
def single_threaded_blas() -> Iterator[None]:
    """Run numpy's BLAS/LAPACK on one thread inside the block.

    The refits make hundreds of small solves (one per output row); a multi-threaded OpenBLAS
    spends longer synchronizing its threads than solving, and on a busy 2-core machine a
    260x260 solve took 0.23 s instead of under a millisecond (measured). threadpoolctl
    (a scikit-learn dependency) sets the limit; without it the solves just run slower.
    """
    try:
        import threadpoolctl
    except ImportError:
        yield
        return
    with threadpoolctl.threadpool_limits(limits=1, user_api="blas"):
        yield


# ---------------------------------------------------------------------------------------- capture
def capture(model: ir.Model, values: Sequence[ir.Value],
            batches: Sequence[Feeds]) -> list[list[np.ndarray]]:
    """The arrays ``values`` take on each batch (``result[value_index][batch_index]``).

    Session settings as measured since the refits were written: basic graph optimizations, ORT's
    thread count."""
    names = []
    for i, value in enumerate(values):
        if value.name is None:
            value.name = f"onnxopt_capture_{i}"
        if value.type is None:
            value.type = ir.TensorType(ir.DataType.FLOAT)
        names.append(value.name)
    arrays: dict[str, list[np.ndarray]] = {name: [] for name in names}
    for outputs in activations.capture(model, names, batches, opt_level="basic", threads=None):
        for name in arrays:
            arrays[name].append(outputs[name])
    return [arrays[name] for name in names]


# ---------------------------------------------------------------------------------------- rows
def input_rows(layer: Layer, x: np.ndarray, picks: np.ndarray | None = None) -> np.ndarray:
    """The layer's input as rows (one per output position); ``picks`` selects rows."""
    if layer.kind == "conv":
        return conv_patches(layer.node, x, layer.weight_array().shape[2:], picks)
    rows = x.reshape(-1, x.shape[-1])
    return rows if picks is None else rows[picks]


def row_count(layer: Layer, x: np.ndarray) -> int:
    if layer.kind == "conv":
        kernel = layer.weight_array().shape[2:]
        pads, strides, dilations = _conv_geometry(layer.node, x.shape[2:], kernel)
        spans = [d * (k - 1) + 1 for k, d in zip(kernel, dilations)]
        outs = [(n + pads[i] + pads[i + len(kernel)] - s) // st + 1
                for i, (n, s, st) in enumerate(zip(x.shape[2:], spans, strides))]
        return x.shape[0] * math.prod(outs)
    return x.size // x.shape[-1]


def conv_patches(node: ir.Node, x: np.ndarray, kernel: Sequence[int],
                 picks: np.ndarray | None = None) -> np.ndarray:
    """im2col: (positions, C * prod(kernel)) patches in the order of ``W.reshape(Cout, -1)``."""
    nd = len(kernel)
    pads, strides, dilations = _conv_geometry(node, x.shape[2:], kernel)
    padded = np.pad(x, [(0, 0), (0, 0)] + [(pads[i], pads[i + nd]) for i in range(nd)])
    spans = [d * (k - 1) + 1 for k, d in zip(kernel, dilations)]
    windows = sliding_window_view(padded, spans, axis=tuple(range(2, 2 + nd)))
    windows = windows[(slice(None), slice(None)) + tuple(slice(None, None, s) for s in strides)
                      + tuple(slice(None, None, d) for d in dilations)]
    windows = windows.transpose((0, *range(2, 2 + nd), 1, *range(2 + nd, 2 + 2 * nd)))
    width = x.shape[1] * math.prod(kernel)
    if picks is None:
        return windows.reshape(-1, width)
    index = np.unravel_index(picks, windows.shape[:1 + nd])
    return windows[index].reshape(len(picks), width)


def _conv_geometry(node: ir.Node, spatial: Sequence[int], kernel: Sequence[int]
                   ) -> tuple[list[int], list[int], list[int]]:
    nd = len(kernel)

    def ints(name: str, default: list[int]) -> list[int]:
        attr = node.attributes.get(name)
        return [int(v) for v in attr.as_ints()] if attr is not None else default

    strides, dilations = ints("strides", [1] * nd), ints("dilations", [1] * nd)
    pads = ints("pads", [0] * (2 * nd))
    auto_pad = node.attributes.get("auto_pad")
    mode = auto_pad.as_string() if auto_pad is not None else "NOTSET"
    if mode == "VALID":
        pads = [0] * (2 * nd)
    elif mode in ("SAME_UPPER", "SAME_LOWER"):
        pads = [0] * (2 * nd)
        for i, (n, k, s, d) in enumerate(zip(spatial, kernel, strides, dilations)):
            total = max((-(-n // s) - 1) * s + d * (k - 1) + 1 - n, 0)
            small, big = total // 2, total - total // 2
            pads[i], pads[i + nd] = (small, big) if mode == "SAME_UPPER" else (big, small)
    return pads, strides, dilations


# ---------------------------------------------------------------------------------------- stats
@dataclasses.dataclass
class LayerStats:
    """Sufficient statistics of one layer's least squares (float64, one block per group)."""

    hessian: np.ndarray  # (groups, in_g + 1, in_g + 1); the last row/column is the ones column
    cross: np.ndarray  # (groups, in_g + 1, out_g)
    target_sq: np.ndarray  # (out,) sum of squared targets
    rows: int

    @property
    def groups(self) -> int:
        return self.hessian.shape[0]


# Widest layer refit by least squares. Its statistics hold an (inputs + 1)^2 float64 matrix per
# group and every solve factorizes it: 8,192 inputs are 0.5 GB. VGG's fc1 (25,088 inputs: 5 GB,
# past the suite's 12 GB limit with its copies) and AlexNet's fc6 (9,216: minutes per candidate)
# keep their magnitude-pruned or k-means weights unrefit.
MAX_REFIT_INPUTS = 8192


def can_refit(layer: Layer) -> bool:
    """Whether ``layer`` is narrow enough for a least-squares refit (see MAX_REFIT_INPUTS)."""
    return layer.layout(layer.weight_array()).shape[1] <= MAX_REFIT_INPUTS


def accumulate(layer: Layer, inputs: Sequence[np.ndarray], ref_inputs: Sequence[np.ndarray],
               ref_rows: np.ndarray, ref_bias: np.ndarray | None, *, max_rows: int = 200_000,
               seed: int = 0) -> LayerStats:
    """Statistics of ``layer`` reading ``inputs`` with targets from the reference layer.

    ``ref_rows`` / ``ref_bias``: the reference weights as rows and its bias; ``ref_inputs``: what
    the reference layer read. At most ``max_rows`` rows are used (Conv positions are sampled).
    """
    groups = layer.groups
    out, in_g = ref_rows.shape
    out_g = out // groups
    hessian = np.zeros((groups, in_g + 1, in_g + 1))
    cross = np.zeros((groups, in_g + 1, out_g))
    target_sq = np.zeros(out)
    rng = np.random.default_rng(seed)
    counts = [row_count(layer, x) for x in inputs]
    keep = min(1.0, max_rows / max(sum(counts), 1))
    total = 0
    for x, xr, count in zip(inputs, ref_inputs, counts):
        picks = None
        if keep < 1.0:
            picks = np.sort(rng.choice(count, size=max(1, int(count * keep)), replace=False))
        rows = input_rows(layer, x, picks).astype(np.float64)
        ref = input_rows(layer, xr, picks).astype(np.float64)
        total += rows.shape[0]
        ones = np.ones((rows.shape[0], 1))
        for g in range(groups):
            cols, outs = slice(g * in_g, (g + 1) * in_g), slice(g * out_g, (g + 1) * out_g)
            a = np.concatenate([rows[:, cols], ones], axis=1)
            y = ref[:, cols] @ ref_rows[outs].T.astype(np.float64)
            if ref_bias is not None:
                y += ref_bias[outs]
            hessian[g] += a.T @ a
            cross[g] += a.T @ y
            target_sq[outs] += np.sum(y * y, axis=0)
    return LayerStats(hessian, cross, target_sq, total)


def _ridge(hessian: np.ndarray, damp: float) -> float:
    diag = np.diag(hessian)[:-1]
    mean = float(np.mean(diag)) if diag.size else 0.0
    return damp * (mean if mean > 0 else 1.0)


# ---------------------------------------------------------------------------------------- solves
def solve_masked(stats: LayerStats, start_rows: np.ndarray, start_bias: np.ndarray | None,
                 masks: np.ndarray, *, damp: float = 1e-3) -> tuple[np.ndarray, np.ndarray | None]:
    """Refit each output row on its kept inputs (``masks``), and the bias when there is one.

    Minimizes ``|X w + b - y|^2 + lambda |w - w_start|^2`` per output; pruned weights stay 0.
    The per-output systems are solved in stacks (:func:`_masked_systems`): one solve call per
    output cost ~1 ms of overhead, 17 s of MobileNetV2's 70 s per pruning candidate (its
    depthwise layers make one 10x10 system per channel). When every weight is kept, the
    outputs of a group share one matrix: one solve per group (:func:`_solve_dense`).
    """
    out, in_g = start_rows.shape
    out_g = out // stats.groups
    rows = np.zeros((out, in_g))
    bias = None if start_bias is None else start_bias.astype(np.float64).copy()
    if masks.all():
        return _solve_dense(stats, start_rows, bias, rows, damp)
    lams = np.array([_ridge(stats.hessian[g], damp) for g in range(stats.groups)])
    kept = masks.reshape(out, in_g).sum(axis=1)
    width = kept + (0 if bias is None else 1)
    order = [o for o in np.argsort(width, kind="stable") if width[o] > 0]
    start = 0
    while start < len(order):  # outputs of similar width share a stack (little padding)
        o = order[start]
        if width[o] > _STACK_WIDTH:  # the order is by width: all the rest are wide too
            for o in order[start:]:
                _solve_one(stats, start_rows, bias, masks, rows, o, out_g, lams)
            break
        end = start + 1
        while (end < len(order) and width[order[end]] <= _STACK_WIDTH
               and (end - start + 1) * int(width[order[end]]) ** 2 <= _STACK):
            end += 1
        outs = np.array(order[start:end])
        system, rhs, sel = _masked_systems(stats, start_rows, masks, outs, out_g, lams,
                                           bias is not None)
        try:
            solution = np.linalg.solve(system, rhs[..., None])[..., 0]
        except np.linalg.LinAlgError:  # a singular system in the stack: one at a time
            solution = np.stack([_solve(a, b) for a, b in zip(system, rhs)])
        for b, o in enumerate(outs):
            n = int(kept[o])
            rows[o, sel[b, :n]] = solution[b, :n]
            if bias is not None:
                bias[o] = solution[b, n]
        start = end
    return rows, bias


def _solve_dense(stats: LayerStats, start_rows: np.ndarray, bias: np.ndarray | None,
                 rows: np.ndarray, damp: float) -> tuple[np.ndarray, np.ndarray | None]:
    """:func:`solve_masked` with nothing pruned: one multi-output solve per group."""
    out, in_g = start_rows.shape
    out_g = out // stats.groups
    width = in_g + (0 if bias is None else 1)
    for g in range(stats.groups):
        outs = slice(g * out_g, (g + 1) * out_g)
        lam = _ridge(stats.hessian[g], damp)
        system = stats.hessian[g][:width, :width].copy()
        system[np.arange(in_g), np.arange(in_g)] += lam
        rhs = stats.cross[g][:width].copy()
        rhs[:in_g] += lam * start_rows[outs].T.astype(np.float64)
        solution = _solve(system, rhs)
        rows[outs] = solution[:in_g].T
        if bias is not None:
            bias[outs] = solution[in_g]
    return rows, bias


def _solve_one(stats: LayerStats, start_rows: np.ndarray, bias: np.ndarray | None,
               masks: np.ndarray, rows: np.ndarray, o: int, out_g: int, lams: np.ndarray
               ) -> None:
    """Output ``o``'s ridge system on its kept inputs alone (fills ``rows`` and ``bias``)."""
    g, local = divmod(o, out_g)
    in_g = start_rows.shape[1]
    sel = np.flatnonzero(masks[o])
    idx = sel if bias is None else np.append(sel, in_g)
    reg = np.full(idx.size, lams[g])
    rhs = stats.cross[g][idx, local].copy()
    rhs[: sel.size] += lams[g] * start_rows[o, sel].astype(np.float64)
    if bias is not None:
        reg[-1] = 0.0  # the bias is not pulled towards its start
    solution = _solve(stats.hessian[g][np.ix_(idx, idx)] + np.diag(reg), rhs)
    rows[o, sel] = solution[: sel.size]
    if bias is not None:
        bias[o] = solution[-1]


_STACK = 1 << 22  # most float64 entries in a stack of systems (32 MB)
_STACK_WIDTH = 128  # wider systems are solved one by one: their solve outweighs the call


def _masked_systems(stats: LayerStats, start_rows: np.ndarray, masks: np.ndarray,
                    outs: np.ndarray, out_g: int, lams: np.ndarray, with_bias: bool
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ridge systems of ``outs`` padded to one size: each output's kept inputs, then its
    bias, then padding rows that solve to 0 (identity on the diagonal, zero right-hand side)."""
    in_g = start_rows.shape[1]
    kept = [np.flatnonzero(masks[o]) for o in outs]
    m = max(k.size for k in kept) + int(with_bias)
    index = np.zeros((len(outs), m), dtype=np.int64)
    weight = np.zeros((len(outs), m), dtype=bool)  # a kept weight (pulled to its start)
    valid = np.zeros((len(outs), m), dtype=bool)
    for b, k in enumerate(kept):
        index[b, :k.size] = k
        weight[b, :k.size] = True
        valid[b, :k.size + int(with_bias)] = True
        if with_bias:
            index[b, k.size] = in_g
    groups, local = np.divmod(outs, out_g)
    system = stats.hessian[groups[:, None, None], index[:, :, None], index[:, None, :]]
    system = np.where(valid[:, :, None] & valid[:, None, :], system, 0.0)
    reg = np.where(weight, lams[groups][:, None], 0.0) + np.where(valid, 0.0, 1.0)
    system += reg[:, :, None] * np.eye(m)
    rhs = stats.cross[groups[:, None], index, local[:, None]]
    start = start_rows[outs[:, None], np.where(weight, index, 0)].astype(np.float64)
    rhs = np.where(valid, rhs + np.where(weight, lams[groups][:, None] * start, 0.0), 0.0)
    return system, rhs, index


def solve_codebook(stats: LayerStats, codes: np.ndarray, codebook: np.ndarray,
                   bias: np.ndarray | None, *, fixed_zero: bool, damp: float = 1e-3
                   ) -> tuple[np.ndarray, np.ndarray | None]:
    """Refit the centroids of a clustered layer (and its bias) with the assignment fixed.

    The output is linear in the centroids: ``y_o = sum_k c_k (X B_k)_o + b_o`` with ``B_k`` the
    positions holding code ``k``; the normal equations come straight from ``H`` and ``G``. With
    ``fixed_zero``, code 0 stays exactly 0 (pruned weights stay pruned).
    """
    k = len(codebook)
    out, in_g = codes.shape
    out_g = out // stats.groups
    mkk = np.zeros((k, k))
    rk = np.zeros(k)
    mkb = np.zeros((k, out))
    rb = np.zeros(out)
    nb = np.zeros(out)
    for o in range(out):
        g, local = divmod(o, out_g)
        hessian, cross = stats.hessian[g], stats.cross[g]
        idx = np.flatnonzero(codes[o] != 0) if fixed_zero else np.arange(in_g)
        c = codes[o, idx].astype(np.int64)
        pair = (c[:, None] * k + c[None, :]).ravel()
        mkk += np.bincount(pair, weights=hessian[np.ix_(idx, idx)].ravel(), minlength=k * k
                           ).reshape(k, k)
        rk += np.bincount(c, weights=cross[idx, local], minlength=k)
        mkb[:, o] = np.bincount(c, weights=hessian[idx, in_g], minlength=k)
        rb[o] = cross[in_g, local]
        nb[o] = hessian[in_g, in_g]
    free = np.arange(1 if fixed_zero else 0, k)
    used = free[np.diag(mkk)[free] > 0]  # centroids no calibration row touches keep their value
    lam = damp * (float(np.mean(np.diag(mkk)[used])) if used.size else 1.0)
    n_used = used.size
    if bias is None:
        system = mkk[np.ix_(used, used)] + lam * np.eye(n_used)
        rhs = rk[used] + lam * codebook[used]
    else:
        system = np.zeros((n_used + out, n_used + out))
        system[:n_used, :n_used] = mkk[np.ix_(used, used)] + lam * np.eye(n_used)
        system[:n_used, n_used:] = mkb[used]
        system[n_used:, :n_used] = mkb[used].T
        system[n_used:, n_used:] = np.diag(nb)
        rhs = np.concatenate([rk[used] + lam * codebook[used], rb])
    solution = _solve(system, rhs)
    new_codebook = codebook.astype(np.float64).copy()
    new_codebook[used] = solution[:n_used]
    new_bias = None if bias is None else solution[n_used:]
    return new_codebook, new_bias


def assign_codes(stats: LayerStats, rows: np.ndarray, bias: np.ndarray | None, keep: np.ndarray,
                 codebook: np.ndarray, *, zero_code: bool, damp: float = 1e-3, block: int = 128
                 ) -> tuple[np.ndarray, np.ndarray | None]:
    """Codes for ``rows`` with error feedback (GPTQ, Frantar et al. 2022), on a fixed codebook.

    Nearest-centroid rounding treats every weight alone. Here the input columns are coded one at
    a time and each column's rounding error is spread over the columns not coded yet, weighted
    by the inverse input Hessian, so later weights (and the bias, coded last, never rounded)
    compensate it: the greedy solution of ``min |X (W - Q)|^2`` over codebook values ``Q``.
    Pruned weights (``keep`` false) are coded 0 and pass their error on as well. Groups (of a
    grouped convolution) are processed as one stack. Written here because GPTQ implementations
    (AutoGPTQ, Neural Compressor's ONNX weight-only path) round to a uniform INT4 grid on PyTorch
    modules or MatMul weights, not to a k-means codebook on Conv and Gemm rows. Returns the codes
    as (outputs, inputs) rows and the compensated bias.
    """
    out, in_g = rows.shape
    groups = stats.groups
    out_g = out // groups
    width = in_g + (0 if bias is None else 1)
    hessian = stats.hessian[:, :width, :width].copy()
    diag = np.arange(in_g)
    hessian[:, diag, diag] += np.array([_ridge(h, damp) for h in stats.hessian])[:, None]
    if bias is not None:
        hessian[:, in_g, in_g] += 1e-9 * np.maximum(hessian[:, in_g, in_g], 1.0)
    try:  # inverse Hessian = U^T U, U upper triangular, per group
        upper = np.swapaxes(np.linalg.cholesky(np.linalg.inv(hessian)), 1, 2)
    except np.linalg.LinAlgError:
        upper = np.zeros_like(hessian)
        upper[:, np.arange(width), np.arange(width)] = 1.0 / np.sqrt(
            np.maximum(hessian[:, np.arange(width), np.arange(width)], 1e-12))
    w = rows.astype(np.float64).reshape(groups, out_g, in_g)
    if bias is not None:
        w = np.concatenate([w, bias.astype(np.float64).reshape(groups, out_g, 1)], axis=2)
    kept = keep.reshape(groups, out_g, in_g)
    allowed = np.arange(1 if zero_code else 0, len(codebook))
    order = np.argsort(codebook[allowed], kind="stable")
    centroids, allowed = codebook[allowed][order].astype(np.float64), allowed[order]
    codes = np.zeros((groups, out_g, in_g), dtype=np.int64)
    for start in range(0, in_g, block):  # GPTQ's lazy batches: one matmul per block
        end = min(start + block, in_g)
        errors = np.zeros((groups, out_g, end - start))
        for j in range(start, end):
            nearest = _nearest_sorted(w[:, :, j], centroids)
            q = np.where(kept[:, :, j], centroids[nearest], 0.0)
            codes[:, :, j] = np.where(kept[:, :, j], allowed[nearest], 0)
            err = (w[:, :, j] - q) / upper[:, j, j][:, None]
            w[:, :, j + 1:end] -= err[:, :, None] * upper[:, None, j, j + 1:end]
            w[:, :, j] = q
            errors[:, :, j - start] = err
        w[:, :, end:] -= errors @ upper[:, start:end, end:]
    new_bias = None if bias is None else w[:, :, in_g].reshape(out)
    return codes.reshape(out, in_g), new_bias


def _nearest_sorted(values: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Index of the nearest of ascending ``centroids`` for every value."""
    right = np.clip(np.searchsorted(centroids, values), 1, max(len(centroids) - 1, 1))
    left = right - 1
    if len(centroids) == 1:
        return np.zeros(values.shape, dtype=np.int64)
    return np.where(np.abs(values - centroids[left]) <= np.abs(centroids[right] - values),
                    left, right)


def reconstruction_error(stats: LayerStats, rows: np.ndarray, bias: np.ndarray | None) -> float:
    """``sum |X w + b - y|^2 / sum y^2`` over the calibration rows (0 is perfect)."""
    out_g = rows.shape[0] // stats.groups
    error = 0.0
    for g in range(stats.groups):
        outs = slice(g * out_g, (g + 1) * out_g)
        w = np.concatenate([rows[outs], np.zeros((out_g, 1)) if bias is None
                            else bias[outs, None]], axis=1).astype(np.float64)
        quad = float(np.sum((w @ stats.hessian[g]) * w))
        lin = float(np.sum(w.T * stats.cross[g]))
        error += quad - 2 * lin + float(np.sum(stats.target_sq[outs]))
    total = float(np.sum(stats.target_sq))
    return max(error, 0.0) / total if total > 0 else 0.0


def _solve(system: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    try:
        return np.linalg.solve(system, rhs)
    except np.linalg.LinAlgError:  # singular even with the ridge (all-zero inputs): least norm
        return np.linalg.lstsq(system, rhs, rcond=None)[0]
