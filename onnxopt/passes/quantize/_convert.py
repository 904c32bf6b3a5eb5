"""Convert: a prepared model plus a calibration table plus a spec -> an INT8 model, load-checked.

Static conversion goes through ``quantize_static`` with the table handed over as ORT's calibration
cache, so no calibration runs here and converting again (another exclusion set, another format)
costs only the rewrite. Dynamic conversion never touches convolutions (ConvInteger made every conv
net 5-9x slower) and passes ``DefaultTensorType`` (without it ``quantize_dynamic`` fails after
ORT's Attention fusion: "Unable to find data type for weight_name").

A prepared model with external data (over the protobuf limit) is quantized dynamically one
weight at a time (:mod:`onnxopt.passes.quantize._streamed`: ORT's quantizer would hold it three times over), or,
for static mode or ops only ORT quantizes, with ORT's ``use_external_data_format``; the INT8
result, about a quarter of the size, comes back as one in-memory protobuf (so up to ~8 GB of FP32
weights).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import tempfile
from pathlib import Path
from typing import Literal

import onnx
import onnx_ir as ir
from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static
from onnxruntime.quantization.calibrate import save_tensors_data

from onnxopt import runner
from onnxopt.errors import OnnxoptError
from onnxopt.evaluation import ort_source
from onnxopt.graph_outputs import unused_name
from onnxopt.model_io import check_proto
from onnxopt.passes.quantize._calibrate import CalibrationTable
from onnxopt.passes.quantize._prepare import COMPUTE_OPS, has_external_data
from onnxopt.passes.quantize._streamed import covers, quantize_matmuls

_QTYPES = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
# Dynamic quantization: matrix products with a constant operand only (never Conv).
DYNAMIC_OPS = ("MatMul", "Gemm", "Attention")


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """Everything that decides the converted model besides the calibration table."""

    mode: Literal["static", "dynamic"]
    quant_format: Literal["qdq", "qoperator"] = "qdq"
    activation_type: Literal["uint8", "int8"] = "uint8"
    weight_type: Literal["uint8", "int8"] = "int8"
    per_channel: bool = False
    reduce_range: bool = False
    op_types: tuple[str, ...] | None = None  # None: every type ORT can quantize
    exclude: frozenset[str] = frozenset()
    # False: a Conv/MatMul/Gemm output gets Q/DQ only when a quantized consumer asks for it
    # (keeps an unsafe tensor written by a compute node float without losing the node's INT8).
    quantize_compute_outputs: bool = True

    def label(self) -> str:
        """A short human name, e.g. ``static QDQ U8S8 per-tensor (3 nodes float)``."""
        a = "U8" if self.activation_type == "uint8" else "S8"
        w = "U8" if self.weight_type == "uint8" else "S8"
        types = f"{a}{w}" if self.mode == "static" else f"U8{w}"
        parts = [self.mode, self.quant_format.upper() if self.mode == "static" else "", types,
                 "per-channel" if self.per_channel else "per-tensor"]
        if self.reduce_range:
            parts.append("7-bit weights")
        text = " ".join(p for p in parts if p)
        return text + (f" ({len(self.exclude)} node(s) float)" if self.exclude else "")

    def with_exclude(self, names: set[str] | frozenset[str]) -> QuantSpec:
        return dataclasses.replace(self, exclude=frozenset(self.exclude | set(names)))


def convert(prepared_path: Path, spec: QuantSpec,
            table: CalibrationTable | None) -> onnx.ModelProto:
    """The quantized model for ``spec``; raises :class:`OnnxoptError` if ORT cannot load it."""
    streamed = _dynamic_streamed(prepared_path, spec) if spec.mode == "dynamic" else None
    if streamed is not None:
        load_check(streamed, spec.label())
        return streamed
    with tempfile.TemporaryDirectory(prefix="onnxopt-convert-") as tmp:
        out = Path(tmp) / "quantized.onnx"
        was = logging.getLogger().disabled
        logging.getLogger().disabled = True  # ORT's quantizer logs pre-processing advice
        try:
            if spec.mode == "dynamic":
                _dynamic(prepared_path, out, spec)
            else:
                if table is None:
                    raise OnnxoptError("static quantization needs a calibration table")
                _static(prepared_path, out, spec, table, Path(tmp))
        finally:
            logging.getLogger().disabled = was
        proto = onnx.load(str(out))  # external data, if written, is read in before tmp goes
    if spec.mode == "static" and spec.quant_format == "qdq":
        proto = float_outputs(proto)
    load_check(proto, spec.label())
    return proto


def float_outputs(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Drop the Quantize/Dequantize pair in front of each graph output: the output stays float.

    ORT's QDQ quantizer quantizes graph outputs like any activation, only to dequantize them
    again. Without the pair the last node runs as an integer kernel with float output (e.g.
    QGemm), two kernels fewer and no rounding of the result: the digits MLP went from 1.67x to
    1.80x over FP32 (1 thread) with it.

    An output that nodes inside the graph also read (BERT's last hidden state feeds its pooler)
    keeps its pair for those readers, under a new name: they still see the quantized tensor
    the calibration planned for, and only the graph output becomes float.
    """
    model = ir.serde.deserialize_model(proto)
    graph = model.graph
    for index, output in enumerate(list(graph.outputs)):
        dq = output.producer()
        if dq is None or dq.op_type != "DequantizeLinear":
            continue
        q = dq.inputs[0].producer() if dq.inputs[0] is not None else None
        if q is None or q.op_type != "QuantizeLinear" or len(dq.inputs[0].uses()) != 1:
            continue
        source = q.inputs[0]
        if source is None or source.is_graph_input() or source.is_graph_output():
            continue
        name, dtype, shape = output.name, output.type, output.shape
        graph.outputs[index] = source
        if output.uses():  # read inside the graph too: the pair stays for those readers
            output.name = unused_name(graph, f"{name}_dequantized")
            source.name, source.type, source.shape = name, dtype, shape
            continue
        params = [v for v in (*dq.inputs[1:], *q.inputs[1:]) if v is not None]
        graph.remove(dq, safe=True)
        if not q.outputs[0].uses():
            graph.remove(q, safe=True)
        source.name, source.type, source.shape = name, dtype, shape
        for value in params:  # their scales and zero points, unless something else reads them
            if value.is_initializer() and not value.uses() and value.name in graph.initializers:
                del graph.initializers[value.name]
    return ir.serde.serialize_model(model)


