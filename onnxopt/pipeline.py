"""The pass pipeline: runs a recipe's passes in order with instruments around each one.

Instruments, not pass bodies, do the book-keeping: timing, model statistics, verification against
ONNX Runtime, and optional checkpoints. Verification runs the rewritten model with the reference
session (optimizations off, one thread) on seeded inputs after every pass that modified the model,
and compares it with the model the pass received, within the pass's declared budget. Drift from
the original model is recorded too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from onnxopt import activations, metrics, provenance, runner, safety
from onnxopt.errors import (
    InputError,
    InternalError,
    OnnxoptError,
    QualityGateError,
    VerificationError,
)
from onnxopt.feeds import Feeds, synthesize_feeds
from onnxopt.isolation import RunTimeLimit, bounded_run, deferred_signals
from onnxopt.model_io import (EXTERNAL_DATA_ALIGNMENT, better_as_file, check_proto,
                              has_external_tensors, is_big, needs_external_data, one_line,
                              release_mappings, save_model)
from onnxopt.recipes import RecipeLike, Step, apply_overrides, load_recipe
from onnxopt.registry import OptPass, PassContext
from onnxopt.stats import ModelStats, macs_text, model_stats

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
                 checkpoint_dir: str | Path | None = None) -> None:
        self.steps = steps
        self.name = name
        self.verify = verify
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None

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
        """
        context = context or PassContext()
        # provenance: hash the source before cloning (the clone does not keep its origin)
        origin = provenance.record(model, self.name, self.steps, context.seed, context.target)
        context.provenance = origin
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
        with _Freezer() as freezer:
            frozen = freezer.freeze(model)
            original = _run_all(frozen, context.verify_feeds, "the input model")
            before = model_stats(model).to_dict()
            previous, previous_frozen = original, frozen
            records: list[PassRecord] = []
            needs_ort = False
            for index, step in enumerate(self.steps):
                if progress is not None:
                    progress(index, step.name)
                opt_pass: OptPass = step.build(context)
                start = time.perf_counter()
                gate_error: QualityGateError | None = None
                try:
                    result = opt_pass(model)
                except VerificationError:
                    raise
                except QualityGateError as exc:
                    gate_error = exc
                    result = ir.passes.PassResult(model, True)
                except OnnxoptError:
                    raise
                except ir.passes.PassError as exc:
                    raise InternalError(f"pass '{step.name}' failed: {exc}") from exc
                except Exception as exc:  # reliability: see _unexpected
                    raise _unexpected(step.name, exc) from exc
                seconds = time.perf_counter() - start
                model = result.model
                release_mappings(model)  # big models: pages the pass read stop counting
                needs_ort = needs_ort or (result.modified and opt_pass.needs_onnxruntime)
                fidelity: dict[str, dict[str, float]] = {}
                drift: dict[str, dict[str, float]] = {}
                if result.modified and self.verify:
                    frozen = freezer.freeze(model)
                    _check_written(frozen, step.name)
                    outputs = _run_all(frozen, context.verify_feeds,
                                       f"the model after pass '{step.name}'")
                    fidelity = _verify(step.name, opt_pass.budget(), previous, outputs,
                                       previous_frozen, frozen, context.verify_feeds)
                    drift = _compare_all(original, outputs)
                    freezer.release(previous_frozen)
                    previous, previous_frozen = outputs, frozen
                if self.checkpoint_dir is not None:
                    save_model(model, self.checkpoint_dir / f"{index + 1:02d}-{step.name}.onnx")
                records.append(PassRecord(
                    name=step.name, options=step.options, modified=result.modified,
                    seconds=seconds, stats=model_stats(model).to_dict(),
                    budget=opt_pass.budget().describe(), fidelity=fidelity, drift=drift,
                    notes=opt_pass.notes,
                ))
                if gate_error is not None:
                    provenance.stamp(model, origin)
                    gate_error.partial = (model, OptimizationReport(  # type: ignore[attr-defined]
                        self.name, before, records[-1].stats, records, needs_ort, origin))
                    raise gate_error
        after = records[-1].stats if records else before
        provenance.stamp(model, origin)
        return model, OptimizationReport(self.name, before, after, records, needs_ort, origin)


def _unexpected(pass_name: str, exc: Exception) -> InternalError:
    """A pass that fails with an unexpected exception met a model it does not handle (fuzzing
    finds these: malformed or unusual graphs that pass the checker). That is the pass's
    limitation, not bad input: exit 3, one line with the pass and the cause; ``--debug`` shows
    the traceback for a bug report."""
    return InternalError(f"pass '{pass_name}' cannot handle this model ({type(exc).__name__}: "
                      f"{one_line(exc)}); rerun with --debug for the traceback")


Frozen = bytes | str  # serialized model, or the path of a temporary file with external data


