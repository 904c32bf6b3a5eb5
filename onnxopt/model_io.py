"""Loading ONNX files with clear errors, and writing them atomically.

Loading checks what a user can get wrong (missing path, not ONNX, truncated, dangling inputs, cycles)
and turns each into a one-line :class:`~onnxopt.errors.InputError`. Writing goes to a temporary file
in the destination folder and is renamed into place, so a crash never leaves half a model behind; a
write that fails (read-only folder, disk full, a folder where a file goes) is an InputError naming
the destination and the cause, with the temporary file removed.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError

from onnxopt import safety
from onnxopt.errors import InputError, write_error
from onnxopt.isolation import deferred_signals, removed_on_forced_exit
from onnxopt.provenance import SOURCE_PATH_KEY

# Opsets older than this are upgraded on load: per-channel quantization and most fusions need 13+.
MIN_OPSET = 13
UPGRADE_TO_OPSET = 17
# Above this many bytes of tensors, models are written with external data (protobuf's 2 GB limit).
EXTERNAL_DATA_THRESHOLD = 1_500_000_000
# Above this many bytes of tensors in memory, ONNX Runtime and the checker get a file with
# external data rather than serialized bytes: a session built from bytes briefly holds the
# tensors three times (the bytes, ORT's parsed copy, its own tensors: 1.72 GB of peak memory for
# a 571 MB INT8 model); from a 64 KiB-aligned external file ORT maps them (0.63 GB).
FILE_SESSION_THRESHOLD = 256 << 20
EXTERNAL_DATA_ALIGNMENT = 65536


def load_model(path: str | Path, *, upgrade: bool = True) -> ir.Model:
    """Load and check an ONNX file; upgrade opsets older than ``MIN_OPSET``.

    External data next to the file is loaded lazily (memory-mapped by onnx_ir).
    """
    path = Path(path)
    if not path.exists():
        raise InputError("no such file", path)
    if path.is_dir():
        raise InputError("is a directory, expected an .onnx file", path)
    safety.check_model_file(path)  # reliability: a FIFO or /dev/zero would block or never end
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError, UnicodeDecodeError) as exc:
        raise InputError(f"not a readable ONNX model ({one_line(exc)})", path) from exc
    if not proto.graph.node and not proto.graph.output:
        raise InputError("not an ONNX model (no graph found; truncated or another format?)", path)
    # reliability: hostile external-data locations are refused before any file they name is
    # opened, and declared types/dims that would crash deeper code are refused here.
    external = bool(safety.external_locations(proto))
    if external:
        safety.check_external_data(proto, path)
    safety.check_declared_types(proto, path)
    # Given the path, the checker resolves external data next to the file (given the proto, it
    # would look in the working directory) and never loads it, so this also works over 2 GB.
    check_proto(str(path) if external else proto, path)
    model = _deserialize(proto, path)
    if external:  # memory-maps external data relative to the file
        ir.external_data.set_base_dir(model.graph, path.parent)
    if upgrade:
        model = upgrade_opset(model, path)
        if external:  # the converter's copy lost the folder external data is relative to
            ir.external_data.set_base_dir(model.graph, path.parent)
    model.meta[SOURCE_PATH_KEY] = str(path)  # provenance: hashed when a pipeline runs
    return model


def _deserialize(proto: onnx.ModelProto, path: Path) -> ir.Model:
    """onnx_ir's form of a checked proto; what the checker lets through and onnx_ir rejects
    (found by fuzzing) becomes an InputError naming the innermost cause."""
    try:
        return ir.serde.deserialize_model(proto)
    except (ir.serde.SerdeError, ValueError, TypeError, KeyError) as exc:
        cause: BaseException = exc
        while cause.__cause__ is not None:
            cause = cause.__cause__
        raise InputError(f"not a model onnxopt can read ({type(cause).__name__}: "
                         f"{one_line(cause)})", path) from exc


def check_proto(proto: onnx.ModelProto | bytes | str, path: str | Path | None = None) -> None:
    """Run the ONNX checker (on a proto, its serialized bytes, which saves a copy, or a file path
    for external data); a failure becomes one line naming the problem."""
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as exc:
        if _only_an_ort_op(str(exc)):
            return  # valid for ONNX Runtime, which loads and judges it next
        raise InputError(f"invalid ONNX model: {one_line(exc)}", path) from exc
    except ValueError as exc:  # the checker refuses protos over 2 GB; they are checked lazily
        if "2GB" not in str(exc) and "2 GB" not in str(exc):
            raise InputError(f"invalid ONNX model: {one_line(exc)}", path) from exc


_UNREGISTERED = re.compile(r"No Op registered for (\w+) with domain_version")


def _only_an_ort_op(message: str) -> bool:
    """True when the checker's complaint is an op that ONNX does not define but ONNX Runtime
    registers in the default domain (``SimplifiedLayerNormalization``, which ORT's fusions and
    the onnxscript rewriter write for RMSNorm): the model is valid for the runtime it targets."""
    match = _UNREGISTERED.search(message)
    return bool(match) and match.group(1) in _ort_default_domain_ops()


@functools.cache
def _ort_default_domain_ops() -> frozenset[str]:
    from onnxruntime.capi import onnxruntime_pybind11_state as ort_c

    onnx_ops = {schema.name for schema in onnx.defs.get_all_schemas()}
    return frozenset(s.name for s in ort_c.get_all_operator_schema()
                     if s.domain in ("", "ai.onnx") and s.name not in onnx_ops)


def upgrade_opset(model: ir.Model, path: str | Path | None = None) -> ir.Model:
    """Convert a model whose default opset is below ``MIN_OPSET`` with ONNX's version converter."""
    opset = model.opset_imports.get("", MIN_OPSET)
    if opset >= MIN_OPSET:
        return model
    try:
        converted = onnx.version_converter.convert_version(
            ir.serde.serialize_model(model), UPGRADE_TO_OPSET
        )
    except Exception as exc:  # the converter raises bare RuntimeErrors from C++
        raise InputError(
            f"opset {opset} is older than {MIN_OPSET} and could not be upgraded: {one_line(exc)}",
            path,
        ) from exc
    return ir.serde.deserialize_model(converted)


