"""Channel dependency groups of an ONNX graph: which slices of which tensors must go together.

Why by hand: removing output channel k of a Conv forces the same index out of the following
BatchNorm, out of any residual partner, out of the matching slot of a Concat, and out of the input
channels of every consumer. Torch-Pruning's DepGraph works this out for PyTorch modules only; no
library does it for ONNX graphs, so this module does it the same way on the graph's use-def chains
(``onnx_ir`` values know their producer and their uses).

The model. A *key* is one axis of one tensor (``(value, axis)``), activation or initializer; each
index along it is an *atom*. One small handler per op type says which atoms of the node's inputs and
outputs must be removed together (a *tie*: channel k of a Conv's output with row k of its weight
and entry k of its bias; channel c of a Flatten's input with the H*W features it becomes...).
Union-find over atoms gives the *units* (the smallest removable sets: a channel, a hidden neuron, an
attention head, a whole convolution group); union-find over keys gives the *groups* (layers
coupled by their channels, described as "conv1 out -> bn1 -> conv2 in"). Atoms that reach anything
no handler can prove safe (a model input or output, an unknown op, an axis an op mixes with others,
a shape that a computed tensor fixes) are *blocked*, and a unit holding a blocked atom is never
removed: what cannot be proved safe is not pruned.

The handlers live in :mod:`onnxopt.passes.prune_channels._rules`. Analysis starts from the output
channels of every weighted layer (Conv, ConvTranspose, Gemm, MatMul
by a constant) and follows ties in both directions until nothing new is reached. Values need
static channel dimensions (run shape inference first).
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from onnxopt.passes.prune_channels._rules import HANDLERS, name_of, port_value, rank_of

Key = tuple[ir.Value, int]
# A port of a node: ("in", i) or ("out", i).
Port = tuple[str, int]
NewDim = Callable[[ir.Value, int], int]
# Run after tensors are resized: updates attributes and shape constants the resize invalidated.
Fixup = Callable[[NewDim], None]


@dataclasses.dataclass
class Unit:
    """The smallest set of slices that can be removed together: ``atoms[key]`` are the indices."""

    atoms: dict[Key, np.ndarray]
    blocked: bool


@dataclasses.dataclass
class ChannelGroup:
    """Layers coupled through their channels, with their units and why some units are blocked."""

    index: int
    keys: list[Key]
    units: list[Unit]
    members: list[tuple[ir.Node, str]]  # (node, role), in graph order
    blocked_reasons: list[str]

    def describe(self) -> str:
        """The group as a chain of layer roles, e.g. ``conv1 out -> bn1 -> conv2 in``."""
        return " -> ".join(f"{node.name or node.op_type} {role}".rstrip()
                           for node, role in self.members) or "(no layers)"

    @property
    def kind(self) -> str:
        """``heads`` (attention heads), ``channels`` (convolutions), else ``neurons``."""
        roles = {role for _, role in self.members}
        if "heads" in roles:
            return "heads"
        if any(node.op_type in ("Conv", "ConvTranspose") for node, _ in self.members):
            return "channels"
        return "neurons"

    @property
    def prunable_units(self) -> list[Unit]:
        return [u for u in self.units if not u.blocked]

    @property
    def weight_keys(self) -> list[Key]:
        """Keys on weight tensors (constant, rank >= 2): what importance is measured on."""
        return [k for k in self.keys if k[0].const_value is not None and len(k[0].shape or ()) >= 2]

    @property
    def node_names(self) -> list[str]:
        return [node.name or "" for node, _ in self.members]

    @property
    def unit_width(self) -> int:
        """Slices per unit on the narrowest weight: 1 for plain channels, head size for heads."""
        weights = set(self.weight_keys)
        widths = [len(idx) for u in self.units for k, idx in u.atoms.items() if k in weights]
        return min(widths, default=1)


@dataclasses.dataclass
class ChannelGraph:
    """Every group of a graph, the size of every key, and the fix-ups resizing needs."""

    groups: list[ChannelGroup]
    dims: dict[Key, int]
    fixups: list[Fixup]


def analyze_channels(graph: ir.Graph, opset: int = 17) -> ChannelGraph:
    """Dependency groups of ``graph`` (a main graph with static channel dimensions)."""
    analyzer = _Analyzer(graph, opset)
    for node in graph:
        for key in _seeds(node):
            analyzer.activate(*key)
    analyzer.run()
    return analyzer.result()


def _seeds(node: ir.Node) -> list[tuple[ir.Value, int]]:
    """Output channels of weighted layers: where analysis starts."""
    if node.domain not in ("", "ai.onnx") or not node.outputs:
        return []
    weight = node.inputs[1] if len(node.inputs) > 1 else None
    if weight is None or weight.const_value is None:
        return []
    out = node.outputs[0]
    if node.op_type in ("Conv", "ConvTranspose", "Gemm"):
        return [(out, 1)]
    if node.op_type == "MatMul" and len(weight.shape or ()) == 2 and out.shape is not None:
        return [(out, len(out.shape) - 1)]
    return []


def _rows(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, dtype=np.int64)
    return m[:, None] if m.ndim == 1 else m


class _UnionFind:
    """Union-find over a handful of integers (the keys), grown on demand."""

    def __init__(self) -> None:
        self.parent: list[int] = []

    def add(self) -> int:
        self.parent.append(len(self.parent))
        return len(self.parent) - 1

    def find(self, a: int) -> int:
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def union(self, a: int, b: int) -> None:
        self.parent[self.find(a)] = self.find(b)


def connected_components(n: int, edges: list[np.ndarray]) -> np.ndarray:
    """Component label (its smallest member) of each of ``n`` nodes; ``edges``: (2, m) arrays.

    Vectorized hook-and-jump (Shiloach-Vishkin style): hooking roots to the smaller label, then
    pointer jumping until every node points at its root. Atoms number in the millions on big
    models, so a Python-level union-find would be too slow.
    """
    labels = np.arange(n, dtype=np.int64)
    if not edges:
        return labels
    a, b = np.concatenate(edges, axis=1)
    while True:
        la, lb = labels[a], labels[b]
        differ = la != lb
        if not differ.any():
            return labels
        la, lb = la[differ], lb[differ]
        low = np.minimum(la, lb)
        np.minimum.at(labels, la, low)
        np.minimum.at(labels, lb, low)
        while True:
            jumped = labels[labels]
            if np.array_equal(jumped, labels):
                break
            labels = jumped


class _Analyzer:
    """Holds the atoms, ties and blocks while handlers walk the graph."""

    def __init__(self, graph: ir.Graph, opset: int) -> None:
        self.graph = graph
        self.opset = opset
        self.order = {id(node): i for i, node in enumerate(graph)}
        self.atom_count = 0
        self.edges: list[np.ndarray] = []
        self.keys = _UnionFind()
        self.offset: dict[Key, int] = {}
        self.key_index: dict[Key, int] = {}
        self.key_list: list[Key] = []
        self.dim: dict[Key, int] = {}
        self.blocked: set[int] = set()
        self.reasons: dict[Key, list[str]] = collections.defaultdict(list)
        self.roles: dict[Key, list[tuple[ir.Node, str]]] = collections.defaultdict(list)
        self.fixups: list[Fixup] = []
        self.fixed_nodes: set[int] = set()
        self.queue: collections.deque[Key] = collections.deque()
        self.visited: set[tuple[int, Port, int]] = set()

    # -- atoms and keys -------------------------------------------------------------------------

    def normalize(self, value: ir.Value, axis: int) -> Key | None:
        rank = rank_of(value)
        if rank is None or not -rank <= axis < rank:
            return None
        return (value, axis % rank)

    def activate(self, value: ir.Value, axis: int) -> Key | None:
        """The key's atoms, allocated on first sight (``None`` when its size is not static)."""
        key = self.normalize(value, axis)
        if key is None:
            return None
        if key in self.offset:
            return key
        dim = value.shape[key[1]] if value.shape is not None else None
        if not isinstance(dim, int) or dim < 1:
            return None
        self.offset[key] = self.atom_count
        self.atom_count += dim
        self.dim[key] = dim
        self.key_index[key] = self.keys.add()
        self.key_list.append(key)
        self.queue.append(key)
        return key

    def tie(self, a: tuple[ir.Value, int], amap: np.ndarray, b: tuple[ir.Value, int],
            bmap: np.ndarray) -> bool:
        """Tie row r of ``amap`` (indices along key a) with row r of ``bmap`` (along key b)."""
        ka, kb = self.activate(*a), self.activate(*b)
        if ka is None or kb is None:
            for key, other in ((ka, b), (kb, a)):
                if key is not None:
                    self.block_key(key, f"'{name_of(other[0])}' has no static size on that axis")
            return False
        amap, bmap = _rows(amap), _rows(bmap)
        if len(amap) != len(bmap):
            raise ValueError(f"tie between {name_of(a[0])} and {name_of(b[0])}: "
                             f"{len(amap)} != {len(bmap)} rows")
        first = self.offset[ka] + amap[:, :1]
        for atoms in (self.offset[ka] + amap, self.offset[kb] + bmap):
            self.edges.append(np.stack(np.broadcast_arrays(first, atoms)).reshape(2, -1))
        self.keys.union(self.key_index[ka], self.key_index[kb])
        return True

    def block_key(self, key: Key, reason: str, indices: Iterable[int] | None = None) -> None:
        start = self.offset[key]
        idx = range(self.dim[key]) if indices is None else indices
        self.blocked.update(start + int(i) for i in idx)
        if reason not in self.reasons[key]:
            self.reasons[key].append(reason)

    def block(self, value: ir.Value, axis: int, reason: str) -> None:
        key = self.activate(value, axis)
        if key is not None:
            self.block_key(key, reason)

    def role(self, node: ir.Node, role: str, value: ir.Value, axis: int) -> None:
        key = self.normalize(value, axis)
        if key is not None and (node, role) not in self.roles[key]:
            self.roles[key].append((node, role))

    def fixup(self, node: ir.Node, fix: Fixup) -> None:
        """Register ``node``'s fix-up (once per node)."""
        if id(node) not in self.fixed_nodes:
            self.fixed_nodes.add(id(node))
            self.fixups.append(fix)

    # -- the walk -------------------------------------------------------------------------------

    def run(self) -> None:
        while self.queue:
            value, axis = self.queue.popleft()
            self._process(value, axis)

    def _process(self, value: ir.Value, axis: int) -> None:
        if value.is_graph_output():
            self.block(value, axis, f"model output '{name_of(value)}' keeps its shape")
        if value.is_graph_input():
            self.block(value, axis, f"model input '{name_of(value)}' keeps its shape")
        producer = value.producer()
        if producer is not None:
            self.visit(producer, ("out", value.index() or 0), axis)
        elif value.const_value is None and not value.is_graph_input():
            self.block(value, axis, f"'{name_of(value)}' has no producer")
        for use in value.uses():
            node = use.node
            if node.graph is not self.graph:
                self.block(value, axis, f"'{name_of(value)}' is used inside a subgraph")
                continue
            self.visit(node, ("in", use.idx), axis)

    def visit(self, node: ir.Node, port: Port, axis: int) -> None:
        memo = (id(node), port, axis)
        if memo in self.visited:
            return
        self.visited.add(memo)
        handler = HANDLERS.get(node.op_type) if node.domain in ("", "ai.onnx") else None
        if handler is None:
            self.block(port_value(node, port), axis,
                       f"{node.op_type} '{node.name}' has no channel rule")
            return
        handler(self, node, port, axis)

    def result(self) -> ChannelGraph:
        roots = connected_components(self.atom_count, self.edges)
        blocked_roots = set(roots[sorted(self.blocked)].tolist()) if self.blocked else set()
        by_group: dict[int, list[Key]] = collections.defaultdict(list)
        for key in self.key_list:
            by_group[self.keys.find(self.key_index[key])].append(key)
        groups = []
        for keys in by_group.values():
            units: dict[int, dict[Key, np.ndarray]] = {}
            for key in keys:
                start = self.offset[key]
                key_roots = roots[start:start + self.dim[key]]
                order = np.argsort(key_roots, kind="stable")
                uniq, first = np.unique(key_roots[order], return_index=True)
                ends = np.append(first[1:], len(order)).tolist()
                for root, lo, hi in zip(uniq.tolist(), first.tolist(), ends):
                    units.setdefault(root, {})[key] = order[lo:hi]
            members = sorted({(id(n), role): (n, role) for k in keys for n, role in self.roles[k]}
                             .values(), key=lambda m: (self.order.get(id(m[0]), -1), m[1]))
            reasons = list(dict.fromkeys(r for k in keys for r in self.reasons[k]))
            groups.append(ChannelGroup(
                index=0, keys=keys,
                units=[Unit(atoms, root in blocked_roots) for root, atoms in sorted(units.items())],
                members=members, blocked_reasons=reasons))
        groups.sort(key=lambda g: min((self.order.get(id(n), 0) for n, _ in g.members), default=0))
        for i, group in enumerate(groups):
            group.index = i
        return ChannelGraph(groups, dict(self.dim), list(self.fixups))
