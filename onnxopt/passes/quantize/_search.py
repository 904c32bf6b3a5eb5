"""The search for the fastest INT8 candidate that meets the accuracy budget.

Candidates arrive sorted by measured speed (fastest first). Cheap steps come first:

1. each candidate as built;
2. remedies that keep every node in INT8: quantize only compute and value-preserving ops (Add,
   Mul, LayerNorm, Softmax... stay float: residual sums and normalizations are where static
   quantization of transformers loses most), then per-channel weights;
3. per-node fallback (:func:`fallback_search`) on the least damaged of those.

Whatever changed a candidate after it was timed is timed again; the fastest result within budget
wins. When nothing meets the budget, the result with the smallest drop that is still faster than
FP32 is returned with ``met=False``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import onnx

from onnxopt.passes._shared.scoring import Evaluator, Score
from onnxopt.passes.quantize._convert import QuantSpec
from onnxopt.passes._shared.timing import Timing
from onnxopt.passes.quantize._prepare import COMPUTE_OPS
from onnxopt.passes.quantize._sensitivity import NodeSensitivity, SearchResult, fallback_search

# Ops whose QDQ form moves integers without changing values (plus the compute ops themselves).
VALUE_PRESERVING_OPS = ("Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "MaxPool",
                        "Relu", "Clip", "Slice", "Split")
MAX_BASE_CANDIDATES = 3
# Node fallback starts from the least damaged candidate at least this fraction as fast as the
# fastest (a slightly slower but more accurate start needs fewer FP32 nodes).
NEAR_FASTEST = 0.7


@dataclasses.dataclass
class Outcome:
    """The chosen (or best) result, its ranking and timing, and what was tried."""

    result: SearchResult | None
    ranking: list[NodeSensitivity]
    timing: Timing | None
    met: bool
    tried: list[dict[str, Any]]


@dataclasses.dataclass
class SearchSettings:
    min_speedup: float
    top_k: int
    max_fallbacks: int
    try_per_channel: bool


def search(candidates: list[tuple[QuantSpec, onnx.ModelProto, Timing | None]],
           convert: Callable[[QuantSpec], onnx.ModelProto], evaluator: Evaluator,
           rank: Callable[[QuantSpec], list[NodeSensitivity]],
           allowed: Callable[[QuantSpec], set[str]],
           time_it: Callable[[onnx.ModelProto], Timing] | None,
           settings: SearchSettings) -> Outcome:
    """Run the three stages over ``candidates`` (spec, model, timing), fastest first.

    A slower candidate that meets the budget as built does not end the search: the faster ones
    that missed it get their remedies (and the fastest its node fallback) first, and whichever
    result within budget is fastest wins.
    """
    tried: list[dict[str, Any]] = []
    found: list[_Found] = []  # within budget
    missed: list[_Found] = []  # over budget, with the spec's timing when known

    def timed(entry: _Found, record: dict[str, Any]) -> _Found | None:
        """``entry`` with its timing; None when it is no longer faster than FP32."""
        if entry.timing is None and time_it is not None:
            entry.timing = time_it(entry.proto)
            record["speedup_worst"] = round(entry.timing.worst, 3)
        if entry.timing is not None and entry.timing.worst < settings.min_speedup:
            record["note"] = "no longer faster than FP32"
            return None
        return entry

    for spec, proto, timing in candidates[:MAX_BASE_CANDIDATES]:  # 1. as built
        entry = _Found(spec, proto, evaluator.score(proto), timing)
        tried.append(_record("as built", entry))
        if evaluator.within(entry.score):
            found.append(entry)
            break  # every later candidate is slower than this one
        missed.append(entry)
    for base in list(missed):  # 2. remedies, fastest candidate first
        if found and _speed(found) >= _speed_of(base):
            break  # this and the remaining candidates cannot beat what is found
        for remedy, why in _remedies(base.spec, settings.try_per_channel):
            proto = convert(remedy)
            entry = _Found(remedy, proto, evaluator.score(proto), None, base)
            tried.append(_record(why, entry))
            if not evaluator.within(entry.score):
                missed.append(entry)
            elif (ok := timed(entry, tried[-1])) is not None:
                found.append(ok)
                break
    fastest = max((_speed_of(m) for m in missed), default=0.0)
    if missed and (not found or fastest > _speed(found)):  # 3. node fallback
        # from the least damaged variant among the candidates about as fast as the fastest
        start = min((m for m in missed if _speed_of(m) >= NEAR_FASTEST * fastest),
                    key=lambda m: m.score.drop)
        ranking = rank(start.spec)
        result = fallback_search(start.spec, convert, evaluator, ranking,
                                 allowed=allowed(start.spec), top_k=settings.top_k,
                                 max_steps=settings.max_fallbacks, known_score=start.score)
        entry = _Found(result.spec, result.proto, result.score,
                       start.timing if result.spec == start.spec else None, None, result)
        tried.append({**_record("node fallback", entry), "steps": result.history,
                      "leave_one_out": result.effects})
        if result.met:
            if (ok := timed(entry, tried[-1])) is not None:
                found.append(ok)
        else:
            missed.append(entry)
    if found:
        best = max(found, key=lambda f: f.timing.worst if f.timing is not None else 0.0)
        return Outcome(best.as_result(True), rank(best.spec), best.timing, True, tried)
    for entry in sorted(missed, key=lambda m: m.score.drop):  # the least damaged fast one
        record = {"step": "best over budget", "candidate": entry.spec.label()}
        if timed(entry, record) is not None:
            tried.append(record)
            return Outcome(entry.as_result(False), rank(entry.spec), entry.timing, False, tried)
        tried.append(record)
    return Outcome(None, [], None, False, tried)


@dataclasses.dataclass
class _Found:
    spec: QuantSpec
    proto: onnx.ModelProto
    score: Score
    timing: Timing | None
    base: _Found | None = None  # the candidate a remedy started from
    result: SearchResult | None = None  # the fallback search's own record

    def as_result(self, met: bool) -> SearchResult:
        if self.result is not None:
            self.result.met = met
            return self.result
        return SearchResult(self.spec, self.proto, self.score, met, [], {})


def _speed(found: list[_Found]) -> float:
    return max((f.timing.worst for f in found if f.timing is not None), default=math.inf)


def _speed_of(entry: _Found) -> float:
    """The measured speed of a candidate, or of the one a remedy came from (an estimate)."""
    source = entry if entry.timing is not None else entry.base
    return source.timing.worst if source is not None and source.timing is not None else 0.0


def _remedies(spec: QuantSpec, per_channel: bool) -> list[tuple[QuantSpec, str]]:
    out = []
    narrow = None
    if spec.mode == "static" and spec.op_types is None:
        narrow = dataclasses.replace(spec, op_types=COMPUTE_OPS + VALUE_PRESERVING_OPS)
        out.append((narrow, "compute and value-preserving ops only"))
    if per_channel and not spec.per_channel:
        best = narrow or spec
        out.append((dataclasses.replace(best, per_channel=True), "per-channel weights"))
    return out


def _record(step: str, entry: _Found) -> dict[str, Any]:
    return {"step": step, "candidate": entry.spec.label(), "value": entry.score.value,
            "drop": entry.score.drop}
