"""Checks that stand between a file from elsewhere and everything that reads it.

A model is data from outside (a download, a colleague's export), so before onnxopt reads a byte
beyond the ``.onnx`` file itself:

* the file must be a regular file (a FIFO or ``/dev/zero`` would block or never end);
* every external-data ``location`` must be a plain relative path inside the model's folder: not
  absolute, no ``..`` component, no symbolic link on the way, naming a regular file, with
  ``offset + length`` within it. onnx's own loader refuses some of these (CVE-2024-27318/27319),
  but only when it is the one reading; onnxopt reads external data through onnx_ir's memory maps
  and ONNX Runtime, which take ``location`` as given. The policy here is stricter than onnx's
  (``sub/../w.bin`` is refused outright, as is a symlink even to a file inside the folder), and
  it is checked on the raw protobuf, so a hostile path is refused before any file it names is
  opened.

Declared types and dims are checked too (an undefined element type or a negative dim is not a
model), and :func:`check_feedable` refuses inputs that cannot be synthesized (strings, or a
declared shape of trillions of elements that would exhaust memory) with one line instead of an
allocation failure deep in numpy.
"""

from __future__ import annotations

import math
import os
import stat
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import onnx
import onnx_ir as ir

from onnxopt.errors import InputError

# Synthesized verification/benchmark inputs above this many elements per input are refused: a
# declared dim of 2**31 would otherwise ask numpy for tens of GiB. 2**28 float32 = 1 GiB.
MAX_SYNTHESIZED_ELEMENTS = 1 << 28  # runner.py (which ships alone) holds the same bound
_VALID_ELEM_TYPES = frozenset(v for v in onnx.TensorProto.DataType.values() if v != 0)


def check_model_file(path: Path) -> None:
    """``path`` must be a regular file (symbolic links to one are fine: the user named it)."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise InputError(f"cannot read it ({exc.strerror})", path) from exc
    if stat.S_ISDIR(mode):
        raise InputError("is a directory, expected an .onnx file", path)
    if not stat.S_ISREG(mode):
        raise InputError("is not a regular file (a device, FIFO or socket); refusing to read it",
                         path)


def all_tensors(proto: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every TensorProto of the model: initializers and tensor attributes, subgraphs included."""
    yield from onnx.external_data_helper._get_all_tensors(proto)  # noqa: SLF001 (onnx's walker)


def external_locations(proto: onnx.ModelProto) -> list[tuple[onnx.TensorProto, dict[str, str]]]:
    """(tensor, its external_data entries) for every tensor stored outside the model file."""
    return [(t, {e.key: e.value for e in t.external_data}) for t in all_tensors(proto)
            if t.data_location == onnx.TensorProto.EXTERNAL]


def check_external_data(proto: onnx.ModelProto, model_path: str | Path) -> None:
    """Refuse any external-data reference that could read outside the model's folder.

    Runs on the protobuf loaded *without* external data; only ``os.lstat`` touches the named
    files (no open, no read), so a FIFO or a device is refused without blocking.
    """
    model_path = Path(model_path)
    base = Path(os.path.realpath(model_path.parent))
    sizes: dict[str, int] = {}
    for tensor, info in external_locations(proto):
        where = f"tensor '{tensor.name}'"
        location = info.get("location", "")
        if location not in sizes:
            sizes[location] = _check_location(location, base, where, model_path)
        _check_extent(tensor, info, sizes[location], where, model_path)


def _check_location(location: str, base: Path, where: str, model_path: Path) -> int:
    """The size of the file ``location`` names, after every check; raises InputError."""
    def refuse(why: str) -> InputError:
        return InputError(f"external data of {where} at '{location}' {why}; refusing to read it",
                          model_path)

    if not location:
        raise refuse("has no location")
    if "\x00" in location:
        raise refuse("contains a NUL character")
    if (PurePosixPath(location).is_absolute() or PureWindowsPath(location).is_absolute()
            or PureWindowsPath(location).drive or location.startswith(("\\", "/"))):
        raise refuse("is an absolute path (it must be relative to the model's folder)")
    parts = PureWindowsPath(location).parts  # splits on both / and \
    if ".." in parts:
        raise refuse("contains '..' (it must stay inside the model's folder)")
    current, info = base, None
    for part in parts:
        if part in ("", "."):
            continue
        current = current / part
        try:
            info = os.lstat(current)
        except OSError as exc:
            raise refuse(f"cannot be read ({exc.strerror})") from exc
        if stat.S_ISLNK(info.st_mode):
            raise refuse(f"goes through the symbolic link '{current}'")
    if info is None:
        raise refuse("names no file")
    if not current.is_relative_to(base):  # unreachable after the checks above; kept as a guard
        raise refuse("is outside the model's folder")
    if not stat.S_ISREG(info.st_mode):
        raise refuse("is not a regular file (a device, FIFO, socket or folder)")
    if info.st_nlink > 1:  # onnx_ir refuses these too, but only when a tensor is first read
        raise refuse(f"has {info.st_nlink} hard links (it could be a file from elsewhere)")
    return info.st_size


