"""The pass pipeline: runs a recipe's passes in order with instruments around each one.

Instruments (:mod:`onnxopt.instruments`), not pass bodies, do the book-keeping: timing, model
statistics, verification against ONNX Runtime, and optional checkpoints. Verification runs the
rewritten model with the reference session (optimizations off, one thread) on seeded inputs after
every pass that modified the model, and compares it with the model the pass received, within the
pass's declared budget. Drift from the original model is recorded too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx_ir as ir

from onnxopt import provenance, safety
from onnxopt.errors import (InputError, InternalError, OnnxoptError, QualityGateError,
                            VerificationError)
from onnxopt.feeds import synthesize_feeds
from onnxopt.instruments import (Checkpoints, PassInstrument, Statistics, StepRun, Timing,
                                 Verification)
from onnxopt.model_io import has_external_tensors, is_big, one_line, release_mappings
from onnxopt.recipes import RecipeLike, Step, apply_overrides, load_recipe
from onnxopt.registry import OptPass, PassContext
from onnxopt.stats import macs_text

REPORT_SCHEMA_VERSION = 1


@dataclasses.dataclass
class PassRecord:
    """What one pass did: its options, time, statistics after it, and its fidelity."""

    name: str
    options: dict[str, Any]
    modified: bool
    seconds: float
    stats: dict[str, Any]
    budget: str
    fidelity: dict[str, dict[str, float]]  # per output, against the model the pass received
    drift: dict[str, dict[str, float]]  # per output, against the original model
    notes: dict[str, Any]


@dataclasses.dataclass
class OptimizationReport:
    """Per-pass records plus the before/after statistics; JSON is the source of truth."""

    recipe: str
    before: dict[str, Any]
    after: dict[str, Any]
    passes: list[PassRecord]
    needs_onnxruntime: bool = False
    # versions, recipe, seed, source hash, target ISA: also stamped into the output model
    provenance: dict[str, str] = dataclasses.field(default_factory=dict)
    schema_version: int = REPORT_SCHEMA_VERSION
    # verification breaches: a pass that was undone (pass, output, node, detail, message)
    warnings: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return jsonable(dataclasses.asdict(self))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def to_markdown(self) -> str:
        """The per-pass waterfall as a Markdown table."""
        rows = [
            "| step | params | size (KiB) | zipped (KiB) | MACs | nodes | time (s) | worst cosine vs original |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
            _md_row("original", self.before, 0.0, None),
        ]
        for rec in self.passes:
            worst = min((m["cosine"] for m in rec.drift.values()), default=None)
            rows.append(_md_row(rec.name + ("" if rec.modified else " (no change)"), rec.stats, rec.seconds, worst))
        text = f"### Recipe `{self.recipe}`\n\n" + "\n".join(rows) + "\n"
        if self.warnings:
            text += "\n" + "".join(f"- **undone**: {w['message']}\n" for w in self.warnings)
        if self.provenance:  # the same facts are stamped into the output model's metadata
            p = self.provenance
            text += (f"\nonnxopt {p.get('version')}, onnxruntime {p.get('onnxruntime_version')}, "
                     f"seed {p.get('seed')}, target {p.get('target_isa')}, source sha256 "
                     f"{p.get('source_sha256', '')[:16]}...\n")
        return text


def _md_row(name: str, stats: dict[str, Any], seconds: float, cosine: float | None) -> str:
    cos = "" if cosine is None else f"{cosine:.6f}"
    return (f"| {name} | {stats['params']:,} | {stats['size_bytes'] / 1024:.1f} | "
            f"{stats['zipped_bytes'] / 1024:.1f} | {macs_text(stats)} | {stats['nodes']} | "
            f"{seconds:.2f} | {cos} |")


class Pipeline:
    """An ordered list of steps, built from a recipe, run over a model."""

    def __init__(self, steps: list[Step], *, name: str = "custom", verify: bool = True,
                 checkpoint_dir: str | Path | None = None,
                 on_breach: Literal["fallback", "raise"] = "fallback") -> None:
        if on_breach not in ("fallback", "raise"):
            raise InputError(f"on_breach must be 'fallback' or 'raise', got {on_breach!r}")
        self.steps = steps
        self.name = name
        self.verify = verify
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        self.on_breach = on_breach

    @classmethod
    def from_recipe(cls, recipe: RecipeLike, overrides: dict[str, Any] | None = None,
                    **kwargs: Any) -> Pipeline:
        """Build from a recipe; ``overrides`` as in :func:`onnxopt.recipes.apply_overrides`."""
        name, steps = load_recipe(recipe)
        if overrides:
            steps = apply_overrides(steps, overrides)
        return cls(steps, name=name, **kwargs)

    def run(self, model: ir.Model, context: PassContext | None = None,
            progress: Any = None) -> tuple[ir.Model, OptimizationReport]:
        """Run every step on a copy of ``model``; the caller's model is left untouched.

        ``progress``, if given, is called as ``progress(step_index, step_name)`` before each step.

        A pass that misses its own budget (an accuracy search that could not meet ``max_drop``)
        raises :class:`QualityGateError` after leaving its best candidate in the model; the error
        then carries ``partial = (model, report)`` so callers can still save that candidate.

        A pass whose result fails verification is undone (``on_breach="fallback"``): the model
        it received goes on to the next pass, and the breach is in the report's ``warnings``
        and the pass's notes. With ``on_breach="raise"``, :class:`VerificationError` is raised
        with ``report`` set to the report up to the last verified pass.
        """
        context = context or PassContext()
        # provenance: hash the source before cloning (the clone does not keep its origin)
        origin = provenance.record(model, self.name, self.steps, context.seed, context.isa)
        context.provenance = origin
        model = _working_copy(model, context)
        statistics = Statistics()
        instruments: list[PassInstrument] = [
            Timing(), Verification(context.verify_feeds, check_passes=self.verify,
                                   fall_back=self.on_breach == "fallback")]
        if self.checkpoint_dir is not None:
            instruments.append(Checkpoints(self.checkpoint_dir))
        instruments.append(statistics)
        records: list[PassRecord] = []
        warnings: list[dict[str, Any]] = []
        needs_ort = False

        def report(*extra: dict[str, Any]) -> OptimizationReport:
            """The report so far (``after``: the last recorded pass's statistics)."""
            after = records[-1].stats if records else statistics.before
            return OptimizationReport(self.name, statistics.before, after, records, needs_ort,
                                      origin, warnings=[*warnings, *extra])

        with contextlib.ExitStack() as stack:
            for instrument in instruments:
                stack.callback(instrument.exit_pipeline)
                instrument.enter_pipeline(model)
            for index, step in enumerate(self.steps):
                if progress is not None:
                    progress(index, step.name)
                step_run = StepRun(index, step.name, step.build(context))
                for instrument in instruments:
                    instrument.run_before_pass(step_run, model)
                result, gate_error = _call(step_run.opt_pass, model, step.name)
                model = step_run.model = result.model
                step_run.modified = result.modified
                release_mappings(model)  # big models: pages the pass read stop counting
                try:
                    for instrument in instruments:
                        instrument.run_after_pass(step_run)
                except VerificationError as exc:
                    exc.report = report(exc.to_dict())
                    raise
                assert step_run.model is not None
                model = step_run.model  # the pass's result, or its input if it was undone
                if step_run.breach is not None:
                    warnings.append(step_run.breach)
                    _note_undone(step_run.opt_pass.notes, step_run.breach)
                needs_ort = needs_ort or (step_run.modified and step_run.opt_pass.needs_onnxruntime)
                records.append(_record(step, step_run))
                if gate_error is not None:
                    provenance.stamp(model, origin)
                    gate_error.partial = (model, report())
                    raise gate_error
        provenance.stamp(model, origin)
        return model, report()


def _working_copy(model: ir.Model, context: PassContext) -> ir.Model:
    """The copy the passes rewrite, and verification inputs in ``context`` if it had none."""
    model = model.clone()
    if has_external_tensors(model) and not is_big(model):
        # Reliability: external data is kept only where protobuf needs it (over the
        # threshold); below, tensors come into memory so every pass sees ordinary tensors
        # and the output is one self-contained file. (The clone's values are replaced; the
        # caller's model still maps its files.)
        ir.external_data.load_to_model(model)
    if not context.verify_feeds:
        safety.check_feedable(model)  # reliability: one line, not a numpy allocation error
        context.verify_feeds = [synthesize_feeds(model, batch=2, seed=context.seed)]
    return model


def _call(opt_pass: OptPass, model: ir.Model,
          name: str) -> tuple[ir.passes.PassResult, QualityGateError | None]:
    """Run one pass; a missed budget of its own comes back with its best candidate in the model."""
    try:
        return opt_pass(model), None
    except VerificationError:
        raise
    except QualityGateError as exc:
        return ir.passes.PassResult(model, True), exc
    except OnnxoptError:
        raise
    except ir.passes.PassError as exc:
        raise InternalError(f"pass '{name}' failed: {exc}") from exc
    except Exception as exc:  # reliability: see _unexpected
        raise _unexpected(name, exc) from exc


def _note_undone(notes: dict[str, Any], breach: dict[str, Any]) -> None:
    """The pass's notes say it was undone, and why (the console prints ``warning``)."""
    undone = f"undone, the model before this pass is kept: {breach['message']}"
    notes["warning"] = f"{notes['warning']}; {undone}" if notes.get("warning") else undone
    notes["verification"] = breach


def _record(step: Step, run: StepRun) -> PassRecord:
    return PassRecord(name=step.name, options=step.options, modified=run.modified,
                      seconds=run.seconds, stats=run.stats,
                      budget=run.opt_pass.budget().describe(), fidelity=run.fidelity,
                      drift=run.drift, notes=run.opt_pass.notes)


def _unexpected(pass_name: str, exc: Exception) -> InternalError:
    """A pass that fails with an unexpected exception met a model it does not handle (fuzzing
    finds these: malformed or unusual graphs that pass the checker). That is the pass's
    limitation, not bad input: exit 3, one line with the pass and the cause; ``--debug`` shows
    the traceback for a bug report."""
    return InternalError(f"pass '{pass_name}' cannot handle this model ({type(exc).__name__}: "
                         f"{one_line(exc)}); rerun with --debug for the traceback")


def jsonable(obj: Any) -> Any:
    """Plain JSON values: infinities become strings, numpy scalars become Python numbers."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        value = float(obj)
        return value if np.isfinite(value) else str(value)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, Path):
        return str(obj)
    return obj
