"""Dynamic INT8 of a model too big for one protobuf, one weight at a time.

ORT's ``quantize_dynamic`` holds the FP32 model up to three times over (it loads it with all its
data, ``ONNXQuantizer`` deep-copies it, then saves and reloads the copy for shape inference): a
2.28 GB model peaked at 7.1 GB (3.1x). Here the prepared model is opened with onnx_ir, whose
external tensors are memory-maps, and each weight is read, quantized and unmapped in turn, so
the FP32 weights are never all in memory; the INT8 weights (a quarter of the size) are.

The graph is the one ``quantize_dynamic`` writes for a MatMul with a constant 2-D right operand
(``DynamicQuantizeLinear`` -> ``MatMulInteger`` -> ``Cast`` -> ``Mul`` by the product of the two
scales), with the same names, and the weight arithmetic is ORT's own ``quantize_data``
(symmetric for signed weights, 7-bit with ``reduce_range``, per output column when
per-channel), so results match ORT's quantizer (a test checks outputs against it). A Gemm
becomes MatMul + Add first, as ORT's dynamic mode does, except that an excluded Gemm stays a
Gemm (ORT splits it and then quantizes the ``<name>_MatMul`` it made, whatever the exclusion
said). Only MatMul and Gemm are covered: what ORT's quantizer does for Attention or LSTM stays
with ORT (:func:`covers` says when this applies).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnxruntime.quantization.quant_utils import quantize_data

from onnxopt.model_io import release_mapping

_TYPES = {"uint8": (onnx.TensorProto.UINT8, ir.DataType.UINT8),
          "int8": (onnx.TensorProto.INT8, ir.DataType.INT8)}


def covers(model: ir.Model, op_types: tuple[str, ...]) -> bool:
    """Whether this quantizer writes what ORT's would: every op to quantize is a MatMul or
    Gemm."""
    wanted = {op for op in op_types if any(n.op_type == op for n in model.graph.all_nodes())}
    return wanted <= {"MatMul", "Gemm"}


def quantize_matmuls(model: ir.Model, *, op_types: tuple[str, ...], weight_type: str,
                     per_channel: bool, reduce_range: bool, exclude: frozenset[str]) -> int:
    """Rewrite every MatMul (and plain Gemm) of ``model``'s main graph with a constant 2-D
    float32 weight into ORT's dynamic INT8 form, in place; returns how many were rewritten."""
    graph = model.graph
    activations: dict[str, tuple[ir.Value, ir.Value, ir.Value]] = {}
    weights: dict[tuple[str, bool], tuple[ir.Value, ir.Value, ir.Value]] = {}
    count = 0
    for node in list(graph):
        weight = _constant_weight(node)
        if node.op_type not in op_types or node.name in exclude or weight is None:
            continue
        a, transposed = node.inputs[0], node.op_type == "Gemm" and _attr(node, "transB") == 1
        if a.name not in activations:
            activations[a.name] = _quantize_activation(graph, node, a)
        if (weight.name, transposed) not in weights:
            weights[weight.name, transposed] = _quantize_weight(
                graph, weight, transposed, weight_type, per_channel, reduce_range)
        _replace(graph, node, activations[a.name], weights[weight.name, transposed])
        count += 1
    for value in list(graph.initializers.values()):
        if not value.uses() and not value.is_graph_output():
            graph.initializers.pop(value.name)
    return count


def _attr(node: ir.Node, name: str, default: float = 0) -> float:
    attr = node.attributes.get(name)
    return attr.value if attr is not None else default


def _constant_weight(node: ir.Node) -> ir.Value | None:
    """The weight of a MatMul, or of a Gemm that ORT's dynamic mode writes as MatMul + Add
    (alpha = beta = 1, A not transposed); None for anything else."""
    if node.domain not in ("", "ai.onnx") or len(node.inputs) < 2:
        return None
    if node.op_type == "Gemm":
        if _attr(node, "alpha", 1.0) != 1.0 or _attr(node, "beta", 1.0) != 1.0 or _attr(
                node, "transA"):
            return None
    elif node.op_type != "MatMul" or len(node.inputs) != 2:
        return None
    a, b = node.inputs[:2]  # the operands share a type: a float weight means a float input
    if a is None or b is None:
        return None
    tensor = b.const_value if b.is_initializer() else None
    if tensor is None or tensor.dtype != ir.DataType.FLOAT or len(tensor.shape) != 2:
        return None
    return b


