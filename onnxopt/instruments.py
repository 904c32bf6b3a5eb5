"""Pass instruments: the book-keeping the pipeline does around every pass, out of the loop.

Modelled on TVM's pass instruments: before a pass runs, the pipeline calls every instrument's
``run_before_pass`` in list order; after it, every ``run_after_pass`` in the same order. Each
instrument measures one thing and writes it into the :class:`StepRun` the pass's report record is
built from: :class:`Timing` (seconds), :class:`Verification` (fidelity to the model the pass
received within its budget, drift from the original), :class:`Checkpoints` (the model after
every pass on disk) and :class:`Statistics` (size, MACs, nodes). ``enter_pipeline`` and
``exit_pipeline`` bracket the whole run (``exit_pipeline`` also on an error).

Verification runs the rewritten model with the reference session (optimizations off, one thread)
on the seeded inputs, and compares it with the model the pass received.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from onnxopt import activations, metrics, runner
from onnxopt.errors import InputError, InternalError, VerificationError
from onnxopt.feeds import Feeds
from onnxopt.isolation import RunTimeLimit, bounded_run, deferred_signals
from onnxopt.model_io import (EXTERNAL_DATA_ALIGNMENT, better_as_file, check_proto,
                              needs_external_data, one_line, release_mappings, save_model)
from onnxopt.registry import OptPass
from onnxopt.stats import model_stats

Outputs = list[dict[str, np.ndarray]]  # reference outputs, one dict per feed batch
Frozen = bytes | str  # serialized model, or the path of a temporary file with external data


@dataclasses.dataclass
class StepRun:
    """One pass as the instruments see it; the pipeline builds the pass's record from it."""

    index: int
    name: str
    opt_pass: OptPass
    model: ir.Model | None = None  # after the pass (set before ``run_after_pass``)
    modified: bool = False
    seconds: float = 0.0
    stats: dict[str, Any] = dataclasses.field(default_factory=dict)
    fidelity: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)
    drift: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)
    # set when verification undid the pass (``VerificationError.to_dict()``)
    breach: dict[str, Any] | None = None


class PassInstrument:
    """Hooks around a pipeline's passes; every default does nothing."""

    def enter_pipeline(self, model: ir.Model) -> None:
        """Before the first pass, with the pipeline's (cloned) input model."""

    def run_before_pass(self, step: StepRun, model: ir.Model) -> None:
        """Just before ``step``'s pass runs on ``model``."""

    def run_after_pass(self, step: StepRun) -> None:
        """Just after the pass; ``step.model`` and ``step.modified`` are its result."""

    def exit_pipeline(self) -> None:
        """After the last pass, or when the run stops with an error."""


class Timing(PassInstrument):
    """Wall-clock seconds of the pass itself (first in the list: nothing else is timed)."""

    def __init__(self) -> None:
        self._start = 0.0

    def run_before_pass(self, step: StepRun, model: ir.Model) -> None:
        self._start = time.perf_counter()

    def run_after_pass(self, step: StepRun) -> None:
        step.seconds = time.perf_counter() - self._start


class Statistics(PassInstrument):
    """Size, parameters, MACs and nodes of the input model and after every pass."""

    def __init__(self) -> None:
        self.before: dict[str, Any] = {}

    def enter_pipeline(self, model: ir.Model) -> None:
        self.before = model_stats(model).to_dict()

    def run_after_pass(self, step: StepRun) -> None:
        assert step.model is not None
        step.stats = model_stats(step.model).to_dict()


class Checkpoints(PassInstrument):
    """The model after every pass, as ``NN-pass.onnx`` in a folder."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def run_after_pass(self, step: StepRun) -> None:
        assert step.model is not None
        save_model(step.model, self.folder / f"{step.index + 1:02d}-{step.name}.onnx")


class Verification(PassInstrument):
    """Checks that every pass that modified the model kept its outputs within its budget.

    The input model is always run once (a model ONNX Runtime cannot run is refused before any
    pass); ``check_passes`` False skips the per-pass checks (``verify=False``). A breach is a
    :class:`VerificationError` naming the pass, the output and the first diverging node. With
    ``fall_back`` (the default) it is not raised: the pass is undone (``step.model`` becomes
    the model the pass received, rebuilt from its frozen copy), ``step.breach`` records it, and
    the run goes on; without, it is raised.
    """

    def __init__(self, feeds: list[Feeds], check_passes: bool = True,
                 fall_back: bool = True) -> None:
        self.feeds = feeds
        self.check_passes = check_passes
        self.fall_back = fall_back
        self._freezer = _Freezer()
        self.original: Outputs = []
        self._previous: Outputs = []
        self._previous_frozen: Frozen = b""

    def enter_pipeline(self, model: ir.Model) -> None:
        frozen = self._freezer.freeze(model)
        self.original = _run_all(frozen, self.feeds, "the input model")
        self._previous, self._previous_frozen = self.original, frozen

    def run_after_pass(self, step: StepRun) -> None:
        if not (step.modified and self.check_passes):
            return
        assert step.model is not None
        frozen = self._freezer.freeze(step.model)
        _check_written(frozen, step.name)
        outputs = _run_all(frozen, self.feeds, f"the model after pass '{step.name}'")
        try:
            step.fidelity = _verify(step.name, step.opt_pass.budget(), self._previous, outputs,
                                    self._previous_frozen, frozen, self.feeds)
        except VerificationError as exc:
            if not self.fall_back:
                raise
            self._freezer.release(frozen)
            step.model, step.modified, step.breach = self._restore(), False, exc.to_dict()
            return
        step.drift = _compare_all(self.original, outputs)
        self._freezer.release(self._previous_frozen)
        self._previous, self._previous_frozen = outputs, frozen

    def exit_pipeline(self) -> None:
        self._freezer.close()

    def _restore(self) -> ir.Model:
        """The model the undone pass received, from its frozen copy. A copy with external data
        comes into memory: its temporary folder is removed when the run ends."""
        frozen = self._previous_frozen
        if isinstance(frozen, bytes):
            return ir.serde.deserialize_model(onnx.load_from_string(frozen))
        model = ir.load(frozen)
        ir.external_data.load_to_model(model)
        return model


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
        self.close()

    def close(self) -> None:
        """Remove the temporary folder, if any (signals wait: no half-deleted folder)."""
        if self._folder is not None:
            with deferred_signals():
                self._folder.cleanup()
            self._folder = None

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
            for name in (frozen, frozen + ".data"):
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