def to_proto(model: ir.Model | onnx.ModelProto) -> onnx.ModelProto:
    """The protobuf form of a model (no copy when it is one already)."""
    return model if isinstance(model, onnx.ModelProto) else ir.serde.serialize_model(model)


def to_ir(model: ir.Model | onnx.ModelProto) -> ir.Model:
    """The onnx_ir form of a model (no copy when it is one already)."""
    return model if isinstance(model, ir.Model) else ir.serde.deserialize_model(model)


def tensor_bytes(model: ir.Model) -> int:
    """Bytes held by the model's initializers."""
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value)


def in_memory_tensor_bytes(model: ir.Model | onnx.ModelProto) -> int:
    """Bytes of tensor data held in memory (external data references not counted)."""
    if isinstance(model, onnx.ModelProto):
        return sum(len(t.raw_data) or t.ByteSize() for t in model.graph.initializer
                   if t.data_location != onnx.TensorProto.EXTERNAL)
    return sum(v.const_value.nbytes for v in model.graph.initializers.values()
               if v.const_value is not None and not isinstance(v.const_value, ir.ExternalTensor))


def better_as_file(model: ir.Model | onnx.ModelProto) -> bool:
    """Whether ONNX Runtime and the checker should get ``model`` as a file with external data
    rather than as bytes (``FILE_SESSION_THRESHOLD``)."""
    return in_memory_tensor_bytes(model) > FILE_SESSION_THRESHOLD


def has_external_tensors(model: ir.Model) -> bool:
    """Whether any initializer (subgraphs included) still lives in an external data file."""
    return any(isinstance(v.const_value, ir.ExternalTensor)
               for g in model.graphs() for v in g.initializers.values())


def release_mappings(model: ir.Model) -> None:
    """Unmap the memory maps of external tensors; they are mapped again when next read.

    A 2 GB model read once (hashed, verified, written) keeps every page it touched resident
    through its maps; dropping them between steps keeps peak memory near one model's size.
    """
    for graph in model.graphs():
        for value in graph.initializers.values():
            release_mapping(value.const_value)


def release_mapping(tensor: ir.TensorProtocol | None) -> None:
    """Unmap one external tensor (mapped again when next read); others are left as they are."""
    if isinstance(tensor, ir.ExternalTensor):
        with contextlib.suppress(BufferError):  # a view of the map is still in use
            tensor.release()


def is_big(model: ir.Model) -> bool:
    """Too big for one protobuf: its tensors stay in (or go to) external data files."""
    return tensor_bytes(model) > EXTERNAL_DATA_THRESHOLD


def needs_external_data(model: ir.Model) -> bool:
    """Big, or already backed by external files (which a plain save would reference in place,
    relative to the wrong folder)."""
    return is_big(model) or has_external_tensors(model)


