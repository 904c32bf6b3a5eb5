"""Weights stored coded (``deep-compress`` / ``share-weights`` / ``prune``): they stay float.

Those passes store a weight as a small decoding subgraph over constants, e.g.
``Gather(codebook, Cast(codes))`` or ``Reshape(ScatterElements(...))``
(:mod:`onnxopt.passes.compress`), which ONNX Runtime folds into a dense tensor at session load.
Left to ONNX Runtime's quantizer, that subgraph is quantized like any activation: the codebook
Gather gets Quantize/Dequantize pairs and the compute node's weight becomes a runtime tensor, so
the decoding runs on every inference (measured on the digits CNN after ``deep-compress``: the
best static candidate 0.17x the speed of FP32) and a dense INT8 weight would replace the codes,
undoing the storage. The compute nodes that read such a weight, and the decoding nodes, are
kept float instead; quantize then works on what is still dense.

Found from the graph alone (a weight input computed from initializers only), so any constant
encoding counts, not just the ones this package writes.
"""

from __future__ import annotations

import onnx


def coded_weights(proto: onnx.ModelProto, compute_ops: tuple[str, ...]) -> dict[str, list[str]]:
    """Compute node name -> the decoding nodes of its weight, for every Conv/MatMul/Gemm whose
    weight (input 1) is computed from initializers only."""
    inits = {t.name for t in proto.graph.initializer}
    producer = {out: node for node in proto.graph.node for out in node.output}
    memo: dict[str, list[onnx.NodeProto] | None] = {}

    def decoders(name: str) -> list[onnx.NodeProto] | None:
        """The nodes computing ``name`` from initializers only; None if it reads anything else."""
        if name in memo:
            return memo[name]
        node = producer.get(name)
        memo[name] = None  # guards against cycles while this value is resolved
        if node is None:
            return None
        found = [node]
        for inp in node.input:
            if not inp or inp in inits:
                continue
            upstream = decoders(inp)
            if upstream is None:
                return None
            found += upstream
        memo[name] = found
        return found

    coded = {}
    for node in proto.graph.node:
        if node.op_type not in compute_ops or len(node.input) < 2 or node.input[1] in inits:
            continue
        chain = decoders(node.input[1])
        if chain:
            coded[node.name] = [n.name for n in chain]
    return coded
