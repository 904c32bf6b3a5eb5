"""Generated and mutated ONNX models, and a runner that feeds them to the CLI in a child process.

Shared by ``tests/test_fuzz.py`` (a small, derandomized share in ``make test``) and
``benchmarks/bench_fuzz.py`` (the long run whose figures are in ``benchmarks/RESULTS.md``).

A *case* is the bytes of a model file plus a label saying how it was made. Random graphs are valid
by construction (shapes chained layer by layer); mutations break one thing each (the issue's list:
truncated and bit-flipped bytes, wrong types, missing shapes, dangling and duplicate names,
cycles, huge declared dims, unknown ops and domains, If/Loop subgraphs, bad attributes, opsets).

The contract every case is held to (:func:`check_outcome`): the command ends with exit code 0 and
a valid output model (the ONNX checker and an ONNX Runtime session accept it), or with one line on
stderr starting with ``error:`` and exit code 2 (1 for a missed quality budget, 3 for a pass that
cannot handle the model, counted separately); never a traceback, a hang (each case has a time limit) or a dead process (each case
runs in a child, so a native crash is seen, not suffered).
"""

from __future__ import annotations

import dataclasses
import os
import random
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxopt import isolation

# Heavy imports once in the fork server (the INT8 pass's shape inference pulls in sympy and torch;
# typer builds its commands through pydantic on first use) rather than in every child. A module
# that fails to import is skipped by multiprocessing.
isolation.PRELOAD[:] = sorted({*isolation.PRELOAD, "onnxopt.api", "onnxopt.passes",
                               "onnxopt.benchmarking", "onnxruntime.tools.symbolic_shape_infer",
                               "typer._adapters", "rich._emoji_codes"})
CASE_TIMEOUT_S = 120.0
# onnxopt's limit on one inference (isolation.RUN_TIME_LIMIT_S, 600 s) lowered for the corpus,
# whose models all finish an inference in milliseconds: an endless Loop then costs seconds.
HARNESS_RUN_LIMIT_S = 3.0
# Options that keep each recipe quick on tiny models without skipping any of its passes: the INT8
# pass would otherwise time candidates for seconds per model.
FAST_SETTINGS = {
    "int8": ["--set", "quantize.measure_latency=false"],
    "speed": ["--set", "quantize.measure_latency=false"],
    "size": ["--set", "quantize.measure_latency=false"],
}
CALIBRATED_RECIPES = ("int8", "prune-channels", "deep-compression", "speed", "size")
EVALUATED_RECIPES = ("deep-compression", "size")


@dataclasses.dataclass
class Case:
    label: str
    data: bytes


# --------------------------------------------------------------------------------------------
# Valid random graphs
# --------------------------------------------------------------------------------------------


def _init(rng: np.random.Generator, name: str, shape: list[int], scale: float = 0.5) -> onnx.TensorProto:
    return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)


