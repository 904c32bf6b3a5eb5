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

from onnxopt.errors import InputError
from onnxopt.evaluation import ModelLike, run_batched, session_for
from onnxopt.feeds import Feeds
from onnxopt.metrics import sample_cosines

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

    return float(np.mean(sample_cosines(rows(target), rows(outputs))))


def worst_output_cosine(outputs: Outputs, reference: Outputs) -> float:
    """The lowest, over outputs, of an output's mean per-sample cosine against the reference."""
    worst = 1.0
    for name, out in outputs.items():
        ref = reference[name].reshape(len(out), -1)
        worst = min(worst, float(np.mean(sample_cosines(ref, out.reshape(len(out), -1)))))
    return worst


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
    """Scores candidate models on fixed evaluation data against the FP32 model.

    ``threads``: the sessions' intra-op threads (None: ORT's choice); all graph optimizations
    are on, as deployed (QDQ groups run as integer kernels).
    """

    def __init__(self, fp32: ModelLike, feeds: Feeds, labels: np.ndarray | None,
                 metric: Metric, max_drop: float | None, *, source: str,
                 fp32_config: Mapping[str, str] | None = None, batch_size: int = 256,
                 threads: int | None = None) -> None:
        self.feeds = feeds
        self.batch_size = batch_size
        self.threads = threads
        self.labels = labels
        self.metric = metric
        self.source = source
        self.samples = len(next(iter(feeds.values())))
        if max_drop is None:
            max_drop = metric.default_max_drop
        if max_drop is None:
            raise InputError(f"metric '{metric.name}' needs an explicit max_drop")
        self.max_drop = float(max_drop)
        self.reference_outputs = self.outputs(fp32, fp32_config)  # config: its external data
        self.target: Target = (labels if labels is not None and metric.uses_labels
                               else self.reference_outputs)
        self.reference = self.metric.score(self.reference_outputs, self.target)
        self.evaluations = 0

    def score(self, model: ModelLike) -> Score:
        self.evaluations += 1
        return self.score_outputs(self.outputs(model))

    def score_outputs(self, outputs: Outputs) -> Score:
        value = self.metric.score(outputs, self.target)
        return Score(value, self.drop(value))

    def drop(self, value: float) -> float:
        """How much worse ``value`` is than the FP32 model's score, in the metric's units."""
        better = self.metric.higher_is_better
        return float((self.reference - value) if better else (value - self.reference))

    def within(self, score: Score) -> bool:
        return score.drop <= self.max_drop + 1e-12

    def describe(self) -> dict[str, Any]:
        return {"metric": self.metric.name, "unit": self.metric.unit, "fp32": self.reference,
                "max_drop": self.max_drop, "samples": self.samples,
                "batch_size": self.batch_size, "data": self.source,
                "labels": self.labels is not None and self.metric.uses_labels}

    def outputs(self, model: ModelLike, config: Mapping[str, str] | None = None) -> Outputs:
        """Every output of ``model`` over the evaluation feeds."""
        session = session_for(model, threads=self.threads, config=config)
        return run_batched(session, self.feeds, batch_size=self.batch_size)


class GuardedEvaluator:
    """``deep-compress``'s budget: the top-1 drop of :class:`Evaluator`, and two guards.

    A model is within budget when, against the model received: its top-1 accuracy dropped by at
    most ``max_drop`` points, at most ``max_flips`` percent of its top-1 predictions changed (with
    labels), and the mean per-sample cosine of every output is at least ``min_cosine``.

    Why the two guards: a few hundred labelled samples cannot see a drop of 0.5 points (that is
    one or two samples), and a search that tries dozens of candidates finds the lucky ones. The
    flips (predictions changed, right or wrong) bound the drop on any data like the evaluation
    data, and the cosine moves smoothly before predictions change. Measured on digits (270
    validation / 450 test samples): top-1 on validation stayed level down to 2.5% of the MLP's
    weights while test had lost 0.44 points (mean cosine 0.989); a LeNet-5 at 2 bits per layer
    kept its validation top-1 and changed 7 test predictions, losing 1.1 points.
    """

    def __init__(self, reference: ModelLike, feeds: Feeds, labels: np.ndarray | None,
                 max_drop: float, min_cosine: float, max_flips: float = 100.0) -> None:
        self.feeds, self.labels = feeds, labels
        self.max_drop, self.min_cosine, self.max_flips = max_drop, min_cosine, max_flips
        self.top1 = Evaluator(reference, feeds, labels, METRICS["top1"], max_drop,
                              source="evaluation data", threads=1)
        self.reference = self.top1.reference_outputs
        self.baseline = self.accuracy(self.reference)
        self.reference_top1 = next(iter(self.reference.values())).argmax(axis=-1)

    @property
    def samples(self) -> int:
        return self.top1.samples

    def describe(self) -> str:
        guard = f"mean output cosine >= {self.min_cosine:g}"
        if self.labels is not None:
            return (f"top-1 drop <= {self.max_drop:g} points, predictions changed <= "
                    f"{self.max_flips:g}%, {guard}; on {self.samples} evaluation samples")
        return f"{guard} against the model received, on {self.samples} samples"

    def score(self, model: ModelLike) -> dict[str, float]:
        outputs = self.top1.outputs(model)
        scores = {"cosine": round(self.cosine(outputs), 6)}
        if self.labels is not None:
            scores["top1"] = round(self.accuracy(outputs), 4)
            changed = next(iter(outputs.values())).argmax(axis=-1) != self.reference_top1
            scores["flips_pct"] = round(100.0 * float(np.mean(changed)), 4)
        return scores

    def ok(self, scores: dict[str, float]) -> bool:
        if scores["cosine"] < self.min_cosine:
            return False
        if self.labels is None:
            return True
        # the drop of the reported (4-decimal) top-1; the tolerance absorbs float error
        return (self.top1.drop(scores["top1"]) <= self.max_drop + 1e-9
                and scores["flips_pct"] <= self.max_flips + 1e-9)

    def accuracy(self, outputs: Outputs) -> float:
        """Top-1 against the labels, in percent (NaN without labels)."""
        if self.labels is None:
            return float("nan")
        return self.top1.score_outputs(outputs).value

    def cosine(self, outputs: Outputs) -> float:
        """Worst output's mean per-sample cosine against the reference."""
        return worst_output_cosine(outputs, self.reference)
