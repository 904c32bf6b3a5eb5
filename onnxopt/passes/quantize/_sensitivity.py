"""Sensitivity: which compute nodes INT8 hurts most, and the fallback search that fixes accuracy.

Compute nodes are Conv/MatMul/Gemm and, in dynamic mode, ORT's fused Attention (QAttention
after quantization: its Q/K/V weight in 7 bits, its input per run).

Two stages, cheap then exact:

1. *Per-node SQNR on calibration data*: the noise a node's own INT8 inputs put on its output,
   i.e. what falling it back to FP32 removes. The node runs alone on its captured calibration
   inputs, in float and with its weight quantized as the spec says (symmetric, per-tensor or
   per-channel, 7 or 8 bits) and its inputs quantized with their calibrated ranges. Lower is
   worse.
2. *Leave-one-out on the evaluation set* for the ``top_k`` lowest-SQNR nodes (and as many
   fused Attentions, ranked apart): the metric with only that node in FP32. Nodes are then
   fallen back greedily, the largest gain per share of MACs first (a fallback costs latency in proportion to the MACs it moves back to FP32), each
   step re-converted and re-scored, until the budget holds or ``max_steps`` runs out.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from onnxopt import runner

from onnxopt.metrics import sqnr_db
from onnxopt.model_io import release_mapping
from onnxopt.passes._shared.scoring import Evaluator, Score
from onnxopt.passes.quantize._calibrate import CalibrationTable
from onnxopt.passes.quantize._convert import QuantSpec
from onnxopt.passes.quantize._prepare import PreparedModel


@dataclasses.dataclass
class NodeSensitivity:
    """One compute node's entry in the sensitivity report (plain data)."""

    node: str
    op_type: str
    macs: int
    mac_share: float
    sqnr_db: float | None  # its output, weight and inputs INT8, vs float: what a fallback removes
    weight_sqnr_db: float | None  # its output with only the weight quantized
    input_sqnr_db: float | None  # its output with only the inputs quantized
    output_sqnr_db: float | None = None  # accumulated, against FP32, in the chosen model
    accuracy_effect: float | None = None  # metric gain when only this node is FP32
    int8: bool = False
    reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: (_round(v) if isinstance(v, float) else v)
                for k, v in dataclasses.asdict(self).items()}


def node_sqnr(prepared: PreparedModel, spec: QuantSpec, table: CalibrationTable | None,
              activations: Mapping[str, np.ndarray]) -> list[NodeSensitivity]:
    """Stage 1 for every compute node, most sensitive (lowest SQNR) first.

    The node runs alone (ONNX Runtime, one-node model) on its real calibration inputs, once in
    float and once with fake-quantized weight and inputs: the SQNR of its *output* is what
    counts (a weight tensor's own SQNR hides a huge weight that only meets zeros).
    """
    model = prepared.ir_model()
    graph = {n.name: n for n in model.graph}
    opset = model.opset_imports.get("", 17)
    total = max(prepared.total_macs, 1)
    rows = []
    candidates = prepared.nodes + (prepared.attention_nodes if spec.mode == "dynamic" else [])
    for cn in candidates:
        node = graph[cn.name]
        feeds = _node_feeds(node, activations)
        if feeds is None:
            rows.append(NodeSensitivity(cn.name, cn.op_type, cn.macs, cn.macs / total,
                                        None, None, None))
            continue
        # ORT's QAttention takes 7-bit weights (reduce_range), whatever the spec says.
        node_spec = dataclasses.replace(spec, reduce_range=True) \
            if cn.op_type == "Attention" else spec
        quantized = _quantized_feeds(node, feeds, node_spec, table)
        run = _single_node_runner(node, opset)
        ref = run(feeds)
        weights_only = {k: quantized[k] if _is_weight(node, k) else v for k, v in feeds.items()}
        inputs_only = {k: v if _is_weight(node, k) else quantized[k] for k, v in feeds.items()}
        rows.append(NodeSensitivity(
            cn.name, cn.op_type, cn.macs, cn.macs / total, sqnr_db(ref, run(quantized)),
            sqnr_db(ref, run(weights_only)) if cn.weight else None,
            sqnr_db(ref, run(inputs_only))))
        del feeds, quantized, weights_only, inputs_only  # views of the weight's memory map
        for value in node.inputs:  # a model over 2 GB: read pages stop counting against memory
            release_mapping(value.const_value if value is not None else None)
    rows.sort(key=lambda r: math.inf if r.sqnr_db is None else r.sqnr_db)
    return rows


