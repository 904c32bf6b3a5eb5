"""Where onnxopt keeps things worth reusing across runs (model exports, the aarch64 environment)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """``$ONNXOPT_CACHE``, else ``$XDG_CACHE_HOME/onnxopt`` or ``~/.cache/onnxopt``.

    Not the temp directory: the CLI gives each run a private one that is removed afterwards, and
    caches should outlive runs (and reboots). Created on first use.
    """
    explicit = os.environ.get("ONNXOPT_CACHE")
    if explicit:
        root = Path(explicit)
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        root = (Path(xdg) if xdg else Path.home() / ".cache") / "onnxopt"
    root.mkdir(parents=True, exist_ok=True)
    return root
