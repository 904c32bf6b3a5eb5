"""``quantize``: INT8 that picks the right types for the CPU, stays safe, pays, and keeps accuracy.

prepare -> calibrate -> convert, with ONNX Runtime's quantizer doing the rewriting, and four
decisions around it (each in its own module):

* **target** (:mod:`onnxopt.isa`): U8S8 on x86 with VNNI/AMX, 7-bit weights without VNNI,
  S8S8 on ARM; the choice and its reason go into the notes;
* **safety** (:mod:`onnxopt.passes.quantize._safety`): tensors 8 bits would wipe out (an attention mask of
  float32 min, outlier-stretched ranges) stay float, found from their numbers, not names;
* **latency** (:mod:`onnxopt.passes._shared.timing`): static and dynamic candidates, with and without the
  shallow Q/DQ-bound nodes, are timed against FP32 here; only ones faster at every thread count
  count, and when none is, the model stays FP32 and the notes say why; the result's residual
  LayerNorms are moved out of ORT's slow SkipLayerNormalization kernel when that times faster
  (:mod:`onnxopt.passes.fusion._layer_norms`);
* **accuracy** (:mod:`onnxopt.passes.quantize._search`, :mod:`onnxopt.passes.quantize._sensitivity`): remedies that keep
  every node INT8 first, then per-node SQNR, leave-one-out on evaluation data and fallback to
  FP32 until the metric's drop is within ``max_drop``; the sensitivity report
  (:mod:`onnxopt.passes.quantize._report`) lists every compute node.

The calibration table (tensor ranges) is plain JSON: ``calib_table`` reuses it when the file
exists and writes it after calibrating when it does not. When no candidate meets the budget
while beating FP32, the best one is left in the model and :class:`AccuracyBudgetError` (a
``QualityGateError``, exit 1) is raised; the pipeline attaches that model and the report to it.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from onnxopt import runner
from onnxopt.calibration import CalibrationData, open_calibration
from onnxopt.errors import InputError, OnnxoptError, QualityGateError
from onnxopt.feeds import Feeds, check_feeds, input_specs, synthesize_feeds
from onnxopt.graph_outputs import outputs_with_producers
from onnxopt.memory import calibration_batch_size
from onnxopt.metrics import Budget, sqnr_db
from onnxopt.passes._shared.surgery import replace_contents
from onnxopt.passes._shared.scoring import Evaluator, resolve_metric
from onnxopt.passes._shared.activations import capture, small_batch
from onnxopt.passes.quantize._coded import coded_weights
from onnxopt.passes.quantize._calibrate import CalibrationTable, calibrate, float_activations
from onnxopt.passes.quantize._convert import DYNAMIC_OPS, QuantSpec, convert, digest, load_check
from onnxopt.passes.fusion import split_layer_norms
from onnxopt.passes._shared.timing import (Decision, Timing, decide, deploy_threads,
                                            measure_decided)
from onnxopt.passes.quantize._prepare import COMPUTE_OPS, PreparedModel, prepare
from onnxopt.passes.quantize._report import quantized_nodes, sensitivity_report
from onnxopt.passes.quantize._safety import FloatPlan, float_plan, unsafe_tensors
from onnxopt.passes.quantize._search import Outcome, SearchSettings, search
from onnxopt.passes.quantize._sensitivity import node_sqnr
from onnxopt.registry import OptPass, option, register
from onnxopt.isa import QuantTarget, detect_cpu, is_host, resolve_target

# Without evaluation data, fidelity to FP32 on calibration inputs is the metric: mean cosine.
FIDELITY_SAMPLES = 128
SYNTHETIC_SAMPLES = 16
EVAL_BATCH_SIZE = 256  # samples per run of the accuracy check, unless --max-memory says fewer
# Latency: at least this many timed runs per model and thread count, whatever the budget says.
MIN_TIMED_RUNS = 15
# Verification floor without evaluation data: the pipeline's cosine check, at most this.
COSINE_FLOOR = 0.98


@dataclasses.dataclass
class QuantizeConfig:
    mode: str = option("auto", "auto: time static and dynamic INT8 against FP32 on this machine "
                               "and keep the fastest that meets the budget (FP32 if none is "
                               "faster); static; dynamic (MatMul/Gemm only, never Conv).")
    format: str = option("qdq", "qdq (Quantize/Dequantize pairs, ORT's preferred CPU format) "
                                "or qoperator (QLinear* operators).")
    per_channel: bool | None = option(None, "Per-channel weights: true, false, or null "
                                            "(per-tensor first, per-channel as an accuracy "
                                            "remedy).")
    calibration: str = option("minmax", "Calibration method: minmax, entropy or percentile.")
    percentile: float = option(99.999, "Percentile kept by the percentile method.", max=100)
    calibration_samples: int = option(256, "Use at most this many calibration samples.", min=1)
    calib_table: str = option("", "Calibration table JSON: reused if the file exists, else "
                                  "written after calibrating.")
    target: str = option("auto", "CPU to quantize for: auto (this machine; or the pipeline's "
                                 "target) or x86-amx, x86-vnni, x86-avx512, x86-avx2, "
                                 "arm64-dotprod, arm64, generic.")
    activation_type: str = option("auto", "uint8, int8 or auto (from the target).")
    weight_type: str = option("auto", "int8, uint8 or auto (from the target).")
    reduce_range: bool | None = option(None, "7-bit weights; null: from the target.")
    exclude_nodes: list[str] = option([], "Node names that stay FP32.")
    exclude_op_types: list[str] = option([], "Operator types that stay FP32.")
    min_depth: int = option(32, "Also time a candidate keeping compute nodes with a reduction "
                                "depth below this (MACs per quantized value) in FP32.")
    min_speedup: float = option(1.05, "An INT8 candidate must be at least this much faster than "
                                      "FP32 at every measured thread count (an interval that "
                                      "straddles it is measured longer before deciding).")
    threads: list[int] | None = option(None, "Thread counts latency is measured at; null: the "
                                             "pipeline's --threads (default 1 and all cores).")
    latency_budget_s: float = option(2.0, "Seconds of interleaved timing per thread count.")
    measure_latency: bool = option(True, "Time candidates against FP32 (off: no FP32 fallback "
                                         "for speed; auto means static, or dynamic without "
                                         "calibration data).")
    metric: Any = option("auto", "top1, cosine, mse, auto (top1 with labels, else cosine against "
                                 "FP32), or a callable f(outputs, target) -> higher is better.")
    max_drop: float | None = option(None, "Largest metric drop against FP32 (top1: points, "
                                          "default 0.5; cosine: default 0.01; mse/callable: "
                                          "required).")
    eval_samples: int = option(1000, "Use at most this many evaluation samples.", min=1)
    sensitivity_top_k: int = option(6, "Leave-one-out for this many lowest-SQNR nodes.")
    max_fallbacks: int = option(16, "Most nodes the accuracy search may fall back to FP32.")
    min_levels: float = option(2.0, "Keep a tensor float when 98% of its values span fewer "
                                    "integer steps than this.")

    def __post_init__(self) -> None:
        """Bad choices fail when the recipe is read, before any pass runs (ValueError: the
        registry turns it into a one-line InputError)."""
        choices = {"mode": ("auto", "static", "dynamic"), "format": ("qdq", "qoperator"),
                   "calibration": ("minmax", "entropy", "percentile"),
                   "activation_type": ("auto", "uint8", "int8"),
                   "weight_type": ("auto", "uint8", "int8")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"option '{name}' must be one of {', '.join(allowed)}, "
                                 f"got {getattr(self, name)!r}")
        if self.threads is not None and (not self.threads or any(t < 1 for t in self.threads)):
            raise ValueError(f"option 'threads' needs positive counts, got {self.threads}")
        if self.max_drop is not None and self.max_drop < 0:
            raise ValueError(f"option 'max_drop' must be >= 0, got {self.max_drop}")


class AccuracyBudgetError(QualityGateError):
    """No INT8 candidate met the accuracy budget while staying faster than FP32.

    ``model`` is the pipeline's model, already holding the best candidate found (the smallest
    drop), so a caller can still save it; ``notes`` holds the figures.
    """

    def __init__(self, message: str, model: ir.Model, notes: dict[str, Any]) -> None:
        super().__init__(message)
        self.model = model
        self.notes = notes


@register
class QuantizePass(OptPass):
    name = "quantize"
    summary = ("INT8 for the target CPU (static/dynamic, QDQ/QOperator): unsafe tensors and "
               "nodes where INT8 is slower stay FP32; accuracy budget by per-node fallback.")
    Config = QuantizeConfig

    def _deploy_threads(self) -> list[int]:
        """The thread counts latency decides at: the pass option, else the pipeline's."""
        return deploy_threads(self.config.threads or self.context.threads)

    def budget(self) -> Budget:
        """From the config and the context alone (the pass contract): with the user's
        evaluation data, the accuracy search is the check; else a cosine floor that leaves
        room for the search's own ``max_drop`` (at most 0.98)."""
        if self.context.evaluation is not None:
            return Budget("none")
        try:
            metric = resolve_metric(self.config.metric, False)
        except InputError:  # call() reports the bad metric; the floor is the default then
            return Budget("cosine", min_value=COSINE_FLOOR)
        if metric.name != "cosine":
            return Budget("cosine", min_value=COSINE_FLOOR)
        max_drop = metric.default_max_drop if self.config.max_drop is None else self.config.max_drop
        return Budget("cosine", min_value=min(COSINE_FLOOR, 1.0 - float(max_drop) - 0.01))

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        cfg: QuantizeConfig = self.config
        cpu = detect_cpu()
        target = resolve_target(cfg.target if cfg.target != "auto" else self.context.isa, cpu)
        measurable = cfg.measure_latency and is_host(target, cpu)
        self.notes["target"] = {
            "name": target.name, "choice": target.describe(), "reason": target.reason,
            "detected": f"{cpu.target_name} (from {cpu.source})", "latency_measured": measurable}
        if cfg.measure_latency and not measurable:
            self.notes["target"]["latency_note"] = (
                f"latency not measured: target {target.name} is not this machine "
                f"({cpu.target_name}); INT8 is assumed to pay there: confirm on the device")
        with (tempfile.TemporaryDirectory(prefix="onnxopt-quantize-") as tmp,
              outputs_with_producers(model) as aliased):
            result = self._run(model, cfg, target, measurable, Path(tmp))
        return ir.passes.PassResult(model, result.modified or bool(aliased))

    def _run(self, model: ir.Model, cfg: QuantizeConfig, target: QuantTarget, measurable: bool,
             tmp: Path) -> ir.passes.PassResult:
        data = self._calibration_data(model, cfg)
        sample = _activation_sample(model, data, self.context.seed)
        prepared = prepare(model, tmp, {k: [1, *v.shape[1:]] for k, v in sample.items()})
        self.notes["prepare"] = prepared.notes
        if not prepared.nodes:
            self.notes["decision"] = "kept FP32: no Conv, MatMul or Gemm to quantize"
            self.notes["warning"] = self.notes["decision"]
            return ir.passes.PassResult(model, False)
        coded = coded_weights(prepared.proto, COMPUTE_OPS)
        if coded:
            self.notes["coded_weights"] = {
                "kept_float": sorted(coded),
                "why": "weights stored coded (codebook/sparse, e.g. by deep-compress): "
                       "quantizing them would decode them at run time and undo the storage"}
        if all(n.name in coded for n in prepared.nodes):
            self.notes["decision"] = ("kept FP32: every Conv, MatMul and Gemm reads a coded "
                                      "weight (codebook/sparse storage), which stays as stored")
            self.notes["warning"] = self.notes["decision"]
            return ir.passes.PassResult(model, False)
        table = self._calibration_table(prepared, data, cfg, tmp)
        activations = capture(prepared.proto, sample, prepared.session_config)
        if measurable and prepared.session_config:  # candidates are timed from in-memory protos
            measurable = False
            self.notes["target"]["latency_note"] = (
                "latency not measured: the model is over the external-data threshold")
        plan = self._float_plan(prepared, table, activations, cfg, coded)
        specs = self._candidate_specs(prepared, target, table, plan, cfg)
        # FP32 reference outputs before any INT8 model exists: over 2 GB, the FP32 session and
        # the candidates would otherwise be in memory together (1.55x the model, not 1.3x).
        evaluator = self._evaluator(model, prepared, data, cfg)
        protos = self._convert_all(prepared, specs, table)
        if not protos:
            raise OnnxoptError(f"no INT8 candidate could be built: "
                               f"{self.notes.get('candidate_failures')}")
        timings: dict[QuantSpec, Timing | None] = {spec: None for spec in protos}
        order = list(protos)
        if measurable:
            measured, decisions = self._measure(
                prepared.proto, {s.label(): p for s, p in protos.items()}, sample)
            self.notes["latency"] = {label: t.to_dict() for label, t in measured.items()}
            self.notes["latency_decisions"] = {k: d.to_dict() for k, d in decisions.items()}
            timings = {s: measured[s.label()] for s in protos}
            # decision.passed is timing.worst >= min_speedup, after longer measurements of
            # straddling intervals (timing.decide), so the search's own checks agree with it
            order = sorted((s for s in protos if decisions[s.label()].passed),
                           key=lambda s: timings[s].worst, reverse=True)
            if not order:
                best = max(protos, key=lambda s: timings[s].worst)
                self._latency_decision(best.label(), timings[best])
                self.notes["decision"] = (
                    f"kept FP32: no INT8 candidate was {cfg.min_speedup:g}x faster than FP32 at "
                    f"{_threads(self._deploy_threads())} (best: {best.label()}, "
                    f"{decisions[best.label()].describe()}): Quantize/Dequantize overhead "
                    "outweighs the integer arithmetic on this model")
                self.notes["warning"] = self.notes["decision"]
                ranking = node_sqnr(prepared, best, table, activations)
                self.notes.update(sensitivity_report(
                    prepared, ranking, None, plan, _shallow_nodes(prepared, cfg.min_depth),
                    cfg.min_depth, None))
                return ir.passes.PassResult(model, False)
        cache = dict(protos)

        def convert_cached(spec: QuantSpec) -> onnx.ModelProto:
            if spec not in cache:
                cache[spec] = convert(prepared.path, spec, table)
            return cache[spec]

        def time_it(proto: onnx.ModelProto) -> Timing:
            return self._measure(prepared.proto, {"candidate": proto}, sample)[0]["candidate"]

        outcome = search(
            [(s, protos[s], timings[s]) for s in order], convert_cached, evaluator,
            rank=lambda spec: node_sqnr(prepared, spec, table, activations),
            allowed=lambda spec: quantized_nodes(prepared, spec),
            time_it=time_it if measurable else None,
            settings=SearchSettings(cfg.min_speedup, cfg.sensitivity_top_k, cfg.max_fallbacks,
                                    try_per_channel=cfg.per_channel is None))
        self.notes["accuracy"] = {**evaluator.describe(), "searches": outcome.tried,
                                  "evaluations": evaluator.evaluations}
        if measurable:
            self._split_layer_norms(prepared.proto, outcome, evaluator, sample)
        return self._finish(model, prepared, sample, activations, plan, outcome, evaluator)

    def _finish(self, model: ir.Model, prepared: PreparedModel, sample: Feeds,
                activations: dict[str, np.ndarray], plan: FloatPlan, outcome: Outcome,
                evaluator: Evaluator) -> ir.passes.PassResult:
        cfg: QuantizeConfig = self.config
        result = outcome.result
        if result is None:
            self.notes["decision"] = ("kept FP32: every INT8 candidate lost its speed-up once "
                                      "the accuracy search had moved nodes back to FP32")
            self.notes["warning"] = self.notes["decision"]
            self.notes.update(sensitivity_report(
                prepared, [], None, plan, _shallow_nodes(prepared, cfg.min_depth),
                cfg.min_depth, None))
            return ir.passes.PassResult(model, False)
        replace_contents(model, ir.serde.deserialize_model(result.proto))
        output_sqnr = _output_sqnr(result.proto, activations, sample, prepared)
        self.notes.update(sensitivity_report(prepared, outcome.ranking, result, plan,
                                             _shallow_nodes(prepared, cfg.min_depth),
                                             cfg.min_depth, output_sqnr))
        summary = (f"{result.spec.label()}: {evaluator.metric.name} {result.score.value:.4g} "
                   f"(FP32 {evaluator.reference:.4g}, drop {result.score.drop:.3g} "
                   f"{evaluator.metric.unit}, allowed {evaluator.max_drop:g})")
        if outcome.timing is not None:
            decision = self._latency_decision(result.spec.label(), outcome.timing)
            summary += f"; faster than FP32 by {decision.describe()}"
            if decision.verdict == "uncertain":
                self.notes["warning"] = ("INT8 kept on an uncertain latency decision: "
                                         + decision.describe())
        self.notes["model_digest"] = digest(result.proto)
        if not outcome.met:
            self.notes["decision"] = f"budget NOT met; kept the best candidate: {summary}"
            raise AccuracyBudgetError(
                f"quantize: no INT8 candidate met the budget: {summary}", model, self.notes)
        self.notes["decision"] = f"INT8: {summary}"
        if self.context.evaluation is not None:
            self.notes["budget"] = ("not re-checked by the pipeline: the accuracy search on the "
                                    "user's evaluation data is the check (seeded verification "
                                    "inputs do not represent INT8 ranges)")
        return ir.passes.PassResult(model, True)

    def _split_layer_norms(self, fp32: onnx.ModelProto, outcome: Outcome,
                           evaluator: Evaluator, sample: Feeds) -> None:
        """Keep the result's residual LayerNorms out of ORT's slow SkipLayerNormalization kernel
        (:mod:`onnxopt.passes.fusion._layer_norms`) when, timed against the result as it is, that is faster and
        the metric stays within budget (values move by float rounding only, but INT8 rounding
        downstream can amplify that, so the model is scored again)."""
        result = outcome.result
        if result is None:
            return
        proto, count = split_layer_norms(result.proto)
        if not count:
            return
        try:
            load_check(proto, "LayerNorm-split")
        except OnnxoptError as exc:
            self.notes["layer_norms"] = {"rewritten": count, "kept": False, "why": exc.message}
            return
        # Two nearly equal models compared through a noisy machine: the split form is timed
        # against the result as found (the quantity decided), longer than a candidate screen and
        # longer still while the interval straddles 1; every thread count is weighed (the worst
        # one alone flipped the choice run to run under load, though the rewrite was 1.4-1.6x
        # faster side by side). FP32 rides along for the speed-ups the notes report.
        timings, decisions = self._measure(
            result.proto, {"split": proto, "fp32": fp32}, sample, scale=1.5, threshold=1.0,
            rule="geomean", decide_on=["split"], reference_name="as found")
        decision = decisions["split"]
        score = evaluator.score(proto)
        faster = decision.passed
        accurate = evaluator.within(score) if outcome.met else score.drop <= result.score.drop
        as_found = timings["as found"].over(timings["fp32"])
        split = timings["split"].over(timings["fp32"])
        self.notes["layer_norms"] = {
            "rewritten": count, "kept": faster and accurate,
            "speedup_as_found": round(as_found.worst, 3),
            "speedup_split": round(split.worst, 3),
            "split_over_as_found": round(decision.speedup, 3),
            "latency_decision": decision.to_dict(),
            "value_split": score.value}
        if faster and accurate:
            result.proto, result.score, outcome.timing = proto, score, split

    def _measure(self, fp32: onnx.ModelProto, candidates: dict[str, onnx.ModelProto],
                 sample: Feeds, scale: float = 1.0, threshold: float | None = None,
                 **rules: Any) -> tuple[dict[str, Timing], dict[str, Decision]]:
        """Interleaved timing at the deployed thread counts, measured longer while an interval
        straddles ``threshold`` (default ``min_speedup``) (:func:`measure_decided`); the budget
        grows with the model so slow models get enough runs (and with ``scale``)."""
        cfg: QuantizeConfig = self.config
        feeds = _latency_feeds(sample)
        session = runner.create_session(fp32.SerializeToString(), threads=1)
        runner.run(session, feeds)
        start = time.perf_counter()
        for _ in range(3):
            runner.run(session, feeds)
        per_run = (time.perf_counter() - start) / 3
        budget = max(cfg.latency_budget_s, MIN_TIMED_RUNS * per_run * (len(candidates) + 1))
        return measure_decided(fp32, candidates, feeds, self._deploy_threads(), budget * scale,
                               cfg.min_speedup if threshold is None else threshold, **rules)

    def _latency_decision(self, label: str, timing: Timing) -> Decision:
        """The latency decision on the kept (or best) candidate, into the notes: which thread
        count decided, and whether the interval cleared the threshold or stayed uncertain."""
        decision = decide(timing, self.config.min_speedup)
        self.notes["latency_decision"] = {"candidate": label, "threads": self._deploy_threads(),
                                          **decision.to_dict()}
        return decision

    # -- inputs --------------------------------------------------------------------------------

    def _calibration_data(self, model: ir.Model, cfg: QuantizeConfig) -> CalibrationData | None:
        if self.context.calibration is None:
            return None
        data = open_calibration(self.context.calibration, model).limit(cfg.calibration_samples)
        self.notes["calibration_data"] = data.description
        return data

    def _calibration_table(self, prepared: PreparedModel, data: CalibrationData | None,
                           cfg: QuantizeConfig, tmp: Path) -> CalibrationTable | None:
        path = Path(cfg.calib_table) if cfg.calib_table else None
        if path is not None and path.is_file():
            table = CalibrationTable.load(path)
            table.check_covers(float_activations(prepared.proto), path)
            self.notes["calibration"] = {"table": str(path), "method": table.method,
                                         "samples": table.samples, "reused": True}
            return table
        if data is None:
            if cfg.mode == "static":
                raise InputError("static quantization needs calibration data (--calib) or an "
                                 "existing calibration table (--calib-table)")
            self.notes["calibration"] = "none given: dynamic quantization only"
            return None
        table = calibrate(prepared.path, data, cfg.calibration, tmp, cfg.percentile)
        self.notes["calibration"] = {"method": table.method, "samples": table.samples,
                                     "tensors": len(table.ranges)}
        if path is not None:
            table.save(path)
            self.notes["calibration"]["table"] = str(path)
        return table

    def _evaluator(self, model: ir.Model, prepared: PreparedModel, data: CalibrationData | None,
                   cfg: QuantizeConfig) -> Evaluator:
        fp32, config = prepared.proto, prepared.session_config
        batch = (calibration_batch_size(model, self.context.max_memory, EVAL_BATCH_SIZE)
                 if self.context.max_memory else EVAL_BATCH_SIZE)  # the user's memory budget
        if self.context.evaluation is not None:
            feeds, labels = self.context.evaluation
            feeds = _check_stacked(feeds, model)
            n = min(len(next(iter(feeds.values()))), cfg.eval_samples)
            feeds = {k: v[:n] for k, v in feeds.items()}
            labels = None if labels is None else np.asarray(labels)[:n]
            metric = resolve_metric(cfg.metric, labels is not None)
            return Evaluator(fp32, feeds, labels, metric, cfg.max_drop, source="evaluation data",
                             fp32_config=config, batch_size=batch)
        metric = resolve_metric(cfg.metric, False)
        if data is not None:
            feeds = _gather(data, FIDELITY_SAMPLES)
            source = "calibration data (no evaluation data given)"
        else:
            feeds = synthesize_feeds(model, batch=SYNTHETIC_SAMPLES, seed=self.context.seed)
            source = "synthetic inputs (no calibration or evaluation data given)"
        return Evaluator(fp32, feeds, None, metric, cfg.max_drop, source=source,
                         fp32_config=config, batch_size=batch)

    # -- what stays float, and the candidates ------------------------------------------------

    def _float_plan(self, prepared: PreparedModel, table: CalibrationTable | None,
                    activations: dict[str, np.ndarray], cfg: QuantizeConfig,
                    coded: dict[str, list[str]]) -> FloatPlan:
        unsafe = unsafe_tensors(table, activations, cfg.min_levels) if table else []
        self.notes["unsafe_tensors"] = [dataclasses.asdict(t) for t in unsafe]
        plan = float_plan(prepared.proto, unsafe, COMPUTE_OPS)
        known = {n.name for n in prepared.proto.graph.node}
        unknown = sorted(set(cfg.exclude_nodes) - known)
        if unknown:
            raise InputError(f"quantize: exclude_nodes names unknown node(s) {unknown[:5]}")
        user = {name: "excluded by the user (exclude_nodes)" for name in cfg.exclude_nodes}
        user.update({n.name: f"excluded by the user (exclude_op_types {n.op_type})"
                     for n in prepared.proto.graph.node if n.op_type in cfg.exclude_op_types})
        for node, decoders in coded.items():  # the storage stays as stored (_coded)
            user.setdefault(node, "weight stored coded (codebook/sparse): kept as stored")
            for name in decoders:
                user.setdefault(name, f"decodes the coded weight of '{node}'")
        plan.static.update(user)
        plan.dynamic.update(user)
        return plan

    def _candidate_specs(self, prepared: PreparedModel, target: QuantTarget,
                         table: CalibrationTable | None, plan: FloatPlan,
                         cfg: QuantizeConfig) -> list[QuantSpec]:
        """Static, static without shallow (Q/DQ-bound) nodes, dynamic: what latency picks from.

        Per-channel weights enter as an accuracy remedy only (unless asked for): they cost
        speed on small models (1.5x instead of 1.8x for the digits MLP here).
        """
        static = QuantSpec(
            mode="static", quant_format=cfg.format,  # type: ignore[arg-type]
            activation_type=target.activation_type if cfg.activation_type == "auto"
            else cfg.activation_type,  # type: ignore[arg-type]
            weight_type=target.weight_type if cfg.weight_type == "auto"
            else cfg.weight_type,  # type: ignore[arg-type]
            reduce_range=target.reduce_range if cfg.reduce_range is None else cfg.reduce_range,
            per_channel=bool(cfg.per_channel), exclude=frozenset(plan.static),
            quantize_compute_outputs=not plan.keep_compute_outputs_float)
        shallow = _shallow_nodes(prepared, cfg.min_depth)
        specs: list[QuantSpec] = []
        if cfg.mode in ("auto", "static") and table is not None:
            specs.append(static)
            if shallow - static.exclude and len(shallow) < len(prepared.nodes):
                specs.append(static.with_exclude(shallow))
        if cfg.mode in ("auto", "dynamic") and any(
                n.op_type in DYNAMIC_OPS and n.weight for n in prepared.nodes):
            specs.append(dataclasses.replace(static, mode="dynamic", quant_format="qdq",
                                             exclude=frozenset(plan.dynamic),
                                             quantize_compute_outputs=True))
        if not cfg.measure_latency:
            specs = specs[:1]  # nothing to choose by: the first (preferred) candidate
        return specs

    def _convert_all(self, prepared: PreparedModel, specs: list[QuantSpec],
                     table: CalibrationTable | None) -> dict[QuantSpec, onnx.ModelProto]:
        protos, failures = {}, {}
        for spec in specs:
            try:
                protos[spec] = convert(prepared.path, spec, table)
            except OnnxoptError as exc:  # a candidate ORT cannot load is dropped, not shipped
                failures[spec.label()] = exc.message
        self.notes["candidates"] = [s.label() for s in protos]
        if failures:
            self.notes["candidate_failures"] = failures
        return protos




