"""Exact operator fusion: ``fuse`` (Conv/Gemm + BatchNorm, MatMul + Add, activations) and
``fuse-transformer`` (attention, LayerNorm, GELU and embedding kernels of ONNX Runtime).

Private modules: ``_rules`` (rewrite rules of our own), ``_embed`` (embedding LayerNorm),
``_attention_mask`` (mask forms), ``_layer_norms`` (residual LayerNorms kept out of ORT's slow
``SkipLayerNormalization``; the quantize pass uses it too, through this facade).
"""

from onnxopt.passes.fusion._layer_norms import split_layer_norm_rules, split_layer_norms
from onnxopt.passes.fusion.fuse import FuseConfig, FusePass, unfolded_batchnorms
from onnxopt.passes.fusion.fuse_transformer import (TRANSFORMER_BUDGET, FuseTransformerConfig,
                                                    FuseTransformerPass)

__all__ = [
    "TRANSFORMER_BUDGET",
    "FuseConfig",
    "FusePass",
    "FuseTransformerConfig",
    "FuseTransformerPass",
    "split_layer_norm_rules",
    "split_layer_norms",
    "unfolded_batchnorms",
]