def random_graph(seed: int, layers: int = 4, opset: int = 17) -> onnx.ModelProto:
    """A valid float model: a chain of layers drawn from a menu, 2-D (MLP) or 4-D (CNN)."""
    rng = np.random.default_rng(seed)
    pick = random.Random(seed)
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    conv = pick.random() < 0.4
    batch: Any = pick.choice(["N", 1, 2])
    if conv:
        c, hw = pick.choice([1, 3, 4]), pick.choice([4, 6, 8])
        shape_in: list[Any] = [batch, c, hw, hw]
    else:
        c = pick.choice([3, 4, 8, 16])
        shape_in = [batch, c]
    cur, k = "x", 0

    def name(prefix: str) -> str:
        nonlocal k
        k += 1
        return f"{prefix}{k}"

    prev_same: str | None = None
    for _ in range(layers):
        if conv:
            op = pick.choice(["Conv", "ConvBN", "Relu", "Sigmoid", "Add", "MaxPool", "Mul"])
            out = name("t")
            if op in ("Conv", "ConvBN"):
                d = pick.choice([2, 4, 8])
                w = name("w")
                inits.append(_init(rng, w, [d, c, 3, 3]))
                ins = [cur, w]
                if pick.random() < 0.5:
                    b = name("b")
                    inits.append(_init(rng, b, [d]))
                    ins.append(b)
                nodes.append(helper.make_node("Conv", ins, [out], name=name("conv"), pads=[1] * 4))
                c = d
                if op == "ConvBN":
                    bn_out = name("t")
                    params = []
                    for suffix, values in (("s", rng.random(d) + 0.5), ("o", rng.standard_normal(d)),
                                           ("m", rng.standard_normal(d)), ("v", rng.random(d) + 0.5)):
                        p = name("bn" + suffix)
                        inits.append(numpy_helper.from_array(values.astype(np.float32), p))
                        params.append(p)
                    nodes.append(helper.make_node("BatchNormalization", [out, *params], [bn_out],
                                                  name=name("bn")))
                    out = bn_out
                prev_same = None
            elif op == "MaxPool":
                nodes.append(helper.make_node("MaxPool", [cur], [out], name=name("pool"),
                                              kernel_shape=[3, 3], pads=[1] * 4))
            elif op == "Add" and prev_same is not None:
                nodes.append(helper.make_node("Add", [cur, prev_same], [out], name=name("res")))
            elif op == "Mul":
                s = name("s")
                inits.append(_init(rng, s, [c, 1, 1]))
                nodes.append(helper.make_node("Mul", [cur, s], [out], name=name("mul")))
            else:
                nodes.append(helper.make_node(op if op != "Add" else "Relu", [cur], [out],
                                              name=name("act")))
            prev_same = cur if op not in ("Conv", "ConvBN") else None
            cur = out
        else:
            op = pick.choice(["MatMul", "MatMulAdd", "Gemm", "Relu", "Tanh", "Softmax",
                              "LayerNorm", "Add", "Identity"])
            out = name("t")
            if op in ("MatMul", "MatMulAdd"):
                d = pick.choice([3, 4, 8, 16])
                w = name("w")
                inits.append(_init(rng, w, [c, d]))
                nodes.append(helper.make_node("MatMul", [cur, w], [out], name=name("mm")))
                if op == "MatMulAdd":
                    b, out2 = name("b"), name("t")
                    inits.append(_init(rng, b, [d]))
                    nodes.append(helper.make_node("Add", [out, b], [out2], name=name("add")))
                    out = out2
                c, prev_same = d, None
            elif op == "Gemm":
                d = pick.choice([3, 4, 8])
                w, b = name("w"), name("b")
                inits += [_init(rng, w, [d, c]), _init(rng, b, [d])]
                nodes.append(helper.make_node("Gemm", [cur, w, b], [out], name=name("gemm"),
                                              transB=1))
                c, prev_same = d, None
            elif op == "LayerNorm":
                s, b = name("ln_s"), name("ln_b")
                inits += [_init(rng, s, [c]), _init(rng, b, [c])]
                nodes.append(helper.make_node("LayerNormalization", [cur, s, b], [out],
                                              name=name("ln"), axis=-1))
            elif op == "Add" and prev_same is not None:
                nodes.append(helper.make_node("Add", [cur, prev_same], [out], name=name("res")))
            elif op == "Softmax":
                nodes.append(helper.make_node("Softmax", [cur], [out], name=name("sm"), axis=-1))
            else:
                nodes.append(helper.make_node(op if op != "Add" else "Relu", [cur], [out],
                                              name=name("act")))
            if op not in ("MatMul", "MatMulAdd", "Gemm"):
                prev_same = cur
            cur = out
    nodes.append(helper.make_node("Identity", [cur], ["y"], name="out"))
    graph = helper.make_graph(
        nodes, f"random{seed}", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape_in)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return onnx.shape_inference.infer_shapes(model)


