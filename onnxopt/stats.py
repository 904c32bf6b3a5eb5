"""Model statistics: parameters, bytes on disk and zipped, MACs per op type, node histogram.

MACs need static shapes: symbolic dimensions are set to 1 (or to ``shapes``) and ONNX shape
inference fills in the rest; where it leaves a MAC node's shapes unknown (shapes computed at run
time, as in transformer exports, or contrib ops such as Attention), ONNX Runtime's symbolic shape
inference is tried on the same static copy. A node whose shapes stay unknown contributes no MACs
and is counted in ``macs_unknown_nodes``, so an under-count is visible rather than silent.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import math
import tempfile
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from onnxopt.model_io import EXTERNAL_DATA_THRESHOLD, tensor_bytes, to_ir

MAC_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul", "QLinearConv", "QLinearMatMul",
           "ConvInteger", "MatMulInteger", "Attention", "QAttention", "MultiHeadAttention",
           "MatMulNBits")


@dataclasses.dataclass
class ModelStats:
    """What a model costs. ``macs`` is per op type, for batch 1 unless shapes say otherwise."""

    params: int
    size_bytes: int
    zipped_bytes: int
    macs: dict[str, int]
    nodes: int
    op_histogram: dict[str, int]
    macs_unknown_nodes: int = 0

    @property
    def total_macs(self) -> int:
        return sum(self.macs.values())

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["total_macs"] = self.total_macs
        return d


def macs_text(stats: ModelStats | Mapping[str, Any]) -> str:
    """Total MACs for people: ``2,516,844,544``, or ``>= 109,051,904 (45 nodes of unknown
    shape)`` when some compute nodes could not be counted (a lower bound, not a figure)."""
    d = stats.to_dict() if isinstance(stats, ModelStats) else stats
    unknown = d.get("macs_unknown_nodes", 0)
    if not unknown:
        return f"{d['total_macs']:,}"
    return f">= {d['total_macs']:,} ({unknown} node{'s' if unknown != 1 else ''} of unknown shape)"


def model_stats(model: ir.Model | onnx.ModelProto, shapes: Mapping[str, list[int]] | None = None,
                file: str | Path | None = None) -> ModelStats:
    """Statistics of ``model``; serialized once for the byte counts.

    With ``file``, the byte counts are those of the file (and its external data) as stored,
    which can differ from a re-serialization by a few bytes of metadata.
    """
    model = to_ir(model)
    params = _params(model)
    if tensor_bytes(model) > EXTERNAL_DATA_THRESHOLD:
        # Too large for one protobuf; the tensors dominate, and are incompressible floats mostly.
        size = zipped = tensor_bytes(model)
        macs, unknown = {}, 0
    else:
        proto = ir.serde.serialize_model(model)
        size = proto.ByteSize()
        macs, unknown = _count_macs(proto, shapes)
        zipped = _zipped_size(model, proto)  # last: it strips the proto's tensor bytes
    if file is not None:
        size, zipped = _file_sizes(Path(file))
    hist = collections.Counter(node.op_type for node in model.graph.all_nodes())
    return ModelStats(
        params=int(params),
        size_bytes=size,
        zipped_bytes=zipped,
        macs=macs,
        nodes=sum(hist.values()),
        op_histogram=dict(sorted(hist.items())),
        macs_unknown_nodes=unknown,
    )


def _params(model: ir.Model) -> int:
    """Initializer elements, with each MatMulNBits weight counted as the K x N weights it packs
    (its uint8 blob holds two 4-bit weights a byte) and its block scales and zero points left
    out, as storage of those weights: quantizing weights keeps the parameter count."""
    packed: dict[str, int] = {}
    storage: set[str] = set()
    for node in model.graph.all_nodes():
        if node.op_type == "MatMulNBits" and node.domain == "com.microsoft":
            k, n = node.attributes["K"].as_int(), node.attributes["N"].as_int()
            names = [v.name for v in node.inputs[1:4] if v is not None]
            if names:
                packed[names[0]] = k * n
                storage.update(names[1:])
    total = 0
    for name, v in model.graph.initializers.items():
        if name in packed:
            total += packed[name]
        elif name not in storage and v.const_value is not None:
            total += math.prod(v.const_value.shape.numpy())
    return total


# Deflated length of tensor bytes, by digest: a pass that leaves a tensor alone costs no recompression.
_DEFLATED_BY_DIGEST: dict[bytes, int] = {}


def _zipped_size(model: ir.Model, proto: onnx.ModelProto) -> int:
    """Deflate (level 6, as zip uses) of each initializer plus the rest of the model.

    ``proto`` is ``model`` serialized; its tensors' ``raw_data`` is cleared (the caller is done
    with it).

    Deflate's window is 32 KiB, so compressing tensors one by one is within a fraction of a per
    mille of compressing the whole file, and it lets unchanged tensors be looked up instead of
    recompressed: the pipeline measures the model after every pass.
    """
    total = 0
    for value in model.graph.initializers.values():
        if value.const_value is None:
            continue
        data = value.const_value.tobytes()
        key = hashlib.blake2b(data, digest_size=16).digest()
        if key not in _DEFLATED_BY_DIGEST:
            _DEFLATED_BY_DIGEST[key] = len(zlib.compress(data, 6))
        total += _DEFLATED_BY_DIGEST[key]
    # The rest of the model: ``proto`` without its tensor bytes. Cleared in place, not copied
    # first: a copy doubled a 0.6 GB model in memory (share-weights' output of a 2.3 GB model).
    for tensor in proto.graph.initializer:
        tensor.ClearField("raw_data")
    return total + len(zlib.compress(proto.SerializeToString(), 6))


def external_data_files(proto: onnx.ModelProto) -> set[str]:
    """The external data files a model names (relative to its folder)."""
    return {entry.value for t in proto.graph.initializer for entry in t.external_data
            if entry.key == "location"}


def file_bytes(path: str | Path) -> int:
    """Bytes of a model file as stored, plus the external data files it names."""
    path = Path(path)
    proto = onnx.load(str(path), load_external_data=False)
    return path.stat().st_size + sum((path.parent / n).stat().st_size
                                     for n in external_data_files(proto))


def _file_sizes(path: Path) -> tuple[int, int]:
    """Bytes and zipped bytes of a model file plus its external data files."""
    model_bytes = path.read_bytes()
    data_files = external_data_files(onnx.load_from_string(model_bytes))
    total = len(model_bytes) + sum((path.parent / n).stat().st_size for n in data_files)
    if total > EXTERNAL_DATA_THRESHOLD:  # as in model_stats: zlib would take minutes (~10 MB/s)
        return total, total
    compressor = zlib.compressobj(6)
    size, zipped = len(model_bytes), len(compressor.compress(model_bytes))
    for name in sorted(data_files):
        with open(path.parent / name, "rb") as f:
            while chunk := f.read(1 << 24):
                size += len(chunk)
                zipped += len(compressor.compress(chunk))
    return size, zipped + len(compressor.flush())


def _count_macs(proto: onnx.ModelProto, shapes: Mapping[str, list[int]] | None) -> tuple[dict[str, int], int]:
    macs: collections.Counter[str] = collections.Counter()
    unknown = 0
    for node, n in _mac_table(proto, shapes):
        if n is None:
            unknown += 1
        else:
            macs[node.op_type] += n
    return dict(sorted(macs.items())), unknown


def node_macs(model: ir.Model | onnx.ModelProto,
              shapes: Mapping[str, list[int]] | None = None) -> dict[str, int | None]:
    """MACs of every node of a ``MAC_OPS`` type, by node name (``None``: shapes unknown)."""
    proto = ir.serde.serialize_model(model) if isinstance(model, ir.Model) else model
    return {node.name: n for node, n in _mac_table(proto, shapes)}


def _mac_table(proto: onnx.ModelProto,
               shapes: Mapping[str, list[int]] | None) -> list[tuple[onnx.NodeProto, int | None]]:
    """Each ``MAC_OPS`` node with its MACs, after shape inference on static input shapes."""
    return _macs_of(_inferred(proto, shapes))


def _inferred(proto: onnx.ModelProto,
              shapes: Mapping[str, list[int]] | None) -> onnx.ModelProto:
    """``proto`` on static input shapes with shapes inferred afresh: ONNX's inference (with data
    propagation), then ORT's symbolic one when a ``MAC_OPS`` node's shapes are still unknown.

    The model's own shape annotations are set aside first: a pass can leave one stale (onnxscript's
    folding and fusions annotate what they rewrite), and ONNX's inference keeps a conflicting
    annotation, drops the node's inference and so every shape downstream of it. They fill in only
    what neither inference finds (e.g. outputs of contrib ops ONNX does not know).
    """
    annotated = _with_static_inputs(proto, shapes or {})
    fresh = _without_annotations(annotated)
    with contextlib.suppress(Exception):  # shape inference rejects some contrib ops; count what we can
        fresh = onnx.shape_inference.infer_shapes(fresh, data_prop=True)
    if any(n is None for _, n in _macs_of(fresh)):
        symbolic = _symbolic_shapes(fresh)
        if symbolic is not None:
            fresh = symbolic
    if any(n is None for _, n in _macs_of(fresh)):
        _fill_from(fresh, annotated)
    if any(n is None for _, n in _macs_of(fresh)):
        _fill_from_a_run(fresh, proto)
    return fresh


def _fill_from_a_run(inferred: onnx.ModelProto, proto: onnx.ModelProto) -> None:
    """Last resort, where no inference follows the shapes (T5's relative position bias is
    computed from values at run time): run ONNX Runtime once on seeded inputs of the static
    input shapes and read the shapes of the inputs and outputs of the nodes still unknown. Only
    those values are fetched; a model ORT cannot run keeps its partial count."""
    from onnxopt import activations, runner

    known = _known_shapes(inferred)
    wanted = sorted({name for node, n in _macs_of(inferred) if n is None
                     for name in [*node.input[:2], *node.output[:1]]
                     if name and name not in known})
    if not wanted:
        return
    signature = [(i.name, onnx.helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type),
                  [d.dim_value for d in i.type.tensor_type.shape.dim])
                 for i in inferred.graph.input if i.name not in known or i.name in
                 {g.name for g in proto.graph.input}]
    inits = {t.name for t in proto.graph.initializer}
    signature = [s for s in signature if s[0] not in inits]
    try:
        feeds = runner.synthesize_arrays(signature)
        values = next(activations.capture(proto, wanted, [feeds], opt_level="disabled",
                                          threads=1))
    except Exception:  # noqa: BLE001 - a model ORT cannot run here keeps its partial count
        return
    for name in wanted:
        inferred.graph.value_info.append(onnx.helper.make_tensor_value_info(
            name, onnx.TensorProto.FLOAT, list(np.shape(values[name]))))


def _without_annotations(proto: onnx.ModelProto) -> onnx.ModelProto:
    """A copy without ``value_info`` and with the graph outputs' shapes (not types) cleared."""
    bare = onnx.ModelProto()
    bare.CopyFrom(proto)
    del bare.graph.value_info[:]
    for output in bare.graph.output:
        if output.type.HasField("tensor_type"):
            output.type.tensor_type.ClearField("shape")
    return bare


