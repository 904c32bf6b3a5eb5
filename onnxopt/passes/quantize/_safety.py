"""Safety: find tensors that 8 bits cannot carry, from their calibrated ranges and sampled values.

No name matching: a tensor is kept in float when quantizing it would wipe it out, which shows in
the numbers. Two signs, either one suffices:

* a range reaching a sentinel magnitude (non-finite, or at least ``SENTINEL``): an additive
  attention mask of float32 min (-3.4e38) gives a scale near 1e36, and every attention score
  becomes 0 after quantization (cosine 0.38-0.41 for three peers' static MiniLM);
* a range stretched by outliers so far that the central 98% of the values fall within fewer
  than ``min_levels`` of the 255 integer steps (a mask of -1e4 or -1e9 does this, as does any
  rare huge value): those values all collapse to one or two integers.

No Quantize/Dequantize pair is put on such a tensor in static mode, and no runtime quantization
reads it in dynamic mode (:func:`float_plan`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping

import numpy as np
import onnx

from onnxopt.passes.quantize._calibrate import CalibrationTable

SENTINEL = 1e30
DEFAULT_MIN_LEVELS = 2.0
_STEPS = 255  # integer steps of an 8-bit range


@dataclasses.dataclass(frozen=True)
class UnsafeTensor:
    """A tensor kept float, with the figures that condemned it."""

    tensor: str
    lowest: float
    highest: float
    levels: float | None  # integer steps spanned by the central 98% (None: not sampled)
    reason: str


def unsafe_tensors(table: CalibrationTable, samples: Mapping[str, np.ndarray],
                   min_levels: float = DEFAULT_MIN_LEVELS) -> list[UnsafeTensor]:
    """Tensors of ``table`` that cannot be quantized; ``samples`` holds values of some of them."""
    found = []
    for name, (lo, hi) in sorted(table.ranges.items()):
        lo, hi = min(lo, 0.0), max(hi, 0.0)  # the quantizer always includes zero
        if not (np.isfinite(lo) and np.isfinite(hi)) or max(-lo, hi) >= SENTINEL:
            found.append(UnsafeTensor(
                name, lo, hi, None,
                f"range [{lo:.3g}, {hi:.3g}] holds sentinel values (e.g. an additive mask of "
                f"float min): an 8-bit scale of {(hi - lo) / _STEPS:.3g} would zero the rest"))
            continue
        values = samples.get(name)
        if values is None or values.size == 0 or hi == lo:
            continue
        finite = values[np.isfinite(values)].astype(np.float64, copy=False)
        if finite.size == 0:
            continue
        p_lo, p_hi = np.percentile(finite, [1.0, 99.0])
        levels = (p_hi - p_lo) / ((hi - lo) / _STEPS)
        if p_hi > p_lo and levels < min_levels:
            found.append(UnsafeTensor(
                name, lo, hi, float(levels),
                f"98% of its values span only {levels:.2g} of 255 integer steps: outliers "
                f"stretch the range to [{lo:.3g}, {hi:.3g}] while the values lie in "
                f"[{p_lo:.3g}, {p_hi:.3g}]"))
    return found


@dataclasses.dataclass
class FloatPlan:
    """Which nodes must stay float so that no unsafe tensor is quantized, per mode.

    Static QDQ: every consumer quantizes its inputs, so consumers stay float; a non-compute
    producer (Add, Mul, Where...) stays float too, while a Conv/MatMul/Gemm producer keeps INT8
    inputs and weights and only stops quantizing its outputs (``keep_compute_outputs_float``).
    Dynamic: only MatMul/Gemm inputs are quantized (at run time), so only compute consumers.
    """

    static: dict[str, str]
    dynamic: dict[str, str]
    keep_compute_outputs_float: bool


def float_plan(proto: onnx.ModelProto, tensors: Iterable[UnsafeTensor],
               compute_ops: Iterable[str]) -> FloatPlan:
    """The :class:`FloatPlan` for ``tensors``; reasons name the tensor and the figures."""
    reasons = {t.tensor: t for t in tensors}
    compute = set(compute_ops)
    plan = FloatPlan({}, {}, False)
    for node in proto.graph.node:
        for name in node.input:
            if name in reasons:
                why = f"reads '{name}': {reasons[name].reason}"
                plan.static.setdefault(node.name, why)
                if node.op_type in compute:
                    plan.dynamic.setdefault(node.name, why)
        for name in node.output:
            if name in reasons:
                if node.op_type in compute:
                    plan.keep_compute_outputs_float = True
                else:
                    plan.static.setdefault(node.name, f"writes '{name}': {reasons[name].reason}")
    return plan
