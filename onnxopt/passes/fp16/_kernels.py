"""Which ops ONNX Runtime's CPU provider runs in float16, by probing, per ORT build.

Where a float16 kernel is missing, ORT's InsertCastTransformer wraps the node in Casts at load
time: the model still runs, in float32 there. A probe is a one-node float16 model run once with
profiling on; an inserted ``Cast`` in the profile means "no float16 kernel". Kernel coverage
differs by build: ORT's aarch64 wheels have MLAS float16 kernels (Conv, Gemm, MatMul, pooling,
elementwise arithmetic) that the x86-64 wheels lack.

:data:`AARCH64_FP16_OPS` was measured with the aarch64 wheel of onnxruntime 1.32.0 under
``qemu-aarch64-static -cpu neoverse-n1`` (set-up: ``/work/shared/ARM-NOTES.md``)::

    python onnxopt/passes/fp16/_kernels.py --write DIR            # on the host (needs onnxopt)
    python onnxopt/passes/fp16/_kernels.py --probe DIR            # on the target: numpy + onnxruntime only

The probing half imports only the standard library, numpy and onnxruntime, so this file runs as
a script on a bare board or under the emulator.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
from typing import Any

import numpy as np
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors

_ORT_ERRORS = (ort_errors.Fail, ort_errors.InvalidGraph, ort_errors.InvalidArgument,
               ort_errors.NotImplemented, ort_errors.RuntimeException, ort_errors.NoSuchFile)

# Op types the probe builds models for, and their float16 input shapes.
_UNARY = [
    "Abs", "AveragePool", "Ceil", "Clip", "Cos", "Dropout", "Elu", "Erf", "Exp", "Flatten",
    "Floor", "GlobalAveragePool", "GlobalMaxPool", "HardSigmoid", "HardSwish", "Identity",
    "LeakyRelu", "Log", "LogSoftmax", "MaxPool", "Neg", "Reciprocal", "ReduceMax", "ReduceMean",
    "ReduceMin", "ReduceSum", "Relu", "Round", "Selu", "Sigmoid", "Sin", "Softmax", "Softplus",
    "Sqrt", "Tanh", "Transpose",
]
_SHAPES: dict[str, list[list[int]]] = {
    **{op: [[1, 2, 4, 4]] for op in _UNARY},
    **{op: [[2, 2], [2, 2]] for op in ("Add", "Sub", "Mul", "Div", "Pow", "MatMul", "Sum", "Max",
                                        "Min", "Mean", "PRelu")},
    "Gemm": [[2, 2], [2, 2], [2]],
    "Conv": [[1, 2, 4, 4], [2, 2, 1, 1], [2]], "ConvTranspose": [[1, 2, 4, 4], [2, 2, 1, 1], [2]],
    "BatchNormalization": [[1, 2, 2, 2], [2], [2], [2], [2]],
    "LayerNormalization": [[2, 2], [2], [2]], "InstanceNormalization": [[1, 2, 2, 2], [2], [2]],
}
PROBED_OPS = frozenset(_SHAPES)

# Measured (see the module docstring): the probed op types with a float16 kernel in ORT 1.32.0's
# aarch64 CPU build. Every other probed op type gets ORT-inserted Casts there.
AARCH64_FP16_OPS = frozenset({
    "Add", "AveragePool", "Clip", "Conv", "Div", "Erf", "Flatten", "Gemm", "GlobalAveragePool",
    "Identity", "LayerNormalization", "LeakyRelu", "MatMul", "Max", "MaxPool", "Min", "Mul",
    "Relu", "Round", "Sub", "Transpose",
})


def probe_model(op_type: str, opset: int) -> bytes | None:
    """A serialized one-node float16 model of ``op_type``, or ``None`` if the probe has none."""
    if op_type not in _SHAPES:
        return None
    import onnx_ir as ir  # only the host builds models

    inputs = [ir.Value(name=f"x{i}", type=ir.TensorType(ir.DataType.FLOAT16), shape=ir.Shape(s))
              for i, s in enumerate(_SHAPES[op_type])]
    pooled = op_type in ("AveragePool", "MaxPool")
    attributes = [ir.AttrInt64s("kernel_shape", [2, 2])] if pooled else []
    node = ir.Node("", op_type, inputs, attributes, num_outputs=1)
    node.outputs[0].name = "y"
    node.outputs[0].type = ir.TensorType(ir.DataType.FLOAT16)
    graph = ir.Graph(inputs, node.outputs, nodes=[node], opset_imports={"": opset})
    return ir.serde.serialize_model(ir.Model(graph, ir_version=8)).SerializeToString()


def runs_in_fp16(model: bytes | str) -> bool | None:
    """Whether ORT runs the one-node float16 ``model`` without inserting Casts (None: it cannot
    load or run it, e.g. an op the opset lacks)."""
    with tempfile.TemporaryDirectory(prefix="onnxopt-fp16-probe-") as tmp:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.enable_profiling = True
        options.profile_file_prefix = os.path.join(tmp, "probe")
        options.log_severity_level = 4
        try:
            session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
            rng = np.random.default_rng(0)
            feeds = {i.name: rng.random(i.shape).astype(np.float16) for i in session.get_inputs()}
            session.run(None, feeds)
        except _ORT_ERRORS:
            return None
        with open(session.end_profiling()) as f:
            events = json.load(f)
    ops = {e["args"].get("op_name") for e in events if e.get("cat") == "Node" and "args" in e}
    return "Cast" not in ops


def _write(folder: str, opset: int = 17) -> None:
    os.makedirs(folder, exist_ok=True)
    for op in sorted(PROBED_OPS):
        data = probe_model(op, opset)
        if data is not None:
            with open(os.path.join(folder, f"{op}.onnx"), "wb") as f:
                f.write(data)


def _probe(folder: str) -> dict[str, Any]:
    results = {}
    for file in sorted(os.listdir(folder)):
        if file.endswith(".onnx"):
            verdict = runs_in_fp16(os.path.join(folder, file))
            results[file[:-5]] = {True: "fp16", False: "casts", None: "unprobed"}[verdict]
    return {"machine": platform.machine(), "onnxruntime": ort.__version__, "ops": results,
            "fp16": sorted(op for op, v in results.items() if v == "fp16")}


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("--write", "--probe"):
        sys.exit("usage: fp16_kernels.py --write DIR | --probe DIR")
    if sys.argv[1] == "--write":
        _write(sys.argv[2])
    else:
        print(json.dumps(_probe(sys.argv[2]), indent=1))