def _node_feeds(node: ir.Node, activations: Mapping[str, np.ndarray]
                ) -> dict[str, np.ndarray] | None:
    """in0, in1, ... for the node's inputs: weights from initializers, the rest captured."""
    feeds = {}
    for i, value in enumerate(node.inputs):
        if value is None:
            continue
        if value.const_value is not None:
            feeds[f"in{i}"] = value.const_value.numpy()
        elif value.name in activations:
            feeds[f"in{i}"] = activations[value.name]
        else:
            return None
    return feeds


def _is_weight(node: ir.Node, key: str) -> bool:
    value = node.inputs[int(key[2:])]
    return value is not None and value.const_value is not None


def _quantized_feeds(node: ir.Node, feeds: dict[str, np.ndarray], spec: QuantSpec,
                     table: CalibrationTable | None) -> dict[str, np.ndarray]:
    """Weights (input 1) and activations fake-quantized as the spec would; biases stay float."""
    out = {}
    for key, x in feeds.items():
        index = int(key[2:])
        value = node.inputs[index]
        if index >= 2 or x.dtype.kind != "f":  # Conv/Gemm bias: int32 in INT8 kernels, ~exact
            out[key] = x
        elif value.const_value is not None:
            axis = _channel_axis(node, x.ndim)
            out[key] = fake_quant_weight(x.astype(np.float64), axis, spec).astype(x.dtype)
        else:
            rng = _range(table, value.name, x, spec)
            out[key] = fake_quant_activation(x, rng).astype(x.dtype)
    return out


def _single_node_runner(node: ir.Node, opset: int) -> Callable[[dict[str, np.ndarray]], np.ndarray]:
    """A function running ``node`` alone (weights fed as inputs) in ONNX Runtime."""
    inputs = [ir.Value(name=f"in{i}", type=v.type, shape=v.shape) if v is not None else None
              for i, v in enumerate(node.inputs)]
    clone = ir.Node(node.domain, node.op_type, inputs,
                    attributes=[ir.Attr(a.name, a.type, a.value) for a in node.attributes.values()],
                    num_outputs=1)
    clone.outputs[0].name = "out"
    clone.outputs[0].type = node.outputs[0].type
    opsets = {"": opset, **({node.domain: 1} if node.domain not in ("", "ai.onnx") else {})}
    graph = ir.Graph([v for v in inputs if v is not None], clone.outputs, nodes=[clone],
                     opset_imports=opsets)
    proto = ir.serde.serialize_model(ir.Model(graph, ir_version=9))
    session = runner.create_session(proto.SerializeToString(), threads=1, opt_level="disabled")
    return lambda feeds: session.run(None, feeds)[0]


def fake_quant_weight(w: np.ndarray, axis: int | None, spec: QuantSpec) -> np.ndarray:
    """Symmetric signed quantization as ORT does it for weights (per-tensor or per-channel)."""
    qmax = 63.0 if spec.reduce_range else 127.0
    if spec.weight_type == "uint8" and not spec.reduce_range:
        qmax = 127.5  # asymmetric uint8 weights span 255 steps
    if spec.per_channel and axis is not None and w.ndim > 1:
        reduce = tuple(i for i in range(w.ndim) if i != axis)
        amax = np.max(np.abs(w), axis=reduce, keepdims=True)
    else:
        amax = np.max(np.abs(w))
    scale = np.where(amax > 0, amax / qmax, 1.0)
    return np.clip(np.round(w / scale), -qmax, qmax) * scale


def fake_quant_activation(x: np.ndarray, rng: tuple[float, float]) -> np.ndarray:
    """Asymmetric 8-bit quantization over ``rng`` (zero always representable)."""
    lo, hi = min(rng[0], 0.0), max(rng[1], 0.0)
    if hi == lo:
        return x.astype(np.float64)
    scale = (hi - lo) / 255.0
    zero = np.round(-lo / scale)
    q = np.clip(np.round(x.astype(np.float64) / scale) + zero, 0, 255)
    return (q - zero) * scale


def _range(table: CalibrationTable | None, name: str, x: np.ndarray,
           spec: QuantSpec) -> tuple[float, float]:
    """The calibrated range (static), or the tensor's own range (dynamic quantizes per run)."""
    if spec.mode == "static" and table is not None and name in table.ranges:
        return table.ranges[name]
    return float(np.min(x)), float(np.max(x))


