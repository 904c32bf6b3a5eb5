"""The channel rules: one small handler per op type, saying which slices move together.

Each handler receives the node, the port through which a channel axis reached it (``("in", i)``
or ``("out", i)``) and the axis, and *ties* the node's other keys to it, or *blocks* it with a
reason. See :mod:`onnxopt.passes.prune_channels._groups` for the model (keys, atoms, ties, units) and the
walk that calls these. A handler that cannot prove a case safe blocks it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx_ir as ir

if TYPE_CHECKING:  # pragma: no cover
    from onnxopt.passes.prune_channels._groups import Fixup, NewDim, Port, _Analyzer

# ----------------------------------------------------------------------------------------------
# Helpers for handlers


def port_value(node: ir.Node, port: Port) -> ir.Value:
    kind, i = port
    value = node.outputs[i] if kind == "out" else node.inputs[i]
    assert value is not None
    return value


def rank_of(value: ir.Value | None) -> int | None:
    return None if value is None or value.shape is None else len(value.shape)


def _dim(value: ir.Value | None, axis: int) -> int | None:
    if value is None or value.shape is None or not -len(value.shape) <= axis < len(value.shape):
        return None
    d = value.shape[axis]
    return d if isinstance(d, int) else None


def name_of(value: ir.Value) -> str:
    return value.name or "?"


def _eye(n: int) -> np.ndarray:
    return np.arange(n, dtype=np.int64)


def _const(value: ir.Value | None) -> np.ndarray | None:
    """A constant's array (initializer or Constant node), else ``None``."""
    if value is None:
        return None
    tensor = ir.convenience.get_const_tensor(value)
    return None if tensor is None else tensor.numpy()


def _tie_all(an: _Analyzer, slots: list[tuple[ir.Value | None, int, np.ndarray]]) -> None:
    """Tie every slot with the first (each slot: value, axis, row map)."""
    slots = [s for s in slots if s[0] is not None]
    first = slots[0]
    for value, axis, rows in slots[1:]:
        an.tie((first[0], first[1]), first[2], (value, axis), rows)


def _is(port: Port, axis: int, node: ir.Node, slots: Iterable[tuple[Port, int]]) -> bool:
    """Whether (port, axis) is one of ``slots`` (axes compared after normalization)."""
    rank = rank_of(port_value(node, port)) or 1
    return any(p == port and s % rank == axis % rank for p, s in slots)


def _block_here(an: _Analyzer, node: ir.Node, port: Port, axis: int, why: str) -> None:
    an.block(port_value(node, port), axis, f"{node.op_type} '{node.name}': {why}")


def add_initializer(graph: ir.Graph, name_hint: str, array: np.ndarray) -> ir.Value:
    """A fresh initializer under an unused name (constants are never edited in place: another
    node may share them)."""
    taken = set(graph.initializers)
    name, n = name_hint, 1
    while name in taken:
        n += 1
        name = f"{name_hint}{n}"
    tensor = ir.Tensor(array, name=name)
    value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(tensor.dtype),
                     const_value=tensor)
    graph.register_initializer(value)
    return value


# ----------------------------------------------------------------------------------------------
# Handlers: one per op family. Each receives the node, the port through which a key reached it,
# and the axis, and ties (or blocks) the keys the node couples with it.

Handler = Callable[["_Analyzer", ir.Node, "Port", int], None]


