"""Graph surgery that two or more pass families need."""

from __future__ import annotations

import onnx_ir as ir


def replace_contents(model: ir.Model, source: ir.Model) -> None:
    """Move ``source``'s graph and functions into ``model``: lets a pass that works on a copy
    (or through protobuf) still return the model object it was given, as in-place passes must."""
    model.graph = source.graph
    model.functions.clear()
    model.functions.update(source.functions)
    model.ir_version = source.ir_version
