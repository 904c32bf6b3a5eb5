"""Which nodes weight-only quantization can take, and which one is the LM head.

ONNX Runtime's quantizer takes ``MatMul`` nodes whose second input is a constant 2-D float
initializer. ``fuse`` turns ``MatMul + Add`` into ``Gemm``, which the quantizer does not take, so
a plain Gemm (alpha 1, no transA, 2-D input, constant B) is split back into ``MatMul`` (+ ``Add``
of its bias) first; :mod:`._convert` moves the bias into MatMulNBits' own bias input afterwards.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir


def constant_2d(value: ir.Value | None) -> np.ndarray | None:
    """The float32 2-D constant weight behind ``value`` (an initializer), or None."""
    if value is None or value.const_value is None or not value.is_initializer():
        return None
    if value.dtype != ir.DataType.FLOAT or len(value.const_value.shape) != 2:
        return None
    return value.const_value.numpy()


def _attr(node: ir.Node, name: str, default: float) -> float:
    attr = node.attributes.get(name)
    return default if attr is None else attr.value


def splittable_gemm(node: ir.Node) -> bool:
    """A Gemm that is ``A @ B (+ C)`` with a constant B, which MatMul + Add computes exactly."""
    if node.op_type != "Gemm" or node.domain not in ("", "ai.onnx"):
        return False
    if _attr(node, "alpha", 1.0) != 1.0 or _attr(node, "transA", 0):
        return False
    if len(node.inputs) > 2 and node.inputs[2] is not None and _attr(node, "beta", 1.0) != 1.0:
        return False
    return constant_2d(node.inputs[1]) is not None


def split_gemms(model: ir.Model) -> int:
    """Replace every :func:`splittable_gemm` by ``MatMul`` (+ ``Add``); returns how many.

    ``transB`` becomes a transposed copy of the weight (the quantizer reads B as [K, N])."""
    graph = model.graph
    count = 0
    for node in list(graph):
        if not splittable_gemm(node):
            continue
        weight = node.inputs[1]
        if _attr(node, "transB", 0):
            # A copy per Gemm, under a free name: one Linear applied twice shares its weight, and
            # ORT's quantizer names its packed weights and zero points after the weight, so a
            # shared copy quantized at two bit widths (a head at 8) would clash.
            data = np.ascontiguousarray(constant_2d(weight).T)
            name = f"{weight.name}_t"
            while name in graph.initializers:
                name += "_"
            weight = ir.Value(name=name, const_value=ir.tensor(data))
            weight.type, weight.shape = ir.TensorType(ir.DataType.FLOAT), ir.Shape(data.shape)
            graph.register_initializer(weight)
        name = node.name or f"gemm_{count}"
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        matmul = ir.node("MatMul", [node.inputs[0], weight], name=f"{name}_MatMul")
        new = [matmul]
        out = matmul.outputs[0]
        if bias is not None:
            add = ir.node("Add", [out, bias], name=f"{name}_Add")
            new.append(add)
            out = add.outputs[0]
        out.name, out.type, out.shape = node.outputs[0].name, node.outputs[0].type, node.outputs[0].shape
        graph.insert_before(node, new)
        node.outputs[0].replace_all_uses_with(out, replace_graph_outputs=True)
        node.outputs[0].name = None
        graph.remove(node, safe=True)
        count += 1
    return count


def fold_weight_transposes(model: ir.Model) -> int:
    """Give each MatMul that reads ``Transpose(W)`` of a 2-D constant W its own transposed copy
    of W as a constant; returns how many.

    Tied embeddings export this way (GPT-2's LM head is ``x @ wte^T``), and constant folding
    skips the Transpose of a large table, so without this the head would stay float. The
    Gather keeps the float table; the head's copy is what gets quantized (an 8-bit head adds a
    quarter of the table's bytes to the file, and reads a quarter of them per token).
    """
    count = 0
    for node in list(model.graph):
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or len(node.inputs) < 2:
            continue
        producer = node.inputs[1].producer() if node.inputs[1] is not None else None
        if producer is None or producer.op_type != "Transpose":
            continue
        perm = producer.attributes.get("perm")
        data = constant_2d(producer.inputs[0])
        if data is None or (perm is not None and list(perm.as_ints()) != [1, 0]):
            continue
        weight = ir.Value(name=f"{producer.inputs[0].name}_transposed_{count}",
                          const_value=ir.tensor(np.ascontiguousarray(data.T)))
        weight.type, weight.shape = ir.TensorType(ir.DataType.FLOAT), ir.Shape(data.T.shape)
        model.graph.register_initializer(weight)
        node.replace_input_with(1, weight)
        if not producer.outputs[0].uses() and not producer.outputs[0].is_graph_output():
            model.graph.remove(producer, safe=True)
        count += 1
    return count


def eligible_matmuls(model: ir.Model) -> list[ir.Node]:
    """MatMuls of the main graph with a constant 2-D float weight (what MatMulNBits replaces)."""
    return [n for n in model.graph if n.op_type == "MatMul" and n.domain in ("", "ai.onnx")
            and constant_2d(n.inputs[1]) is not None]


def lm_head(model: ir.Model, eligible: list[ir.Node]) -> ir.Node | None:
    """The eligible MatMul nearest the logits output, or None.

    The logits output: the graph output whose name contains ``logits``, else the first one
    (``present.*`` cache outputs come from the QKV projection, not the head). From it the search
    walks producers backwards and stops at the first MatMul/Gemm on each path; the last of
    those in graph order is the head (a classifier's last layer in an MLP).
    """
    outputs = list(model.graph.outputs)
    if not outputs:
        return None
    named = [o for o in outputs if o.name and "logits" in o.name.lower()]
    start = named[0] if named else outputs[0]
    wanted = set(eligible)
    order = {n: i for i, n in enumerate(model.graph)}
    found: list[ir.Node] = []
    seen: set[ir.Node] = set()
    stack = [start.producer()]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if node.op_type in ("MatMul", "Gemm", "MatMulNBits"):
            if node in wanted:
                found.append(node)
            continue
        stack.extend(v.producer() for v in node.inputs if v is not None)
    return max(found, key=order.__getitem__) if found else None