def _fill_from(inferred: onnx.ModelProto, annotated: onnx.ModelProto) -> None:
    """Add ``annotated``'s static shapes (its own annotations, and ONNX's inference over them)
    for the values ``inferred`` has no static shape of."""
    with contextlib.suppress(Exception):
        annotated = onnx.shape_inference.infer_shapes(annotated, data_prop=True)
    known = _known_shapes(inferred)
    by_name = {vi.name: vi for vi in [*annotated.graph.value_info, *annotated.graph.output]}
    for name in _known_shapes(annotated).keys() - known.keys():
        if name in by_name:
            inferred.graph.value_info.append(by_name[name])


def attention_macs(proto: onnx.ModelProto, shapes: Mapping[str, list[int]] | None = None
                   ) -> dict[str, tuple[int, int]]:
    """Per ORT Attention node (com.microsoft) with known shapes: MACs of its Q/K/V projection
    and of its two S x S products (Q K^T, softmax(.) V). QAttention runs the first in INT8 and
    the second in float, so an INT8 share of MACs needs them apart."""
    return node_and_attention_macs(proto, shapes)[1]


def node_and_attention_macs(proto: onnx.ModelProto, shapes: Mapping[str, list[int]] | None = None
                            ) -> tuple[dict[str, int | None], dict[str, tuple[int, int]]]:
    """:func:`node_macs` and :func:`attention_macs` from one shape inference."""
    inferred = _inferred(proto, shapes)
    return {node.name: n for node, n in _macs_of(inferred)}, _attention_split(inferred)