def _check_extent(tensor: onnx.TensorProto, info: Mapping[str, str], size: int, where: str,
                  model_path: Path) -> None:
    """``offset + length`` inside the file, and ``length`` what the tensor's dims need."""
    try:
        offset = int(info.get("offset", "0") or 0)
        length = int(info["length"]) if info.get("length") else size - offset
    except ValueError as exc:
        raise InputError(f"external data of {where} has a non-integer offset or length",
                         model_path) from exc
    if offset < 0 or length < 0 or offset + length > size:
        raise InputError(
            f"external data of {where} asks for bytes {offset}..{offset + length} of "
            f"'{info.get('location')}', which holds {size}", model_path)
    needed = tensor_nbytes(tensor)
    if needed is not None and needed != length:
        raise InputError(f"external data of {where} holds {length} bytes; its dims "
                         f"{list(tensor.dims)} need {needed}", model_path)


_FOUR_BIT = {getattr(onnx.TensorProto, n) for n in ("INT4", "UINT4", "FLOAT4E2M1")
             if hasattr(onnx.TensorProto, n)}
_TWO_BIT = {getattr(onnx.TensorProto, n) for n in ("INT2", "UINT2") if hasattr(onnx.TensorProto, n)}


def tensor_nbytes(tensor: onnx.TensorProto) -> int | None:
    """Bytes a tensor's dims and type need (None for strings and unknown types)."""
    count = math.prod(tensor.dims)
    if tensor.data_type in _FOUR_BIT:
        return (count + 1) // 2
    if tensor.data_type in _TWO_BIT:
        return (count + 3) // 4
    try:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
    except (KeyError, ValueError):
        return None
    return None if dtype.kind in "OSU" else count * dtype.itemsize


def check_declared_types(proto: onnx.ModelProto, path: str | Path | None = None) -> None:
    """Element types must be defined ONNX types and static dims non-negative (the checker lets
    both through; onnx_ir and numpy then fail with tracebacks).

    A declared dim of -1 is the convention of some exporters (paddle2onnx, older converters) for
    "dynamic", and ONNX Runtime reads it so: it becomes an unknown dim of the in-memory copy
    (the file is never touched). Other negative dims are refused."""
    for graph in _graphs(proto.graph):
        for vi in [*graph.input, *graph.output, *graph.value_info]:
            tensor_type = vi.type.tensor_type if vi.type.HasField("tensor_type") else None
            if tensor_type is None:
                continue
            if tensor_type.elem_type not in _VALID_ELEM_TYPES:
                raise InputError(f"'{vi.name}' declares element type {tensor_type.elem_type}, "
                                 "which is not an ONNX tensor type", path)
            for d in tensor_type.shape.dim:
                if d.HasField("dim_value") and d.dim_value == -1:
                    d.ClearField("dim_value")
                elif d.HasField("dim_value") and d.dim_value < 0:
                    raise InputError(f"'{vi.name}' declares a negative dimension "
                                     f"({d.dim_value})", path)
        for t in graph.initializer:
            if t.data_type not in _VALID_ELEM_TYPES:
                raise InputError(f"initializer '{t.name}' has element type {t.data_type}, "
                                 "which is not an ONNX tensor type", path)
            if any(d < 0 for d in t.dims):
                raise InputError(f"initializer '{t.name}' has negative dims {list(t.dims)}", path)


def _graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _graphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _graphs(g)


def check_feedable(model: ir.Model, shapes: Mapping[str, Sequence[int]] | None = None,
                   batch: int = 2, path: str | Path | None = None) -> None:
    """Inputs onnxopt can synthesize: numeric tensors of a sane declared size."""
    shapes = dict(shapes or {})
    initializers = set(model.graph.initializers)
    for value in model.graph.inputs:
        if value.name in initializers:
            continue
        if not isinstance(value.type, ir.TensorType) or value.dtype is None:
            raise InputError(f"input '{value.name}' is not a tensor; onnxopt needs tensor inputs",
                             path)
        try:
            value.dtype.numpy()
        except TypeError as exc:
            raise InputError(f"input '{value.name}' has type {value.dtype}, which onnxopt "
                             "cannot synthesize (pass real inputs)", path) from exc
        if value.dtype == ir.DataType.STRING:
            raise InputError(f"input '{value.name}' holds strings, which onnxopt cannot "
                             "synthesize", path)
        if value.name in shapes or value.shape is None:
            continue
        count = math.prod(_dim_value(d, axis, shapes, batch) for axis, d in enumerate(value.shape))
        if count > MAX_SYNTHESIZED_ELEMENTS:
            raise InputError(
                f"input '{value.name}' declares shape {list(value.shape)}: {count:,} elements, "
                f"more than onnxopt synthesizes ({MAX_SYNTHESIZED_ELEMENTS:,}); give smaller "
                "shapes (--shape) or real inputs", path)


def _dim_value(d: Any, axis: int, shapes: Mapping[str, Sequence[int]], batch: int) -> int:
    if isinstance(d, int):
        return d
    name = getattr(d, "value", None)
    if name and name in shapes:
        return int(shapes[name][0])
    return batch if axis == 0 else 1
