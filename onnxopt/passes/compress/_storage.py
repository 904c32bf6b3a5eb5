"""Compressed weight storage written in standard ONNX ops that ONNX Runtime folds at session load.

Encodings (every input is a constant, so ORT's constant folding turns each into one dense
initializer when the session loads; measured: the optimized graph keeps only the consumer, and
latency is that of the dense model):

* ``sparse`` (pruned weights): ``Reshape(ScatterElements(ConstantOfShape([N]), CumSum(Cast(gaps)),
  values), shape)``. ``gaps`` is uint8: the distance from the previous kept weight (the first holds
  its position); a gap over 255 gets filler entries of value 0, Deep Compression's relative
  indexing. One kept fp32 weight costs 5 bytes.
* ``codebook`` (clustered weights): ``Gather(codebook, Cast(codes, int32))`` with ``codes`` of the
  weight's shape, UINT2 (four per byte), UINT4 (two per byte) or UINT8.
* ``sparse-codebook``: ``sparse`` whose values are ``Gather(codebook, Cast(codes))``; code 0 is 0.
* ``half``: ``Cast(float16 tensor, to=FLOAT)``, for small tensors such as biases.

Why not ONNX's ``sparse_initializer``: onnx_ir, the IR all passes work on, does not represent it
(it is dropped on load), and its int64 indices cost 8 bytes per kept weight. ORT does load it, by
densifying at load (measured on a 784x300 weight with 8% kept: 226 KB vs 941 KB dense; zipped,
both about 100 KB). UINT4 codes need opset 21 (Cast from UINT4), UINT2 codes opset 25; zipped,
2-bit codes packed four to a byte are ~13% smaller than packed two to a byte (deflate codes whole
bytes: measured on a compressed LeNet-5, 4.4 KB -> 3.8 KB for its three 2-bit layers).
``DequantizeLinear`` would decode these types as well but ORT keeps DequantizeLinear unfolded, so
the chain uses Cast and Gather.

:func:`read_weight` reads any of these back (and plain initializers) with numpy, so later passes see
the weight whichever way it is stored.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import ml_dtypes
import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

MAX_GAP = 255
Format = Literal["dense", "sparse", "codebook", "sparse-codebook"]
IndexDtype = Literal["uint2", "uint4", "uint8"]
_PACKED: dict[str, tuple[int, Any, ir.DataType]] = {  # codes per byte, numpy type, ONNX type
    "uint2": (4, ml_dtypes.uint2, ir.DataType.UINT2),
    "uint4": (2, ml_dtypes.uint4, ir.DataType.UINT4),
}


# ---------------------------------------------------------------------------------------- reading
def read_weight(value: ir.Value | None) -> np.ndarray | None:
    """The value's tensor if it is an initializer or one of the encodings above, else ``None``."""
    if value is None:
        return None
    if value.const_value is not None:
        return value.const_value.numpy()
    node = value.producer()
    if node is None or node.domain not in ("", "ai.onnx") or node.op_type not in _DECODERS:
        return None
    inputs = []
    for inp in node.inputs:
        array = read_weight(inp)
        if array is None:
            return None
        inputs.append(array)
    return _DECODERS[node.op_type](node, inputs)


def stored_format(value: ir.Value) -> Format | None:
    """How the value is stored (``None`` when it is not a constant weight)."""
    if value.const_value is not None:
        return "dense"
    node = value.producer()
    if node is None or read_weight(value) is None:
        return None
    if node.op_type == "Gather":
        return "codebook"
    scatter = node.inputs[0].producer() if node.op_type == "Reshape" and node.inputs[0] else None
    if scatter is not None and scatter.op_type == "ScatterElements":
        updates = scatter.inputs[2]
        producer = updates.producer() if updates is not None else None
        coded = producer is not None and producer.op_type == "Gather"
        return "sparse-codebook" if coded else "sparse"
    return None


def _decode_cast(node: ir.Node, x: list[np.ndarray]) -> np.ndarray:
    return x[0].astype(ir.DataType(node.attributes["to"].as_int()).numpy())


