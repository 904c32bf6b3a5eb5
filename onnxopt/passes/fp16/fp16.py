"""``fp16``: weights and activations in float16, float32 model inputs/outputs kept (ARM targets).

The conversion is ONNX Runtime's own converter (``onnxruntime.transformers.float16``, the
maintained fork of onnxconverter-common's, shipped with onnxruntime, so no extra dependency). It
inserts Casts at the model inputs/outputs and around every node it keeps in float32, clamps weights
into float16's range, and fixes type attributes (Cast targets, Resize scales, ...).

Which ops stay float32: ORT's ``DEFAULT_OP_BLOCK_LIST`` (ML ops, TopK, NonMaxSuppression, Range,
CumSum, ...), ``keep_ops``, and the ops without a float16 CPU kernel in the ORT build named by
``kernels`` (:mod:`onnxopt.passes.fp16._kernels`, measured by probing): for ``arm64``, ORT's aarch64 build (Conv,
Gemm, MatMul, pooling and elementwise arithmetic run in float16 there; Softmax, Sigmoid, Tanh,
Exp, BatchNormalization, reductions do not); ``this-machine`` probes the local ORT. Kept ops run
in float32 with Casts around them, instead of ORT inserting Casts per node at load.

Range: nodes whose activations float16 cannot hold stay float32 too (:mod:`onnxopt.passes.fp16._ranges`). The
float32 model runs once on the calibration batches (else the verification inputs) and every
tensor whose float16 cast error exceeds ``max_cast_error`` (overflow past 65504, or values
mostly under float16's normal range) keeps its producer and consumers in float32; the notes list
those nodes and why. Random-weight MobileNetV2 needs this: its activations fall under 1e-6.
The check sees the main graph only: values inside ``If``/``Loop``/``Scan`` bodies cannot be
fetched from ORT, so the notes count those nodes as unchecked (the pipeline's verification still
covers their outputs).

Control flow: subgraph nodes convert like the rest; the Casts the converter adds around a kept
node inside a body are moved into that body (:mod:`onnxopt.passes.fp16._subgraphs`).
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

from onnxopt.feeds import Feeds, synthesize_feeds
from onnxopt.graph_outputs import outputs_with_producers
from onnxopt.metrics import Budget
from onnxopt.passes.fp16._kernels import AARCH64_FP16_OPS, PROBED_OPS, probe_model, runs_in_fp16
from onnxopt.passes.fp16._ranges import MAX_CAST_ERROR, activation_ranges, nodes_to_keep
from onnxopt.passes.fp16._subgraphs import move_casts_into_subgraphs
from onnxopt.passes._shared.surgery import replace_contents
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
    max_cast_error: float = option(
        MAX_CAST_ERROR, "Largest relative RMS error of storing an activation in float16, measured on the "
        "calibration (else verification) inputs in float32; nodes producing or reading a tensor "
        "above it (overflow, underflow) stay float32. Rounding alone gives 2.8e-4. 0: no check.")
    range_batches: int = option(2, "Most input batches the range check runs.", min=1)


@register
class Fp16Pass(OptPass):
    name = "fp16"
    summary = "Weights and activations to float16; float32 inputs/outputs kept (for ARM targets)."
    Config = Fp16Config

    def budget(self) -> Budget:
        return FP16_BUDGET

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        with outputs_with_producers(model) as aliased:
            result = self._convert(model)
        return ir.passes.PassResult(model, result.modified or bool(aliased))

    def _convert(self, model: ir.Model) -> ir.passes.PassResult:
        cfg: Fp16Config = self.config
        op_types = {n.op_type for n in model.graph.all_nodes() if n.domain in ("", "ai.onnx")}
        no_kernel = no_fp16_kernel(op_types, cfg.kernels, model.opset_imports.get("", 17))
        blocked = set(DEFAULT_OP_BLOCK_LIST) | set(cfg.keep_ops) | no_kernel
        self.notes = {"kernels": cfg.kernels, "kept_float32_ops": sorted(op_types & blocked),
                      "onnxruntime": ort.__version__}
        if not _float32_left(model, blocked | set(cfg.keep_nodes)):
            self.notes["skipped"] = "no float32 computation left to convert"
            self.notes["warning"] = "nothing converted to float16: " + self.notes["skipped"]
            return ir.passes.PassResult(model, False)
        out_of_range: dict[str, str] = {}
        if cfg.max_cast_error > 0:
            ranges = activation_ranges(model, self._range_batches(model))
            out_of_range = nodes_to_keep(model, ranges, cfg.max_cast_error)
            self.notes["range_check"] = {
                "tensors": len(ranges), "max_cast_error": cfg.max_cast_error,
                "out_of_range": sum(r.cast_error > cfg.max_cast_error for r in ranges.values())}
            inner = sum(n.graph is not model.graph for n in model.graph.all_nodes())
            if inner:
                self.notes["range_check"]["unchecked_subgraph_nodes"] = inner
            self.notes["kept_float32_nodes"] = out_of_range
        if not _float32_left(model, blocked | set(cfg.keep_nodes) | set(out_of_range)):
            self.notes["skipped"] = "no float32 computation left to convert within range"
            self.notes["warning"] = "nothing converted to float16: " + self.notes["skipped"]
            return ir.passes.PassResult(model, False)
        converted = convert_float_to_float16(
            ir.serde.serialize_model(model), keep_io_types=True, op_block_list=sorted(blocked),
            node_block_list=[*cfg.keep_nodes, *out_of_range])
        moved = move_casts_into_subgraphs(converted)
        if moved:
            self.notes["subgraph_casts_moved"] = moved
        replace_contents(model, ir.serde.deserialize_model(converted))
        self.notes["initializers_retyped"] = match_initializer_types(model, cfg.max_cast_error)
        if out_of_range:
            self.notes["float16_round_trips_removed"] = remove_float16_round_trips(model)
        common.TopologicalSortPass()(model)
        self.notes["weight_elements_by_dtype"] = tensor_dtypes(model)
        return ir.passes.PassResult(model, True)

    def _range_batches(self, model: ir.Model) -> list[Feeds]:
        """Inputs for the range check: calibration, else verification, else seeded feeds."""
        cfg: Fp16Config = self.config
        batches = list(self.context.calibration or self.context.verify_feeds or [])
        if not batches:
            batches = [synthesize_feeds(model, batch=2, seed=self.context.seed)]
        return batches[: max(cfg.range_batches, 1)]


def remove_float16_round_trips(model: ir.Model) -> int:
    """Connect float32 nodes to each other directly where ORT's converter went through float16.

    The converter casts every output of a node it keeps float32 to float16 and every input back
    to float32, also between two kept nodes: ``a (fp32) -> Cast(fp16) -> Cast(fp32) -> b (fp32)``.
    That round trip loses what the node was kept for (a tensor outside float16's range), so each
    ``Cast(fp32)`` fed by a ``Cast(fp16)`` of a float32 value reads that value instead. (A
    precision change, which is why no generic rewrite rule does it.) A float32 value whose
    float16 copy is no longer read takes back its original name. Returns how many went.
    """
    removed = 0
    for node in list(model.graph):
        if node.op_type != "Cast" or _cast_to(node) != ir.DataType.FLOAT:
            continue
        half = node.inputs[0]
        down = half.producer() if half is not None else None
        if (down is None or down.op_type != "Cast" or _cast_to(down) != ir.DataType.FLOAT16
                or down.inputs[0] is None or down.inputs[0].dtype != ir.DataType.FLOAT):
            continue
        if node.outputs[0].is_graph_output():  # keeps its name: a float32-to-float32 Cast
            node.replace_input_with(0, down.inputs[0])
        else:
            node.outputs[0].replace_all_uses_with(down.inputs[0])
            model.graph.remove(node, safe=True)
        removed += 1
        if not half.uses() and not half.is_graph_output():  # the float32 value takes its name
            name, source = half.name, down.inputs[0]
            model.graph.remove(down, safe=True)
            source.name = name
    return removed


def match_initializer_types(model: ir.Model, max_cast_error: float) -> int:
    """Make initializers hold the type their value declares; returns how many changed.

    ORT's converter types the weights of the nodes it keeps float32 as float16 (and Casts them
    back) but leaves their data float32: ORT runs that, ONNX's checker rejects it. The data go
    to float16, as intended, unless float16 cannot hold them (then the type goes to float32).
    """
    changed = 0
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if (tensor is None or value.dtype != ir.DataType.FLOAT16
                or tensor.dtype != ir.DataType.FLOAT):
            continue
        data = tensor.numpy()
        with np.errstate(over="ignore"):
            half = data.astype(np.float16)
        norm = float(np.linalg.norm(data))
        error = float(np.linalg.norm(data - half.astype(np.float32))) if norm else 0.0
        if np.all(np.isfinite(half)) and (max_cast_error <= 0 or error <= max_cast_error * norm):
            value.const_value = ir.tensor(half, name=value.name)
        else:
            value.type = ir.TensorType(ir.DataType.FLOAT)
        changed += 1
    return changed


def _cast_to(node: ir.Node) -> ir.DataType | None:
    attr = node.attributes.get("to")
    return None if attr is None else ir.DataType(attr.as_int())


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
