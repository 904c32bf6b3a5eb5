"""Hand converters a graph whose every output has a producing node of its own.

ONNX allows a graph output that is a graph input, an initializer, or listed twice, but the
converters the ``fp16`` and ``quantize`` passes hand the model to do not: onnxconverter-common's
float16 converter writes a second producer for such a name (onnx_ir then refuses the model), and
ORT's quantizer reports "Graph is not a DAG". onnx_ir's ``OutputFixPass`` inserts an ``Identity``
but renames the graph input, which changes the model's interface; this keeps every name:

* an output that is a graph input, or a repeat of an earlier output, is taken off the output
  list for the conversion and put back at its place afterwards (its value cannot change);
* an initializer output gets an ``Identity`` in front, fed by a copy of the initializer under
  a new name, so the conversion cannot retype the value the output shows.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import onnx_ir as ir


@contextlib.contextmanager
def outputs_with_producers(model: ir.Model) -> Iterator[int]:
    """Within the block, every output of ``model.graph`` is produced by a node; yields how many
    outputs were set aside or aliased. The graph's contents may be replaced inside the block."""
    graph = model.graph
    set_aside: list[tuple[int, str]] = []
    seen: set[ir.Value] = set()
    for index, output in enumerate(graph.outputs):
        if output.is_graph_input() or output in seen:
            set_aside.append((index, output.name))
        seen.add(output)
    for index, _ in reversed(set_aside):
        graph.outputs.pop(index)
    aliased = _alias_initializer_outputs(graph)
    yield len(set_aside) + aliased
    graph = model.graph
    by_name = {v.name: v for v in (*graph.inputs, *graph.outputs)}
    for index, name in set_aside:
        graph.outputs.insert(index, by_name[name])


def _alias_initializer_outputs(graph: ir.Graph) -> int:
    inserted = 0
    for index, output in enumerate(list(graph.outputs)):
        if not output.is_initializer():
            continue
        # A new value over a copy of the tensor: onnx_ir names a tensor after its value and
        # wraps the caller's TensorProto, so renaming either would modify the input model.
        name = unused_name(graph, f"{output.name}_source")
        source = ir.Value(name=name, shape=output.shape, type=output.type,
                          const_value=ir.tensor(output.const_value.numpy(), name=name))
        node = ir.node("Identity", inputs=[source])
        alias = node.outputs[0]
        alias.name, alias.shape, alias.type = output.name, output.shape, output.type
        alias.doc_string = output.doc_string
        graph.outputs[index] = alias
        output.replace_all_uses_with(source)
        graph.initializers.pop(output.name)
        graph.register_initializer(source)
        graph.append(node)
        inserted += 1
    return inserted


def unused_name(graph: ir.Graph, base: str) -> str:
    taken = {v.name for v in graph.inputs} | set(graph.initializers)
    taken |= {v.name for node in graph.all_nodes() for v in node.outputs}
    name, n = base, 1
    while name in taken:
        name, n = f"{base}_{n}", n + 1
    return name
