"""Lazy imports of PyTorch and TensorFlow, so the core installs and runs without either.

A missing framework is the user's install, not a bug: it becomes an :class:`InputError` that
names the extra to install. Objects are recognised without importing anything: a torch module can
only exist if torch is already in ``sys.modules``.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from types import ModuleType
from typing import Any

from onnxopt.errors import InputError

_EXTRA = {
    "torch": "torch",
    "tensorflow": "tensorflow",
    "keras": "tensorflow",
    "tf2onnx": "tensorflow",
}


def require(module: str, why: str) -> ModuleType:
    """Import ``module`` or raise an InputError saying which onnxopt extra provides it."""
    if module in ("tensorflow", "keras", "tf2onnx"):
        _quiet_tensorflow()
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise InputError(
            f"{why} needs {module}, which is not installed ({exc}); "
            f"install onnxopt[{_EXTRA.get(module, module)}]"
        ) from exc


def loaded(module: str) -> ModuleType | None:
    """The module if something already imported it, else None (never imports)."""
    return sys.modules.get(module)


def is_instance(obj: Any, module: str, attr_path: str) -> bool:
    """``isinstance(obj, module.attr_path)`` when ``module`` is imported; False otherwise."""
    target: Any = loaded(module)
    if target is None:
        return False
    for part in attr_path.split("."):
        target = getattr(target, part, None)
        if target is None:
            return False
    return isinstance(obj, target)


def _quiet_tensorflow() -> None:
    """Hide TensorFlow's C++ INFO/WARNING chatter (errors still print), unless the user set a level.

    It only takes effect before TensorFlow's first import, hence the check.
    """
    if "tensorflow" not in sys.modules:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # tf2onnx logs every conversion step at INFO through its own logger; keep warnings and errors.
    tf2onnx_log = logging.getLogger("tf2onnx")
    if tf2onnx_log.level == logging.NOTSET:
        tf2onnx_log.setLevel(logging.WARNING)
