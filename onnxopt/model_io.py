"""Loading ONNX files with clear errors, and writing them atomically.

Loading checks what a user can get wrong (missing path, not ONNX, truncated, dangling inputs, cycles)
and turns each into a one-line :class:`~onnxopt.errors.InputError`. Writing goes to a temporary file
in the destination folder and is renamed into place, so a crash never leaves half a model behind.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError

from onnxopt.errors import InputError

# Opsets older than this are upgraded on load: per-channel quantization and most fusions need 13+.
MIN_OPSET = 13
UPGRADE_TO_OPSET = 17
# Above this many bytes of tensors, models are written with external data (protobuf's 2 GB limit).
EXTERNAL_DATA_THRESHOLD = 1_500_000_000


def load_model(path: str | Path, *, upgrade: bool = True) -> ir.Model:
    """Load and check an ONNX file; upgrade opsets older than ``MIN_OPSET``.

    External data next to the file is loaded lazily (memory-mapped by onnx_ir).
    """
    path = Path(path)
    if not path.exists():
        raise InputError("no such file", path)
    if path.is_dir():
        raise InputError("is a directory, expected an .onnx file", path)
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError, UnicodeDecodeError) as exc:
        raise InputError(f"not a readable ONNX model ({one_line(exc)})", path) from exc
    if not proto.graph.node and not proto.graph.output:
        raise InputError("not an ONNX model (no graph found; truncated or another format?)", path)
    check_proto(proto, path)
    model = ir.serde.deserialize_model(proto)
    if any(
        isinstance(v.const_value, ir.ExternalTensor) for v in model.graph.initializers.values()
    ):
        model = ir.load(str(path))  # memory-maps external data relative to the file
    if upgrade:
        model = upgrade_opset(model, path)
    return model


def check_proto(proto: onnx.ModelProto, path: str | Path | None = None) -> None:
    """Run the ONNX checker; a failure becomes one line naming the problem."""
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as exc:
        raise InputError(f"invalid ONNX model: {one_line(exc)}", path) from exc
    except ValueError as exc:  # the checker refuses protos over 2 GB; they are checked lazily
        if "2GB" not in str(exc) and "2 GB" not in str(exc):
            raise InputError(f"invalid ONNX model: {one_line(exc)}", path) from exc


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
    path.parent.mkdir(parents=True, exist_ok=True)
    model = to_ir(model)
    external = tensor_bytes(model) > EXTERNAL_DATA_THRESHOLD
    data_name = path.name + ".data"
    with _staging_dir(path.parent) as staging:
        staged = staging / path.name
        if external:
            ir.save(model, staged, external_data=data_name)
            os.replace(staging / data_name, path.parent / data_name)
        else:
            ir.save(model, staged)
        os.replace(staged, path)
    return path


def write_bytes_atomic(data: bytes, path: str | Path) -> Path:
    """Write any artifact (JSON, Markdown) atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; artifacts get the usual mode
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def _staging_dir(parent: Path) -> Iterator[Path]:
    """A temporary folder beside the destination (same file system, so renames are atomic)."""
    with tempfile.TemporaryDirectory(prefix=".onnxopt-", dir=parent) as tmp:
        yield Path(tmp)


def _same_file(a: str | Path, b: str | Path) -> bool:
    a, b = Path(a), Path(b)
    return a.exists() and b.exists() and os.path.samefile(a, b)


def one_line(exc: BaseException) -> str:
    """The exception's message folded onto one line (C++ errors span several), at most 300 chars."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."
