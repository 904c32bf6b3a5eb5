"""Weight compression: ``prune`` (unstructured sparsity), ``share-weights`` (clustering and
de-duplication) and ``deep-compress`` (the two searched together under a budget, as in Deep
Compression).

Private modules: ``_layers`` (which weights are a layer's), ``_refit`` (layer-wise refits from
captured activations), ``_storage`` (how sparse and clustered weights are stored in the file).
"""

from onnxopt.passes.compress.deep_compress import (DeepCompressConfig, DeepCompressPass,
                                                   compression_table)
from onnxopt.passes.compress.prune import PruneConfig, PrunePass
from onnxopt.passes.compress.share_weights import ShareWeightsConfig, ShareWeightsPass, cluster

__all__ = [
    "DeepCompressConfig",
    "DeepCompressPass",
    "PruneConfig",
    "PrunePass",
    "ShareWeightsConfig",
    "ShareWeightsPass",
    "cluster",
    "compression_table",
]
