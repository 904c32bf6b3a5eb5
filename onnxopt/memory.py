"""A memory budget for calibration: how many samples per batch fit in ``--max-memory``.

Calibration runs the model with every intermediate tensor as an output (that is how ONNX
Runtime's calibrators see activations), one batch at a time (:mod:`onnxopt.calibration` streams
them from disk). Peak memory is therefore the process's baseline, the weights, and one batch of
*all* activations, held about twice (ONNX Runtime's buffers and the arrays handed to numpy), so
the batch size is what a budget can control (:func:`memory_needed` and its inverse
:func:`calibration_batch_size`). Activations per sample come from ONNX shape inference at batch
1; unknown shapes count as the largest known activation, so the estimate errs on the small side.
The constants were measured (``benchmarks/bench_big_model.py``, calib steps): 0.53 GB baseline
and 2.2 bytes per activation byte for a 224x224 CNN calibrated with static INT8.
"""

from __future__ import annotations

import math
import re

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import ShapeInferencePass

from onnxopt.errors import InputError
from onnxopt.model_io import tensor_bytes

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
DEFAULT_BATCH_SIZE = 32
PROCESS_BASELINE = 512 << 20  # Python with numpy, onnx, onnxruntime and onnxopt loaded
WEIGHT_COPIES = 2  # the calibration session's weights and their prepacked form
ACTIVATION_COPIES = 2.5  # ORT's buffers plus the outputs handed to numpy (measured 2.2)


def parse_size(text: str, option: str = "--max-memory") -> int:
    """``4G``, ``512M``, ``1.5GiB`` or a number of bytes -> bytes (binary units)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?b)?\s*", text.lower())
    if not match:
        raise InputError(f"bad {option} '{text}': expected a size like 4G, 512M or 1.5GiB")
    value = float(match.group(1)) * _UNITS[match.group(2)]
    if value < 1:
        raise InputError(f"bad {option} '{text}': must be positive")
    return int(value)


def activation_bytes_per_sample(model: ir.Model) -> int:
    """Bytes of every node output of the main graph for one sample (shape inference at batch 1)."""
    probe = model.clone()
    for value in probe.graph.inputs:
        if value.shape is not None:
            value.shape = ir.Shape([d if isinstance(d, int) else 1 for d in value.shape])
    # Inference failing leaves shapes unknown; the fallback below covers them.
    ShapeInferencePass(strict_mode=False)(probe)
    sizes, unknown = [], 0
    for node in probe.graph:
        for out in node.outputs:
            shape, dtype = out.shape, out.dtype
            if shape is None or dtype is None or not all(isinstance(d, int) for d in shape):
                unknown += 1
                continue
            try:
                itemsize = np.dtype(dtype.numpy()).itemsize
            except TypeError:
                itemsize = 8
            sizes.append(math.prod(shape) * itemsize)
    largest = max(sizes, default=4096)
    return sum(sizes) + unknown * largest


def memory_needed(model: ir.Model, batch: int) -> int:
    """Estimated peak bytes of calibrating ``model`` with batches of ``batch`` samples."""
    per_sample = max(1, activation_bytes_per_sample(model))
    return int(PROCESS_BASELINE + WEIGHT_COPIES * tensor_bytes(model)
               + ACTIVATION_COPIES * per_sample * batch)


def calibration_batch_size(model: ir.Model, budget: int,
                           default: int = DEFAULT_BATCH_SIZE) -> int:
    """The most samples per calibration batch (up to ``default``) whose estimated peak memory
    (:func:`memory_needed`) fits in ``budget``; raises InputError when not even one fits."""
    fixed = memory_needed(model, 0)
    per_sample = memory_needed(model, 1) - fixed
    if budget < fixed + per_sample:
        raise InputError(
            f"--max-memory {_human(budget)} is below what calibrating one sample needs "
            f"({_human(fixed + per_sample)}: the process, the weights "
            f"({_human(tensor_bytes(model))}) and one sample's activations)")
    return max(1, min(default, (budget - fixed) // per_sample))


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
