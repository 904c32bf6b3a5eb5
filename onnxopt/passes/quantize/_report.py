"""The sensitivity report: every compute node, its SQNR and accuracy effect, INT8 or why not.

Plain data for the pass's ``notes``: ``sensitivity`` (one record per Conv/MatMul/Gemm, most
sensitive first), ``excluded`` (node -> reason) and ``int8_mac_share`` (the share of the model's
multiply-accumulates that run in INT8, fused Attention included).
"""

from __future__ import annotations

from typing import Any

from onnxopt.passes.quantize._convert import DYNAMIC_OPS, QuantSpec
from onnxopt.passes.quantize._prepare import ComputeNode, PreparedModel
from onnxopt.passes.quantize._safety import FloatPlan
from onnxopt.passes.quantize._sensitivity import NodeSensitivity, SearchResult


def quantized_nodes(prepared: PreparedModel, spec: QuantSpec) -> set[str]:
    """Compute nodes ``spec`` puts in INT8."""
    names = set()
    for n in prepared.nodes:
        if n.name in spec.exclude:
            continue
        if spec.mode == "dynamic" and (n.op_type not in DYNAMIC_OPS or n.weight is None):
            continue
        if spec.op_types is not None and n.op_type not in spec.op_types:
            continue
        names.add(n.name)
    if spec.mode == "dynamic" and (spec.op_types is None or "Attention" in spec.op_types):
        names.update(n.name for n in prepared.attention_nodes if n.name not in spec.exclude)
    return names


def sensitivity_report(prepared: PreparedModel, ranking: list[NodeSensitivity],
                       result: SearchResult | None, plan: FloatPlan, shallow: set[str],
                       min_depth: int, output_sqnr: dict[str, float] | None) -> dict[str, Any]:
    """``sensitivity``, ``excluded`` and ``int8_mac_share`` for the notes."""
    spec = result.spec if result is not None else None
    quantized = quantized_nodes(prepared, spec) if spec else set()
    rows = {r.node: r for r in ranking}
    candidates = prepared.nodes + prepared.attention_nodes
    order = [r.node for r in ranking] + [n.name for n in candidates if n.name not in rows]
    by_name = {n.name: n for n in candidates}
    total = max(prepared.total_macs, 1)
    report = []
    for name in order:
        n = by_name[name]
        row = rows.get(name) or NodeSensitivity(name, n.op_type, n.macs, n.macs / total,
                                                None, None, None)
        row.int8 = name in quantized
        if result is not None:
            row.accuracy_effect = result.effects.get(name)
        if output_sqnr is not None:
            row.output_sqnr_db = output_sqnr.get(n.output)
        row.reason = None if row.int8 else _why_float(n, plan, result, shallow, min_depth)
        report.append(row.to_dict())
    return {"sensitivity": report, "int8_mac_share": round(int8_mac_share(prepared, spec), 4),
            "excluded": {r["node"]: r["reason"] for r in report if not r["int8"]}}


def int8_mac_share(prepared: PreparedModel, spec: QuantSpec | None) -> float:
    """The share of all MACs that ``spec`` runs in INT8. A fused Attention counts whole in the
    total; dynamic mode makes it QAttention, whose Q/K/V projection runs in INT8 (its two S x S
    products stay float); ORT's static quantizers leave Attention float."""
    quantized = quantized_nodes(prepared, spec) if spec else set()
    int8 = sum(n.macs for n in prepared.nodes if n.name in quantized)
    int8 += sum(projection for name, (projection, _) in prepared.attention.items()
                if name in quantized)
    return int8 / max(prepared.total_macs, 1)


def _why_float(node: ComputeNode, plan: FloatPlan, result: SearchResult | None,
               shallow: set[str], min_depth: int) -> str:
    if result is None:
        return "model kept in FP32"
    spec = result.spec
    planned = plan.dynamic if spec.mode == "dynamic" else plan.static
    if node.name in planned:
        return planned[node.name]
    if node.op_type == "Attention" and spec.mode == "static":
        return "static quantization leaves Attention float (ORT quantizes it dynamically only)"
    if spec.mode == "dynamic" and (node.op_type not in DYNAMIC_OPS or node.weight is None):
        return ("dynamic mode quantizes MatMul/Gemm with a constant operand only (ConvInteger "
                "is 5-9x slower than FP32 Conv; activation x activation products need ranges)")
    fallen = any(node.name in h.get("fallen_back", ()) for h in result.history)
    if node.name in spec.exclude and fallen:
        return "accuracy: moved back to FP32 by the sensitivity search"
    if node.name in spec.exclude and node.name in shallow:
        return (f"latency: reduction depth {node.depth} < {min_depth} (Quantize/Dequantize-bound)"
                "; the candidate without it measured faster")
    return "not quantized by ONNX Runtime's quantizer (unsupported inputs or position)"
