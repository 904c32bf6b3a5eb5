"""Calibration data: representative model inputs, read lazily in batches so memory stays bounded.

Sources: an ``.npz`` of stacked samples (one array per model input, samples on axis 0), a folder
of ``.npy`` files (``<input>.npy`` per input, or any number of sample files for a one-input
model), a mapping of stacked arrays, a sequence of feed batches, or a function returning a fresh
iterator of feed batches. Every batch is checked against the model's inputs
(:func:`onnxopt.feeds.check_feeds`); wrong names, dtypes or shapes are an :class:`InputError`.

Why streaming by hand: ``numpy.load`` reads a whole ``.npz`` member at once. Here members are read
row by row from the zip stream (stored or deflated), and ``.npy`` files are memory-mapped, so a
10 GB calibration set costs one batch of memory.
"""

from __future__ import annotations

import itertools
import math
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any, Union

import numpy as np
import onnx_ir as ir

from onnxopt.errors import InputError
from onnxopt.feeds import Feeds, check_feeds, input_specs

CalibrationSource = Union[
    str, Path, Mapping[str, np.ndarray], Iterable[Feeds], Callable[[], Iterator[Feeds]],
    "CalibrationData",
]

DEFAULT_BATCH_SIZE = 32


class CalibrationData(Sequence[Feeds]):
    """Batches of calibration feeds, read again from the source on every iteration.

    A ``Sequence``: ``len()`` is the number of batches and ``data[i]`` reads up to batch ``i``, so
    code written for a list of feeds works unchanged, without holding every batch in memory.
    """

    def __init__(self, open_batches: Callable[[], Iterator[Feeds]], *, num_batches: int,
                 num_samples: int | None, description: str) -> None:
        self._open = open_batches
        self._num_batches = num_batches
        self.num_samples = num_samples
        self.description = description
        self._first: Feeds | None = None

    def __iter__(self) -> Iterator[Feeds]:
        return itertools.islice(self._open(), self._num_batches)

    def __len__(self) -> int:
        return self._num_batches

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError("calibration batch index out of range")
        if index == 0:
            if self._first is None:
                self._first = next(iter(self))
            return self._first
        return next(itertools.islice(iter(self), index, None))

    def limit(self, max_samples: int | None) -> CalibrationData:
        """A view on the batches holding the first ``max_samples`` samples (whole batches)."""
        if max_samples is None or self.num_samples is None or max_samples >= self.num_samples:
            return self
        per_batch = max(1, math.ceil(self.num_samples / max(self._num_batches, 1)))
        batches = max(1, math.ceil(max_samples / per_batch))
        return CalibrationData(self._open, num_batches=min(batches, self._num_batches),
                               num_samples=min(max_samples, self.num_samples),
                               description=f"{self.description} (first {max_samples} samples)")


def open_calibration(source: CalibrationSource, model: ir.Model, *,
                     batch_size: int = DEFAULT_BATCH_SIZE) -> CalibrationData:
    """Calibration batches for ``model`` from any supported source (see the module docstring)."""
    if isinstance(source, CalibrationData):
        return source
    batch_size = _model_batch_size(model, batch_size)
    if isinstance(source, (str, Path)):
        path = Path(source)
        if path.is_dir():
            return _from_npy_folder(path, model, batch_size)
        if path.is_file():
            return _from_npz(path, model, batch_size)
        raise InputError("no such calibration file or folder", path)
    if isinstance(source, Mapping):
        arrays = dict(source)
        _check_names(arrays, model, None)
        n = _sample_count({k: np.shape(v) for k, v in arrays.items()}, None)
        return _stacked(lambda: {k: np.asarray(v) for k, v in arrays.items()}, n, model,
                        batch_size, "in-memory arrays", None)
    if callable(source):
        factory = source
        count = sum(1 for _ in factory())
        return CalibrationData(lambda: _checked(factory(), model, None), num_batches=count,
                               num_samples=None, description="batches from a function")
    if isinstance(source, Sequence):
        batches = list(source)
        return CalibrationData(lambda: _checked(iter(batches), model, None),
                               num_batches=len(batches), num_samples=None,
                               description=f"{len(batches)} feed batch(es)")
    if isinstance(source, Iterable):
        # A one-shot iterator cannot be read twice; calibration needs several passes.
        batches = list(source)
        return CalibrationData(lambda: _checked(iter(batches), model, None),
                               num_batches=len(batches), num_samples=None,
                               description=f"{len(batches)} feed batch(es) from an iterator")
    raise InputError(f"calibration data must be a path, arrays or feed batches, got {type(source)}")


