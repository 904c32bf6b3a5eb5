"""Latency: is an INT8 candidate faster than the FP32 model, here, at every thread count?

Measured, not predicted: whether INT8 pays depends on the model's size (Quantize/Dequantize cost
dominates models of tens of microseconds), the CPU and ONNX Runtime's fusions. Candidates and the
FP32 model run interleaved in one process (:func:`onnxopt.benchmarking.benchmark`), and a candidate
counts by its *worst* speed-up over the thread counts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx

from onnxopt.benchmarking import benchmark
from onnxopt.feeds import Feeds

FP32 = "fp32"


@dataclasses.dataclass(frozen=True)
class Timing:
    """Speed-up of p50 over FP32 per thread count, with its 95% interval."""

    speedups: Mapping[int, float]
    ci95: Mapping[int, tuple[float, float]]
    p50_ms: Mapping[int, float]

    @property
    def worst(self) -> float:
        return min(self.speedups.values())

    def to_dict(self) -> dict[str, Any]:
        return {f"{t} thread(s)": {"speedup": round(s, 3),
                                   "ci95": [round(x, 3) for x in self.ci95[t]],
                                   "p50_ms": round(self.p50_ms[t], 4)}
                for t, s in self.speedups.items()}


def measure(fp32: onnx.ModelProto, candidates: Mapping[str, onnx.ModelProto], feeds: Feeds,
            threads: Sequence[int], time_budget_s: float) -> dict[str, Timing]:
    """Timing of each candidate (and of FP32 itself, ~1.0x) against ``fp32``."""
    names = [FP32, *candidates]
    result = benchmark([fp32, *candidates.values()], threads=list(threads), feeds=feeds,
                       names=names, time_budget_s=time_budget_s, measure_memory=False,
                       bootstrap=200)
    timings = {}
    for name in names:
        rows = [result.row(name, t) for t in threads]
        timings[name] = Timing({r["threads"]: float(r["speedup"]) for r in rows},
                               {r["threads"]: tuple(r["speedup_ci95"]) for r in rows},
                               {r["threads"]: float(r["p50_ms"]) for r in rows})
    return timings


def geomean(values: Sequence[float]) -> float:
    """Geometric mean: how speed-ups over several thread counts are weighed together."""
    return float(np.exp(np.mean(np.log(list(values)))))