def _channel_axis(node: ir.Node, ndim: int) -> int | None:
    """The weight axis ORT quantizes per channel: output channels."""
    if node.op_type == "Conv":
        return 0
    if node.op_type == "Gemm":
        return 0 if node.attributes.get_int("transB", 0) else 1
    if node.op_type in ("MatMul", "Attention"):
        return ndim - 1
    return None


def _round(x: float) -> float | str:
    return round(x, 4) if math.isfinite(x) else str(x)


@dataclasses.dataclass
class SearchResult:
    """The outcome of the fallback search on one candidate."""

    spec: QuantSpec
    proto: onnx.ModelProto
    score: Score
    met: bool
    history: list[dict[str, Any]]
    effects: dict[str, float]


def fallback_search(spec: QuantSpec, convert: Callable[[QuantSpec], onnx.ModelProto],
                    evaluator: Evaluator, ranking: list[NodeSensitivity], *,
                    allowed: set[str], top_k: int, max_steps: int,
                    known_score: Score | None = None) -> SearchResult:
    """Stage 2: leave-one-out on the lowest-SQNR nodes, then greedy fallback to the budget.

    The number of nodes in FP32 doubles (1, 2, 4, ...) until the budget holds, then a bisection
    finds the smallest count that holds, each trial re-converted and re-scored: ``max_steps``
    nodes cost about 2 log2(max_steps) conversions. When no single
    node's fallback reduced the drop, the error does not sit in one compute node (it accumulates,
    or comes from ops that are not compute nodes) and the search stops there.
    """
    proto = convert(spec)
    score = known_score or evaluator.score(proto)
    history: list[dict[str, Any]] = [{"fallen_back": [], "value": score.value, "drop": score.drop}]
    best = SearchResult(spec, proto, score, evaluator.within(score), history, {})
    if best.met:
        return best
    effects: dict[str, float] = {}
    for row in _leave_one_out_candidates(ranking, allowed, top_k):
        loo = evaluator.score(convert(spec.with_exclude({row.node})))
        effects[row.node] = score.drop - loo.drop
    best.effects = effects
    helpful = sorted((n for n, e in effects.items() if e > 0),
                     key=lambda n: effects[n] / (_share(ranking, n) + 0.01), reverse=True)
    if not helpful:
        history.append({"stopped": "no single node's fallback reduced the drop"})
        return best
    order = helpful + [r.node for r in ranking if r.node in allowed and r.node not in helpful]
    order = order[:max_steps]

    def fall_back(count: int) -> SearchResult:
        fallen = order[:count]
        trial_spec = spec.with_exclude(set(fallen))
        trial = convert(trial_spec)
        trial_score = evaluator.score(trial)
        history.append({"fallen_back": list(fallen), "value": trial_score.value,
                        "drop": trial_score.drop,
                        "fp32_mac_share": round(sum(_share(ranking, n) for n in fallen), 4)})
        return SearchResult(trial_spec, trial, trial_score, evaluator.within(trial_score),
                            history, effects)

    low, count = 0, 1  # low: the most nodes known not to be enough
    while True:
        trial = fall_back(count)
        if trial.score.drop < best.score.drop or (trial.met and not best.met):
            best = trial
        if trial.met or count == len(order):
            break
        low, count = count, min(2 * count, len(order))
    high = count
    while best.met and high - low > 1:  # the doubling overshot: bisect for fewer fallbacks
        middle = (low + high) // 2
        trial = fall_back(middle)
        if trial.met:
            best, high = trial, middle
        else:
            low = middle
    best.history = history
    return best


def _leave_one_out_candidates(ranking: list[NodeSensitivity], allowed: set[str],
                              top_k: int) -> list[NodeSensitivity]:
    """The ``top_k`` lowest-SQNR compute nodes, and as many fused Attentions on top.

    Apart, because their SQNRs do not compare: on MiniLM the 6 Attentions measured 17-26 dB
    and took 4 of 6 places from the MatMuls, and the MatMul whose fallback alone met the budget
    (25 dB) was never tried; the search then kept 7 nodes float instead of 1.
    """
    rows = [r for r in ranking if r.node in allowed]
    return ([r for r in rows if r.op_type != "Attention"][:top_k]
            + [r for r in rows if r.op_type == "Attention"][:top_k])


def _share(ranking: list[NodeSensitivity], node: str) -> float:
    return next((r.mac_share for r in ranking if r.node == node), 0.0)
