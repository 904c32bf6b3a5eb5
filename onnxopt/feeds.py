"""Model inputs ("feeds"): synthesized from the model's signature, or read from ``.npz`` and checked.

Feeds are plain ``dict[str, numpy.ndarray]``. Synthesized feeds are seeded, so the verification of
every pass, and every benchmark, sees the same inputs.
"""

from __future__ import annotations

import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxopt import runner
from onnxopt.errors import InputError
from onnxopt.provenance import SOURCE_PATH_KEY

Feeds = dict[str, np.ndarray]

def parse_shape_overrides(specs: list[str] | None) -> dict[str, dict[str, int] | list[int]]:
    """Parse ``--shape`` options: ``name=1x3x224x224`` (a whole input) or ``batch=4`` (a symbolic dim)."""
    overrides: dict[str, dict[str, int] | list[int]] = {}
    for spec in specs or []:
        name, sep, value = spec.partition("=")
        try:
            dims = [int(d) for d in value.lower().split("x")] if sep else None
        except ValueError:
            dims = None
        if not name or not dims or any(d < 1 for d in dims):
            raise InputError(f"bad --shape '{spec}': expected NAME=1x3x224x224 or DIM=4")
        overrides[name] = dims
    return overrides


def input_specs(model: ir.Model) -> list[tuple[str, np.dtype, list[int | str | None]]]:
    """Name, numpy dtype and dims (ints, symbolic names or None) of each real graph input."""
    initializers = set(model.graph.initializers)
    specs = []
    for value in model.graph.inputs:
        if value.name in initializers:  # IR < 4 lists initializers as inputs too
            continue
        if value.type is None or not isinstance(value.type, ir.TensorType):
            raise InputError(f"input '{value.name}' is not a tensor; onnxopt needs tensor inputs")
        dtype = value.dtype.numpy()
        dims: list[int | str | None] = []
        if value.shape is not None:
            for d in value.shape:
                dims.append(d if isinstance(d, int) else (d.value if d.value else None))
        specs.append((value.name, dtype, dims))
    return specs


def graph_io(model: ir.Model) -> dict[str, list[dict[str, Any]]]:
    """Name, dtype and shape of every real graph input and output, for people (``inspect``):
    the input names are the array names an ``.npz`` of feeds must use."""
    initializers = set(model.graph.initializers)

    def describe(value: ir.Value) -> dict[str, Any]:
        dtype = str(value.dtype.name).lower() if value.dtype is not None else str(value.type)
        shape = None if value.shape is None else [
            d if isinstance(d, int) else (d.value or "?") for d in value.shape]
        return {"name": value.name, "dtype": dtype, "shape": shape}

    return {"inputs": [describe(v) for v in model.graph.inputs if v.name not in initializers],
            "outputs": [describe(v) for v in model.graph.outputs]}


def synthesize_feeds(
    model: ir.Model,
    *,
    batch: int = 1,
    shapes: Mapping[str, list[int]] | None = None,
    seed: int = 0,
) -> Feeds:
    """Seeded random inputs matching the model's signature.

    Symbolic dimensions take ``shapes[dim_name]`` (e.g. ``seq=128``), else ``batch`` for the first
    axis and 1 elsewhere. ``shapes[input_name]`` replaces a whole input's shape. The value rules
    (masks are ones, token types zeros, ...) live in the self-contained runner, so a board
    running the runner alone synthesizes the same inputs.
    """
    try:
        return runner.synthesize_arrays(input_specs(model), batch=batch, shapes=shapes, seed=seed)
    except runner.RunnerError as exc:  # e.g. a shape too large to allocate
        raise InputError(str(exc), model.meta.get(SOURCE_PATH_KEY)) from exc


def load_npz(path: str | Path) -> dict[str, np.ndarray]:
    """Read every array of an ``.npz`` file, with a one-line error for a bad file."""
    path = Path(path)
    if not path.is_file():
        raise InputError("no such file", path)
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
        raise InputError(f"not a readable .npz file ({exc})", path) from exc


def load_feeds(path: str | Path, model: ir.Model) -> Feeds:
    """Read feeds from ``.npz`` and check names, dtypes and ranks against the model's inputs."""
    arrays = load_npz(path)
    return check_feeds(arrays, model, path)


def check_feeds(arrays: Mapping[str, np.ndarray], model: ir.Model, path: str | Path | None = None,
                *, stacked: bool = False) -> Feeds:
    """Check feed names, dtypes and static dims against the model; raise :class:`InputError`.

    ``stacked``: axis 0 counts samples, which are run in batches of the model's size (a model
    with a fixed batch of 1 still takes an evaluation set of many samples), so it is not checked.
    """
    specs = input_specs(model)
    expected = {name for name, _, _ in specs}
    missing = sorted(expected - set(arrays))
    extra = sorted(set(arrays) - expected)
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing input(s) {missing}")
        if extra:
            parts.append(f"unknown name(s) {extra}")
        raise InputError("; ".join(parts) + f" (model inputs: {sorted(expected)})", path)
    feeds: Feeds = {}
    for name, dtype, dims in specs:
        array = np.asarray(arrays[name])
        if array.dtype != dtype:
            raise InputError(f"input '{name}' has dtype {array.dtype}, the model expects {dtype}", path)
        if dims and array.ndim != len(dims):
            raise InputError(
                f"input '{name}' has shape {list(array.shape)}, the model expects rank {len(dims)} {dims}",
                path,
            )
        for axis, d in enumerate(dims):
            if isinstance(d, int) and array.shape[axis] != d and not (stacked and axis == 0):
                raise InputError(
                    f"input '{name}' has shape {list(array.shape)}, the model expects {dims}", path
                )
        check_finite(array, f"input '{name}'", path)
        feeds[name] = array
    return feeds


def check_finite(array: np.ndarray, what: str, path: str | Path | None = None) -> None:
    """Reliability: NaN or infinite values are refused naming the file and array; downstream
    they end in a calibration ``AssertionError``, an SVD that does not converge, or a metric
    that is NaN and so never misses its budget."""
    if array.dtype.kind not in "fc" or array.size == 0:
        return
    if not np.isfinite(array).all():
        kind = "NaN" if np.isnan(array).any() else "infinite"
        raise InputError(f"{what} holds {kind} values; give finite data", path)


def load_evaluation(path: str | Path, model: ir.Model) -> tuple[Feeds, np.ndarray | None]:
    """``--eval`` data: inputs checked against the model, plus optional finite ``labels`` with
    one entry per sample."""
    arrays = load_npz(path)
    labels = arrays.pop("labels", None)
    feeds = check_feeds(arrays, model, path, stacked=True)
    if labels is not None:
        if labels.dtype.kind not in "biuf":
            raise InputError(f"array 'labels' has dtype {labels.dtype}; expected class "
                             "indices", path)
        check_finite(labels, "array 'labels'", path)
        counts = {len(a) for a in feeds.values() if a.ndim}
        if labels.ndim == 0 or (counts and counts != {len(labels)}):
            raise InputError(f"array 'labels' has shape {list(labels.shape)}; expected one "
                             f"label per sample ({sorted(counts)})", path)
    return feeds, labels