def if_loop_model(seed: int) -> onnx.ModelProto:
    """A valid model with an If (two branch subgraphs) and a Loop (a body subgraph)."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((4, 4)).astype(np.float32)
    then_g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["a"])], "then", [],
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [None, 4])])
    else_g = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["b"])], "else", [],
        [helper.make_tensor_value_info("b", TensorProto.FLOAT, [None, 4])])
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]),
         helper.make_node("Add", ["v_in", "one"], ["v_out"])], "body",
        [helper.make_tensor_value_info("iter", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_in", TensorProto.FLOAT, [None, 4])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_out", TensorProto.FLOAT, [None, 4])])
    nodes = [
        helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
        helper.make_node("Greater", ["s", "zero"], ["c"]),
        helper.make_node("If", ["c"], ["i"], then_branch=then_g, else_branch=else_g),
        helper.make_node("Loop", ["trips", "", "i"], ["y"], body=body),
    ]
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.float32(0), "zero"),
             numpy_helper.from_array(np.ones(1, np.float32), "one"),
             numpy_helper.from_array(np.int64(3), "trips")]
    graph = helper.make_graph(nodes, f"ifloop{seed}",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def unusual_model(seed: int) -> onnx.ModelProto:
    """Valid but unusual: each seed picks one oddity passes must survive (outputs that are
    inputs or initializers, unused initializers and outputs, float16/double inputs, other
    opsets, a weight shared by two nodes, a model with no initializers)."""
    rng = np.random.default_rng(seed)
    variant = seed % 6
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    w = numpy_helper.from_array(rng.standard_normal((4, 4)).astype(np.float32), "w")
    opset = 17
    if variant == 0:  # an output that is the input, one that is an initializer, unused weight
        nodes = [helper.make_node("MatMul", ["x", "w"], ["y"])]
        unused = numpy_helper.from_array(np.ones(3, np.float32), "unused")
        outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape)
                   for n, shape in (("y", ["N", 4]), ("x", ["N", 4]), ("w", [4, 4]))]
        graph = helper.make_graph(nodes, "odd0", [x], outputs, [w, unused])
    elif variant == 1:  # the same weight feeds two nodes; a node output nobody reads
        nodes = [helper.make_node("MatMul", ["x", "w"], ["a"]),
                 helper.make_node("MatMul", ["a", "w"], ["b"]),
                 helper.make_node("TopK", ["b", "k"], ["y", "idx"], axis=-1)]
        k = numpy_helper.from_array(np.array([2], np.int64), "k")
        graph = helper.make_graph(nodes, "odd1", [x], [helper.make_tensor_value_info(
            "y", TensorProto.FLOAT, ["N", 2])], [w, k])
    elif variant in (2, 3):  # float16 or double end to end
        dtype = (np.float16, TensorProto.FLOAT16) if variant == 2 else (np.float64, TensorProto.DOUBLE)
        wt = numpy_helper.from_array(rng.standard_normal((4, 4)).astype(dtype[0]), "w")
        nodes = [helper.make_node("MatMul", ["x", "w"], ["a"]), helper.make_node("Relu", ["a"], ["y"])]
        graph = helper.make_graph(nodes, "odd2", [helper.make_tensor_value_info(
            "x", dtype[1], ["N", 4])], [helper.make_tensor_value_info("y", dtype[1], ["N", 4])],
            [wt])
    elif variant == 4:  # another opset, a Constant node instead of an initializer
        opset = [13, 18, 21][seed % 3]
        nodes = [helper.make_node("Constant", [], ["c"], value=w),
                 helper.make_node("Gemm", ["x", "c"], ["g"]), helper.make_node("Softmax", ["g"], ["y"])]
        graph = helper.make_graph(nodes, "odd4", [x], [helper.make_tensor_value_info(
            "y", TensorProto.FLOAT, ["N", 4])])
    else:  # integer input through Gather (an embedding), no float input at all
        emb = numpy_helper.from_array(rng.standard_normal((100, 8)).astype(np.float32), "emb")
        nodes = [helper.make_node("Gather", ["emb", "ids"], ["e"]),
                 helper.make_node("ReduceMean", ["e"], ["y"], axes=[1], keepdims=0)]
        graph = helper.make_graph(nodes, "odd5", [helper.make_tensor_value_info(
            "ids", TensorProto.INT64, ["N", 5])], [helper.make_tensor_value_info(
                "y", TensorProto.FLOAT, ["N", 8])], [emb])
        opset = 17
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8 if opset < 21 else 10
    return model


# --------------------------------------------------------------------------------------------
# Mutations: each breaks one thing
# --------------------------------------------------------------------------------------------

_BAD_TYPES = [TensorProto.INT64, TensorProto.STRING, TensorProto.BOOL, TensorProto.DOUBLE,
              TensorProto.UINT8, TensorProto.FLOAT16, TensorProto.UNDEFINED, 99]


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    return m


def _m_truncate(m: onnx.ModelProto, r: random.Random) -> bytes:
    data = m.SerializeToString()
    return data[: r.randrange(0, len(data))]


def _m_bitflip(m: onnx.ModelProto, r: random.Random) -> bytes:
    data = bytearray(m.SerializeToString())
    for _ in range(r.choice([1, 2, 8, 32])):
        i = r.randrange(len(data))
        data[i] ^= 1 << r.randrange(8)
    return bytes(data)


def _m_input_type(m: onnx.ModelProto, r: random.Random) -> onnx.ModelProto:
    m.graph.input[0].type.tensor_type.elem_type = r.choice(_BAD_TYPES)
    return m


def _m_init_type(m: onnx.ModelProto, r: random.Random) -> onnx.ModelProto:
    if m.graph.initializer:
        r.choice(m.graph.initializer).data_type = r.choice(_BAD_TYPES)
    return m


def _m_no_shapes(m: onnx.ModelProto, r: random.Random) -> onnx.ModelProto:
    for vi in [*m.graph.input, *m.graph.output]:
        if r.random() < 0.5:
            vi.type.tensor_type.ClearField("shape")
        else:
            vi.ClearField("type")
    del m.graph.value_info[:]
    return m


def _m_dangling(m: onnx.ModelProto, r: random.Random) -> onnx.ModelProto:
    node = r.choice(m.graph.node)
    if node.input:
        node.input[r.randrange(len(node.input))] = "ghost"
    else:
        node.input.append("ghost")
    return m


def _m_duplicate(m: onnx.ModelProto, r: random.Random) -> onnx.ModelProto:
    choice = r.randrange(3)
    if choice == 0 and len(m.graph.node) > 1:  # two nodes produce the same tensor
        m.graph.node[0].output[0] = m.graph.node[-1].output[0]
    elif choice == 1 and m.graph.initializer:  # the same initializer twice
        m.graph.initializer.append(m.graph.initializer[0])
    else:  # a graph input shadowing an initializer / a second input of the same name
        m.graph.input.append(m.graph.input[0])
    return m


def _m_cycle(m: onnx.ModelProto, r: random.Random) -> onnx.ModelProto:
    first, last = m.graph.node[0], m.graph.node[-1]
    first.input[0] = last.output[0]
    return m


def _m_huge_dims(m: onnx.ModelProto, r: random.Random) -> onnx.ModelProto:
    choice = r.randrange(3)
    if choice == 0:
        dims = m.graph.input[0].type.tensor_type.shape.dim
        if dims:
            dims[r.randrange(len(dims))].dim_value = r.choice([2**31, 2**40, 2**62])
    elif choice == 1 and m.graph.initializer:  # declared dims far beyond the data held
        t = r.choice(m.graph.initializer)
        t.dims[:] = [2**31, 2**31][: max(1, len(t.dims))]
    else:
        dims = m.graph.input[0].type.tensor_type.shape.dim
        if dims:
            dims[r.randrange(len(dims))].dim_value = -r.choice([1, 7])
    return m


def _m_unknown_op(m: onnx.ModelProto, r: random.Random) -> onnx.ModelProto:
    node = r.choice(m.graph.node)
    if r.random() < 0.5:
        node.op_type = "NoSuchOp"
    else:
        node.domain = "com.example.evil"
        m.opset_import.append(helper.make_opsetid("com.example.evil", 1))
    return m


def _m_attribute(m: onnx.ModelProto, r: random.Random) -> onnx.ModelProto:
    node = r.choice(m.graph.node)
    choice = r.randrange(3)
    if choice == 0:
        node.attribute.append(helper.make_attribute("kernel_shape", [0, -1]))
    elif choice == 1 and node.attribute:
        node.attribute[0].type = onnx.AttributeProto.STRING
    else:
        node.attribute.append(helper.make_attribute("axis", 2**40))
    return m


def _m_opset(m: onnx.ModelProto, r: random.Random) -> onnx.ModelProto:
    choice = r.randrange(4)
    if choice == 0:
        m.opset_import[0].version = r.choice([1, 7, 99, 10**6])
    elif choice == 1:
        m.ir_version = r.choice([0, 1, 99])
    elif choice == 2:
        del m.opset_import[:]
    else:
        m.graph.output[0].name = "not_produced"
    return m


def _m_subgraph(m: onnx.ModelProto, r: random.Random) -> onnx.ModelProto:
    """Break an If/Loop model's subgraph (works on any model: it swaps in the If/Loop one)."""
    m = if_loop_model(r.randrange(100))
    choice = r.randrange(3)
    if_node = m.graph.node[2]
    branch = if_node.attribute[0].g
    if choice == 0:  # a branch with two outputs where the other has one
        branch.output.append(helper.make_tensor_value_info("extra", TensorProto.FLOAT, [1]))
    elif choice == 1:  # a branch reading a name nobody defines
        branch.node[0].input[0] = "ghost"
    else:  # Loop body without its condition output
        body = m.graph.node[3].attribute[0].g
        del body.output[0]
    return m


