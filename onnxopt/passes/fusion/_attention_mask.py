"""Rewrite fused ``Attention`` into the form ONNX Runtime's quantizer turns into ``QAttention``.

onnxscript's Attention fusion writes ``qkv_hidden_sizes`` and passes the padding mask as the
additive ``attention_bias`` (input 5). ORT's ``quantize_dynamic`` skips every Attention carrying
``qkv_hidden_sizes``, and ``QAttention`` has no ``attention_bias`` input, so the QKV projections
(about a third of MiniLM's time) stayed FP32. Here the attribute is dropped when Q, K and V sizes
are equal, and a bias that is exactly the standard padding mask of one ``[batch, seq]`` graph
input becomes ``mask_index`` (input 3) in ORT's raw 2-D format: int32 ``[batch, seq]``, 0 = masked.

Neither onnxscript nor ORT offers this conversion. Matching the exporter's mask subgraph node by
node would tie it to one transformers version (5.x builds it with ``GatherND``/``And``/``Where``
from a vmap), so the bias is instead *probed*: its subgraph is cut out and run in ORT on padding
patterns of several shapes, and it must equal ``0`` where the mask is 1 and at most ORT's
``mask_filter_value`` (-10000) where it is 0, for every query row and head. Any other input the
subgraph reads may only feed ``Shape`` (its values cannot matter).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common
from onnxruntime.capi.onnxruntime_pybind11_state import Fail, InvalidArgument, RuntimeException

from onnxopt import runner
from onnxopt.passes.fusion._embed import CONTRIB

# ORT's Attention turns a raw mask's zeros into this additive value (its default
# ``mask_filter_value``); a bias at or below it masks as completely (exp underflows to 0).
ORT_MASK_FILTER = -10000.0
# (batch, seq) padding patterns the bias must reproduce; seq 1 and 257 catch masks that depend on
# the length (causal, sliding windows narrower than 257), the random patterns non-suffix padding.
# A static dimension of the mask input replaces the probe's.
PROBE_SHAPES = ((1, 1), (2, 5), (3, 64), (2, 257))
# What ORT raises when the cut-out subgraph cannot run on a probe: the bias is then not proven.
_ORT_ERRORS = (Fail, InvalidArgument, RuntimeException)
_BIAS_INPUT, _MASK_INDEX_INPUT = 5, 3


def quantizable_attention(model: ir.Model) -> dict[str, int]:
    """Rewrite ``model``'s com.microsoft Attention nodes in place; returns what changed."""
    changed = {"qkv_hidden_sizes_dropped": 0, "mask_index_from_bias": 0}
    masks: dict[ir.Value, ir.Value | None] = {}  # attention bias -> its mask_index, if any
    for node in list(model.graph):
        if node.op_type != "Attention" or node.domain != CONTRIB:
            continue
        sizes = node.attributes.get("qkv_hidden_sizes")
        if sizes is not None and len(set(sizes.as_ints())) == 1:
            del node.attributes["qkv_hidden_sizes"]
            changed["qkv_hidden_sizes_dropped"] += 1
        bias = _input(node, _BIAS_INPUT)
        if (bias is None or _input(node, _MASK_INDEX_INPUT) is not None
                or len(node.inputs) > 6 or "mask_filter_value" in node.attributes):
            continue  # no bias, a mask already, past/KV-cache inputs or a custom fill: leave
        if bias not in masks:
            source = padding_mask_source(model, bias)
            masks[bias] = None if source is None else _int32_mask(model, node, source)
        mask_index = masks[bias]
        if mask_index is None:
            continue
        node.replace_input_with(_MASK_INDEX_INPUT, mask_index)
        node.replace_input_with(_BIAS_INPUT, None)
        changed["mask_index_from_bias"] += 1
    if changed["mask_index_from_bias"]:
        _trim_trailing_none_inputs(model)
        common.RemoveUnusedNodesPass()(model)  # the bias subgraph, now unread
    return changed


