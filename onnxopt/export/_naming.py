"""Input/output names and the batch axis of an exported graph.

Exporters name graph inputs and outputs after framework internals (``args_0``, ``Identity:0``,
``onnx::Gemm_7``) and symbolic dims after solver variables (``s77``, ``unk__6``). Downstream tools
and users address inputs by name, so every exporter's result goes through :func:`apply_names`.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import onnx_ir as ir

from onnxopt.errors import InputError

BATCH_DIM = "batch"


def default_names(prefix: str, count: int) -> list[str]:
    """``input`` for a single input, ``input_0``, ``input_1``... for several."""
    return [prefix] if count == 1 else [f"{prefix}_{i}" for i in range(count)]


def check_names(names: Sequence[str] | None, count: int, what: str) -> list[str] | None:
    """Validate user-given names against the number of graph inputs or outputs."""
    if names is None:
        return None
    names = [str(n) for n in names]
    if len(names) != count:
        raise InputError(
            f"got {len(names)} {what} name(s) {names} for a model with {count} {what}(s)"
        )
    if len(set(names)) != len(names) or any(not n for n in names):
        raise InputError(f"{what} names must be unique and non-empty, got {names}")
    return names


def apply_names(
    model: ir.Model,
    input_names: Sequence[str] | None,
    output_names: Sequence[str] | None,
    *,
    defaults: bool = True,
) -> None:
    """Rename graph inputs and outputs to the given names.

    A side without names gets ``input``/``output`` defaults, or keeps its names when
    ``defaults=False`` (ONNX files, whose names are already chosen).
    """
    graph = model.graph
    real_inputs = [v for v in graph.inputs if v.name not in graph.initializers]
    wanted_in = check_names(input_names, len(real_inputs), "input")
    wanted_out = check_names(output_names, len(graph.outputs), "output")
    if defaults:
        wanted_in = wanted_in or default_names("input", len(real_inputs))
        wanted_out = wanted_out or default_names("output", len(graph.outputs))
    targets = list(zip(real_inputs, wanted_in or [])) + list(zip(graph.outputs, wanted_out or []))
    # A value that is both an input and an output cannot carry two names: the input's name wins.
    seen: set[int] = set()
    unique = []
    for value, name in targets:
        if id(value) not in seen:
            seen.add(id(value))
            unique.append((value, name))
    _rename_all(graph, unique)


def name_batch_axis(model: ir.Model, outputs: Collection[str] = (), name: str = BATCH_DIM) -> bool:
    """Name axis 0 of every input ``batch``, and of the outputs whose axis 0 is that same dim.

    Exporters name the batch after solver variables (``s77``, ``unk__6``). An output's axis 0 is
    the batch when it carries an input's batch symbol (the dynamo exporter shares symbols) or when
    ``outputs`` lists it (verification saw it follow the batch size; tf2onnx gives every unknown
    dim its own name). Returns False, changing nothing, if some input's axis 0 is fixed.
    """
    graph = model.graph
    inputs = [v for v in graph.inputs if v.name not in graph.initializers]
    if not inputs or not all(_dynamic_first_dim(v) for v in inputs):
        return False
    symbols = {v.shape[0].value for v in inputs} - {None}
    followers = [
        v
        for v in graph.outputs
        if _dynamic_first_dim(v) and (v.shape[0].value in symbols or v.name in outputs)
    ]
    for value in inputs + followers:
        value.shape = ir.Shape([name, *list(value.shape)[1:]])
    return True


def _dynamic_first_dim(value: ir.Value) -> bool:
    shape = value.shape
    return shape is not None and len(shape) > 0 and not isinstance(shape[0], int)


def _rename_all(graph: ir.Graph, targets: list[tuple[ir.Value, str]]) -> None:
    """Rename values, first moving aside any other value that already holds a wanted name."""
    wanted = {name for _, name in targets}
    renamed = {id(v) for v, _ in targets}
    taken = {v.name for v in _all_values(graph) if v.name}
    for value in _all_values(graph):
        if id(value) not in renamed and value.name in wanted:
            value.name = _fresh(f"{value.name}_inner", taken | wanted)
            taken.add(value.name)
    # Two passes through temporary names, so swaps (a->b, b->a) cannot collide.
    for i, (value, _) in enumerate(targets):
        value.name = _fresh(f"__onnxopt_tmp_{i}", taken | wanted)
    for value, name in targets:
        value.name = name


def _all_values(graph: ir.Graph) -> list[ir.Value]:
    """Every named value, subgraphs (If/Loop bodies) included: ONNX names are model-wide."""
    values: list[ir.Value] = list(graph.inputs) + list(graph.initializers.values())
    for node in ir.traversal.RecursiveGraphIterator(graph):
        values.extend(node.outputs)
        for attr in node.attributes.values():
            if attr.type == ir.AttributeType.GRAPH:
                values.extend(attr.value.inputs)
            elif attr.type == ir.AttributeType.GRAPHS:
                values.extend(v for g in attr.value for v in g.inputs)
    return list({id(v): v for v in values}.values())


def _fresh(base: str, taken: set[str]) -> str:
    name, i = base, 0
    while name in taken:
        i += 1
        name = f"{base}_{i}"
    return name
