"""onnxopt's graph passes: one package per pass family, each behind a facade ``__init__``.

Importing this package registers every pass with :mod:`onnxopt.registry` (the core reaches passes
only through that registry). Families: :mod:`cleanup`, :mod:`fusion` (``fuse``,
``fuse-transformer``), :mod:`quantize`, :mod:`quantize_weights` (``quantize-weights``), :mod:`prune_channels`, :mod:`compress` (``prune``,
``share-weights``, ``deep-compress``) and :mod:`fp16`; what two or more of them use lives in
:mod:`onnxopt.passes._shared`. Built-in recipes are declared in :mod:`onnxopt.recipes`.
"""

from onnxopt.passes.cleanup import CleanupConfig, CleanupPass
from onnxopt.passes.compress import (DeepCompressConfig, DeepCompressPass, PruneConfig, PrunePass,
                                     ShareWeightsConfig, ShareWeightsPass)
from onnxopt.passes.fp16 import Fp16Config, Fp16Pass
from onnxopt.passes.fusion import FuseConfig, FusePass, FuseTransformerConfig, FuseTransformerPass
from onnxopt.passes.prune_channels import PruneChannelsConfig, PruneChannelsPass
from onnxopt.passes.quantize import QuantizeConfig, QuantizePass
from onnxopt.passes.quantize_weights import QuantizeWeightsConfig, QuantizeWeightsPass

__all__ = [
    "CleanupConfig",
    "CleanupPass",
    "DeepCompressConfig",
    "DeepCompressPass",
    "Fp16Config",
    "Fp16Pass",
    "FuseConfig",
    "FusePass",
    "FuseTransformerConfig",
    "FuseTransformerPass",
    "PruneChannelsConfig",
    "PruneChannelsPass",
    "PruneConfig",
    "PrunePass",
    "QuantizeConfig",
    "QuantizePass",
    "QuantizeWeightsConfig",
    "QuantizeWeightsPass",
    "ShareWeightsConfig",
    "ShareWeightsPass",
]
