"""The weight layers that pruning and weight sharing act on, seen as matrices.

Conv, Gemm and MatMul with a constant weight are all ``y = x @ w + b`` per output
unit once the weight is laid out as *rows*: one row per output unit (output channel, output
feature) over the inputs it reads (for a grouped Conv, the patch of its own group). Pruning, the
least-squares refits and clustering work on those rows and write them back in the node's own layout.

Layers are selected by op type and excluded by patterns matched against the node name, the op type
and the weight's name: shell-style wildcards (``fnmatch``) or, with a ``re:`` prefix, a regular
expression searched in the name.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re
from collections.abc import Iterable, Sequence
from typing import Literal

import numpy as np
import onnx_ir as ir
from onnxopt.passes.compress import _storage as weight_storage

from onnxopt.errors import InputError

WEIGHT_OPS = ("Conv", "Gemm", "MatMul")


@dataclasses.dataclass
class Layer:
    """One weight layer: its node, its weight (and bias) values, and how its weight maps to rows."""

    node: ir.Node
    weight: ir.Value
    bias: ir.Value | None
    kind: Literal["conv", "fc"]

    @property
    def name(self) -> str:
        """What the report calls the layer: the weight's name (``fc1.weight``), else the node's."""
        return self.weight.name or self.node.name or self.node.op_type

    @property
    def groups(self) -> int:
        attr = self.node.attributes.get("group")
        return int(attr.as_int()) if attr is not None and self.node.op_type == "Conv" else 1

    @property
    def input(self) -> ir.Value:
        """The activation the layer reads."""
        value = self.node.inputs[0]
        assert value is not None
        return value

    def weight_array(self) -> np.ndarray:
        array = weight_storage.read_weight(self.weight)
        assert array is not None, "layers are only built for constant weights"
        return array

    def bias_array(self) -> np.ndarray | None:
        if self.bias is None:
            return None
        bias = weight_storage.read_weight(self.bias)
        assert bias is not None
        return bias.reshape(-1) * self._bias_scale()

    @property
    def scale(self) -> float:
        """Gemm's ``alpha``: the rows hold ``alpha * B`` (1 for other ops)."""
        return _attr_float(self.node, "alpha", 1.0) if self.node.op_type == "Gemm" else 1.0

    def layout(self, array: np.ndarray) -> np.ndarray:
        """An array of the weight's shape (weights, codes) as (outputs, inputs per group) rows."""
        op = self.node.op_type
        if op == "Conv":
            return array.reshape(array.shape[0], -1)
        if op == "Gemm":
            return array if _attr_int(self.node, "transB") else array.T
        return array.T  # MatMul: x @ W with W (in, out)

    def unlayout(self, rows: np.ndarray, like: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`layout`, in the dtype and shape of ``like``."""
        op = self.node.op_type
        if op == "Conv":
            out = rows.reshape(like.shape)
        elif op == "Gemm":
            out = rows if _attr_int(self.node, "transB") else rows.T
        else:
            out = rows.T
        return np.ascontiguousarray(out, dtype=like.dtype)

    def to_rows(self, weight: np.ndarray) -> np.ndarray:
        """The weight as (outputs, inputs per group) rows, Gemm's ``alpha`` folded in."""
        return self.layout(weight) * self.scale if self.scale != 1.0 else self.layout(weight)

    def from_rows(self, rows: np.ndarray, like: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`to_rows`."""
        return self.unlayout(rows / self.scale if self.scale != 1.0 else rows, like)

    def bias_to_stored(self, bias: np.ndarray, like: np.ndarray) -> np.ndarray:
        return (bias / self._bias_scale()).reshape(like.shape).astype(like.dtype)

    def _bias_scale(self) -> float:
        return _attr_float(self.node, "beta", 1.0) if self.node.op_type == "Gemm" else 1.0


def find_layers(model: ir.Model, *, ops: Sequence[str] = WEIGHT_OPS,
                exclude: Sequence[str] = (), min_elements: int = 0) -> list[Layer]:
    """Weight layers of the main graph in topological order, minus the excluded ones.

    Skipped silently (they are not weight layers in this sense): non-float weights, a weight that
    is not constant, MatMuls whose constant is the left operand, Gemm with ``transA``.
    """
    unknown = sorted(set(ops) - set(WEIGHT_OPS))
    if unknown:
        raise InputError(f"cannot prune or cluster op type(s) {unknown} "
                         f"(supported: {list(WEIGHT_OPS)})")
    check_patterns(exclude)
    layers = []
    for node in model.graph:
        if node.domain not in ("", "ai.onnx") or node.op_type not in ops:
            continue
        layer = _as_layer(node)
        if layer is None or matches(layer, exclude):
            continue
        if layer.weight_array().size < min_elements:
            continue
        layers.append(layer)
    return layers


def _as_layer(node: ir.Node) -> Layer | None:
    if len(node.inputs) < 2 or node.inputs[0] is None or node.inputs[1] is None:
        return None
    weight = node.inputs[1]
    if weight.is_graph_input():  # an initializer listed as input can be fed at run time
        return None
    array = weight_storage.read_weight(weight)
    if array is None or array.dtype != np.float32:
        return None
    op = node.op_type
    bias: ir.Value | None = None
    if op == "Conv":
        if array.ndim < 3:
            return None
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        kind: Literal["conv", "fc"] = "conv"
    elif op == "Gemm":
        if _attr_int(node, "transA") or array.ndim != 2:
            return None
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        if bias is not None and _bias_len(bias) != (array.shape[0] if _attr_int(node, "transB")
                                                    else array.shape[1]):
            bias = None  # a scalar or 2-D C broadcasts differently: leave it alone
        kind = "fc"
    else:
        if array.ndim != 2:
            return None
        bias = _following_add_bias(node, array.shape[1])
        kind = "fc"
    if bias is not None and (weight_storage.read_weight(bias) is None or len(bias.uses()) != 1):
        bias = None  # not constant, or shared with another node: refits leave it as it is
    return Layer(node, weight, bias, kind)


def _following_add_bias(node: ir.Node, out_features: int) -> ir.Value | None:
    """The bias of ``MatMul -> Add(const)``, the way exporters write a linear layer."""
    uses = node.outputs[0].uses()
    if len(uses) != 1 or node.outputs[0].is_graph_output():
        return None
    add = uses[0].node
    if add.op_type != "Add" or add.domain not in ("", "ai.onnx"):
        return None
    other = add.inputs[1 - uses[0].idx]
    if other is None or _bias_len(other) != out_features:
        return None
    return other


def _bias_len(value: ir.Value) -> int | None:
    array = weight_storage.read_weight(value)
    if array is None or array.size != max(array.shape, default=1) or array.ndim > 2:
        return None
    if array.ndim == 2 and array.shape[0] != 1:
        return None
    return int(array.size)


def check_patterns(patterns: Iterable[str]) -> None:
    """Raise :class:`InputError` for a bad ``re:`` pattern (before any work is done)."""
    for pattern in patterns:
        if pattern.startswith("re:"):
            try:
                re.compile(pattern[3:])
            except re.error as exc:
                raise InputError(f"bad layer pattern '{pattern}': {exc}") from exc


def pattern_matches(pattern: str, names: Iterable[str]) -> bool:
    """``fnmatch`` on any of ``names``; ``re:...`` searches a regular expression instead."""
    if pattern.startswith("re:"):
        regex = re.compile(pattern[3:])
        return any(regex.search(n) for n in names)
    return any(fnmatch.fnmatchcase(n, pattern) for n in names)


def layer_names(layer: Layer) -> list[str]:
    """The names a pattern is matched against: node name, op type, weight name."""
    return [n for n in (layer.node.name, layer.node.op_type, layer.weight.name) if n]


def matches(layer: Layer, patterns: Iterable[str]) -> bool:
    names = layer_names(layer)
    return any(pattern_matches(p, names) for p in patterns)


def first_match(layer: Layer, table: dict[str, object]) -> object | None:
    """The value of the first pattern in ``table`` (in insertion order) matching ``layer``."""
    names = layer_names(layer)
    for pattern, value in table.items():
        if pattern_matches(pattern, names):
            return value
    return None


def _attr_int(node: ir.Node, name: str, default: int = 0) -> int:
    attr = node.attributes.get(name)
    return int(attr.as_int()) if attr is not None else default


def _attr_float(node: ir.Node, name: str, default: float) -> float:
    attr = node.attributes.get(name)
    return float(attr.as_float()) if attr is not None else default