def _model_batch_size(model: ir.Model, requested: int) -> int:
    """A static batch dimension shared by every input wins over ``requested``."""
    firsts = {dims[0] for _, _, dims in input_specs(model) if dims}
    if len(firsts) == 1 and isinstance(next(iter(firsts)), int):
        return int(next(iter(firsts)))
    return max(1, requested)


def _checked(batches: Iterator[Feeds], model: ir.Model, path: Path | None) -> Iterator[Feeds]:
    for batch in batches:
        yield check_feeds(batch, model, path)


def _check_names(arrays: Mapping[str, Any], model: ir.Model, path: Path | None) -> None:
    expected = {name for name, _, _ in input_specs(model)}
    missing, extra = sorted(expected - set(arrays)), sorted(set(arrays) - expected)
    if missing or extra:
        parts = ([f"missing input(s) {missing}"] if missing else []) + (
            [f"unknown name(s) {extra}"] if extra else [])
        raise InputError("; ".join(parts) + f" (model inputs: {sorted(expected)})", path)


def _sample_count(shapes: Mapping[str, tuple[int, ...]], path: Path | None) -> int:
    counts = {name: (shape[0] if shape else 0) for name, shape in shapes.items()}
    if len(set(counts.values())) != 1:
        raise InputError(f"inputs hold different numbers of samples (axis 0): {counts}", path)
    n = next(iter(counts.values()))
    if n == 0:
        raise InputError("calibration data holds no samples", path)
    return n


def _stacked(open_arrays: Callable[[], Mapping[str, Any]], n: int, model: ir.Model,
             batch_size: int, description: str, path: Path | None) -> CalibrationData:
    """Batches sliced from arrays that support lazy slicing (memory maps, in-memory arrays)."""

    def batches() -> Iterator[Feeds]:
        arrays = open_arrays()
        for start in range(0, n, batch_size):
            yield check_feeds({k: np.ascontiguousarray(v[start:start + batch_size])
                               for k, v in arrays.items()}, model, path)

    return CalibrationData(batches, num_batches=math.ceil(n / batch_size), num_samples=n,
                           description=f"{description}: {n} samples in batches of {batch_size}")


# --- .npz: rows streamed from the zip members -------------------------------------------------


def _npz_headers(path: Path) -> dict[str, tuple[tuple[int, ...], np.dtype, bool]]:
    """Shape, dtype and Fortran order of every member, read from the headers only."""
    headers = {}
    try:
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                if not info.filename.endswith(".npy"):
                    continue
                with zf.open(info) as member:
                    headers[info.filename[:-4]] = _read_npy_header(member)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise InputError(f"not a readable .npz file ({exc})", path) from exc
    if not headers:
        raise InputError("the .npz file holds no arrays", path)
    return headers


def _read_npy_header(stream: IO[bytes]) -> tuple[tuple[int, ...], np.dtype, bool]:
    version = np.lib.format.read_magic(stream)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(stream)
    else:
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(stream)
    if dtype.hasobject:
        raise ValueError("arrays of Python objects are not supported")
    return tuple(shape), dtype, fortran


def _from_npz(path: Path, model: ir.Model, batch_size: int) -> CalibrationData:
    headers = _npz_headers(path)
    _check_names(headers, model, path)
    n = _sample_count({k: h[0] for k, h in headers.items()}, path)

    def batches() -> Iterator[Feeds]:
        with zipfile.ZipFile(path) as zf:
            streams = {name: _NpyRows(zf.open(name + ".npy"), path) for name in headers}
            try:
                for start in range(0, n, batch_size):
                    count = min(batch_size, n - start)
                    yield check_feeds({k: s.read(count) for k, s in streams.items()}, model, path)
            finally:
                for s in streams.values():
                    s.close()

    return CalibrationData(batches, num_batches=math.ceil(n / batch_size), num_samples=n,
                           description=f"{path.name}: {n} samples in batches of {batch_size}")