def _quantize_activation(graph: ir.Graph, consumer: ir.Node,
                         a: ir.Value) -> tuple[ir.Value, ir.Value, ir.Value]:
    """``DynamicQuantizeLinear(a)``, placed before the first MatMul that reads ``a``."""
    node = ir.Node("", "DynamicQuantizeLinear", [a], num_outputs=3,
                   name=f"{a.name}_QuantizeLinear")
    for value, suffix in zip(node.outputs, ("_quantized", "_scale", "_zero_point")):
        value.name = a.name + suffix
    graph.insert_before(consumer, node)
    return node.outputs[0], node.outputs[1], node.outputs[2]


def _quantize_weight(graph: ir.Graph, weight: ir.Value, transposed: bool, weight_type: str,
                     per_channel: bool, reduce_range: bool) -> tuple[ir.Value, ir.Value, ir.Value]:
    """The INT8 weight (transposed for a Gemm with ``transB``), its scale and zero point as
    initializers; the FP32 map is released."""
    onnx_type, ir_type = _TYPES[weight_type]
    data = weight.const_value.numpy()
    data = data.T if transposed else data
    symmetric = weight_type == "int8"  # ORT's default: signed weights are symmetric
    if per_channel:  # one (scale, zero point) per output column, as ORT's per-channel MatMul
        columns = [quantize_data(data[:, j], onnx_type, symmetric, reduce_range=reduce_range)
                   for j in range(data.shape[1])]
        zero_point = np.array([c[0] for c in columns]).reshape(-1)
        scale = np.array([c[1] for c in columns], np.float32).reshape(-1)
        quantized = np.stack([c[2] for c in columns], axis=1)
    else:
        zero_point, scale, quantized = quantize_data(data.reshape(-1), onnx_type, symmetric,
                                                     reduce_range=reduce_range)
        zero_point = np.asarray(zero_point).reshape(())
        scale = np.asarray(scale, np.float32).reshape(())
        quantized = quantized.reshape(data.shape)
    del data
    release_mapping(weight.const_value)
    name = f"{weight.name}_Transposed" if transposed else weight.name
    values = (_initializer(graph, f"{name}_quantized", quantized.astype(ir_type.numpy())),
              _initializer(graph, f"{name}_scale", scale),
              _initializer(graph, f"{name}_zero_point", zero_point.astype(ir_type.numpy())))
    return values


def _initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    value = ir.Value(name=name, const_value=ir.tensor(array, name=name))
    value.type, value.shape = ir.TensorType(value.const_value.dtype), value.const_value.shape
    graph.register_initializer(value)
    return value


def _replace(graph: ir.Graph, node: ir.Node, a: tuple[ir.Value, ir.Value, ir.Value],
             w: tuple[ir.Value, ir.Value, ir.Value]) -> None:
    """MatMul(a, w) -> Mul(Cast(MatMulInteger(a_q, w_q, a_zp, w_zp)), a_scale * w_scale), then
    ``Add`` of the bias for a Gemm (ORT's names: ``<gemm>_MatMul``, ``<gemm>_Add``)."""
    (a_q, a_scale, a_zp), (w_q, w_scale, w_zp) = a, w
    out = node.outputs[0]
    bias = node.inputs[2] if node.op_type == "Gemm" and len(node.inputs) > 2 else None
    name, product = ((f"{node.name}_MatMul", f"{out.name}_MatMul") if node.op_type == "Gemm"
                     else (node.name, out.name))
    base = f"{name}_quant"
    integer = ir.Node("", "MatMulInteger", [a_q, w_q, a_zp, w_zp], name=base)
    integer.outputs[0].name = f"{product}_output_quantized"
    cast = ir.Node("", "Cast", integer.outputs, [ir.AttrInt64("to", ir.DataType.FLOAT)],
                   name=f"{integer.outputs[0].name}_cast")
    cast.outputs[0].name = f"{integer.outputs[0].name}_cast_output"
    scales = ir.Node("", "Mul", [a_scale, w_scale], name=f"{base}_scales_mul")
    scales.outputs[0].name = f"{base}_scales_mul:0"
    result = ir.Node("", "Mul", [cast.outputs[0], scales.outputs[0]],
                     name=f"{base}_output_scale_mul")
    new_nodes = [integer, cast, scales, result]
    if bias is not None:
        result.outputs[0].name = product
        new_nodes.append(ir.Node("", "Add", [result.outputs[0], bias], name=f"{node.name}_Add"))
    ir.convenience.replace_nodes_and_values(graph, node, [node], new_nodes, [out],
                                            [new_nodes[-1].outputs[0]])