def load_check(proto: onnx.ModelProto, what: str) -> None:
    """The ONNX checker and an ONNX Runtime session must both accept the model."""
    try:
        with ort_source(proto) as source:  # over 2 GB a file: no serialized copy for either
            check_proto(source)
            runner.create_session(source, threads=1)
    except Exception as exc:  # ORT raises its own exception types on load
        raise OnnxoptError(f"the {what} model does not load: {str(exc).splitlines()[0][:200]}"
                           ) from exc


def _static(src: Path, out: Path, spec: QuantSpec, table: CalibrationTable, tmp: Path) -> None:
    cache = tmp / "calibration-cache.json"
    save_tensors_data(table.to_ort(), cache)
    quantize_static(
        str(src), str(out), None,
        quant_format=QuantFormat.QDQ if spec.quant_format == "qdq" else QuantFormat.QOperator,
        op_types_to_quantize=list(spec.op_types) if spec.op_types else None,
        per_channel=spec.per_channel, reduce_range=spec.reduce_range,
        activation_type=_QTYPES[spec.activation_type], weight_type=_QTYPES[spec.weight_type],
        nodes_to_exclude=sorted(spec.exclude),
        calibrate_method=table.to_ort().calibration_method,
        calibration_cache_path=str(cache),
        use_external_data_format=has_external_data(src),
        extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT,
                       "OpTypesToExcludeOutputQuantization":
                           [] if spec.quantize_compute_outputs else list(COMPUTE_OPS)},
    )


def _dynamic_streamed(src: Path, spec: QuantSpec) -> onnx.ModelProto | None:
    """The dynamic INT8 model of a prepared model with external data, quantized weight by
    weight; None when the model fits in memory or has ops only ORT's quantizer handles."""
    if not has_external_data(src):
        return None
    ops = tuple(op for op in (spec.op_types or DYNAMIC_OPS) if op in DYNAMIC_OPS)
    model = ir.load(src)  # external tensors stay memory-mapped until each is read
    if not covers(model, ops):
        return None
    quantize_matmuls(model, op_types=ops, weight_type=spec.weight_type,
                     per_channel=spec.per_channel, reduce_range=spec.reduce_range,
                     exclude=spec.exclude)
    ir.external_data.load_to_model(model)  # what is left float (biases, excluded layers)
    return ir.serde.serialize_model(model)


def _dynamic(src: Path, out: Path, spec: QuantSpec) -> None:
    ops = [op for op in (spec.op_types or DYNAMIC_OPS) if op in DYNAMIC_OPS]
    # ORT's dynamic mode splits every Gemm into "<name>_MatMul" + "<name>_Add" before it reads
    # the exclusions, so an excluded Gemm would be quantized anyway: exclude its MatMul too.
    exclude = spec.exclude | {f"{name}_MatMul" for name in spec.exclude}
    quantize_dynamic(
        str(src), str(out), op_types_to_quantize=ops, per_channel=spec.per_channel,
        reduce_range=spec.reduce_range, weight_type=_QTYPES[spec.weight_type],
        nodes_to_exclude=sorted(exclude), use_external_data_format=has_external_data(src),
        extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT, "MatMulConstBOnly": True},
    )


def digest(proto: onnx.ModelProto) -> str:
    """A short content hash, to show that two conversions gave the same model."""
    return hashlib.sha256(proto.SerializeToString(deterministic=True)).hexdigest()[:16]