def _m_endless_loop(m: onnx.ModelProto, r: random.Random) -> onnx.ModelProto:
    """A valid model whose Loop runs 2**62 times: a hang unless inference is time-limited."""
    m = if_loop_model(r.randrange(100))
    for t in m.graph.initializer:
        if t.name == "trips":
            t.CopyFrom(numpy_helper.from_array(np.int64(2**62), "trips"))
    return m


def _m_empty(m: onnx.ModelProto, r: random.Random) -> onnx.ModelProto:
    del m.graph.node[:]
    if r.random() < 0.5:
        del m.graph.output[:]
    return m


MUTATIONS: dict[str, Callable[[onnx.ModelProto, random.Random], onnx.ModelProto | bytes]] = {
    "truncated": _m_truncate,
    "bit-flipped": _m_bitflip,
    "wrong-input-type": _m_input_type,
    "wrong-initializer-type": _m_init_type,
    "missing-shapes": _m_no_shapes,
    "dangling-name": _m_dangling,
    "duplicate-name": _m_duplicate,
    "cycle": _m_cycle,
    "huge-dims": _m_huge_dims,
    "unknown-op-or-domain": _m_unknown_op,
    "bad-attribute": _m_attribute,
    "opset-or-ir-version": _m_opset,
    "broken-subgraph": _m_subgraph,
    "endless-loop": _m_endless_loop,
    "empty-graph": _m_empty,
}


