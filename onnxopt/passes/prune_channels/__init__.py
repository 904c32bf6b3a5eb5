"""Structured pruning (``prune-channels``): channels, FFN neurons and attention heads removed by
dependency group, then the next layers refit.

Private modules: ``_rules`` (how each op type propagates channels), ``_groups`` (the dependency
groups), ``_importance`` (which units to remove), ``_surgery`` (removing them),
``_reconstruction`` (least-squares refit of the consumers).
"""

from onnxopt.passes.prune_channels.prune_channels import PruneChannelsConfig, PruneChannelsPass

__all__ = ["PruneChannelsConfig", "PruneChannelsPass"]
