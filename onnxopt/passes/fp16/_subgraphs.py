"""Put the Casts ORT's float16 converter adds for nodes inside ``If``/``Loop``/``Scan`` bodies
into those bodies.

``onnxruntime.transformers.float16.convert_float_to_float16`` walks subgraphs and converts their
nodes, but appends every Cast it creates around a float32-kept node to the *main* graph's node
list, also when that node sits in a subgraph. Such a Cast then reads a value that exists only
inside the branch (the kept node's input from a sibling node, or its renamed output), while the
kept node reads the Cast's output from the outer scope: a dependency inner -> outer -> inner
that no node order can satisfy (a topological sort reorders one graph's nodes, it never moves a
node between graphs; onnx_ir deserializes the Cast's input as a dangling value and sorts it
anywhere). ONNX's checker rejects the model ("Nodes in a graph must be topologically sorted").

The repair is structural: a main-graph Cast whose input is defined only inside a subgraph moves
into that subgraph, right after the input's producer (to a fixpoint, as Casts chain), with its
``value_info``. Casts that read outer-scope values stay where they are (valid captures).
"""

from __future__ import annotations

from collections.abc import Iterator

import onnx


def subgraphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """Every graph nested in ``graph``'s node attributes, at any depth (not ``graph`` itself)."""
    for node in graph.node:
        for attr in node.attribute:
            nested = [attr.g] if attr.HasField("g") else []
            for sub in [*nested, *attr.graphs]:
                yield sub
                yield from subgraphs(sub)


def _defined(graph: onnx.GraphProto) -> set[str]:
    """Names a graph defines itself: inputs, initializers, node outputs."""
    names = {v.name for v in graph.input} | {t.name for t in graph.initializer}
    names.update(o for n in graph.node for o in n.output if o)
    return names


def move_casts_into_subgraphs(model: onnx.ModelProto) -> int:
    """Move main-graph Casts that read a subgraph's value into that subgraph; returns how many."""
    main = model.graph
    inner = list(subgraphs(main))
    if not inner:
        return 0
    owner: dict[str, onnx.GraphProto] = {}
    for sub in inner:
        for name in _defined(sub):
            owner.setdefault(name, sub)
    moved = 0
    while True:
        main_names = _defined(main)
        movable = [i for i, n in enumerate(main.node) if n.op_type == "Cast" and n.input
                   and n.input[0] not in main_names and n.input[0] in owner]
        if not movable:
            break
        for index in reversed(movable):
            node = main.node[index]
            sub = owner[node.input[0]]
            moved_node = onnx.NodeProto()
            moved_node.CopyFrom(node)
            del main.node[index]
            _insert_after_producer(sub, moved_node)
            for out in moved_node.output:
                owner[out] = sub
            moved += 1
    if moved:
        _move_value_infos(main, owner)
    return moved


def _insert_after_producer(graph: onnx.GraphProto, node: onnx.NodeProto) -> None:
    """Insert ``node`` right after the node producing its first input (first if none does)."""
    position = 0
    for i, other in enumerate(graph.node):
        if node.input[0] in other.output:
            position = i + 1
            break
    graph.node.insert(position, node)


def _move_value_infos(main: onnx.GraphProto, owner: dict[str, onnx.GraphProto]) -> None:
    """Move the main graph's ``value_info`` for names that live in a subgraph into it."""
    main_names = _defined(main)
    keep = []
    for info in main.value_info:
        sub = owner.get(info.name)
        if sub is not None and info.name not in main_names:
            if all(v.name != info.name for v in sub.value_info):
                sub.value_info.append(info)
        else:
            keep.append(info)
    del main.value_info[:]
    main.value_info.extend(keep)
