"""ONNX sources: there is no framework to compare with, so check, upgrade and load in ORT.

A caller's ``onnx.ModelProto`` or ``onnx_ir.Model`` is never modified: the result is a copy.
"""

from __future__ import annotations

from pathlib import Path

import onnx
import onnx_ir as ir

from onnxopt.export._verify import check_loads
from onnxopt.model_io import check_proto, load_model, upgrade_opset


def load_onnx_source(src: onnx.ModelProto | ir.Model | None, path: Path | None) -> ir.Model:
    """The checked, opset-upgraded model that ONNX Runtime has shown it can load."""
    if path is not None:
        model = load_model(path)
    else:
        proto = src if isinstance(src, onnx.ModelProto) else ir.serde.serialize_model(src)
        check_proto(proto)
        model = upgrade_opset(ir.serde.deserialize_model(proto))  # a new object, not ``src``
    check_loads(model, str(path) if path else None)
    return model