def _decode_cumsum(node: ir.Node, x: list[np.ndarray]) -> np.ndarray | None:
    if any(a.as_int() for k, a in node.attributes.items() if k in ("exclusive", "reverse")):
        return None
    return np.cumsum(x[0], axis=int(x[1]), dtype=x[0].dtype)


def _decode_constant_of_shape(node: ir.Node, x: list[np.ndarray]) -> np.ndarray | None:
    fill = node.attributes.get("value")
    if fill is None:
        return np.zeros(x[0].astype(np.int64), dtype=np.float32)
    value = fill.as_tensor().numpy()
    return np.full(x[0].astype(np.int64), value.reshape(-1)[0], dtype=value.dtype)


def _decode_scatter(node: ir.Node, x: list[np.ndarray]) -> np.ndarray | None:
    reduction = node.attributes.get("reduction")
    if x[0].ndim != 1 or (reduction is not None and reduction.as_string() != "none"):
        return None
    out = x[0].copy()
    out[x[1].astype(np.int64)] = x[2]
    return out


def _decode_reshape(node: ir.Node, x: list[np.ndarray]) -> np.ndarray | None:
    shape = [int(d) for d in x[1]]
    if 0 in shape:
        return None
    return x[0].reshape(shape)


def _decode_gather(node: ir.Node, x: list[np.ndarray]) -> np.ndarray:
    axis = node.attributes.get("axis")
    return np.take(x[0], x[1].astype(np.int64), axis=axis.as_int() if axis is not None else 0)


_DECODERS: dict[str, Callable[[ir.Node, list[np.ndarray]], np.ndarray | None]] = {
    "Cast": _decode_cast, "CumSum": _decode_cumsum, "ConstantOfShape": _decode_constant_of_shape,
    "ScatterElements": _decode_scatter, "Reshape": _decode_reshape, "Gather": _decode_gather,
}