# -- helpers ------------------------------------------------------------------------------------


def _shallow_nodes(prepared: PreparedModel, min_depth: int) -> set[str]:
    """Compute nodes whose reduction depth is too small for INT8 to pay (Q/DQ-bound)."""
    return {n.name for n in prepared.nodes if 0 < n.depth < min_depth}


def _fixed_batch(model: ir.Model) -> int | None:
    firsts = {dims[0] if dims else None for _, _, dims in input_specs(model)}
    first = next(iter(firsts)) if len(firsts) == 1 else None
    return first if isinstance(first, int) else None


def _check_stacked(feeds: Feeds, model: ir.Model) -> Feeds:
    """Stacked evaluation samples: names, dtypes and dims checked on one model-sized batch."""
    counts = {len(np.asarray(v)) for v in feeds.values()}
    if len(counts) != 1:
        raise InputError(f"evaluation inputs hold different numbers of samples: {sorted(counts)}")
    check_feeds({k: np.asarray(v)[:_fixed_batch(model) or 1] for k, v in feeds.items()}, model)
    return {k: np.asarray(v) for k, v in feeds.items()}


def _activation_sample(model: ir.Model, data: CalibrationData | None, seed: int) -> Feeds:
    """A few real samples for activation statistics (seeded synthetic ones without data)."""
    if data is not None:
        return small_batch(data[0], fixed_batch=_fixed_batch(model) is not None)
    return synthesize_feeds(model, batch=2, seed=seed)


def _latency_feeds(sample: Feeds) -> Feeds:
    """One sample: batch-1 latency, what the issue's benchmarks measure."""
    return {k: v[:1] for k, v in sample.items()}


def _gather(data: CalibrationData, limit: int) -> Feeds:
    """Up to ``limit`` samples from the first calibration batches, stacked."""
    parts: list[Feeds] = []
    count = 0
    for batch in data:
        parts.append(batch)
        count += len(next(iter(batch.values())))
        if count >= limit:
            break
    return {k: np.concatenate([p[k] for p in parts])[:limit] for k in parts[0]}


def _output_sqnr(proto: onnx.ModelProto, activations: dict[str, np.ndarray], sample: Feeds,
                 prepared: PreparedModel) -> dict[str, float]:
    """SQNR of every compute node's output in the chosen model against FP32."""
    quantized = capture(proto, sample)
    return {n.output: sqnr_db(activations[n.output], quantized[n.output])
            for n in prepared.nodes + prepared.attention_nodes
            if n.output in activations and n.output in quantized
            and activations[n.output].shape == quantized[n.output].shape}


def _threads(threads: list[int]) -> str:
    return " and ".join(str(t) for t in threads) + " thread(s)"
