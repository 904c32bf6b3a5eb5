"""ONNX Runtime sessions and latency measurement; standard library + numpy + onnxruntime only.

This module must stay self-contained (no other onnxopt import) so it can be copied to a bare ARM
board and run as a script next to a model.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import onnxruntime as ort

OPT_LEVELS = {
    "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def session_options(
    *,
    threads: int | None = None,
    inter_op_threads: int | None = None,
    parallel: bool = False,
    opt_level: str = "all",
    config: Mapping[str, str] | None = None,
) -> ort.SessionOptions:
    """ORT session options from plain values (``threads=None`` lets ORT choose)."""
    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = int(threads)
    if inter_op_threads:
        so.inter_op_num_threads = int(inter_op_threads)
    so.execution_mode = (
        ort.ExecutionMode.ORT_PARALLEL if parallel else ort.ExecutionMode.ORT_SEQUENTIAL
    )
    so.graph_optimization_level = OPT_LEVELS[opt_level]
    so.log_severity_level = 3
    for key, value in (config or {}).items():
        so.add_session_config_entry(str(key), str(value))
    return so


def create_session(
    model: str | bytes, *, providers: list[str] | None = None, **options: Any
) -> ort.InferenceSession:
    """A CPU session for a model path or serialized bytes; ``options`` go to :func:`session_options`."""
    return ort.InferenceSession(
        model, sess_options=session_options(**options), providers=providers or ["CPUExecutionProvider"]
    )


def reference_session(model: str | bytes) -> ort.InferenceSession:
    """The verification oracle: graph optimizations off, one thread (deterministic, no fusions)."""
    return create_session(model, threads=1, opt_level="disabled")


def run(session: ort.InferenceSession, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Outputs by name."""
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, dict(feeds))))
