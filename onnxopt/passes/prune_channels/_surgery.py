"""Remove chosen units from a graph: slice the weights, resize the activations, fix attributes.

Everything is decided in original indices first and applied once, so tensors touched by several
groups (a Concat's consumer, a weight shared by two layers) are cut consistently.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import onnx_ir as ir

from onnxopt.passes.prune_channels._groups import ChannelGraph, Key, Unit


def removed_atoms(units: Iterable[Unit]) -> dict[Key, np.ndarray]:
    """Indices to delete per key, merged over ``units`` (sorted, unique)."""
    collected: dict[Key, list[np.ndarray]] = {}
    for unit in units:
        for key, idx in unit.atoms.items():
            collected.setdefault(key, []).append(idx)
    return {key: np.unique(np.concatenate(parts)) for key, parts in collected.items()}


def kept_indices(channels: ChannelGraph, removed: dict[Key, np.ndarray]) -> dict[Key, np.ndarray]:
    """Original indices that survive, for every key that loses some."""
    return {key: np.setdiff1d(np.arange(channels.dims[key]), idx) for key, idx in removed.items()}


def remove_units(channels: ChannelGraph, units: Iterable[Unit]) -> dict[Key, np.ndarray]:
    """Apply the removal in place; returns the kept original indices per changed key."""
    removed = removed_atoms(units)
    kept = kept_indices(channels, removed)
    for (value, axis), keep in kept.items():
        if value.const_value is not None:
            array = value.const_value.numpy()
            sliced = np.ascontiguousarray(np.take(array, keep, axis=axis))
            tensor = ir.Tensor(sliced, name=value.name)
            value.const_value = tensor
            value.shape = ir.Shape(tensor.shape)
        elif value.shape is not None:
            dims = list(value.shape)
            dims[axis] = int(len(keep))
            value.shape = ir.Shape(dims)

    def new_dim(value: ir.Value, axis: int) -> int:
        rank = len(value.shape) if value.shape is not None else 0
        key = (value, axis % rank if rank else axis)
        if key in kept:
            return int(len(kept[key]))
        if key in channels.dims:
            return channels.dims[key]
        dim = value.shape[axis] if value.shape is not None else None
        if not isinstance(dim, int):
            raise ValueError(f"size of axis {axis} of '{value.name}' is not static")
        return dim

    for fix in channels.fixups:
        fix(new_dim)
    return kept
