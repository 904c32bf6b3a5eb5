"""``fuse-transformer``: fuse BERT-like blocks into ONNX Runtime's contrib ops (com.microsoft).

Attention, SkipLayerNormalization, BiasGelu/FastGelu/Gelu come from onnxscript's ORT fusions
(``optimize_for_ort``), which are written for the dynamo exporter's graphs; ORT's own
``onnxruntime.transformers.optimizer`` fuses no Attention on those (INT8-NOTES lesson 5).
EmbedLayerNormalization, which onnxscript lacks, comes from :mod:`fusion_embed`. The Attention
nodes are then put in the form ORT's dynamic quantizer turns into QAttention
(:mod:`transformer_mask`). The result needs ONNX Runtime.
"""

from __future__ import annotations

import dataclasses
from collections import Counter

import onnx_ir as ir
import onnx_ir.passes.common as common
from onnxscript.optimizer._constant_folding import FoldConstantsPass
from onnxscript.rewriter.ort_fusions import optimize_for_ort

from onnxopt.metrics import Budget
from onnxopt.passes.fusion import replace_contents
from onnxopt.passes.fusion_embed import CONTRIB, embed_layer_norm_rules
from onnxopt.passes.transformer_mask import quantizable_attention
from onnxopt.recipes import register_recipe
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
            return ir.passes.PassResult(model, False)
        fired = {name: n for name, n in counts.items() if n}
        if cfg.embed_layer_norm:
            n = embed_layer_norm_rules().apply_to_model(fused)
            if n:
                fired["embed_layer_normalization"] = n
        if not fired:
            # Attention fused earlier (or by another tool) may still need the QAttention form.
            rewritten = quantizable_attention(model) if cfg.quantizable_attention else {}
            fired = {k: n for k, n in rewritten.items() if n}
            self.notes = {"fusions": fired, "contrib_ops": dict(_contrib_ops(model))}
            return ir.passes.PassResult(model, bool(fired))
        # Attention takes one packed QKV weight, which the fusion builds with a Concat of the
        # three initializers: fold it so the runtime does not re-concatenate every call.
        FoldConstantsPass(shape_inference=False, input_size_limit=cfg.fold_size_limit,
                          output_size_limit=cfg.fold_size_limit)(fused)
        common.RemoveUnusedNodesPass()(fused)
        if cfg.quantizable_attention:
            rewritten = {k: n for k, n in quantizable_attention(fused).items() if n}
            fired.update(rewritten)
        common.RemoveUnusedOpsetsPass()(fused)
        replace_contents(model, fused)
        self.notes = {"fusions": fired, "contrib_ops": dict(_contrib_ops(model))}
        return ir.passes.PassResult(model, True)


def _contrib_ops(model: ir.Model) -> Counter[str]:
    return Counter(n.op_type for n in model.graph.all_nodes() if n.domain == CONTRIB)


register_recipe("transformer", ["cleanup", "fuse", "fuse-transformer"])