def padding_mask_source(model: ir.Model, bias: ir.Value) -> ir.Value | None:
    """The graph input whose padding mask ``bias`` is, or None if the probes disagree."""
    probe = _bias_subgraph(model, bias)
    if probe is None:
        return None
    session_model, mask_name, others = probe
    session = runner.reference_session(
        ir.serde.serialize_model(session_model).SerializeToString())
    rng = np.random.default_rng(0)
    mask_input = session_model.graph.inputs[0]
    static = [d if isinstance(d, int) else None for d in mask_input.shape]
    shapes = {(static[0] or batch, static[1] or seq) for batch, seq in PROBE_SHAPES}
    for batch, seq in sorted(shapes):
        mask = (rng.random((batch, seq)) < 0.7).astype(mask_input.dtype.numpy())
        mask[:, 0] = 1  # a row without any key is ill-defined in both forms
        feeds = {mask_name: mask}
        feeds.update({v.name: np.zeros((batch, seq), v.dtype.numpy()) for v in others})
        try:
            (out,) = runner.run(session, feeds).values()
        except _ORT_ERRORS:
            return None
        if not _is_padding_bias(np.asarray(out), mask.astype(bool)):
            return None
    return next(v for v in model.graph.inputs if v.name == mask_name)


def _bias_subgraph(model: ir.Model, bias: ir.Value
                   ) -> tuple[ir.Model, str, list[ir.Value]] | None:
    """A copy of the graph computing only ``bias``, its mask input first; None when the bias
    reads initializer-free inputs other than one rank-2 mask (besides through ``Shape``)."""
    index = next((i for i, n in enumerate(model.graph) if bias in n.outputs), None)
    if index is None:
        return None  # a graph input or initializer: not derived from a mask input
    copy = model.clone()
    node = copy.graph.node(index)
    target = node.outputs[list(model.graph.node(index).outputs).index(bias)]
    copy.graph.outputs.clear()
    copy.graph.outputs.append(target)
    common.RemoveUnusedNodesPass()(copy)
    read_by_value = [v for v in copy.graph.inputs
                     if any(use.node.op_type != "Shape" for use in v.uses())]
    if len(read_by_value) != 1:
        return None
    mask = read_by_value[0]
    if mask.shape is None or mask.shape.rank() != 2 or mask.dtype not in (
            ir.DataType.INT64, ir.DataType.INT32, ir.DataType.BOOL):
        return None
    others = [v for v in copy.graph.inputs if v is not mask and v.uses()]
    if any(v.shape is None or v.shape.rank() != 2 or v.dtype.numpy() is None for v in others):
        return None  # the probe feeds every input [batch, seq]
    copy.graph.inputs.clear()
    copy.graph.inputs.extend([mask, *others])
    return copy, mask.name, others


def _is_padding_bias(bias: np.ndarray, keep: np.ndarray) -> bool:
    """``bias`` broadcasts to [batch, heads, seq, seq] with 0 at kept keys, <= -10000 elsewhere."""
    batch, seq = keep.shape
    if bias.ndim != 4 or bias.shape[-1] != seq or bias.shape[0] not in (1, batch):
        return False
    try:
        full = np.broadcast_to(bias, (batch, bias.shape[1], seq, seq))
    except ValueError:
        return False
    kept = np.broadcast_to(keep[:, None, None, :], full.shape)
    return bool(np.all(full[kept] == 0) and np.all(full[~kept] <= ORT_MASK_FILTER))


def _int32_mask(model: ir.Model, before: ir.Node, source: ir.Value) -> ir.Value:
    """``Cast(source, int32)`` inserted at the top of the graph (ahead of ``before``)."""
    cast = ir.node("Cast", [source], attributes={"to": ir.DataType.INT32}, num_outputs=1)
    mask = cast.outputs[0]
    mask.name = f"{source.name}_mask_index"
    mask.dtype = ir.DataType.INT32
    mask.shape = source.shape
    first = model.graph.node(0)
    model.graph.insert_before(first if first is not None else before, cast)
    return mask


def _input(node: ir.Node, index: int) -> ir.Value | None:
    return node.inputs[index] if index < len(node.inputs) else None


def _trim_trailing_none_inputs(model: ir.Model) -> None:
    """Attention without its bias keeps six inputs whose last is empty: drop the empty tail."""
    for node in model.graph:
        if node.op_type != "Attention" or node.domain != CONTRIB:
            continue
        inputs = list(node.inputs)
        while inputs and inputs[-1] is None:
            inputs.pop()
        if len(inputs) != len(node.inputs):
            node.resize_inputs(len(inputs))
