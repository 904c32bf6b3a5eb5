"""``fp16``: weights and activations in float16, float32 model inputs/outputs kept (ARM targets).

The conversion is ONNX Runtime's own converter (``onnxruntime.transformers.float16``, the
maintained fork of onnxconverter-common's, shipped with onnxruntime, so no extra dependency). It
inserts Casts at the model inputs/outputs and around every node it keeps in float32, clamps weights
into float16's range, and fixes type attributes (Cast targets, Resize scales, ...).

Which ops stay float32: ORT's ``DEFAULT_OP_BLOCK_LIST`` (ML ops, TopK, NonMaxSuppression, Range,
CumSum, ...), ``keep_ops``, and the ops without a float16 CPU kernel in the ORT build named by
``kernels`` (:mod:`fp16_kernels`, measured by probing): for ``arm64``, ORT's aarch64 build (Conv,
Gemm, MatMul, pooling and elementwise arithmetic run in float16 there; Softmax, Sigmoid, Tanh,
Exp, BatchNormalization, reductions do not); ``this-machine`` probes the local ORT. Kept ops run
in float32 with Casts around them, instead of ORT inserting Casts per node at load.
"""

from __future__ import annotations

import dataclasses
from functools import cache
from typing import Literal

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common
import onnxruntime as ort
from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

from onnxopt.metrics import Budget
from onnxopt.passes.fp16_kernels import AARCH64_FP16_OPS, PROBED_OPS, probe_model, runs_in_fp16
from onnxopt.passes.fusion import replace_contents
from onnxopt.recipes import register_recipe
from onnxopt.registry import OptPass, option, register

# float16 keeps 11 significant bits: each rounding is within 2**-11 = 4.9e-4 relative. Errors
# of a few dozen layers add up like a random walk to ~1e-2 relative RMS at the output, i.e. a
# cosine of 1 - 5e-5. A floor of 0.999 (~4.5% relative RMS error) therefore passes every
# healthy conversion and still fails on an overflow, a lost sign or a skipped Cast. Measured:
# digits-size MLP and CNN 0.9999999, MiniLM-L6 0.9999993, DenseNet121 0.99999, ResNet50's
# softmax output 0.99975 (a softmax sharpens logit errors; its logits agree far closer).
FP16_BUDGET = Budget("cosine", min_value=0.999)

Kernels = Literal["arm64", "this-machine", "none"]


@dataclasses.dataclass
class Fp16Config:
    kernels: Kernels = option(
        "arm64", "ORT build whose float16 CPU kernels decide what stays float32: 'arm64' "
                 "(aarch64 wheels, measured), 'this-machine' (probe the local ORT), 'none'.")
    keep_ops: list[str] = option([], "Op types to keep in float32 besides those.")
    keep_nodes: list[str] = option([], "Node names to keep in float32.")


@register
class Fp16Pass(OptPass):
    name = "fp16"
    summary = "Weights and activations to float16; float32 inputs/outputs kept (for ARM targets)."
    Config = Fp16Config

    def budget(self) -> Budget:
        return FP16_BUDGET

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        cfg: Fp16Config = self.config
        op_types = {n.op_type for n in model.graph.all_nodes() if n.domain in ("", "ai.onnx")}
        no_kernel = no_fp16_kernel(op_types, cfg.kernels, model.opset_imports.get("", 17))
        blocked = set(DEFAULT_OP_BLOCK_LIST) | set(cfg.keep_ops) | no_kernel
        self.notes = {"kernels": cfg.kernels, "kept_float32_ops": sorted(op_types & blocked),
                      "onnxruntime": ort.__version__}
        if not _float32_left(model, blocked | set(cfg.keep_nodes)):
            self.notes["skipped"] = "no float32 computation left to convert"
            return ir.passes.PassResult(model, False)
        converted = convert_float_to_float16(
            ir.serde.serialize_model(model), keep_io_types=True, op_block_list=sorted(blocked),
            node_block_list=list(cfg.keep_nodes))
        replace_contents(model, ir.serde.deserialize_model(converted))
        common.TopologicalSortPass()(model)
        self.notes["weight_elements_by_dtype"] = tensor_dtypes(model)
        return ir.passes.PassResult(model, True)


def no_fp16_kernel(op_types: set[str], kernels: Kernels, opset: int) -> set[str]:
    """The probed op types among ``op_types`` that the ``kernels`` ORT build runs in float32."""
    probed = op_types & PROBED_OPS
    if kernels == "arm64":
        return probed - AARCH64_FP16_OPS
    if kernels == "this-machine":
        return {op for op in probed if local_fp16_kernel(op, opset) is False}
    return set()


@cache
def local_fp16_kernel(op_type: str, opset: int) -> bool | None:
    """Whether this machine's ORT has a float16 CPU kernel for ``op_type`` (None: unprobeable)."""
    model = probe_model(op_type, opset)
    return None if model is None else runs_in_fp16(model)


def _float32_left(model: ir.Model, kept: set[str]) -> bool:
    """Whether a float32 tensor still feeds or leaves a node that is neither a Cast nor kept."""
    def convertible(node: ir.Node) -> bool:
        return node.op_type != "Cast" and node.op_type not in kept and node.name not in kept

    return any(
        convertible(n) and any(v is not None and v.dtype == ir.DataType.FLOAT
                               for v in (*n.inputs, *n.outputs))
        for n in model.graph.all_nodes())


def float16_ops(model: ir.Model) -> list[str]:
    """Names of the nodes that compute in float16 (any float16 input or output)."""
    return [n.name or n.op_type for n in model.graph.all_nodes()
            if any(v is not None and v.dtype == ir.DataType.FLOAT16
                   for v in (*n.inputs, *n.outputs))]


def tensor_dtypes(model: ir.Model) -> dict[str, int]:
    """How many initializer elements each dtype holds (float16 share of the weights)."""
    counts: dict[str, int] = {}
    for value in model.graph.initializers.values():
        if value.const_value is not None:
            key = value.const_value.dtype.name
            counts[key] = counts.get(key, 0) + int(np.prod(value.const_value.shape.numpy()))
    return counts


register_recipe("fp16", ["cleanup", "fuse", "fp16"])