# ---------------------------------------------------------------------------------------- sizes
def sparse_entries(flat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(gaps uint8, entry index into flat or -1 for a filler)`` for the nonzeros of ``flat``."""
    positions = np.flatnonzero(flat)
    if positions.size == 0:
        return np.zeros(1, np.uint8), np.full(1, -1, np.int64)
    deltas = np.diff(positions, prepend=0)
    fillers = np.maximum((deltas - 1) // MAX_GAP, 0)
    real = np.cumsum(fillers + 1) - 1
    gaps = np.full(int(real[-1]) + 1, MAX_GAP, dtype=np.int64)
    gaps[real] = deltas - MAX_GAP * fillers
    source = np.full(gaps.size, -1, np.int64)
    source[real] = positions
    return gaps.astype(np.uint8), source


def code_bytes(count: int, index_dtype: IndexDtype) -> int:
    per_byte = _PACKED[index_dtype][0] if index_dtype in _PACKED else 1
    return -(-count // per_byte)


def sparse_bytes(array: np.ndarray) -> int:
    """Bytes of the ``sparse`` encoding's tensors (gaps + fp32 values)."""
    gaps, _ = sparse_entries(array.reshape(-1))
    return gaps.size * (1 + array.itemsize)


def codebook_bytes(codes: np.ndarray, codebook: np.ndarray, index_dtype: IndexDtype,
                   sparse: bool) -> int:
    """Bytes of the ``codebook`` or ``sparse-codebook`` encoding's tensors."""
    if sparse:
        gaps, _ = sparse_entries(codes.reshape(-1))
        return gaps.size + code_bytes(gaps.size, index_dtype) + codebook.nbytes
    return code_bytes(codes.size, index_dtype) + codebook.nbytes


# ---------------------------------------------------------------------------------------- writing
def store_dense(graph: ir.Graph, value: ir.Value, array: np.ndarray) -> ir.Value:
    """Store ``array`` as a plain initializer in place of ``value``'s current storage."""
    if value.const_value is not None and value.is_initializer():
        value.const_value = ir.tensor(array, name=value.name)
        return value
    init = _initializer(graph, value.name or "weight", array)
    return _replace(graph, value, init, [])


def store_half(graph: ir.Graph, value: ir.Value, array: np.ndarray) -> ir.Value:
    """Store a float32 ``array`` as float16 behind a Cast back to float32 (half the bytes)."""
    half = _initializer(graph, f"{value.name or 'tensor'}.fp16", array.astype(np.float16))
    cast = ir.node("Cast", [half], {"to": int(ir.DataType.FLOAT)},
                   name=f"{value.name or 'tensor'}/cast_fp16")
    return _replace(graph, value, cast.outputs[0], [cast])


def store_sparse(graph: ir.Graph, value: ir.Value, array: np.ndarray) -> ir.Value:
    """Store ``array``'s nonzeros as gaps + fp32 values (the ``sparse`` encoding)."""
    flat = array.reshape(-1)
    gaps, source = sparse_entries(flat)
    values = np.where(source >= 0, flat[np.maximum(source, 0)], 0).astype(array.dtype)
    base = value.name or "weight"
    nodes, values_v = [], _initializer(graph, f"{base}.values", values)
    return _scatter(graph, value, base, array.shape, gaps, values_v, nodes)


def store_codebook(graph: ir.Graph, value: ir.Value, codes: np.ndarray, codebook: np.ndarray, *,
                   index_dtype: IndexDtype, sparse: bool) -> ir.Value:
    """Store ``codebook[codes]`` as packed codes + a codebook feeding a Gather.

    With ``sparse``, only the entries whose code is nonzero are kept (``codebook[0]`` must be 0).
    """
    base = value.name or "weight"
    codebook_v = _initializer(graph, f"{base}.codebook", codebook.astype(np.float32))
    if sparse:
        if codebook[0] != 0:
            raise ValueError("sparse codebook storage needs code 0 to be the value 0")
        flat = codes.reshape(-1)
        gaps, source = sparse_entries(flat)
        entry_codes = np.where(source >= 0, flat[np.maximum(source, 0)], 0)
        codes_v = _codes(graph, f"{base}.codes", entry_codes, index_dtype)
        nodes = _gather(base, codebook_v, codes_v)
        return _scatter(graph, value, base, codes.shape, gaps, nodes[-1].outputs[0], nodes)
    codes_v = _codes(graph, f"{base}.codes", codes, index_dtype)
    nodes = _gather(base, codebook_v, codes_v)
    return _replace(graph, value, nodes[-1].outputs[0], nodes)


def _gather(base: str, codebook_v: ir.Value, codes_v: ir.Value) -> list[ir.Node]:
    cast = ir.node("Cast", [codes_v], {"to": int(ir.DataType.INT32)}, name=f"{base}/cast_codes")
    gather = ir.node("Gather", [codebook_v, cast.outputs[0]], name=f"{base}/gather")
    return [cast, gather]


def _scatter(graph: ir.Graph, value: ir.Value, base: str, shape: tuple[int, ...],
             gaps: np.ndarray, values_v: ir.Value, nodes: list[ir.Node]) -> ir.Value:
    size = int(np.prod(shape))
    gaps_v = _initializer(graph, f"{base}.gaps", gaps)
    axis_v = _initializer(graph, f"{base}.axis", np.array(0, np.int64))
    size_v = _initializer(graph, f"{base}.size", np.array([size], np.int64))
    shape_v = _initializer(graph, f"{base}.shape", np.array(shape, np.int64))
    cast = ir.node("Cast", [gaps_v], {"to": int(ir.DataType.INT64)}, name=f"{base}/cast_gaps")
    cumsum = ir.node("CumSum", [cast.outputs[0], axis_v], name=f"{base}/positions")
    zeros = ir.node("ConstantOfShape", [size_v], name=f"{base}/zeros")
    scatter = ir.node("ScatterElements", [zeros.outputs[0], cumsum.outputs[0], values_v],
                      name=f"{base}/scatter")
    reshape = ir.node("Reshape", [scatter.outputs[0], shape_v], name=f"{base}/reshape")
    return _replace(graph, value, reshape.outputs[0],
                    [*nodes, cast, cumsum, zeros, scatter, reshape])


def _codes(graph: ir.Graph, name: str, codes: np.ndarray, index_dtype: IndexDtype) -> ir.Value:
    if index_dtype in _PACKED:
        per_byte, np_type, onnx_type = _PACKED[index_dtype]
        if codes.size and int(codes.max()) >= 1 << (8 // per_byte):
            raise ValueError(f"{index_dtype.upper()} codes must be below {1 << (8 // per_byte)}")
        tensor = ir.Tensor(codes.astype(np_type), dtype=onnx_type, name=name)
        return _register(graph, name, tensor)
    return _initializer(graph, name, codes.astype(np.uint8))


def _initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    return _register(graph, name, ir.tensor(array))


def _register(graph: ir.Graph, name: str, tensor: ir.TensorProtocol) -> ir.Value:
    unique = _unique_name(graph, name)
    tensor.name = unique
    value = ir.Value(name=unique, shape=ir.Shape(tensor.shape), type=ir.TensorType(tensor.dtype),
                     const_value=tensor)
    if unique != name:  # taken by the storage this one replaces: see _replace
        value.meta[_WANTED_NAME] = name
    graph.register_initializer(value)
    return value


_WANTED_NAME = "onnxopt.wanted_name"


def _unique_name(graph: ir.Graph, name: str) -> str:
    taken = set(graph.initializers)
    candidate, n = name, 1
    while candidate in taken:
        candidate, n = f"{name}.{n}", n + 1
    return candidate


def _replace(graph: ir.Graph, old: ir.Value, new: ir.Value, nodes: list[ir.Node]) -> ir.Value:
    """Put ``nodes`` before ``old``'s first consumer and make every consumer read ``new``.

    ``new`` takes ``old``'s name and type; the old storage (initializers, decode nodes) is removed
    at once: a pass that runs the model between layers (a refit) would otherwise hand ONNX Runtime
    two decode chains with the same node names.
    """
    if nodes:
        consumers = {id(use.node) for use in old.uses()}
        first = next((n for n in graph if id(n) in consumers), None)
        if first is None:
            graph.extend(nodes)
        else:
            graph.insert_before(first, nodes)
    name = old.name
    new.type = old.type if old.type is not None else ir.TensorType(ir.DataType.FLOAT)
    new.shape = old.shape
    old.replace_all_uses_with(new)
    if old.is_initializer() and name is not None and not old.uses():
        graph.initializers.pop(name)
    elif old.producer() is not None:
        if name is not None:
            old.name = f"{name}.replaced"
        _remove_dead_chain(graph, old)
    _take_wanted_names(graph, [v for node in nodes for v in node.inputs if v is not None])
    if name is not None and not new.is_initializer():
        new.name = name
    return new


def _remove_dead_chain(graph: ir.Graph, value: ir.Value) -> None:
    """Remove the nodes that computed ``value``, and their initializers, once nothing reads them."""
    pending = [value.producer()]
    while pending:
        node = pending.pop()
        if node is None or node.graph is not graph or any(
                o.uses() or o.is_graph_output() for o in node.outputs):
            continue
        inputs = [v for v in node.inputs if v is not None]
        graph.remove(node, safe=True)
        for v in inputs:
            if v.uses() or v.is_graph_input():
                continue
            if v.is_initializer() and v.name is not None:
                graph.initializers.pop(v.name)
            else:
                pending.append(v.producer())


def _take_wanted_names(graph: ir.Graph, values: list[ir.Value]) -> None:
    """Give initializers the names the storage they replaced held, where those are free now."""
    for value in values:
        wanted = value.meta.get(_WANTED_NAME)
        if wanted is not None and wanted not in graph.initializers:
            value.name = wanted
            del value.meta[_WANTED_NAME]


def remove_unused(model: ir.Model) -> None:
    """Drop decode nodes and initializers a re-encoding left behind."""
    common_passes.RemoveUnusedNodesPass()(model)
    _take_wanted_names(model.graph, list(model.graph.initializers.values()))
