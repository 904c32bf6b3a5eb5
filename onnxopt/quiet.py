"""No framework noise on the console by default; ``--verbose`` shows all of it.

A torch export prints four "torchvision is not installed" warnings and a FutureWarning; a Keras
export prints absl's "log messages before InitializeLog" banner, oneDNN and CPU-feature INFO lines
from TensorFlow's C++ runtime and tf2onnx's per-step INFO logs; NaN data leaks numpy
RuntimeWarnings. None of it is actionable for the user, and TensorFlow's native lines break the
progress bar. Python-level noise is silenced with warning filters and logger levels;
C++ lines written straight to file descriptor 2 can only be caught there, so
:func:`native_stderr_filtered` points the descriptor at a temporary file around an export and
passes on every line that is not known noise (errors still print).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import tempfile
import warnings
from collections.abc import Iterator
from typing import Any, TextIO

# Loggers whose INFO/WARNING chatter is noise: torch's exporter registry (torchvision missing),
# tf2onnx's conversion steps, absl (TensorFlow's Python logging).
NOISY_LOGGERS = ("torch.onnx", "torch._dynamo", "torch.export", "tf2onnx", "absl")
# Lines on fd 2 from native code that are noise: glog/absl INFO and WARNING lines
# ("I0000 00:00:... port.cc:153] oneDNN ..."), absl's banner, the CPU-feature advice.
NATIVE_NOISE = re.compile(
    r"^(WARNING: All log messages before absl::InitializeLog\(\) is called"
    r"|[IW]\d{4} [\d:.]+ +\d+ \S+:\d+\] "
    r"|To enable the following instructions:)")

FRAMEWORKS = r"(torch|keras|tensorflow|tf2onnx|onnxscript|google\.protobuf)"

_state = {"verbose": False}


def install(verbose: bool) -> None:
    """Called once by the CLI before any framework import; with ``verbose``, changes nothing."""
    _state["verbose"] = verbose
    if verbose:
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # read at TensorFlow's first import
    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category)
    warnings.filterwarnings("ignore", category=UserWarning, module=FRAMEWORKS)
    # numpy's NaN/overflow warnings name the calling line, not numpy: matched by message
    warnings.filterwarnings("ignore", category=RuntimeWarning,
                            message=r"(invalid value|overflow|divide by zero) encountered")
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


@contextlib.contextmanager
def native_stderr_filtered() -> Iterator[None]:
    """Inside: native writes to fd 2 go to a temporary file, Python's ``sys.stderr`` (the
    console, progress spinners) to the real stderr; on exit, lines that are not
    :data:`NATIVE_NOISE` are written out. A no-op under ``--verbose``."""
    if _state["verbose"]:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    python_stderr = sys.stderr
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        real = os.fdopen(os.dup(saved), "w", buffering=1)
        sys.stderr = _Filtered(real)  # torch's logging handler is made here, on sys.stderr
        try:
            yield
        finally:
            real.close()
            sys.stderr = python_stderr
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            kept = [line for line in capture.read().decode(errors="replace").splitlines()
                    if not NATIVE_NOISE.match(line)]
            if kept:
                python_stderr.write("\n".join(kept) + "\n")
                python_stderr.flush()


class _Filtered:
    """A text stream that drops whole writes matching :data:`NATIVE_NOISE` (torch logs its
    glog-style warnings through a Python handler whose level its import resets)."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        if NATIVE_NOISE.match(text.lstrip()):
            return len(text)
        return self._stream.write(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)
