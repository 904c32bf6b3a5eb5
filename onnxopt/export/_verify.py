"""Numerical check of an export: the framework and ONNX Runtime run the same seeded inputs.

The result is an :class:`ExportCheck`, stored in the model's ``metadata_props`` so it travels with
the file, and logged. A dynamic batch axis is checked at a second batch size, because a wrong
reshape often holds at the traced size only.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import onnx_ir as ir
from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

from onnxopt import runner
from onnxopt.errors import InputError, QualityGateError
from onnxopt.feeds import input_specs, synthesize_feeds
from onnxopt.metrics import Budget, max_abs_error, max_rel_error
from onnxopt.model_io import EXTERNAL_DATA_THRESHOLD, save_model, tensor_bytes

logger = logging.getLogger("onnxopt.export")

METADATA_PREFIX = "onnxopt.export."
SEED = 0

# A reference takes arrays in graph-input order and returns arrays in graph-output order.
Reference = Callable[[list[np.ndarray]], list[np.ndarray]]
Status = Literal["passed", "failed", "loaded", "skipped"]
# ORT's Python exceptions derive from Exception directly; these are the ones a bad graph raises.
ORT_ERRORS: tuple[type[Exception], ...] = (
    ort_state.Fail,
    ort_state.InvalidArgument,
    ort_state.InvalidGraph,
    ort_state.NotImplemented,
    ort_state.RuntimeException,
    ort_state.InvalidProtobuf,
)


@dataclasses.dataclass(frozen=True)
class ExportCheck:
    """How an export was produced and how closely ONNX Runtime reproduces the framework.

    ``status`` is ``passed``/``failed`` after a numerical check, ``loaded`` for ONNX inputs (checked
    and loaded by ONNX Runtime, no framework to compare with) and ``skipped`` with ``verify=False``.
    """

    exporter: str
    reference: str
    status: Status
    batch_sizes: tuple[int, ...] = ()
    max_abs_error: float | None = None
    max_rel_error: float | None = None
    rtol: float | None = None
    atol: float | None = None
    worst_output: str | None = None
    fallback_reason: str | None = None

    def summary(self) -> str:
        """One line for logs and reports."""
        text = f"{self.exporter}: {self.status}"
        if self.max_abs_error is not None:
            text += (
                f" vs {self.reference} at batch {_join(self.batch_sizes)}: max abs error "
                f"{self.max_abs_error:.3g}, max rel error {self.max_rel_error:.3g} "
                f"(allowed rtol={self.rtol:g}, atol={self.atol:g})"
            )
        if self.fallback_reason:
            text += f"; fell back after: {self.fallback_reason}"
        return text

    def to_metadata(self) -> dict[str, str]:
        """``metadata_props`` entries (``onnxopt.export.*``); None fields are left out."""
        props = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value is None or value == ():
                continue
            if field.name == "batch_sizes":
                text = _join(value)
            elif isinstance(value, float):
                text = repr(value)  # round-trips exactly
            else:
                text = str(value)
            props[METADATA_PREFIX + field.name] = text
        return props

    @classmethod
    def from_model(cls, model: ir.Model) -> ExportCheck | None:
        """Read back the check that :func:`onnxopt.export.export` stored, if any."""
        props = model.metadata_props
        if METADATA_PREFIX + "status" not in props:
            return None
        kwargs: dict[str, object] = {}
        for field in dataclasses.fields(cls):
            raw = props.get(METADATA_PREFIX + field.name)
            if raw is None:
                continue
            if field.name == "batch_sizes":
                kwargs[field.name] = tuple(int(b) for b in raw.split(",") if b)
            elif field.name in ("max_abs_error", "max_rel_error", "rtol", "atol"):
                kwargs[field.name] = float(raw)
            else:
                kwargs[field.name] = raw
        return cls(**kwargs)  # type: ignore[arg-type]

    def stamp(self, model: ir.Model) -> None:
        """Store this check in the model's metadata, replacing an earlier one."""
        for key in [k for k in model.metadata_props if k.startswith(METADATA_PREFIX)]:
            del model.metadata_props[key]
        model.metadata_props.update(self.to_metadata())


def verification_batches(example_batch: int | None, dynamic: bool) -> tuple[int, ...]:
    """The example's batch size, then a second one (1, or 3 when the example has batch 1)."""
    first = example_batch or 1
    if not dynamic:
        return (first,)
    return (first, 1 if first != 1 else 3)