def _attention_split(inferred: onnx.ModelProto) -> dict[str, tuple[int, int]]:
    if not any(n.op_type == "Attention" for n in inferred.graph.node):
        return {}
    known = _known_shapes(inferred)
    found = {}
    for node in inferred.graph.node:
        parts = _attention_parts(known.get(node.input[0]), known.get(node.input[1])) \
            if node.op_type == "Attention" and len(node.input) > 1 else None
        if parts is not None:
            found[node.name] = parts
    return found


def _attention_parts(a: list[int] | None, w: list[int] | None) -> tuple[int, int] | None:
    """(projection, S x S products) MACs of Attention on input ``a`` [B, S, H_in], weight ``w``."""
    if a is None or w is None or len(a) != 3 or len(w) != 2:
        return None
    batch, seq, _ = a
    return math.prod(a) * w[1], 2 * batch * seq * seq * (w[1] // 3)


def _macs_of(proto: onnx.ModelProto) -> list[tuple[onnx.NodeProto, int | None]]:
    known = _known_shapes(proto)
    return [(node, _node_macs(node, known)) for node in proto.graph.node
            if node.op_type in MAC_OPS]


def _symbolic_shapes(proto: onnx.ModelProto) -> onnx.ModelProto | None:
    """``proto`` with ONNX Runtime's symbolic shape inference (it knows contrib ops and follows
    shapes computed at run time); None when it fails."""
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    # When it cannot finish, it saves `sym_shape_infer_temp.onnx` and a `<uuid>.data` in the
    # working directory before raising: let it do so in a folder of its own.
    with tempfile.TemporaryDirectory(prefix="onnxopt-shapes-") as folder, \
            contextlib.chdir(folder):
        try:
            return SymbolicShapeInference.infer_shapes(proto, auto_merge=True)
        except Exception:  # it raises many types on graphs it cannot follow; count what we can
            return None


def _with_static_inputs(proto: onnx.ModelProto, shapes: Mapping[str, list[int]]) -> onnx.ModelProto:
    """A copy with static input dims, and without the bytes of large tensors.

    Shape inference needs every initializer's dims but the values only of small ones (Reshape
    targets, Slice bounds), so large weights are left out of the copy: much faster on big models.
    """
    copy = onnx.ModelProto()
    copy.ir_version = proto.ir_version
    copy.opset_import.extend(proto.opset_import)
    copy.graph.CopyFrom(_graph_without_large_tensors(proto.graph))
    for inp in copy.graph.input:
        dims = inp.type.tensor_type.shape.dim
        if inp.name in shapes:
            for d, v in zip(dims, shapes[inp.name]):
                d.Clear()
                d.dim_value = int(v)
            continue
        for d in dims:
            if not d.HasField("dim_value"):
                value = shapes.get(d.dim_param, [1])[0] if d.dim_param else 1
                d.Clear()
                d.dim_value = int(value)
    return copy


def _graph_without_large_tensors(graph: onnx.GraphProto, limit: int = 4096) -> onnx.GraphProto:
    light = onnx.GraphProto(node=graph.node, input=graph.input, output=graph.output,
                            value_info=graph.value_info, name=graph.name)
    for tensor in graph.initializer:
        if math.prod(tensor.dims) <= limit:
            light.initializer.append(tensor)
        else:
            light.initializer.append(onnx.TensorProto(name=tensor.name, dims=tensor.dims,
                                                      data_type=tensor.data_type))
    return light


def _known_shapes(proto: onnx.ModelProto) -> dict[str, list[int]]:
    known: dict[str, list[int]] = {}
    infos = list(proto.graph.input) + list(proto.graph.value_info) + list(proto.graph.output)
    for vi in infos:
        dims = vi.type.tensor_type.shape.dim
        if vi.type.tensor_type.HasField("shape") and all(d.HasField("dim_value") for d in dims):
            known[vi.name] = [d.dim_value for d in dims]
    for init in proto.graph.initializer:
        known[init.name] = list(init.dims)
    return known


def _node_macs(node: onnx.NodeProto, known: dict[str, list[int]]) -> int | None:
    """Multiply-accumulates of one node, or None when its shapes are unknown."""
    op = node.op_type
    # Quantized ops carry scales/zero points between the data inputs.
    data_in = {"QLinearConv": (0, 3), "QLinearMatMul": (0, 3)}.get(op, (0, 1))
    a = known.get(node.input[data_in[0]]) if len(node.input) > data_in[0] else None
    w = known.get(node.input[data_in[1]]) if len(node.input) > data_in[1] else None
    out = known.get(node.output[0])
    if op in ("Conv", "QLinearConv", "ConvInteger"):
        if w is None or out is None:
            return None
        return math.prod(out) * math.prod(w[1:])  # each output: Cin/group * kernel MACs
    if op == "ConvTranspose":
        if a is None or w is None:
            return None
        return math.prod(a) * math.prod(w[1:])  # each input element scatters Cout/group * kernel
    if op == "Gemm":
        if out is None or a is None:
            return None
        trans_a = next((at.i for at in node.attribute if at.name == "transA"), 0)
        k = a[0] if trans_a else a[1]
        return math.prod(out) * k
    if op in ("MatMul", "QLinearMatMul", "MatMulInteger"):
        if out is None or a is None:
            return None
        return math.prod(out) * a[-1]
    if op == "MatMulNBits":  # com.microsoft: the MatMul it replaced, [..., K] x [K, N]
        k = next((at.i for at in node.attribute if at.name == "K"), None)
        if out is not None and k is not None:
            return math.prod(out) * k
        n = next((at.i for at in node.attribute if at.name == "N"), None)
        return None if a is None or n is None else math.prod(a) * n
    if op in ("Attention", "QAttention"):  # com.microsoft: QKV projection, then two S x S products
        parts = _attention_parts(a, w)
        return None if parts is None else sum(parts)
    if op == "MultiHeadAttention":  # com.microsoft, projected Q, K, V: Q K^T and softmax(.) V
        k = known.get(node.input[1]) if len(node.input) > 1 else None
        if a is None or k is None or len(a) != 3 or len(k) != 3:
            return None
        return 2 * a[0] * a[1] * k[1] * a[2]
    return None  # other fused ops: not counted