def save_model(
    model: ir.Model | onnx.ModelProto, path: str | Path, *, protect: str | Path | None = None
) -> Path:
    """Write ``model`` to ``path`` atomically; large models get an external ``.data`` file.

    ``protect`` names an input file that must not be overwritten (the CLI passes it unless
    ``--force`` was given).
    """
    path = Path(path)
    if protect is not None and _same_file(path, protect):
        raise InputError("refusing to overwrite the input model (pass --force to allow it)", path)
    check_writable(path)
    model = to_ir(model)
    external = needs_external_data(model)
    data_name = path.name + ".data"
    try:
        with _parents_made(path.parent), _staging_dir(path.parent) as staging:
            staged = staging / path.name
            if external:
                # Tensors stream one at a time from their memory maps into the new file; offsets
                # aligned to 64 KiB let ONNX Runtime memory-map them in turn instead of copying.
                ir.save(model, staged, external_data=data_name, alignment=EXTERNAL_DATA_ALIGNMENT)
            else:
                ir.save(model, staged)
            with deferred_signals():  # reliability: both renames or neither, never a model alone
                if external:
                    os.replace(staging / data_name, path.parent / data_name)
                os.replace(staged, path)
    except OSError as exc:  # the staging folder (and what it held) is gone already
        raise write_error(exc, path) from exc
    return path


def write_bytes_atomic(data: bytes, path: str | Path) -> Path:
    """Write any artifact (JSON, Markdown) atomically."""
    path = Path(path)
    check_writable(path)
    try:
        with _parents_made(path.parent):
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            try:
                os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; artifacts: the usual mode
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                os.replace(tmp, path)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
                raise
    except OSError as exc:
        raise write_error(exc, path) from exc
    return path


@contextlib.contextmanager
def _parents_made(folder: Path) -> Iterator[None]:
    """Create ``folder`` and its missing parents; remove the ones made here if the block fails
    (a failed write leaves no empty folders behind either)."""
    missing = []
    here = folder
    while not here.exists() and here != here.parent:
        missing.append(here)
        here = here.parent
    folder.mkdir(parents=True, exist_ok=True)
    try:
        yield
    except BaseException:
        for made in missing:  # deepest first
            with contextlib.suppress(OSError):
                made.rmdir()
        raise


def check_writable(path: str | Path, *, folder: bool = False) -> None:
    """Refuse, before any work, a destination that cannot be written: a folder where a file
    goes (or a file where a folder goes), a read-only file system, no permission.

    Disk full cannot be foreseen; the writers turn it into the same kind of one-line error.
    """
    path = Path(path)
    if folder and path.exists() and not path.is_dir():
        raise InputError("is a file, expected a folder", path)
    if not folder and path.is_dir():
        raise InputError("is a directory, expected a file path", path)
    existing = path if folder and path.is_dir() else path.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise InputError(f"cannot write: {existing} is not a folder", path)
    if not os.access(existing, os.W_OK | os.X_OK):
        read_only = hasattr(os, "statvfs") and bool(os.statvfs(existing).f_flag & os.ST_RDONLY)
        code = errno.EROFS if read_only else errno.EACCES
        raise InputError(f"cannot write: {os.strerror(code)}", path)


@contextlib.contextmanager
def staged_folder(folder: str | Path, files: Mapping[str, bytes]) -> Iterator[Path]:
    """Write ``files`` into ``folder`` all together or not at all (a report's JSON and Markdown).

    They are written on entry into a temporary folder beside ``folder`` (so a full disk fails
    here, before the block runs, e.g. before the model is written) and moved into ``folder`` when
    the block ends without an exception; otherwise the temporary folder is removed.
    """
    folder = Path(folder)
    check_writable(folder, folder=True)
    with contextlib.ExitStack() as stack:
        name = ""
        try:
            stack.enter_context(_parents_made(folder.parent))
            staging = stack.enter_context(_staging_dir(folder.parent))
            for name, data in files.items():
                (staging / name).write_bytes(data)
        except OSError as exc:
            raise write_error(exc, folder / name) from exc
        yield folder
        try:
            with deferred_signals():
                if not folder.exists():
                    os.chmod(staging, 0o777 & ~_umask())  # mkdtemp makes 0700
                    os.rename(staging, folder)
                    staging.mkdir()  # left for _staging_dir to remove
                else:
                    for name in files:
                        os.replace(staging / name, folder / name)
        except OSError as exc:
            raise write_error(exc, folder) from exc


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def _staging_dir(parent: Path) -> Iterator[Path]:
    """A temporary folder beside the destination (same file system, so renames are atomic).

    Its removal holds SIGINT/SIGTERM until done, so an interrupt never leaves it half-deleted.
    """
    tmp = tempfile.mkdtemp(prefix=".onnxopt-", dir=parent)
    try:
        with removed_on_forced_exit(tmp):
            yield Path(tmp)
    finally:
        with deferred_signals():
            shutil.rmtree(tmp, ignore_errors=True)


def _same_file(a: str | Path, b: str | Path) -> bool:
    a, b = Path(a), Path(b)
    return a.exists() and b.exists() and os.path.samefile(a, b)


def one_line(exc: BaseException) -> str:
    """The exception's message folded onto one line (C++ errors span several), at most 300 chars."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."