def verify_export(
    model: ir.Model,
    reference: Reference,
    *,
    exporter: str,
    reference_name: str,
    batch_sizes: Sequence[int],
    rtol: float,
    atol: float,
    examples: Mapping[str, np.ndarray] | None = None,
    fallback_reason: str | None = None,
) -> tuple[ExportCheck, set[str]]:
    """Compare ORT with ``reference`` on seeded inputs; raise QualityGateError above tolerance.

    ``examples`` (by input name) give the shape of each input past axis 0 (a dynamic sequence
    length is checked at the example's length, not 1); integer and boolean ones also give the
    values, tiled along the batch axis, because random ids can fall outside an embedding. Also
    returns the outputs whose axis 0 followed the batch size at every size tried.
    """
    try:
        session = _reference_session(model)
    except ORT_ERRORS as exc:
        raise QualityGateError(
            f"export verification failed: ONNX Runtime cannot load the exported model: "
            f"{_first_line(exc)}"
        ) from exc
    names = [name for name, _, _ in input_specs(model)]
    out_names = [v.name for v in model.graph.outputs]
    budget = Budget("allclose", rtol=rtol, atol=atol)
    worst_abs, worst_rel, worst_output, breach = 0.0, 0.0, None, None
    follows_batch = set(out_names) if len(batch_sizes) > 1 else set()
    for batch in batch_sizes:
        feeds = _feeds(model, batch, examples or {})
        try:
            ort_out = runner.run(session, feeds)
        except ORT_ERRORS as exc:
            raise QualityGateError(
                f"export verification failed: ONNX Runtime cannot run the exported model at batch "
                f"{batch}: {_first_line(exc)}" + _batch_hint(batch_sizes)
            ) from exc
        ref_out = reference([feeds[n] for n in names])
        if len(ref_out) != len(out_names):
            raise QualityGateError(
                f"export verification failed: {reference_name} returned {len(ref_out)} outputs, "
                f"the ONNX model has {len(out_names)}"
            )
        for name, ref in zip(out_names, ref_out):
            ref, out = np.asarray(ref), ort_out[name]
            if out.ndim == 0 or out.shape[0] != batch:
                follows_batch.discard(name)
            problem = budget.check(ref, out)
            if ref.shape == out.shape:
                abs_err, rel_err = max_abs_error(ref, out), max_rel_error(ref, out)
                if worst_output is None or abs_err > worst_abs or math.isnan(abs_err):
                    worst_output = name
                worst_abs, worst_rel = _max(worst_abs, abs_err), _max(worst_rel, rel_err)
            if problem and breach is None:
                breach = f"output '{name}' at batch {batch}: {problem}"
    check = ExportCheck(
        exporter=exporter,
        reference=reference_name,
        status="failed" if breach else "passed",
        batch_sizes=tuple(batch_sizes),
        max_abs_error=worst_abs,
        max_rel_error=worst_rel,
        rtol=rtol,
        atol=atol,
        worst_output=worst_output,
        fallback_reason=fallback_reason,
    )
    if breach:
        error = QualityGateError(
            f"export verification failed: ONNX Runtime differs from {reference_name} at {breach}"
            f"; worst over batch sizes {_join(tuple(batch_sizes))}: max abs error "
            f"{worst_abs:.3g}, max rel error {worst_rel:.3g}" + _batch_hint(batch_sizes, breach)
        )
        error.check = check  # type: ignore[attr-defined]
        raise error
    logger.info("export verified: %s", check.summary())
    return check, follows_batch


def check_loads(model: ir.Model, source: str | None = None) -> None:
    """Create an ORT session for the model; an ONNX file ORT cannot load is an InputError."""
    try:
        _reference_session(model)
    except ORT_ERRORS as exc:
        raise InputError(f"ONNX Runtime cannot load the model: {_first_line(exc)}", source) from exc


def _reference_session(model: ir.Model):  # noqa: ANN202 (onnxruntime.InferenceSession)
    """ORT's verification session; large models go through a temporary file (protobuf 2 GB)."""
    if tensor_bytes(model) <= EXTERNAL_DATA_THRESHOLD:
        return runner.reference_session(ir.serde.serialize_model(model).SerializeToString())
    with tempfile.TemporaryDirectory(prefix="onnxopt-verify-") as tmp:
        path = save_model(model, Path(tmp) / "model.onnx")
        return runner.reference_session(str(path))


def _feeds(model: ir.Model, batch: int, examples: Mapping[str, np.ndarray]) -> dict:
    """Seeded random inputs at ``batch``, shaped and (for integers) valued after the examples."""
    shapes = {n: [batch, *a.shape[1:]] for n, a in examples.items() if a.ndim}
    feeds = synthesize_feeds(model, batch=batch, shapes=shapes, seed=SEED)
    for name, example in examples.items():
        if name in feeds and example.dtype.kind not in "fc":
            feeds[name] = _tile(example, batch)
    return feeds


def _tile(example: np.ndarray, batch: int) -> np.ndarray:
    """Repeat or cut ``example`` along axis 0 to ``batch`` rows."""
    if example.ndim == 0 or example.shape[0] == 0:
        return example
    return np.take(example, np.arange(batch) % example.shape[0], axis=0)


def _batch_hint(batch_sizes: Sequence[int], breach: str | None = None) -> str:
    if len(batch_sizes) < 2 or (breach and f"at batch {batch_sizes[0]}:" in breach):
        return ""
    return " (the batch axis may not really be dynamic: try dynamic_batch=False)"


def _max(a: float, b: float) -> float:
    return b if math.isnan(b) else max(a, b)


def _join(values: tuple[int, ...]) -> str:
    return ",".join(str(v) for v in values)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]