def _conv(an: _Analyzer, node: ir.Node, port: Port, axis: int) -> None:
    """Conv: input channels with weight axis 1; output channels with weight axis 0 and bias.

    ConvTranspose swaps the weight's axes. With ``group > 1`` (depthwise included) whole groups
    go: input group g with output group g, and the ``group`` attribute shrinks to match.
    """
    x, w, y = node.inputs[0], node.inputs[1], node.outputs[0]
    b = node.inputs[2] if len(node.inputs) > 2 else None
    if w is None or w.const_value is None or x is None:
        _block_here(an, node, port, axis, "weights are computed")
        return
    transpose = node.op_type == "ConvTranspose"
    w_in, w_out = (0, 1) if transpose else (1, 0)
    groups = node.attributes.get_int("group", 1)
    in_slots = [(("in", 0), 1), (("in", 1), w_in)]
    out_slots = [(("out", 0), 1), (("in", 1), w_out), (("in", 2), 0)]
    if groups == 1:
        cin, cout = w.shape[w_in], w.shape[w_out]
        if _is(port, axis, node, in_slots):
            _tie_all(an, [(x, 1, _eye(cin)), (w, w_in, _eye(cin))])
            an.role(node, "in", w, w_in)
        elif _is(port, axis, node, out_slots):
            _tie_all(an, [(y, 1, _eye(cout)), (w, w_out, _eye(cout)), (b, 0, _eye(cout))])
            an.role(node, "out", w, w_out)
        else:
            _block_here(an, node, port, axis, "spatial axis")
        return
    # Grouped: the weight axis that holds one group's channels cannot shrink on its own.
    per_group_axis = 1
    full_slots = [(("in", 0), 1), (("out", 0), 1), (("in", 1), 1 - per_group_axis),
                  (("in", 2), 0)]
    if not _is(port, axis, node, full_slots):
        _block_here(an, node, port, axis, "axis shared by every group")
        return
    cin = _dim(x, 1)
    cout = _dim(y, 1)
    if cin is None or cout is None or cin % groups or cout % groups:
        _block_here(an, node, port, axis, "group sizes unknown")
        return

    def blocks(n: int) -> np.ndarray:
        return np.arange(n, dtype=np.int64).reshape(groups, n // groups)

    w_full = w.shape[1 - per_group_axis]  # Cout for Conv, Cin for ConvTranspose
    _tie_all(an, [(x, 1, blocks(cin)), (y, 1, blocks(cout)),
                  (w, 1 - per_group_axis, blocks(w_full)), (b, 0, blocks(cout))])
    role = "dw" if groups == cin else "grouped"
    an.role(node, role, y, 1)
    cin_per_group = cin // groups

    def fix(new_dim: NewDim) -> None:
        node.attributes["group"] = ir.AttrInt64("group", new_dim(x, 1) // cin_per_group)

    an.fixup(node, fix)


def _batch_norm(an: _Analyzer, node: ir.Node, port: Port, axis: int) -> None:
    """BatchNormalization / InstanceNormalization: per-channel parameters follow the channels."""
    if len([o for o in node.outputs[1:] if o.uses() or o.is_graph_output()]):
        _block_here(an, node, port, axis, "training-mode outputs")
        return
    x, y = node.inputs[0], node.outputs[0]
    params = [v for v in node.inputs[1:] if v is not None]
    slots = [(("in", 0), 1), (("out", 0), 1)] + [(("in", i), 0) for i in range(1, len(node.inputs))]
    c = _dim(x, 1)
    if not _is(port, axis, node, slots) or c is None:
        _block_here(an, node, port, axis, "not the channel axis")
        return
    _tie_all(an, [(x, 1, _eye(c)), (y, 1, _eye(c))] + [(p, 0, _eye(c)) for p in params])
    an.role(node, "", y, 1)


def _layer_norm(an: _Analyzer, node: ir.Node, port: Port, axis: int) -> None:
    """LayerNormalization mixes the normalized axes; the leading axes pass through."""
    x, y = node.inputs[0], node.outputs[0]
    rank = rank_of(x)
    if port not in (("in", 0), ("out", 0)) or rank is None:
        _block_here(an, node, port, axis, "normalized axis")
        return
    first = node.attributes.get_int("axis", -1) % rank
    if axis % rank >= first:
        _block_here(an, node, port, axis, "normalized axis")
        return
    n = _dim(x, axis)
    if n is None:
        _block_here(an, node, port, axis, "unknown size")
        return
    _tie_all(an, [(x, axis, _eye(n)), (y, axis, _eye(n))])


def _unary(an: _Analyzer, node: ir.Node, port: Port, axis: int) -> None:
    """Elementwise on one tensor (Relu, Clip, Sigmoid, HardSwish, Gelu, Cast...): same axis."""
    if port not in (("in", 0), ("out", 0)):
        _block_here(an, node, port, axis, "parameter input")
        return
    if any(o.uses() or o.is_graph_output() for o in node.outputs[1:]):
        _block_here(an, node, port, axis, "extra outputs in use")
        return
    x, y = node.inputs[0], node.outputs[0]
    n = _dim(port_value(node, port), axis)
    if n is None:
        _block_here(an, node, port, axis, "unknown size")
        return
    _tie_all(an, [(x, axis, _eye(n)), (y, axis, _eye(n))])


def _broadcast(an: _Analyzer, node: ir.Node, port: Port, axis: int) -> None:
    """Elementwise with broadcasting (Add, Mul, ...): every non-broadcast operand moves together.

    This is how residual joins couple layers: both inputs of ``Add(conv_a, conv_b)`` lose the same
    channels. A constant operand of the full size (a bias) is cut too; a size-1 axis broadcasts.
    """
    y = node.outputs[0]
    out_rank = rank_of(y)
    here = port_value(node, port)
    rank = rank_of(here)
    if out_rank is None or rank is None:
        _block_here(an, node, port, axis, "unknown rank")
        return
    out_axis = axis + (out_rank - rank) if port[0] == "in" else axis
    n = _dim(y, out_axis)
    if n is None:
        _block_here(an, node, port, axis, "unknown size")
        return
    slots: list[tuple[ir.Value | None, int, np.ndarray]] = [(y, out_axis, _eye(n))]
    joined = 0
    for value in node.inputs:
        r = rank_of(value)
        if value is None or r is None:
            _block_here(an, node, port, axis, "unknown operand rank")
            return
        a = out_axis - (out_rank - r)
        if a < 0:
            continue
        d = _dim(value, a)
        if d == 1 and n != 1:
            continue  # broadcast along this axis: untouched
        if d != n:
            _block_here(an, node, port, axis, "operand sizes unknown")
            return
        slots.append((value, a, _eye(n)))
        joined += value.const_value is None
    _tie_all(an, slots)
    if joined > 1:
        an.role(node, "join", y, out_axis)


def _pool(an: _Analyzer, node: ir.Node, port: Port, axis: int) -> None:
    """Pooling keeps channels apart: axis 1 passes through, spatial axes block."""
    rank = rank_of(port_value(node, port)) or 2
    if port not in (("in", 0), ("out", 0)) or axis % rank != 1:
        _block_here(an, node, port, axis, "spatial axis")
        return
    if any(o.uses() or o.is_graph_output() for o in node.outputs[1:]):
        _block_here(an, node, port, axis, "indices output in use")
        return
    n = _dim(node.inputs[0], 1)
    if n is None:
        _block_here(an, node, port, axis, "unknown size")
        return
    _tie_all(an, [(node.inputs[0], 1, _eye(n)), (node.outputs[0], 1, _eye(n))])


def _resize(an: _Analyzer, node: ir.Node, port: Port, axis: int) -> None:
    """Resize/Upsample: an axis with scale 1 and no explicit ``sizes`` passes through."""
    x, y = node.inputs[0], node.outputs[0]
    if port not in (("in", 0), ("out", 0)):
        _block_here(an, node, port, axis, "parameter input")
        return
    sizes = _const(node.inputs[3]) if len(node.inputs) > 3 else None
    scales_value = node.inputs[2] if len(node.inputs) > 2 else (
        node.inputs[1] if node.op_type == "Upsample" and len(node.inputs) > 1 else None)
    scales = _const(scales_value)
    if sizes is not None and sizes.size:
        _block_here(an, node, port, axis, "explicit output sizes")
        return
    rank = rank_of(x) or 0
    if scales is None or scales.size != rank or scales[axis % rank] != 1:
        _block_here(an, node, port, axis, "scaled axis")
        return
    n = _dim(x, axis)
    if n is None:
        _block_here(an, node, port, axis, "unknown size")
        return
    _tie_all(an, [(x, axis, _eye(n)), (y, axis, _eye(n))])


def _pad(an: _Analyzer, node: ir.Node, port: Port, axis: int) -> None:
    """Pad: an axis without padding passes through."""
    x, y = node.inputs[0], node.outputs[0]
    rank = rank_of(x)
    if port not in (("in", 0), ("out", 0)) or rank is None:
        _block_here(an, node, port, axis, "parameter input")
        return
    pads = _const(node.inputs[1]) if len(node.inputs) > 1 else None
    if pads is None and "pads" in node.attributes:
        pads = np.asarray(node.attributes.get_ints("pads"))
    axes_given = len(node.inputs) > 3 and node.inputs[3] is not None
    a = axis % rank
    if pads is None or axes_given or pads.size != 2 * rank or pads[a] or pads[a + rank]:
        _block_here(an, node, port, axis, "padded axis")
        return
    n = _dim(x, a)
    if n is None:
        _block_here(an, node, port, axis, "unknown size")
        return
    _tie_all(an, [(x, a, _eye(n)), (y, a, _eye(n))])


def _transpose(an: _Analyzer, node: ir.Node, port: Port, axis: int) -> None:
    """Transpose: output axis i is input axis perm[i]."""
    x, y = node.inputs[0], node.outputs[0]
    rank = rank_of(x)
    if rank is None:
        _block_here(an, node, port, axis, "unknown rank")
        return
    perm = list(node.attributes.get_ints("perm", list(range(rank))[::-1]))
    a = axis % rank
    x_axis, y_axis = (a, perm.index(a)) if port[0] == "in" else (perm[a], a)
    n = _dim(x, x_axis)
    if n is None:
        _block_here(an, node, port, axis, "unknown size")
        return
    _tie_all(an, [(x, x_axis, _eye(n)), (y, y_axis, _eye(n))])


def _softmax(an: _Analyzer, node: ir.Node, port: Port, axis: int) -> None:
    """Softmax normalizes along its axis (opset < 13: every axis from it on); others pass."""
    x, y = node.inputs[0], node.outputs[0]
    rank = rank_of(x)
    if rank is None:
        _block_here(an, node, port, axis, "unknown rank")
        return
    default = -1 if an.opset >= 13 else 1
    sm_axis = node.attributes.get_int("axis", default) % rank
    a = axis % rank
    if a == sm_axis or (an.opset < 13 and a > sm_axis):
        _block_here(an, node, port, axis, "normalized axis")
        return
    n = _dim(x, a)
    if n is None:
        _block_here(an, node, port, axis, "unknown size")
        return
    _tie_all(an, [(x, a, _eye(n)), (y, a, _eye(n))])


def _concat(an: _Analyzer, node: ir.Node, port: Port, axis: int) -> None:
    """Concat: input i's channel j is output channel offset_i + j (offsets remapped)."""
    y = node.outputs[0]
    rank = rank_of(y)
    if rank is None:
        _block_here(an, node, port, axis, "unknown rank")
        return
    cat = node.attributes.get_int("axis", 0) % rank
    a = axis % rank
    sizes = [_dim(v, a) for v in node.inputs]
    if any(s is None for s in sizes):
        _block_here(an, node, port, axis, "unknown input sizes")
        return
    if a != cat:
        n = sizes[0]
        _tie_all(an, [(y, a, _eye(n))] + [(v, a, _eye(n)) for v in node.inputs])
        return
    offsets = np.cumsum([0] + sizes)
    targets = range(len(node.inputs)) if port[0] == "out" else [port[1]]
    for i in targets:
        an.tie((node.inputs[i], a), _eye(sizes[i]), (y, a), offsets[i] + _eye(sizes[i]))
    an.role(node, "concat", y, a)


def _split(an: _Analyzer, node: ir.Node, port: Port, axis: int) -> None:
    """Split: output i's channel j is input channel offset_i + j; the split sizes are rewritten."""
    x = node.inputs[0]
    rank = rank_of(x)
    if rank is None or port[0] == "in" and port[1] != 0:
        _block_here(an, node, port, axis, "split sizes input")
        return
    sp_axis = node.attributes.get_int("axis", 0) % rank
    a = axis % rank
    sizes = [_dim(v, a) for v in node.outputs]
    if any(s is None for s in sizes):
        _block_here(an, node, port, axis, "unknown output sizes")
        return
    if a != sp_axis:
        n = _dim(x, a)
        _tie_all(an, [(x, a, _eye(n))] + [(v, a, _eye(n)) for v in node.outputs])
        return
    offsets = np.cumsum([0] + sizes)
    for i, out in enumerate(node.outputs):
        an.tie((x, a), offsets[i] + _eye(sizes[i]), (out, a), _eye(sizes[i]))
    an.role(node, "split", x, a)
    graph = an.graph

    def fix(new_dim: NewDim) -> None:
        new_sizes = np.asarray([new_dim(v, a) for v in node.outputs], dtype=np.int64)
        if np.array_equal(new_sizes, sizes):
            return
        if an.opset >= 13:
            node.attributes.pop("num_outputs", None)
            split_in = node.inputs[1] if len(node.inputs) > 1 else None
            value = add_initializer(graph, f"{(split_in or x).name}_pruned", new_sizes)
            if len(node.inputs) < 2:
                node.resize_inputs(2)
            node.replace_input_with(1, value)
        else:
            node.attributes["split"] = ir.AttrInt64s("split", [int(s) for s in new_sizes])

    an.fixup(node, fix)


def _flatten(an: _Analyzer, node: ir.Node, port: Port, axis: int) -> None:
    """Flatten: channel c of the input becomes a block of output features (c's H*W values)."""
    x, y = node.inputs[0], node.outputs[0]
    rank = rank_of(x)
    if rank is None:
        _block_here(an, node, port, axis, "unknown rank")
        return
    start = node.attributes.get_int("axis", 1) % max(rank, 1)
    if port[0] == "out":
        if axis % 2 == 1 and any((x, a) in an.offset for a in range(start, rank)):
            return  # tied from the input side already
        _block_here(an, node, port, axis, "flattened features without one source axis")
        return
    dims = [_dim(x, a) for a in range(start, rank)]
    a = axis % rank
    if a < start or any(d is None for d in dims):
        _block_here(an, node, port, axis, "axis merged into the batch")
        return
    an.tie((x, a), _eye(dims[a - start]), (y, 1), _merge_map(dims, a - start))
    an.role(node, "flatten", y, 1)


def _merge_map(dims: list[int], k: int) -> np.ndarray:
    """Rows: for each index along merged axis k, the flat indices holding it."""
    flat = np.arange(int(np.prod(dims)), dtype=np.int64).reshape(dims)
    return np.moveaxis(flat, k, 0).reshape(dims[k], -1)


def _reshape(an: _Analyzer, node: ir.Node, port: Port, axis: int) -> None:
    """Reshape: merging an axis into others is Flatten's block map; splitting one axis into
    (heads, head_size) ties whole heads. The target-shape constant is rewritten; a shape the
    graph computes at run time blocks (except -1 entries, which adapt)."""
    x, y = node.inputs[0], node.outputs[0]
    if port[0] == "in" and port[1] != 0:
        _block_here(an, node, port, axis, "shape input")
        return
    if x.shape is None or y.shape is None:
        _block_here(an, node, port, axis, "unknown shapes")
        return
    segments = _segments(list(x.shape), list(y.shape))
    if segments is None:
        _block_here(an, node, port, axis, "shapes do not factor")
        return
    a = axis % len(x.shape if port[0] == "in" else y.shape)
    for ins, outs in segments:
        if (a in ins) if port[0] == "in" else (a in outs):
            break
    else:
        _block_here(an, node, port, axis, "axis not found")
        return
    in_dims = [x.shape[i] for i in ins]
    out_dims = [y.shape[o] for o in outs]
    if len(ins) == 1 and len(outs) == 1:  # unchanged axis
        if _dim(x, ins[0]) is None:
            _block_here(an, node, port, axis, "unknown size")
            return
        x_axis, y_axis, x_map, y_map = ins[0], outs[0], _eye(in_dims[0]), _eye(in_dims[0])
        role = ""
    elif len(outs) == 1:  # merge: x axes -> one y axis
        if port[0] == "out":
            if any((x, i) in an.offset for i in ins):
                return
            _block_here(an, node, port, axis, "merged features without one source axis")
            return
        k = ins.index(a)
        x_axis, y_axis, x_map, y_map = a, outs[0], _eye(in_dims[k]), _merge_map(in_dims, k)
        role = "flatten"
    elif len(ins) == 1:  # split: one x axis -> (outer, inner...) y axes; units are whole outers
        if port[0] == "out" and a != outs[0]:
            _block_here(an, node, port, axis, "inner axis of a split")
            return
        inner = int(np.prod(out_dims[1:]))
        x_axis, y_axis = ins[0], outs[0]
        x_map, y_map = _eye(out_dims[0] * inner).reshape(out_dims[0], inner), _eye(out_dims[0])
        role = "heads" if inner > 1 else ""
    else:
        _block_here(an, node, port, axis, "axes regrouped")
        return
    if not _shape_editable(an, node, y_axis, same_axis=x_axis == y_axis and len(ins) == 1):
        _block_here(an, node, port, axis, "target shape computed at run time")
        return
    an.tie((x, x_axis), x_map, (y, y_axis), y_map)
    if role:
        an.role(node, role, y, y_axis)
    an.fixup(node, _reshape_fix(an.graph, node))


def _segments(din: list[Any], dout: list[Any]) -> list[tuple[list[int], list[int]]] | None:
    """Split two shapes into runs of axes with equal products (symbolic dims must match 1:1)."""
    segs: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while i < len(din) and j < len(dout):
        if not isinstance(din[i], int) or not isinstance(dout[j], int):
            same = din[i] == dout[j] and getattr(din[i], "value", None) is not None
            # [N, 7, 7, 64] -> [?, 3136]: one unknown each side, equal static rest: same size.
            rest_in, rest_out = din[i + 1:], dout[j + 1:]
            if not same and not (
                    all(isinstance(d, int) for d in rest_in + rest_out)
                    and not isinstance(din[i], int) and not isinstance(dout[j], int)
                    and np.prod(rest_in, dtype=np.int64) == np.prod(rest_out, dtype=np.int64)):
                return None
            segs.append(([i], [j]))
            i, j = i + 1, j + 1
            continue
        ins, outs, pi, pj = [i], [j], din[i], dout[j]
        i, j = i + 1, j + 1
        while pi != pj:
            if pi < pj:
                if i >= len(din) or not isinstance(din[i], int):
                    return None
                pi *= din[i]
                ins.append(i)
                i += 1
            else:
                if j >= len(dout) or not isinstance(dout[j], int):
                    return None
                pj *= dout[j]
                outs.append(j)
                j += 1
        segs.append((ins, outs))
    rest_in, rest_out = list(range(i, len(din))), list(range(j, len(dout)))
    if any(din[r] != 1 for r in rest_in) or any(dout[r] != 1 for r in rest_out):
        return None
    if (rest_in or rest_out) and segs:
        segs[-1] = (segs[-1][0] + rest_in, segs[-1][1] + rest_out)
    return segs


def _shape_pieces(node: ir.Node) -> list[tuple[ir.Value, np.ndarray | None, int]] | None:
    """The target shape as (piece, its constant array or None, length): one constant, or the
    pieces of a Concat the graph builds it from."""
    shape = node.inputs[1]
    array = _const(shape)
    if array is not None:
        return [(shape, array, array.size)]
    producer = shape.producer() if shape is not None else None
    if producer is None or producer.op_type != "Concat":
        return None
    pieces = []
    for v in producer.inputs:
        n = _dim(v, 0)
        if n is None:
            return None
        pieces.append((v, _const(v), n))
    return pieces


def _shape_editable(an: _Analyzer, node: ir.Node, y_axis: int, same_axis: bool) -> bool:
    pieces = _shape_pieces(node)
    if pieces is None:
        return False
    pos = 0
    for _, array, n in pieces:
        if pos <= y_axis < pos + n:
            if array is None:
                return False
            entry = int(array.reshape(-1)[y_axis - pos])
            allowzero = node.attributes.get_int("allowzero", 0)
            return entry == -1 or entry > 0 or (entry == 0 and not allowzero and same_axis)
        pos += n
    return False


def _reshape_fix(graph: ir.Graph, node: ir.Node) -> Fixup:
    """Rewrite the positive entries of the target shape to the output's new sizes."""

    def fix(new_dim: NewDim) -> None:
        y = node.outputs[0]
        pieces = _shape_pieces(node)
        assert pieces is not None
        pos = 0
        new_inputs: list[ir.Value] = []
        changed = False
        for value, array, n in pieces:
            if array is None:
                new_inputs.append(value)
                pos += n
                continue
            flat = array.reshape(-1).copy()
            for k in range(n):
                if flat[k] > 0 and isinstance(y.shape[pos + k], int):
                    flat[k] = new_dim(y, pos + k)
            if np.array_equal(flat, array.reshape(-1)):
                new_inputs.append(value)
            else:
                changed = True
                new_inputs.append(add_initializer(graph, f"{value.name or 'shape'}_pruned",
                                                  flat.reshape(array.shape).astype(array.dtype)))
            pos += n
        if not changed:
            return
        if len(pieces) == 1:
            node.replace_input_with(1, new_inputs[0])
            return
        concat = node.inputs[1].producer()
        clone = ir.Node("", "Concat", new_inputs, attributes=[ir.AttrInt64("axis", 0)],
                        name=f"{node.name}_shape")
        graph.insert_before(node, clone)
        clone.outputs[0].name = f"{node.name}_pruned_shape"
        clone.outputs[0].shape = ir.Shape([sum(p[2] for p in pieces)])
        clone.outputs[0].type = ir.TensorType(ir.DataType.INT64)
        node.replace_input_with(1, clone.outputs[0])
        del concat

    return fix


def _gemm(an: _Analyzer, node: ir.Node, port: Port, axis: int) -> None:
    """Gemm: A's features with B's K axis (consumer side); Y's features with B's N axis and C."""
    a, b, y = node.inputs[0], node.inputs[1], node.outputs[0]
    c = node.inputs[2] if len(node.inputs) > 2 else None
    trans_a, trans_b = node.attributes.get_int("transA", 0), node.attributes.get_int("transB", 0)
    a_k, b_k, b_n = (0 if trans_a else 1), (1 if trans_b else 0), (0 if trans_b else 1)
    k, n = _dim(b, b_k), _dim(b, b_n)
    c_slots = []
    if c is not None and rank_of(c):
        c_axis = rank_of(c) - 1
        if _dim(c, c_axis) == n and n != 1:
            c_slots = [(("in", 2), c_axis)]
    if k is None or n is None:
        _block_here(an, node, port, axis, "unknown weight shape")
        return
    if _is(port, axis, node, [(("in", 0), a_k), (("in", 1), b_k)]):
        _tie_all(an, [(a, a_k, _eye(k)), (b, b_k, _eye(k))])
        an.role(node, "in", b, b_k)
    elif _is(port, axis, node, [(("out", 0), 1), (("in", 1), b_n)] + c_slots):
        slots = [(y, 1, _eye(n)), (b, b_n, _eye(n))]
        if c_slots:
            slots.append((c, c_slots[0][1], _eye(n)))
        _tie_all(an, slots)
        an.role(node, "out", b, b_n)
    else:
        _block_here(an, node, port, axis, "batch axis")


def _matmul(an: _Analyzer, node: ir.Node, port: Port, axis: int) -> None:
    """MatMul: A's last axis with B's second-to-last (contracted); Y's last with B's last; Y's
    rows with A's rows; batch axes broadcast like elementwise ops (attention heads ride on them)."""
    a, b, y = node.inputs[0], node.inputs[1], node.outputs[0]
    ra, rb, ry = rank_of(a), rank_of(b), rank_of(y)
    if ra is None or rb is None or ry is None or ra < 2 or rb < 2:
        _block_here(an, node, port, axis, "vector operand or unknown rank")
        return
    here_rank = rank_of(port_value(node, port)) or 1
    ax = axis % here_rank
    where = (port, ax)
    # The axes that move together, as (port, value, axis); the first gives the size. The
    # weight B, when constant, is an input side on the contracted axis, an output on columns.
    groups = (([(("in", 0), a, ra - 1), (("in", 1), b, rb - 2)], "in"),  # contracted
              ([(("in", 1), b, rb - 1), (("out", 0), y, ry - 1)], "out"),  # columns
              ([(("in", 0), a, ra - 2), (("out", 0), y, ry - 2)], None))  # rows
    for tied, role in groups:
        if where not in {(p, v_axis) for p, _, v_axis in tied}:
            continue
        size = _dim(tied[0][1], tied[0][2])
        if size is None:
            _block_here(an, node, port, axis, "unknown size")
            return
        _tie_all(an, [(v, v_axis, _eye(size)) for _, v, v_axis in tied])
        if role and b.const_value is not None:
            an.role(node, role, b, next(v_axis for p, _, v_axis in tied if p == ("in", 1)))
        return
    # A batch axis: broadcast across A, B and Y.
    y_axis = ax + (ry - here_rank) if port[0] == "in" else ax
    n = _dim(y, y_axis)
    if n is None:
        _block_here(an, node, port, axis, "unknown size")
        return
    slots: list[tuple[ir.Value | None, int, np.ndarray]] = [(y, y_axis, _eye(n))]
    for v, r in ((a, ra), (b, rb)):
        va = y_axis - (ry - r)
        if va < 0 or (_dim(v, va) == 1 and n != 1):
            continue
        slots.append((v, va, _eye(n)))
    _tie_all(an, slots)


def _shape_op(an: _Analyzer, node: ir.Node, port: Port, axis: int) -> None:
    """Shape: safe when no one reads the pruned axis's size (e.g. only the batch size is used)."""
    x = node.inputs[0]
    rank = rank_of(x)
    if rank is None or port != ("in", 0):
        _block_here(an, node, port, axis, "unknown rank")
        return
    start, end = node.attributes.get_int("start", 0), node.attributes.get_int("end", rank)
    start = min(max(start + rank if start < 0 else start, 0), rank)
    end = min(max(end + rank if end < 0 else end, 0), rank)
    a = axis % rank
    if not start <= a < end:
        return
    pos = a - start
    for use in node.outputs[0].uses():
        gather = use.node.op_type == "Gather" and use.idx == 0
        index = _const(use.node.inputs[1]) if gather else None
        if index is None or pos in set((index.reshape(-1) % (end - start)).tolist()):
            _block_here(an, node, port, axis, "the pruned size is read at run time")
            return
    if node.outputs[0].is_graph_output():
        _block_here(an, node, port, axis, "shape is a model output")


def _squeeze(an: _Analyzer, node: ir.Node, port: Port, axis: int) -> None:
    """Squeeze/Unsqueeze: the remaining axes keep their order."""
    x, y = node.inputs[0], node.outputs[0]
    rx, ry = rank_of(x), rank_of(y)
    if rx is None or ry is None or port not in (("in", 0), ("out", 0)):
        _block_here(an, node, port, axis, "axes input")
        return
    axes = _const(node.inputs[1]) if len(node.inputs) > 1 else None
    if axes is None and "axes" in node.attributes:
        axes = np.asarray(node.attributes.get_ints("axes"))
    if axes is None:
        _block_here(an, node, port, axis, "axes unknown")
        return
    squeeze = node.op_type == "Squeeze"
    big = rx if squeeze else ry
    gone = {int(v) % big for v in axes.reshape(-1)}
    kept = [i for i in range(big) if i not in gone]  # axes of the bigger tensor that survive
    a = axis % (rx if port[0] == "in" else ry)
    on_big = (port[0] == "in") == squeeze
    if on_big and a in gone:
        _block_here(an, node, port, axis, "squeezed axis")
        return
    big_axis, small_axis = (a, kept.index(a)) if on_big else (kept[a], a)
    x_axis, y_axis = (big_axis, small_axis) if squeeze else (small_axis, big_axis)
    n = _dim(x, x_axis)
    if n is None:
        _block_here(an, node, port, axis, "unknown size")
        return
    _tie_all(an, [(x, x_axis, _eye(n)), (y, y_axis, _eye(n))])


UNARY_OPS = (
    "Relu", "LeakyRelu", "Sigmoid", "Tanh", "HardSigmoid", "HardSwish", "Elu", "Selu", "Celu",
    "Gelu", "Erf", "Softplus", "Softsign", "Mish", "ThresholdedRelu", "Neg", "Abs", "Sqrt", "Exp",
    "Log", "Reciprocal", "Floor", "Ceil", "Round", "Sign", "Sin", "Cos", "Cast", "Identity",
    "Dropout", "Clip", "Swish",
)
BROADCAST_OPS = ("Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "PRelu", "Where")
POOL_OPS = ("MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool",
            "GlobalLpPool")

HANDLERS: dict[str, Handler] = {
    "Conv": _conv, "ConvTranspose": _conv,
    "BatchNormalization": _batch_norm, "InstanceNormalization": _batch_norm,
    "LayerNormalization": _layer_norm,
    **{op: _unary for op in UNARY_OPS},
    **{op: _broadcast for op in BROADCAST_OPS},
    **{op: _pool for op in POOL_OPS},
    "Resize": _resize, "Upsample": _resize, "Pad": _pad,
    "Transpose": _transpose, "Softmax": _softmax, "LogSoftmax": _softmax,
    "Concat": _concat, "Split": _split, "Flatten": _flatten, "Reshape": _reshape,
    "Gemm": _gemm, "MatMul": _matmul, "Shape": _shape_op,
    "Squeeze": _squeeze, "Unsqueeze": _squeeze,
}
