"""Accuracy and fidelity of ONNX models, measured with ONNX Runtime on real data.

Inputs are run in batches (a model with a fixed batch size gets its last batch zero-padded), so a
test set of any size fits any model the exporter produced.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from onnxopt import metrics, runner
from onnxopt.errors import InputError
from onnxopt.model_io import EXTERNAL_DATA_ALIGNMENT, better_as_file, to_ir, to_proto

ModelLike = ir.Model | onnx.ModelProto | str | Path
Inputs = Mapping[str, np.ndarray] | np.ndarray


def session_for(model: ModelLike, **options: object) -> ort.InferenceSession:
    """An ONNX Runtime session for a path, a ``ModelProto`` or an ``onnx_ir.Model``.

    A model holding more than ``FILE_SESSION_THRESHOLD`` bytes of tensors goes through a
    temporary file with external data, which ORT maps instead of copying (see
    :func:`as_file`); smaller ones are handed over as bytes.
    """
    with ort_source(model) as source:
        return runner.create_session(source, **options)


@contextlib.contextmanager
def ort_source(model: ModelLike) -> Iterator[str | bytes]:
    """What ``onnxruntime.InferenceSession`` takes for ``model``: its path, its serialized bytes,
    or, over ``FILE_SESSION_THRESHOLD`` bytes of tensors, the path of a temporary copy with
    external data (:func:`as_file`; protobuf cannot serialize past 2 GB). A session made inside
    the block outlives it."""
    if isinstance(model, (str, Path)):
        yield str(model)
    elif not better_as_file(model):
        yield to_proto(model).SerializeToString()
    else:
        with as_file(model) as path:
            yield str(path)


@contextlib.contextmanager
def as_file(model: ir.Model | onnx.ModelProto) -> Iterator[Path]:
    """``model`` written to a private temporary folder, tensors in 64 KiB-aligned external data
    (streamed by onnx_ir, no copy of the model in memory); the folder goes on exit. A session
    made from the file inside the block keeps working: ORT has read or mapped the tensors, and
    a mapping outlives its unlinked file."""
    with tempfile.TemporaryDirectory(prefix="onnxopt-session-") as tmp:
        path = Path(tmp) / "model.onnx"
        ir.save(to_ir(model), path, external_data=path.name + ".data",
                alignment=EXTERNAL_DATA_ALIGNMENT)
        yield path


def run_batched(session: ort.InferenceSession, feeds: Inputs, *, input_name: str | None = None,
                batch_size: int = 256) -> dict[str, np.ndarray]:
    """Every output of ``session`` over all samples of ``feeds``, run ``batch_size`` at a time."""
    feeds = _as_feeds(session, feeds, input_name)
    n = _sample_count(feeds)
    fixed = _fixed_batch(session)
    step = fixed or max(1, int(batch_size))
    names = [o.name for o in session.get_outputs()]
    chunks: list[list[np.ndarray]] = []
    for start in range(0, n, step):
        batch = {k: v[start:start + step] for k, v in feeds.items()}
        real = len(next(iter(batch.values())))
        if fixed and real < fixed:  # pad to the model's fixed batch, drop the padding afterwards
            batch = {k: np.concatenate([v, np.zeros((fixed - real, *v.shape[1:]), v.dtype)])
                     for k, v in batch.items()}
        chunks.append([out[:real] for out in session.run(names, batch)])
    return {name: np.concatenate([c[i] for c in chunks]) for i, name in enumerate(names)}


def predict(model: ModelLike | None, feeds_or_array: Inputs, *, input_name: str | None = None,
            batch_size: int = 256, session: ort.InferenceSession | None = None) -> np.ndarray:
    """The first output of ``model`` (or of a ready ``session``) over all samples."""
    session = session or session_for(_required(model))
    outputs = run_batched(session, feeds_or_array, input_name=input_name, batch_size=batch_size)
    return next(iter(outputs.values()))


def top1_accuracy(model: ModelLike | None, x: Inputs, y: np.ndarray, *,
                  input_name: str | None = None, batch_size: int = 256,
                  session: ort.InferenceSession | None = None) -> float:
    """Top-1 accuracy in percent: argmax of the first output over its last axis against ``y``."""
    logits = predict(model, x, input_name=input_name, batch_size=batch_size, session=session)
    y = np.asarray(y)
    if logits.shape[:-1] != y.shape:
        raise InputError(f"labels have shape {list(y.shape)} but the model's output is "
                         f"{list(logits.shape)}; expected labels of shape "
                         f"{list(logits.shape[:-1])}")
    return float(100.0 * np.mean(logits.argmax(axis=-1) == y))


def fidelity(model_a: ModelLike, model_b: ModelLike, feeds: Inputs, *,
             input_name: str | None = None, batch_size: int = 256) -> dict[str, dict[str, float]]:
    """:func:`onnxopt.metrics.compare` of every output of ``model_b`` against ``model_a``.

    Outputs are paired by position (passes keep the order) and named after ``model_a``'s.
    """
    ref = run_batched(session_for(model_a), feeds, input_name=input_name, batch_size=batch_size)
    out = run_batched(session_for(model_b), feeds, input_name=input_name, batch_size=batch_size)
    if len(ref) != len(out):
        raise InputError(f"the models have {len(ref)} and {len(out)} outputs; cannot compare them")
    result = {}
    for (name, r), o in zip(ref.items(), out.values()):
        if r.shape != o.shape:
            raise InputError(f"output '{name}' has shape {list(r.shape)} in the first model and "
                             f"{list(o.shape)} in the second")
        result[name] = metrics.compare(r, o)
    return result


def _required(model: ModelLike | None) -> ModelLike:
    if model is None:
        raise InputError("give a model or a session")
    return model


def _as_feeds(session: ort.InferenceSession, feeds: Inputs, input_name: str | None
              ) -> dict[str, np.ndarray]:
    """An array becomes the feed of the model's only input (or of ``input_name``)."""
    if isinstance(feeds, Mapping):
        return {k: np.asarray(v) for k, v in feeds.items()}
    if input_name is None:
        inputs = [i.name for i in session.get_inputs()]
        if len(inputs) != 1:
            raise InputError(f"the model has inputs {inputs}; pass feeds as a dict or input_name")
        input_name = inputs[0]
    return {input_name: np.asarray(feeds)}


def _sample_count(feeds: Mapping[str, np.ndarray]) -> int:
    counts = {len(v) for v in feeds.values()}
    if len(counts) != 1:
        raise InputError(f"feeds disagree on the number of samples (first axis): {sorted(counts)}")
    return counts.pop()


def _fixed_batch(session: ort.InferenceSession) -> int | None:
    """The batch size every input fixes on its first axis, or None when it is dynamic."""
    firsts = {i.shape[0] if i.shape else None for i in session.get_inputs()}
    first = firsts.pop() if len(firsts) == 1 else None
    return first if isinstance(first, int) else None
