"""``fuse-transformer``: fuse BERT-like blocks into ONNX Runtime's contrib ops (com.microsoft).

Attention, SkipLayerNormalization, BiasGelu/FastGelu/Gelu come from onnxscript's ORT fusions
(``optimize_for_ort``), which are written for the dynamo exporter's graphs; ORT's own
``onnxruntime.transformers.optimizer`` fuses no Attention on those (INT8-NOTES lesson 5).
EmbedLayerNormalization, which onnxscript lacks, comes from :mod:`onnxopt.passes.fusion._embed`. The Attention
nodes are then put in the form ORT's dynamic quantizer turns into QAttention
(:mod:`onnxopt.passes.fusion._attention_mask`). The result needs ONNX Runtime.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Any, Literal

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common
from onnxscript.optimizer._constant_folding import FoldConstantsPass
from onnxscript.rewriter.ort_fusions import optimize_for_ort

from onnxopt.isa import is_host, resolve_target
from onnxopt.metrics import Budget
from onnxopt.model_io import is_big
from onnxopt.passes._shared.surgery import replace_contents
from onnxopt.passes.fusion._embed import CONTRIB, embed_layer_norm_rules
from onnxopt.passes.fusion._layer_norms import split_layer_norm_rules
from onnxopt.passes.fusion._rules import gemm_inputs_to_2d
from onnxopt.passes._shared.timing import deploy_threads, measure_decided
from onnxopt.passes.fusion._attention_mask import quantizable_attention
from onnxopt.registry import OptPass, option, register

# Fused kernels reorder sums (softmax, LayerNorm statistics, GELU): measured on MiniLM-L6 (seq 128)
# max abs 2.6e-6 and cosine 1 - 6e-13 against the unfused graph, with outputs of magnitude ~1.
# rtol 1e-3 / atol 1e-4 leaves ~40x headroom for deeper or wider models while still catching a
# wrong fusion: dropping one layer's attention mask moved MiniLM's outputs by 0.53 (max abs),
# dropping one SkipLayerNorm bias by 0.36.
TRANSFORMER_BUDGET = Budget("allclose", rtol=1e-3, atol=1e-4)

# Every fusion here starts from one of these: attention from Softmax (or an already fused
# Attention), (Skip)LayerNorm from LayerNormalization or its ReduceMean form, the GELUs from Erf or
# Tanh, RMSNorm from ReduceMean, rotary embeddings from Sin/Cos, the embedding block from
# LayerNormalization.
TRANSFORMER_OPS = frozenset({"Softmax", "Attention", "LayerNormalization", "ReduceMean", "Erf",
                             "Tanh", "Gelu", "SimplifiedLayerNormalization", "Sin", "Cos"})


@dataclasses.dataclass
class FuseTransformerConfig:
    embed_layer_norm: bool = option(True, "Fuse the embedding block into EmbedLayerNormalization.")
    fold_size_limit: int = option(
        1 << 22, "Largest constant (elements) folded after fusion (e.g. packed QKV weights).")
    quantizable_attention: bool = option(
        True, "Write Attention as ORT's quantizer needs for QAttention: no qkv_hidden_sizes when "
              "Q, K, V sizes agree; a probed padding-mask bias as the raw 2-D mask_index.")
    split_layer_norms: Literal["auto", "always", "never"] = option(
        "auto", "Residual LayerNorms (SkipLayerNormalization, LayerNormalization(Add)) written as "
        "LayerNormalization(Sum), which keeps them out of ORT's slow SkipLayerNormalization CPU "
        "kernel: 'auto' times both forms here and keeps the faster (only when --target is this "
        "machine); 'always'; 'never'.")
    threads: list[int] | None = option(
        None, "Thread counts the LayerNorm forms are timed at; null: the pipeline's --threads "
        "(default 1 and all cores).")
    latency_budget_s: float = option(1.0, "Seconds of interleaved timing per thread count.")


@register
class FuseTransformerPass(OptPass):
    name = "fuse-transformer"
    summary = ("Fuse Attention, SkipLayerNorm, BiasGelu/FastGelu and EmbedLayerNorm into ONNX "
               "Runtime contrib ops (needs ONNX Runtime).")
    Config = FuseTransformerConfig
    needs_onnxruntime = True

    def budget(self) -> Budget:
        return TRANSFORMER_BUDGET

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        cfg: FuseTransformerConfig = self.config
        ops = {n.op_type for n in model.graph.all_nodes()}
        if not ops & TRANSFORMER_OPS:
            # The `int8` recipe runs this pass on every model: a CNN or MLP skips the clone and
            # the rewriter (a 2 GB MLP would otherwise be copied and folded for nothing).
            self.notes = {"fusions": {}, "skipped": "no op any transformer fusion starts from "
                          f"({', '.join(sorted(TRANSFORMER_OPS))})"}
            # Not applicable is not falling short: no console warning for every CNN in `int8`.
            return ir.passes.PassResult(model, False)
        # onnxscript's ORT optimizer also rewrites what is not a transformer (every Gemm back to
        # MatMul + Add, for one), so it works on a copy that is adopted only if a fusion fired.
        candidate = model.clone()
        try:
            fused, counts = optimize_for_ort(candidate)
        except Exception as exc:  # noqa: BLE001 - onnxscript's rules on graphs they were not written for
            # Best effort, as in the `int8` recipe: the model is untouched (the rewriter worked
            # on a copy), the report says why nothing was fused.
            self.notes = {"fusions": {}, "skipped": f"onnxscript's fusions failed: "
                          f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
            self.notes["warning"] = "nothing fused: " + self.notes["skipped"]
            return ir.passes.PassResult(model, False)
        fired = {name: n for name, n in counts.items() if n}
        gemm_inputs_to_2d(fused)  # onnxscript's attention fusion can leave a Gemm a 3-D input
        if cfg.embed_layer_norm:
            n = embed_layer_norm_rules().apply_to_model(fused)
            if n:
                fired["embed_layer_normalization"] = n
        if not fired:
            # Attention fused earlier (or by another tool) may still need the QAttention form,
            # and its LayerNorms the split form.
            rewritten = quantizable_attention(model) if cfg.quantizable_attention else {}
            fired = {k: n for k, n in rewritten.items() if n}
            layer_norms = self._split_layer_norms(model)
            self.notes = {"fusions": fired, "contrib_ops": dict(_contrib_ops(model))}
            if layer_norms:
                self.notes["layer_norms"] = layer_norms
            modified = bool(fired) or bool(layer_norms.get("kept"))
            if not modified:
                self.notes["warning"] = ("nothing fused: no Attention, LayerNorm, GELU or "
                                         "embedding pattern matched (see 'contrib_ops')")
            return ir.passes.PassResult(model, modified)
        # Attention takes one packed QKV weight, which the fusion builds with a Concat of the
        # three initializers: fold it so the runtime does not re-concatenate every call.
        FoldConstantsPass(shape_inference=False, input_size_limit=cfg.fold_size_limit,
                          output_size_limit=cfg.fold_size_limit)(fused)
        common.RemoveUnusedNodesPass()(fused)
        if cfg.quantizable_attention:
            rewritten = {k: n for k, n in quantizable_attention(fused).items() if n}
            fired.update(rewritten)
        # The rewrites can leave a node before its input's producer (Swin's shifted windows):
        # valid to run once sorted, but onnx_ir's clone, used next and by later passes, refuses it.
        common.TopologicalSortPass()(fused)
        layer_norms = self._split_layer_norms(fused)
        common.RemoveUnusedOpsetsPass()(fused)
        replace_contents(model, fused)
        self.notes = {"fusions": fired, "contrib_ops": dict(_contrib_ops(model))}
        if layer_norms:
            self.notes["layer_norms"] = layer_norms
        return ir.passes.PassResult(model, True)

    def _split_layer_norms(self, fused: ir.Model) -> dict[str, Any]:
        """Write the residual LayerNorms as LayerNormalization(Sum) (:mod:`onnxopt.passes.fusion._layer_norms`)
        when that runs faster here. ORT 1.32's SkipLayerNormalization CPU kernel, which ORT also
        fuses ``LayerNormalization(Add)`` into at load, took 0.20 ms for a [1, 128, 384] input
        against 0.035 ms for LayerNormalization (benchmarks/bench_layer_norm.py): 2.1 of
        MiniLM-L6's 18 ms at 1 thread. Timed rather than assumed, since a later ORT or another
        CPU may not share the slow kernel."""
        cfg: FuseTransformerConfig = self.config
        if cfg.split_layer_norms == "never" or fused.opset_imports.get("", 0) < 17:
            return {}  # LayerNormalization needs opset 17
        split = fused.clone()
        count = split_layer_norm_rules().apply_to_model(split)
        if not count:
            return {}
        notes: dict[str, Any] = {"rewritten": count}
        if cfg.split_layer_norms == "auto":
            target = resolve_target(self.context.isa)
            if not is_host(target):  # as the quantize pass: timing here says nothing there
                return {**notes, "kept": False,
                        "why": f"target {target.name} is not this machine: not timed"}
            if is_big(fused):  # timed from in-memory protos, which stop at 2 GB
                return {**notes, "kept": False, "why": "over the 2 GB protobuf limit: not timed"}
            sample = self._latency_feeds()
            if sample is None:
                return {**notes, "kept": False, "why": "no sample inputs to time on"}
            # geometric mean over the thread counts, measured longer while its interval
            # straddles 1 (nearly equal models on a noisy machine: timing.measure_decided)
            timings, decisions = measure_decided(
                ir.to_proto(fused), {"split": ir.to_proto(split)}, sample,
                deploy_threads(cfg.threads or self.context.threads), cfg.latency_budget_s,
                threshold=1.0, rule="geomean")
            timing, decision = timings["split"], decisions["split"]
            notes["speedup"] = {t: round(s, 3) for t, s in timing.speedups.items()}
            notes["latency_decision"] = decision.to_dict()
            if not decision.passed:
                return {**notes, "kept": False, "why": f"not faster here: {decision.describe()}"}
        replace_contents(fused, split)
        return {**notes, "kept": True}

    def _latency_feeds(self) -> dict[str, np.ndarray] | None:
        """One sample (batch 1) from the calibration data or the verification inputs."""
        batches = list(self.context.calibration or []) or self.context.verify_feeds
        if not batches:
            return None
        return {k: np.asarray(v)[:1] for k, v in batches[0].items()}


def _contrib_ops(model: ir.Model) -> Counter[str]:
    return Counter(n.op_type for n in model.graph.all_nodes() if n.domain == CONTRIB)
