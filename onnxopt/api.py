"""The library API: ``export``, ``optimize``, ``benchmark``, ``inspect``, ``load``, ``save``.

Thin functions over the modules that do the work, so deployment code needs one import.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
import onnx_ir as ir

from onnxopt.errors import InputError
from onnxopt.feeds import Feeds
from onnxopt.model_io import load_model, to_ir
from onnxopt.pipeline import OptimizationReport, Pipeline
from onnxopt.recipes import RecipeLike
from onnxopt.registry import PassContext
from onnxopt.stats import ModelStats, model_stats

ModelLike = ir.Model | onnx.ModelProto | str | Path


def load(model: ModelLike) -> ir.Model:
    """An ``onnx_ir.Model`` from a path, a ``ModelProto`` or an ``onnx_ir.Model``."""
    if isinstance(model, (str, Path)):
        return load_model(model)
    return to_ir(model)


def inspect(model: ModelLike, shapes: dict[str, list[int]] | None = None) -> ModelStats:
    """Parameters, bytes (raw and zipped, as stored when a path), MACs per op type, node histogram."""
    file = model if isinstance(model, (str, Path)) else None
    return model_stats(load(model), shapes, file=file)


def optimize(
    model: ModelLike,
    recipe: RecipeLike = "default",
    *,
    calibration: Iterable[Feeds] | str | Path | None = None,
    evaluation: tuple[Feeds, np.ndarray | None] | None = None,
    verify_feeds: list[Feeds] | None = None,
    seed: int = 0,
    isa: str | None = None,
    verify: bool = True,
    checkpoint_dir: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    progress: Callable[[int, str], None] | None = None,
    max_memory: int | None = None,
    threads: Sequence[int] | None = None,
    on_breach: Literal["fallback", "raise"] = "fallback",
    target: str | None = None,
) -> tuple[ir.Model, OptimizationReport]:
    """Run a recipe over a copy of ``model``; every pass is verified against ONNX Runtime.

    ``calibration``: representative inputs (an ``.npz`` of stacked samples, a folder of ``.npy``,
    or an iterable of feeds), read in batches; the first batch also serves for verification
    unless ``verify_feeds`` is given. ``max_memory`` (bytes) sizes those batches, and the batches
    of INT8's accuracy check, so the weights plus one batch of activations fit
    (:mod:`onnxopt.memory`). ``threads``: the intra-op thread counts the model will run at;
    passes that decide by latency (``quantize``, ``fuse-transformer``) decide at these
    (default: 1 and every usable core).
    ``isa``: the CPU to optimize for (``optimize --target``; see
    :mod:`onnxopt.isa`), default this machine's; ``target`` is its old name. ``on_breach``:
    a pass that fails verification is undone and reported (``fallback``) or raises
    :class:`~onnxopt.errors.VerificationError` (``raise``); see :meth:`Pipeline.run`.
    """
    if threads is not None and (not threads or any(int(t) < 1 for t in threads)):
        raise InputError(f"threads must be positive counts, got {list(threads)}")
    ir_model = load(model)
    batches = _calibration_batches(calibration, ir_model, max_memory)
    if verify_feeds is None and batches:
        verify_feeds = [batches[0]]
    context = PassContext(
        calibration=batches, evaluation=evaluation, verify_feeds=list(verify_feeds or []),
        seed=seed, isa=isa, target=target, max_memory=max_memory,
        threads=None if threads is None else [int(t) for t in threads],
    )
    pipeline = Pipeline.from_recipe(recipe, overrides, verify=verify, checkpoint_dir=checkpoint_dir,
                                    on_breach=on_breach)
    return pipeline.run(ir_model, context, progress=progress)


def _calibration_batches(calibration: Iterable[Feeds] | str | Path | None, model: ir.Model,
                         max_memory: int | None = None) -> Sequence[Feeds] | None:
    """Calibration data as a sequence of feed batches, streamed from disk rather than loaded
    whole (reliability: a large calibration set must not need its size in memory)."""
    if calibration is None:
        return None
    from onnxopt.calibration import DEFAULT_BATCH_SIZE, open_calibration
    from onnxopt.memory import calibration_batch_size

    batch_size = (DEFAULT_BATCH_SIZE if max_memory is None
                  else calibration_batch_size(model, max_memory, DEFAULT_BATCH_SIZE))
    data = open_calibration(calibration, model, batch_size=batch_size)
    for _ in data:  # reliability: every batch checked (names, dtypes, shapes, finite values)
        pass        # up front, streamed, rather than failing inside a pass minutes later
    return data


def benchmark(models: list[ModelLike], **kwargs: Any) -> Any:
    """Interleaved ONNX Runtime latency comparison; see :func:`onnxopt.benchmarking.benchmark`."""
    from onnxopt.benchmarking import benchmark as _benchmark

    return _benchmark([load(m) if not isinstance(m, (str, Path)) else m for m in models], **kwargs)


def export(src: Any, example_inputs: Any = None, **kwargs: Any) -> ir.Model:
    """Export a PyTorch/Keras/TensorFlow model (or load an ONNX one), verified numerically."""
    from onnxopt.export import export as _export

    return _export(src, example_inputs, **kwargs)
