"""Which float32 activations float16 cannot hold, measured on sample inputs.

float16 has 10 fraction bits between 2**-14 (6.1e-5) and 65504; below 2**-14 it is subnormal and
loses a bit of precision per halving, down to 0 under 6e-8; above 65504 it is inf. A network
whose activations leave that range breaks when converted whatever its kernels do. Measured: Keras
MobileNetV2 with random weights (``weights=None``) shrinks its activations layer after layer, to a
largest value of 9e-7 at block 7 and 6e-11 at the logits; in float16 they round to 0 (cosine 0).

The check runs the float32 model once per batch with every float node output fetched and
computes, per tensor, the relative RMS error of casting it to float16 and back
(``|x - f16(x)| / |x|``, inf when a value overflows). Healthy tensors sit near float16's rounding,
2**-11 / sqrt(3) = 2.8e-4; a tensor far above that is out of float16's range. numpy and ONNX
Runtime do the work; no library reports per-tensor float16 range errors.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from onnxopt.activations import capture
from onnxopt.feeds import Feeds

FP16_MAX = float(np.finfo(np.float16).max)  # 65504
FP16_MIN_NORMAL = float(np.finfo(np.float16).tiny)  # 2**-14
# Largest cast error still taken as float16's rounding (2.8e-4 for values in range), with room.
MAX_CAST_ERROR = 2e-3


@dataclasses.dataclass
class TensorRange:
    """One activation's float32 range and what storing it in float16 costs."""

    name: str
    max_abs: float
    cast_error: float  # relative RMS error of x -> float16 -> float32; inf on overflow

    def reason(self) -> str:
        if self.max_abs > FP16_MAX:
            return f"overflow: max |x| {self.max_abs:.3g} > {FP16_MAX:g}"
        return (f"underflow: max |x| {self.max_abs:.3g}, float16 cast error "
                f"{self.cast_error:.3g} (values under {FP16_MIN_NORMAL:.2g} lose precision)")


def activation_ranges(model: ir.Model, batches: Sequence[Feeds]) -> dict[str, TensorRange]:
    """Range and float16 cast error of every float32 node output of the main graph."""
    names = [v.name for node in model.graph for v in node.outputs
             if v.name and v.dtype == ir.DataType.FLOAT]
    max_abs = dict.fromkeys(names, 0.0)
    err_sq = dict.fromkeys(names, 0.0)
    ref_sq = dict.fromkeys(names, 0.0)
    # The settings of the pipeline's verification: no graph optimization, one thread.
    for outputs in capture(model, names, batches, opt_level="disabled", threads=1):
        for name, out in outputs.items():
            x = np.asarray(out, dtype=np.float64)
            finite = np.isfinite(x)
            if not finite.any():
                continue
            x = np.where(finite, x, 0.0)
            max_abs[name] = max(max_abs[name], float(np.max(np.abs(x))))
            err, ref = _cast_error_sums(x)
            err_sq[name] += err
            ref_sq[name] += ref
    result = {}
    for name in names:
        error = (0.0 if ref_sq[name] == 0 else float(np.sqrt(err_sq[name] / ref_sq[name]))
                 if np.isfinite(err_sq[name]) else float("inf"))
        if max_abs[name] > FP16_MAX:
            error = float("inf")
        result[name] = TensorRange(name, max_abs[name], error)
    return result


def float16_cast_error(x: np.ndarray) -> float:
    """Relative RMS error of ``x`` -> float16 -> float32 (inf when a value overflows)."""
    err, ref = _cast_error_sums(np.asarray(x, dtype=np.float64))
    return 0.0 if ref == 0 else float(np.sqrt(err / ref)) if np.isfinite(err) else float("inf")


def _cast_error_sums(x: np.ndarray) -> tuple[float, float]:
    """Squared error of the float16 round trip of float64 ``x``, and squared norm of ``x``."""
    with np.errstate(over="ignore", invalid="ignore"):
        half = x.astype(np.float16).astype(np.float64)
        return float(np.sum((x - half) ** 2)), float(np.sum(x * x))


def nodes_to_keep(model: ir.Model, ranges: dict[str, TensorRange], max_error: float
                  ) -> dict[str, str]:
    """Nodes to keep in float32, with why: the producer and every consumer of each tensor whose
    cast error exceeds ``max_error``, so that tensor is never stored in float16. Unnamed nodes
    get a name (ORT's converter blocks nodes by name)."""
    keep: dict[str, str] = {}
    taken = {n.name for n in model.graph if n.name}
    for node in model.graph:
        for value in node.outputs:
            found = ranges.get(value.name or "")
            if found is None or found.cast_error <= max_error:
                continue
            for user in [node, *(use.node for use in value.uses())]:
                if user.graph is not model.graph:
                    continue
                if not user.name:
                    user.name = _fresh_name(f"onnxopt_fp32_{user.op_type}", taken)
                keep.setdefault(user.name, f"{value.name}: {found.reason()}")
    return keep


def _fresh_name(stem: str, taken: set[str]) -> str:
    index = 0
    while f"{stem}_{index}" in taken:
        index += 1
    taken.add(f"{stem}_{index}")
    return f"{stem}_{index}"
