"""Accuracy: a metric, a budget, and the evaluation of a candidate model against the FP32 one.

The metric is ``top1`` (percent, against labels, or agreement with the FP32 model's top-1 when
there are none), ``cosine`` (mean per-sample cosine of the outputs against the FP32 model), ``mse``
(against labels or the FP32 outputs), or a Python callable ``f(outputs, target) -> float``
(higher is better; ``target`` is the labels, or the FP32 outputs by name when there are none).
The *drop* is how much worse a candidate scores than the FP32 model, in the metric's units
(points of top-1; cosine units; MSE units): the budget is ``drop <= max_drop``.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import onnx

from onnxopt.errors import InputError
from onnxopt.evaluation import run_batched, session_for
from onnxopt.feeds import Feeds

Outputs = dict[str, np.ndarray]
Target = np.ndarray | Outputs | None


@dataclasses.dataclass(frozen=True)
class Metric:
    """A score of a model's outputs; ``default_max_drop`` None means the user must give one."""

    name: str
    higher_is_better: bool
    default_max_drop: float | None
    unit: str
    score: Callable[[Outputs, Any], float]
    uses_labels: bool


def _first(outputs: Outputs) -> np.ndarray:
    return next(iter(outputs.values()))


def top1_score(outputs: Outputs, target: Any) -> float:
    """Percent of samples whose argmax matches the labels (or the reference's argmax)."""
    pred = _first(outputs).argmax(axis=-1)
    ref = _first(target).argmax(axis=-1) if isinstance(target, Mapping) else np.asarray(target)
    if pred.shape != ref.shape:
        raise InputError(f"labels have shape {list(ref.shape)} but the model predicts "
                         f"{list(pred.shape)}")
    return float(100.0 * np.mean(pred == ref))


def cosine_score(outputs: Outputs, target: Outputs) -> float:
    """Mean over samples of the cosine between all float outputs and the reference's.

    The batch is the leading size most outputs share; an output without it (a constant, such
    as an initializer that is also a graph output) counts whole in every sample's row.
    """
    floats = [k for k, v in target.items() if v.dtype.kind == "f" and v.ndim > 0]
    sizes = Counter(len(target[k]) for k in floats)
    batch = max(sizes, key=lambda n: (sizes[n], n)) if sizes else 1

    def rows(out: Outputs) -> np.ndarray:
        parts = [out[k].reshape(batch, -1) if len(out[k]) == batch
                 else np.broadcast_to(out[k].reshape(1, -1), (batch, out[k].size))
                 for k in floats]
        return np.concatenate([p.astype(np.float64) for p in parts], axis=1)

    a, b = rows(outputs), rows(target)
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    both_zero = (na == 0) & (nb == 0)
    cos = np.where(both_zero, 1.0, (a * b).sum(axis=1) / np.maximum(na * nb, 1e-300))
    return float(np.mean(cos))


def mse_score(outputs: Outputs, target: Any) -> float:
    """Mean squared error of the first output against the labels (or the reference's)."""
    ref = _first(target) if isinstance(target, Mapping) else np.asarray(target)
    out = _first(outputs)
    if out.shape != ref.shape:
        raise InputError(f"targets have shape {list(ref.shape)}, the output {list(out.shape)}")
    return float(np.mean((out.astype(np.float64) - ref) ** 2))


METRICS = {
    "top1": Metric("top1", True, 0.5, "points of top-1", top1_score, True),
    "cosine": Metric("cosine", True, 0.01, "cosine", cosine_score, False),
    "mse": Metric("mse", False, None, "MSE", mse_score, True),
}


def resolve_metric(spec: Any, has_labels: bool) -> Metric:
    """``auto``: top-1 against labels when there are some, else cosine against FP32."""
    if callable(spec):
        name = getattr(spec, "__name__", "custom")
        return Metric(name, True, None, name, spec, True)
    if spec in (None, "", "auto"):
        return METRICS["top1" if has_labels else "cosine"]
    if spec not in METRICS:
        raise InputError(f"unknown metric '{spec}' (known: auto, {', '.join(METRICS)}, "
                         "or a Python callable)")
    return METRICS[spec]


@dataclasses.dataclass(frozen=True)
class Score:
    value: float
    drop: float  # how much worse than FP32, in the metric's units (>= 0 is worse)


class Evaluator:
    """Scores candidate models on fixed evaluation data against the FP32 model."""

    def __init__(self, fp32: onnx.ModelProto, feeds: Feeds, labels: np.ndarray | None,
                 metric: Metric, max_drop: float | None, *, source: str,
                 fp32_config: Mapping[str, str] | None = None, batch_size: int = 256) -> None:
        self.feeds = feeds
        self.batch_size = batch_size
        self.labels = labels
        self.metric = metric
        self.source = source
        self.samples = len(next(iter(feeds.values())))
        if max_drop is None:
            max_drop = metric.default_max_drop
        if max_drop is None:
            raise InputError(f"metric '{metric.name}' needs an explicit max_drop")
        self.max_drop = float(max_drop)
        self.reference_outputs = self._run(fp32, fp32_config)  # config: its external data
        self.target: Target = (labels if labels is not None and metric.uses_labels
                               else self.reference_outputs)
        self.reference = self.metric.score(self.reference_outputs, self.target)
        self.evaluations = 0

    def score(self, proto: onnx.ModelProto) -> Score:
        self.evaluations += 1
        value = self.metric.score(self._run(proto), self.target)
        better = self.metric.higher_is_better
        drop = (self.reference - value) if better else (value - self.reference)
        return Score(value, float(drop))

    def within(self, score: Score) -> bool:
        return score.drop <= self.max_drop + 1e-12

    def describe(self) -> dict[str, Any]:
        return {"metric": self.metric.name, "unit": self.metric.unit, "fp32": self.reference,
                "max_drop": self.max_drop, "samples": self.samples,
                "batch_size": self.batch_size, "data": self.source,
                "labels": self.labels is not None and self.metric.uses_labels}

    def _run(self, proto: onnx.ModelProto, config: Mapping[str, str] | None = None) -> Outputs:
        # Deployment settings (all graph optimizations): QDQ groups run as integer kernels.
        session = session_for(proto, config=config)
        return run_batched(session, self.feeds, batch_size=self.batch_size)
