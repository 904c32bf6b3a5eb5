"""What the user asked to export: a file, a directory, a ``pkg.module:factory`` string or an object.

Kinds are recognised without importing a framework (see ``_frameworks.is_instance``), so an ONNX
file never pulls in torch or TensorFlow. Files are classified by suffix; a wrong one fails here with
a message that says what would work.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import onnx
import onnx_ir as ir

from onnxopt.errors import InputError
from onnxopt.export._frameworks import is_instance

Kind = Literal["torch-module", "torch-program", "keras", "tf-function", "saved-model", "onnx"]

_FACTORY = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
_KERAS_SUFFIXES = (".keras", ".h5", ".hdf5")
_WEIGHTS_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")
_EXPECTED = (
    "expected .onnx, .pt2 (torch.export.save), .keras/.h5, a TensorFlow SavedModel directory "
    "or pkg.module:factory"
)


@dataclasses.dataclass
class Source:
    """A resolved source: ``obj`` is the model object, or None when ``path`` is loaded later."""

    kind: Kind
    obj: Any = None
    path: Path | None = None
    example_inputs: Any = None
    label: str = ""


def resolve(src: Any, example_inputs: Any = None, *, allow_factory: bool = True) -> Source:
    """Classify ``src``; explicit ``example_inputs`` win over those a factory returns."""
    if isinstance(src, (str, os.PathLike)):
        text = os.fspath(src)
        path = Path(text)
        if not path.exists() and allow_factory and _FACTORY.match(text):
            return _from_factory(text, example_inputs)
        return _from_path(path, example_inputs)
    label = type(src).__name__
    if isinstance(src, (onnx.ModelProto, ir.Model)):
        kind: Kind = "onnx"
    elif is_instance(src, "keras", "Model") or is_instance(src, "tf_keras", "Model"):
        kind = "keras"
    elif is_instance(src, "torch", "export.ExportedProgram"):
        kind = "torch-program"
    elif is_instance(src, "torch", "nn.Module"):
        kind = "torch-module"
    elif is_instance(src, "tensorflow", "types.experimental.GenericFunction") or is_instance(
        src, "tensorflow", "types.experimental.ConcreteFunction"
    ):
        kind = "tf-function"
    else:
        raise InputError(
            f"cannot export a {type(src).__module__}.{label}: expected a torch nn.Module or "
            f"ExportedProgram, a Keras model, a tf.function, an ONNX model, or a path ({_EXPECTED})"
        )
    return Source(kind, obj=src, example_inputs=example_inputs, label=label)


def _from_path(path: Path, example_inputs: Any) -> Source:
    if not path.exists():
        raise InputError(f"no such file or directory ({_EXPECTED})", path)
    if path.is_dir():
        if (path / "saved_model.pb").is_file() or (path / "saved_model.pbtxt").is_file():
            return Source("saved-model", path=path, example_inputs=example_inputs, label=str(path))
        raise InputError(
            f"directory is not a TensorFlow SavedModel (no saved_model.pb); {_EXPECTED}", path
        )
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        kind: Kind = "onnx"
    elif suffix == ".pt2":
        kind = "torch-program"
    elif suffix in _KERAS_SUFFIXES:
        kind = "keras"
    elif suffix in _WEIGHTS_SUFFIXES:
        raise InputError(
            f"a {suffix} file holds weights, not a model's code; load it into your model and pass "
            "the model object, name a pkg.module:factory that does, or save a torch.export program "
            "with torch.export.save(..., 'model.pt2')",
            path,
        )
    else:
        raise InputError(f"unknown model file type '{suffix or path.name}': {_EXPECTED}", path)
    return Source(kind, path=path, example_inputs=example_inputs, label=str(path))


def _from_factory(spec: str, example_inputs: Any) -> Source:
    """Import ``pkg.module:factory`` and call it: it returns a model or (model, example_inputs)."""
    module_name, _, attr = spec.partition(":")
    with _cwd_on_path():
        try:
            target: Any = importlib.import_module(module_name)
        except (ImportError, SyntaxError) as exc:
            raise InputError(f"cannot import module '{module_name}' ({exc})", spec) from exc
    for part in attr.split("."):
        try:
            target = getattr(target, part)
        except AttributeError as exc:
            raise InputError(f"module '{module_name}' has no attribute '{attr}'", spec) from exc
    if not callable(target):
        raise InputError(f"'{attr}' is a {type(target).__name__}, not a callable factory", spec)
    try:
        result = target()
    except Exception as exc:  # the user's code: its error in one line, exit 2 (--debug: traceback)
        message = " ".join(str(exc).split())[:300] or "no message"
        raise InputError(f"the factory raised {type(exc).__name__}: {message}", spec) from exc
    factory_examples = None
    if isinstance(result, tuple):
        if len(result) != 2:
            raise InputError(
                f"the factory returned a tuple of {len(result)}; expected a model or "
                "(model, example_inputs)",
                spec,
            )
        result, factory_examples = result
    source = resolve(
        result,
        example_inputs if example_inputs is not None else factory_examples,
        allow_factory=False,
    )
    source.label = spec
    return source


@contextlib.contextmanager
def _cwd_on_path() -> Iterator[None]:
    """Let ``onnxopt export mymodels:build`` find ``mymodels.py`` in the current directory.

    Console scripts, unlike ``python -m``, do not put the working directory on ``sys.path``.
    """
    cwd = os.getcwd()
    added = cwd not in sys.path and "" not in sys.path
    if added:
        sys.path.append(cwd)
    try:
        yield
    finally:
        if added:
            with contextlib.suppress(ValueError):
                sys.path.remove(cwd)