class _NpyRows:
    """Reads an ``.npy`` stream ``count`` rows (axis-0 entries) at a time."""

    def __init__(self, stream: IO[bytes], path: Path) -> None:
        self._stream = stream
        self._path = path
        self.shape, self.dtype, fortran = _read_npy_header(stream)
        self._whole: np.ndarray | None = None
        self._pos = 0
        if fortran and len(self.shape) > 1:  # rows are not contiguous: read the member once
            self._whole = np.asfortranarray(np.frombuffer(stream.read(), dtype=self.dtype)
                                            .reshape(self.shape, order="F"))
        self._row_items = math.prod(self.shape[1:])

    def read(self, count: int) -> np.ndarray:
        if self._whole is not None:
            rows = self._whole[self._pos:self._pos + count]
        else:
            nbytes = count * self._row_items * self.dtype.itemsize
            data = self._stream.read(nbytes)
            if len(data) != nbytes:
                raise InputError("truncated array in the .npz file", self._path)
            rows = np.frombuffer(data, dtype=self.dtype).reshape((count, *self.shape[1:]))
        self._pos += count
        return np.array(rows)  # writable and owning its memory

    def close(self) -> None:
        self._stream.close()


# --- folder of .npy files ---------------------------------------------------------------------


def _from_npy_folder(folder: Path, model: ir.Model, batch_size: int) -> CalibrationData:
    files = sorted(folder.glob("*.npy"))
    if not files:
        raise InputError("the calibration folder holds no .npy files", folder)
    specs = input_specs(model)
    names = [name for name, _, _ in specs]
    by_stem = {f.stem: f for f in files}
    if set(names) <= set(by_stem):
        paths = {name: by_stem[name] for name in names}
        shapes = {name: _npy_shape(p) for name, p in paths.items()}
        n = _sample_count(shapes, folder)
        return _stacked(lambda: {k: np.load(p, mmap_mode="r") for k, p in paths.items()},
                        n, model, batch_size, f"{folder.name}/ (one .npy per input)", folder)
    if len(specs) != 1:
        raise InputError(
            f"expected one .npy per model input ({', '.join(n + '.npy' for n in names)}); "
            f"found {', '.join(f.name for f in files[:5])}{' ...' if len(files) > 5 else ''}",
            folder)
    return _sample_files(files, specs[0][0], len(specs[0][2]), model, batch_size, folder)


def _npy_shape(path: Path) -> tuple[int, ...]:
    try:
        with path.open("rb") as f:
            return _read_npy_header(f)[0]
    except (OSError, ValueError) as exc:
        raise InputError(f"not a readable .npy file ({exc})", path) from exc


def _sample_files(files: list[Path], name: str, rank: int, model: ir.Model, batch_size: int,
                  folder: Path) -> CalibrationData:
    """A one-input model: each file holds one sample (rank - 1) or a stack of samples (rank)."""
    counts = []
    for f in files:
        shape = _npy_shape(f)
        if len(shape) == rank - 1:
            counts.append(1)
        elif len(shape) == rank:
            counts.append(shape[0])
        else:
            raise InputError(f"holds shape {list(shape)}; input '{name}' has rank {rank}", f)
    n = sum(counts)

    def batches() -> Iterator[Feeds]:
        pending: list[np.ndarray] = []
        size = 0
        for f in files:
            array = np.load(f, mmap_mode="r")
            array = array[None] if array.ndim == rank - 1 else array
            pos = 0
            while pos < len(array):
                take = min(batch_size - size, len(array) - pos)
                pending.append(array[pos:pos + take])
                pos += take
                size += take
                if size == batch_size:
                    yield check_feeds({name: np.concatenate(pending)}, model, f)
                    pending, size = [], 0
        if pending:
            yield check_feeds({name: np.concatenate(pending)}, model, folder)

    return CalibrationData(batches, num_batches=math.ceil(n / batch_size), num_samples=n,
                           description=f"{folder.name}/ ({len(files)} .npy files, {n} samples "
                                       f"in batches of {batch_size})")
