"""What every framework exporter hands back to :func:`onnxopt.export.export`."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxopt.export._verify import Reference


@dataclasses.dataclass
class Exported:
    """An exported graph plus what its verification needs.

    ``reference`` runs the source model on arrays in graph-input order; ``examples`` are the
    example inputs in the same order (integer ones are reused as verification inputs, since random
    ids can fall outside an embedding). ``input_names``/``output_names`` are names the source gave
    itself (a SavedModel signature's keys), used when the caller gives none. ``keepalive`` holds
    objects the reference needs (a loaded SavedModel).
    """

    model: ir.Model
    exporter: str
    reference: Reference | None
    reference_name: str
    example_batch: int | None = None
    examples: list[np.ndarray] | None = None
    fallback_reason: str | None = None
    input_names: list[str] | None = None
    output_names: list[str] | None = None
    keepalive: Any = None