def make_case(kind: str, seed: int) -> Case:
    """``kind`` is ``random``, ``if-loop``, ``unusual`` or a :data:`MUTATIONS` key (applied to a
    random graph)."""
    if kind == "random":
        return Case(f"random/{seed}", random_graph(seed).SerializeToString())
    if kind == "if-loop":
        return Case(f"if-loop/{seed}", if_loop_model(seed).SerializeToString())
    if kind == "unusual":
        return Case(f"unusual/{seed}", unusual_model(seed).SerializeToString())
    base = random_graph(seed, layers=1 + seed % 4)
    mutated = MUTATIONS[kind](_copy(base), random.Random(seed))
    data = mutated if isinstance(mutated, bytes) else mutated.SerializeToString()
    return Case(f"{kind}/{seed}", data)


KINDS = ["random", "if-loop", "unusual", *MUTATIONS]


# --------------------------------------------------------------------------------------------
# Running a command on a case, in a child process
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Outcome:
    command: str
    exitcode: int | None
    stderr: str
    signal_name: str | None = None
    timed_out: bool = False
    output_problem: str | None = None  # set when exit 0 but the output model is not valid

    def describe(self) -> str:
        return (f"{self.command}: exit {self.exitcode}, signal {self.signal_name}, "
                f"timed out {self.timed_out}, output problem {self.output_problem}, "
                f"stderr {self.stderr[-2000:]!r}")


