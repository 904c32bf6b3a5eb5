"""ONNX Runtime's ``MatMulNBitsQuantizer``, one algorithm per name, on a serialized model.

The quantizer does the rewriting (packing, block scales, zero points); this module only picks its
configuration, runs it once per precision (the LM head gets its own ``bits``) and tidies the
result: every MatMulNBits gets the requested ``accuracy_level`` (HQQ's builder sets none), and a
bias ``Add`` after a MatMulNBits moves into the op's bias input (what ``fuse``'s Gemm had).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np
import onnx
import onnx_ir as ir
from onnxruntime.quantization import CalibrationDataReader
from onnxruntime.quantization.matmul_nbits_quantizer import (DefaultWeightOnlyQuantConfig,
                                                             GPTQWeightOnlyQuantConfig,
                                                             HQQWeightOnlyQuantConfig,
                                                             KQuantWeightOnlyQuantConfig,
                                                             MatMulNBitsQuantizer,
                                                             RTNWeightOnlyQuantConfig)

ALGORITHMS = ("rtn", "hqq", "k-quant", "gptq")
BIAS_INPUT = 5  # MatMulNBits: A, B, scales, zero_points, g_idx, bias


class _Batches(CalibrationDataReader):
    """ORT's reader protocol over a list of feeds (GPTQ deep-copies it, so plain data only)."""

    def __init__(self, batches: list[dict[str, np.ndarray]]) -> None:
        self.batches = batches
        self._it: Iterator[dict[str, np.ndarray]] = iter(batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return iter(self.batches)

    def __deepcopy__(self, memo: dict) -> _Batches:
        return _Batches(self.batches)


def quantize(proto: onnx.ModelProto, *, algorithm: str, bits: int, block_size: int,
             symmetric: bool, include: set[str], calibration: list[dict[str, np.ndarray]] | None
             ) -> onnx.ModelProto:
    """``proto`` with the MatMuls named in ``include`` as MatMulNBits of ``bits`` bits."""
    others = sorted({n.name for n in proto.graph.node if n.op_type == "MatMul"} - include)
    algo = _algo_config(algorithm, bits, block_size, symmetric, calibration, include)
    quantizer = MatMulNBitsQuantizer(proto, bits=bits, block_size=block_size,
                                     is_symmetric=symmetric, nodes_to_exclude=others,
                                     algo_config=algo)
    if algorithm == "gptq":
        # ORT's GPTQ path ignores nodes_to_exclude (only RTN/k-quant mark them "fp32" in the
        # node table it builds), so the table gets them here, or the LM head would go to 4 bits.
        table = quantizer._generate_q4_node_config
        quantizer._generate_q4_node_config = lambda: {**table(), **dict.fromkeys(others, "fp32")}
    quiet = [logging.getLogger(), logging.getLogger("onnxruntime.quantization")]
    levels = [log.level for log in quiet]
    for log in quiet:
        log.setLevel(logging.WARNING)  # its INFO lines per node
    try:
        quantizer.process()
    finally:
        for log, level in zip(quiet, levels):
            log.setLevel(level)
    return quantizer.model.model


def _algo_config(algorithm: str, bits: int, block_size: int, symmetric: bool,
                 calibration: list[dict[str, np.ndarray]] | None, include: set[str]) -> object:
    if algorithm == "rtn":  # ORT's default: blockwise min/max, round to nearest, in C++
        return DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=symmetric,
                                            bits=bits)
    if algorithm == "hqq":
        return HQQWeightOnlyQuantConfig(block_size=block_size, bits=bits)
    if algorithm == "k-quant":
        # its node table says 4 bits unless a node's own entry says otherwise
        return KQuantWeightOnlyQuantConfig(
            customized_weight_config={name: {"bits": bits} for name in include})
    if algorithm == "gptq":
        return GPTQWeightOnlyQuantConfig(calibration_data_reader=_Batches(calibration or []),
                                         block_size=128)
    raise ValueError(f"unknown algorithm {algorithm!r}")


def finish(model: ir.Model, accuracy_level: int) -> int:
    """Set ``accuracy_level`` on every MatMulNBits and move bias Adds in; returns Adds moved."""
    moved = 0
    for node in list(model.graph):
        if node.op_type != "MatMulNBits":
            continue
        if accuracy_level:
            node.attributes["accuracy_level"] = ir.AttrInt64("accuracy_level", accuracy_level)
        else:
            node.attributes.pop("accuracy_level", None)
        out = node.outputs[0]
        uses = list(out.uses())
        if len(uses) != 1 or out.is_graph_output() or len(node.inputs) > BIAS_INPUT:
            continue
        add = uses[0].node
        bias = add.inputs[1 - uses[0].idx] if add.op_type == "Add" else None
        n = node.attributes["N"].as_int()
        if (bias is None or bias.const_value is None or bias.dtype != ir.DataType.FLOAT
                or list(bias.const_value.shape) != [n]):
            continue
        node.resize_inputs(BIAS_INPUT + 1)
        node.replace_input_with(BIAS_INPUT, bias)
        result = add.outputs[0]
        name, typ, shape = result.name, result.type, result.shape
        was_output = result.is_graph_output()
        result.replace_all_uses_with(out, replace_graph_outputs=True)
        model.graph.remove(add, safe=True)
        if was_output:
            out.name, out.type, out.shape = name, typ, shape
        moved += 1
    return moved


__all__ = ["ALGORITHMS", "finish", "quantize"]
