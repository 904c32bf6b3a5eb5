"""Latency: is a candidate faster than a reference model, here, at the thread counts deployed?

Measured, not predicted: whether INT8 pays depends on the model's size (Quantize/Dequantize cost
dominates models of tens of microseconds), the CPU and ONNX Runtime's fusions. Candidates and the
reference run interleaved in blocks with settle runs, in one process
(:func:`onnxopt.benchmarking.benchmark`).

Decisions need a clear answer, not one noisy reading: in ``make demo`` one 2-thread reading of
the MLP's INT8 graph gave 0.92x (95% interval 0.906-1.266) against a threshold of 1.05x, while
run alone in blocks it is 1.8x faster. So a decision (:func:`decide`) looks at the interval:

* it *clears* when the interval (and the point estimate) lie at or above the threshold;
* it *fails* when they lie below;
* otherwise it *straddles*: :func:`measure_decided` measures the straddling thread counts again,
  ``EXTENSION_FACTOR`` times longer each time, at most ``EXTENSIONS`` times. Still straddling,
  the decision is *uncertain* and follows the rule: keep the candidate when the point estimate
  clears the threshold at the deciding thread count.

``worst`` rule (INT8 candidates): the candidate must clear at every thread count; the deciding
count is a failing one if any, else a straddling one, else the closest call (lowest speed-up).
``geomean`` rule (LayerNorm forms, nearly equal models whose worst count alone flipped run to
run): the geometric means of the point estimates and of the interval bounds decide.

Thread counts: the pipeline's ``--threads`` (:attr:`onnxopt.registry.PassContext.threads`), by
default 1 and every usable core (:func:`deploy_threads`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import onnx

from onnxopt.benchmarking import benchmark
from onnxopt.feeds import Feeds

FP32 = "fp32"
EXTENSIONS = 2  # longer measurements at most, while an interval straddles the threshold
EXTENSION_FACTOR = 2.0  # each lasts this many times the previous one
CLEARS, FAILS, STRADDLES, UNCERTAIN = "clears", "fails", "straddles", "uncertain"
Rule = Literal["worst", "geomean"]


def deploy_threads(threads: Sequence[int] | None) -> list[int]:
    """The thread counts decisions are made at: ``threads`` (``--threads``), else 1 and every
    usable core."""
    if threads:
        return list(dict.fromkeys(int(t) for t in threads))
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return list(dict.fromkeys([1, max(1, cores)]))


@dataclasses.dataclass(frozen=True)
class Timing:
    """Speed-up of p50 over the reference per thread count, with its 95% interval, and how many
    measurements (1 + extensions) the figures at each count took to settle."""

    speedups: Mapping[int, float]
    ci95: Mapping[int, tuple[float, float]]
    p50_ms: Mapping[int, float]
    measurements: Mapping[int, int] = dataclasses.field(default_factory=dict)

    @property
    def worst(self) -> float:
        return min(self.speedups.values())

    def to_dict(self) -> dict[str, Any]:
        return {f"{t} thread(s)": {"speedup": round(s, 3),
                                   "ci95": [round(x, 3) for x in self.ci95[t]],
                                   "p50_ms": round(self.p50_ms[t], 4),
                                   "measurements": self.measurements.get(t, 1)}
                for t, s in self.speedups.items()}

    def updated(self, newer: Timing) -> Timing:
        """These figures with the thread counts ``newer`` measured replaced by its own."""
        counts = {t: self.measurements.get(t, 1) + 1 for t in newer.speedups}
        return Timing({**self.speedups, **newer.speedups}, {**self.ci95, **newer.ci95},
                      {**self.p50_ms, **newer.p50_ms}, {**self.measurements, **counts})

    def over(self, other: Timing) -> Timing:
        """Speed-ups of this model over ``other``, both measured against one reference. The
        interval is conservative (bound over opposite bound), never narrower than either."""
        return Timing({t: s / other.speedups[t] for t, s in self.speedups.items()},
                      {t: (lo / other.ci95[t][1], hi / other.ci95[t][0])
                       for t, (lo, hi) in self.ci95.items()},
                      dict(self.p50_ms), dict(self.measurements))


@dataclasses.dataclass(frozen=True)
class Decision:
    """Whether a candidate passed, how clearly, and at which thread count."""

    passed: bool
    verdict: str  # clears, fails, or uncertain (still straddling: decided by the point estimate)
    threads: int | None  # the deciding thread count; None: the geometric mean over all decided
    speedup: float
    ci95: tuple[float, float]
    threshold: float
    rule: Rule
    measurements: int

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "verdict": self.verdict,
                "deciding_threads": self.threads if self.threads is not None
                else "geometric mean", "speedup": round(self.speedup, 3),
                "ci95": [round(x, 3) for x in self.ci95], "threshold": self.threshold,
                "rule": self.rule, "measurements": self.measurements}

    def describe(self) -> str:
        where = (f"at {self.threads} thread(s)" if self.threads is not None
                 else "geometric mean over the thread counts")
        text = (f"{self.speedup:.2f}x {where} (95% interval {self.ci95[0]:.2f}-"
                f"{self.ci95[1]:.2f}, threshold {self.threshold:g}x)")
        if self.verdict == UNCERTAIN:
            text += (f"; uncertain after {self.measurements} measurements, decided by the "
                     "point estimate")
        return text


def verdict(speedup: float, ci95: tuple[float, float], threshold: float) -> str:
    """``clears``, ``fails`` or ``straddles``: where the interval lies against ``threshold``."""
    lo, hi = ci95
    if min(lo, speedup) >= threshold:
        return CLEARS
    if max(hi, speedup) < threshold:
        return FAILS
    return STRADDLES


def pending(timing: Timing, threshold: float, rule: Rule = "worst") -> list[int]:
    """Thread counts to measure longer before deciding (empty: the answer is clear)."""
    if rule == "geomean":
        point, ci = _geomean_of(timing)
        return list(timing.speedups) if verdict(point, ci, threshold) == STRADDLES else []
    verdicts = {t: verdict(s, timing.ci95[t], threshold) for t, s in timing.speedups.items()}
    if FAILS in verdicts.values():
        return []  # one count below the threshold decides, whatever the others say
    return [t for t, v in verdicts.items() if v == STRADDLES]


def decide(timing: Timing, threshold: float, rule: Rule = "worst") -> Decision:
    """The decision on ``timing`` as it stands (see the module docstring for the rules)."""
    if rule == "geomean":
        point, ci = _geomean_of(timing)
        v = verdict(point, ci, threshold)
        return Decision(point >= threshold, UNCERTAIN if v == STRADDLES else v, None, point, ci,
                        threshold, rule, max(timing.measurements.values(), default=1))
    verdicts = {t: verdict(s, timing.ci95[t], threshold) for t, s in timing.speedups.items()}
    for kind in (FAILS, STRADDLES, CLEARS):
        counts = [t for t, v in verdicts.items() if v == kind]
        if counts:
            break
    t = min(counts, key=lambda c: timing.speedups[c])
    point = timing.speedups[t]
    return Decision(point >= threshold, UNCERTAIN if kind == STRADDLES else kind, t, point,
                    tuple(timing.ci95[t]), threshold, rule, timing.measurements.get(t, 1))


def measure(fp32: onnx.ModelProto, candidates: Mapping[str, onnx.ModelProto], feeds: Feeds,
            threads: Sequence[int], time_budget_s: float,
            reference_name: str = FP32) -> dict[str, Timing]:
    """Timing of each candidate (and of the reference itself, ~1.0x, as ``reference_name``)
    against ``fp32``."""
    names = [reference_name, *candidates]
    result = benchmark([fp32, *candidates.values()], threads=list(threads), feeds=feeds,
                       names=names, time_budget_s=time_budget_s, measure_memory=False,
                       bootstrap=200)
    timings = {}
    for name in names:
        rows = [result.row(name, t) for t in threads]
        timings[name] = Timing({r["threads"]: float(r["speedup"]) for r in rows},
                               {r["threads"]: tuple(r["speedup_ci95"]) for r in rows},
                               {r["threads"]: float(r["p50_ms"]) for r in rows},
                               {r["threads"]: 1 for r in rows})
    return timings


def measure_decided(reference: onnx.ModelProto, candidates: Mapping[str, onnx.ModelProto],
                    feeds: Feeds, threads: Sequence[int], time_budget_s: float, threshold: float,
                    rule: Rule = "worst", decide_on: Sequence[str] | None = None,
                    reference_name: str = FP32,
                    ) -> tuple[dict[str, Timing], dict[str, Decision]]:
    """:func:`measure`, then longer measurements (interleaved again with the reference) of the
    candidates in ``decide_on`` (default: all) whose interval straddles ``threshold``, at the
    straddling thread counts only; returns the timings and each decided candidate's decision."""
    timings = measure(reference, candidates, feeds, threads, time_budget_s, reference_name)
    names = list(candidates if decide_on is None else decide_on)
    budget = time_budget_s
    for _ in range(EXTENSIONS):
        todo = {n: pending(timings[n], threshold, rule) for n in names}
        todo = {n: counts for n, counts in todo.items() if counts}
        if not todo:
            break
        budget *= EXTENSION_FACTOR
        counts = sorted({t for c in todo.values() for t in c})
        again = measure(reference, {n: candidates[n] for n in todo}, feeds, counts, budget,
                        reference_name)
        for n, wanted in todo.items():
            newer = again[n]
            timings[n] = timings[n].updated(Timing(
                {t: newer.speedups[t] for t in wanted}, {t: newer.ci95[t] for t in wanted},
                {t: newer.p50_ms[t] for t in wanted}))
    return timings, {n: decide(timings[n], threshold, rule) for n in names}


def geomean(values: Sequence[float]) -> float:
    """Geometric mean: how speed-ups over several thread counts are weighed together."""
    return float(np.exp(np.mean(np.log(list(values)))))


def _geomean_of(timing: Timing) -> tuple[float, tuple[float, float]]:
    ts = list(timing.speedups)
    return (geomean([timing.speedups[t] for t in ts]),
            (geomean([timing.ci95[t][0] for t in ts]), geomean([timing.ci95[t][1] for t in ts])))