def _main_captured(argv: list[str], log: str, output: str | None) -> tuple[int, str | None]:
    """In the child: ``onnxopt.cli.main(argv)`` with stdout/stderr (fd level) sent to ``log``;
    then, on success, check the output model with the ONNX checker and an ORT session."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    isolation.RUN_TIME_LIMIT_S = HARNESS_RUN_LIMIT_S
    from onnxopt.cli import main

    code = main(argv)
    sys.stdout.flush()
    sys.stderr.flush()
    problem = None
    if code == 0 and output is not None:
        problem = validate_output(Path(output))
    return code, problem


def validate_output(path: Path) -> str | None:
    """None when ``path`` is a model the ONNX checker and ONNX Runtime both accept."""
    import onnxruntime as ort

    if not path.is_file():
        return "no output file"
    try:
        onnx.checker.check_model(str(path), full_check=True)
        ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as exc:  # any rejection is a finding, reported as text
        return f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
    return None


def run_command(argv: list[str], *, output: Path | None = None,
                timeout: float = CASE_TIMEOUT_S) -> Outcome:
    """``onnxopt <argv>`` in a child process forked from a warm server."""
    with tempfile.NamedTemporaryFile(prefix="fuzz-", suffix=".log", delete=False) as f:
        log = f.name
    try:
        result = isolation.run_in_child(_main_captured, argv, log,
                                        None if output is None else str(output), timeout=timeout)
        stderr = Path(log).read_text(errors="replace")
    finally:
        os.unlink(log)
    code, problem = result.value if result.value is not None else (result.exitcode, None)
    return Outcome(" ".join(argv[:1] + [a for a in argv[1:] if a.startswith("-")]), code,
                   stderr, result.signal_name, result.timed_out, problem)


def contract_violation(outcome: Outcome) -> str | None:
    """Why ``outcome`` breaks the contract (module docstring), or None."""
    if outcome.timed_out:
        return "hang (time limit reached)"
    if outcome.signal_name:
        return f"process killed by {outcome.signal_name}"
    lines = [line for line in outcome.stderr.splitlines() if line.strip()]
    if "Traceback" in outcome.stderr:
        return "traceback on stderr"
    if outcome.exitcode == 0:
        return outcome.output_problem
    if outcome.exitcode in (1, 2, 3):  # 3: a pass could not handle a valid model
        errors = [line for line in lines if line.startswith("error:")]
        if len(errors) != 1:
            return f"expected one 'error:' line, got {len(errors)}"
        return None
    return f"unexpected exit code {outcome.exitcode}"


def feeds_files(model_path: Path, folder: Path, samples: int = 16) -> tuple[Path, Path] | None:
    """Synthesized calibration and evaluation ``.npz`` for a model that loads (else None)."""
    from onnxopt.errors import OnnxoptError
    from onnxopt.feeds import synthesize_feeds
    from onnxopt.model_io import load_model

    try:
        model = load_model(model_path)
        calib = synthesize_feeds(model, batch=samples, seed=1)
        evaluation = synthesize_feeds(model, batch=samples, seed=2)
    except (OnnxoptError, ValueError, TypeError):
        return None
    calib_path, eval_path = folder / "calib.npz", folder / "eval.npz"
    np.savez(calib_path, **calib)
    np.savez(eval_path, **evaluation)
    return calib_path, eval_path


def optimize_argv(model: Path, out: Path, recipe: str, data: tuple[Path, Path] | None) -> list[str]:
    argv = ["optimize", str(model), "-o", str(out), "--recipe", recipe, *FAST_SETTINGS.get(recipe, [])]
    if data is not None and recipe in CALIBRATED_RECIPES:
        argv += ["--calib", str(data[0])]
    if data is not None and recipe in EVALUATED_RECIPES:
        argv += ["--eval", str(data[1])]
    return argv


def prepare_data(model_path: Path, folder: Path) -> tuple[Path, Path] | None:
    """:func:`feeds_files` in a child process (loading a hostile model must not hurt the caller)."""
    result = isolation.run_in_child(feeds_files, model_path, folder, timeout=CASE_TIMEOUT_S)
    return result.value