class _Freezer:
    """Models in the form ONNX Runtime and the checker take.

    Bytes for a small model; otherwise (over ``FILE_SESSION_THRESHOLD``, or tensors still in
    external files) a file with external data in a private temporary folder: protobuf cannot
    serialize 2 GB, a model read from external data would otherwise be resolved against the
    working directory, and ORT maps an aligned file where it would copy bytes three times.
    Removed on exit.
    """

    def __init__(self) -> None:
        self._folder: tempfile.TemporaryDirectory[str] | None = None
        self._count = 0

    def __enter__(self) -> _Freezer:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._folder is not None:
            with deferred_signals():
                self._folder.cleanup()

    def freeze(self, model: ir.Model) -> Frozen:
        if not needs_external_data(model) and not better_as_file(model):
            return ir.serde.serialize_model(model).SerializeToString()
        if self._folder is None:
            self._folder = tempfile.TemporaryDirectory(prefix="onnxopt-verify-")
        self._count += 1
        path = Path(self._folder.name) / f"step{self._count}.onnx"
        ir.save(model, path, external_data=path.name + ".data",
                alignment=EXTERNAL_DATA_ALIGNMENT)
        release_mappings(model)  # every page was read for the copy; ORT maps the copy next
        return str(path)

    def release(self, frozen: Frozen) -> None:
        """Delete a frozen file no longer needed (a 2 GB model per step adds up)."""
        if isinstance(frozen, str):
            for name in (frozen, frozen + ".data", frozen + ".probe.onnx"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(name)


def _check_written(frozen: Frozen, pass_name: str) -> None:
    try:
        check_proto(frozen)  # bytes as they are: a parsed copy would cost the model's size again
    except InputError as exc:
        raise InternalError(f"pass '{pass_name}' produced an invalid model: {exc.message}") from exc


def _run_all(frozen: Frozen, feeds: list[Feeds], what: str) -> list[dict[str, np.ndarray]]:
    """Reference outputs for every feed batch."""
    try:
        session = runner.reference_session(frozen)
        return [_bounded(session, f) for f in feeds]
    except RunTimeLimit as exc:
        raise InputError(f"{what}: {exc}") from exc
    except Exception as exc:  # ORT raises its own exception types for load and run failures
        # the input model is the user's; a pass's output that ORT refuses is the pass's fault
        error = InputError if what == "the input model" else InternalError
        raise error(f"{what} does not run in ONNX Runtime: {one_line(exc)}") from exc


def _bounded(session: Any, feeds: Feeds) -> dict[str, np.ndarray]:
    """``runner.run`` with a time limit (reliability: an endless Loop is an error, not a hang)."""
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, bounded_run(session, dict(feeds), outputs=names)))


def _compare_all(ref: list[dict[str, np.ndarray]], out: list[dict[str, np.ndarray]]) -> dict[str, dict[str, float]]:
    """Worst case over batches of every metric, per output."""
    result: dict[str, dict[str, float]] = {}
    for r_batch, o_batch in zip(ref, out):
        for name, r in r_batch.items():
            m = metrics.compare(r, o_batch[name]) if r.shape == o_batch[name].shape else {
                "max_abs": float("inf"), "max_rel": float("inf"), "cosine": 0.0, "sqnr_db": 0.0}
            worst = result.setdefault(name, m)
            for key in ("max_abs", "max_rel"):
                worst[key] = max(worst[key], m[key])
            for key in ("cosine", "sqnr_db"):
                worst[key] = min(worst[key], m[key])
    return result


def _verify(pass_name: str, budget: metrics.Budget, ref: list[dict[str, np.ndarray]],
            out: list[dict[str, np.ndarray]], before: Frozen, after: Frozen,
            feeds: list[Feeds]) -> dict[str, dict[str, float]]:
    """Raise :class:`VerificationError` naming the pass, the output and the culprit node."""
    for r_batch, o_batch in zip(ref, out):
        for name, r in r_batch.items():
            if name not in o_batch:
                raise VerificationError(pass_name, name, None, "output disappeared")
            breach = budget.check(r, o_batch[name])
            if breach:
                node = _first_diverging_node(before, after, feeds[0], budget)
                raise VerificationError(pass_name, name, node, breach)
    return _compare_all(ref, out)


def _first_diverging_node(before_frozen: Frozen, after_frozen: Frozen, feeds: Feeds,
                          budget: metrics.Budget) -> str | None:
    """The earliest node of the rewritten graph whose output breaches the budget.

    Only tensors that keep their name across the pass can be compared; the first one (in the
    rewritten graph's topological order) that breaches points at the rewrite that went wrong.
    """
    before, after = _graph_of(before_frozen), _graph_of(after_frozen)
    produced_before = {o for node in before.graph.node for o in node.output}
    candidates = [(node, o) for node in after.graph.node for o in node.output if o in produced_before]
    names = [o for _, o in candidates]
    if not names:
        return None
    ref, out = (_run_with_outputs(f, names, feeds) for f in (before_frozen, after_frozen))
    for node, name in candidates:
        if budget.check(ref[name], out[name]):
            return f"{node.name or '?'} ({node.op_type}) -> '{name}'"
    return None


def _graph_of(frozen: Frozen) -> onnx.ModelProto:
    """The protobuf of a frozen model (without external data: graph structure only)."""
    if isinstance(frozen, bytes):
        return onnx.load_from_string(frozen)
    return onnx.load(frozen, load_external_data=False)


def _run_with_outputs(frozen: Frozen, names: list[str], feeds: Feeds) -> dict[str, np.ndarray]:
    with activations.outputs_added(frozen, names) as source:  # a file: beside it, no tensor copy
        session = runner.reference_session(source)
    return _bounded(session, feeds)


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
