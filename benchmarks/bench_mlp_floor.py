"""Where a digits MLP's INT8 time goes: why 1.75x over FP32 at 2 threads is out of reach here.

The issue-3 MLPs (784-256-128-10) run in about 13 µs in FP32. This times, interleaved in one
process at 1 and 2 threads (:func:`onnxopt.benchmarking.benchmark`, ORT optimizations "all"):

* ``fp32`` (the reference) and ``int8``, the ``int8`` recipe's model;
* ``empty``: an Identity on the same input, the floor every ``session.run`` pays;
* ``int8 cut after N``: the INT8 graph as ONNX Runtime runs it (its optimized graph:
  QuantizeLinear, then one QGemm per layer) cut after its N-th node, so a node's cost is the
  difference of two p50s;
* the other INT8 forms ONNX Runtime offers for such a model: ``ort-dynamic`` (``quantize_dynamic``:
  DynamicQuantizeMatMul) and, for a model written with MatMul, ``matmul-nbits-8`` (MatMulNBits,
  8-bit weights, int8 compute via ``accuracy_level`` 4: the GEMV kernels written for M=1).

Run: ``.venv/bin/python benchmarks/bench_mlp_floor.py [--models torch-mlp,keras-mlp]
[--budget 8]`` (about 2 minutes).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import sys
import tempfile
from pathlib import Path
from typing import Any

import onnx
import onnxruntime as ort
from onnx import helper

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_int8.py, models.py

import bench_int8  # noqa: E402

import onnxopt  # noqa: E402
from onnxopt.benchmarking import benchmark  # noqa: E402


def as_runtime_runs_it(path: Path, out: Path) -> onnx.ModelProto:
    """The model after ORT's fusions (QDQ pairs into QGemm), as a portable file ("extended":
    no hardware-specific layouts)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(out)
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return onnx.load(out)


def cut_after(model: onnx.ModelProto, count: int) -> onnx.ModelProto:
    """The graph's first ``count`` nodes, with the last one's output as the graph output."""
    cut = onnx.ModelProto()
    cut.CopyFrom(model)
    del cut.graph.node[count:]
    last = cut.graph.node[-1]
    del cut.graph.output[:]
    cut.graph.output.append(helper.make_tensor_value_info(last.output[0], _output_type(cut, last),
                                                          [None, None]))  # [batch, features]
    used = {name for node in cut.graph.node for name in node.input}
    kept = [init for init in cut.graph.initializer if init.name in used]
    del cut.graph.initializer[:]
    cut.graph.initializer.extend(kept)
    return cut


def _output_type(model: onnx.ModelProto, node: onnx.NodeProto) -> int:
    """A quantizing node (QuantizeLinear, QGemm with an output scale) outputs its zero point's
    type; the rest of these graphs output float."""
    zero_point = {"QuantizeLinear": 2, "QGemm": 8}.get(node.op_type)
    if zero_point is None or len(node.input) <= zero_point:
        return onnx.TensorProto.FLOAT
    return next(init.data_type for init in model.graph.initializer
                if init.name == node.input[zero_point])


def empty_like(model: onnx.ModelProto) -> onnx.ModelProto:
    source = model.graph.input[0]
    output = onnx.ValueInfoProto(name="y", type=source.type)
    graph = helper.make_graph([helper.make_node("Identity", [source.name], ["y"])], "empty",
                              [source], [output])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def matmul_nbits(model: onnx.ModelProto) -> onnx.ModelProto | None:
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer)

    if not any(node.op_type == "MatMul" for node in model.graph.node):
        return None  # the quantizer rewrites MatMul only (the PyTorch export writes Gemm)
    config = DefaultWeightOnlyQuantConfig(block_size=128, is_symmetric=True, accuracy_level=4,
                                          bits=8)
    quantizer = MatMulNBitsQuantizer(model, algo_config=config)
    quantizer.process()
    return quantizer.model.model


def variants(name: str, work: Path) -> tuple[dict[str, Path], dict[str, Any]]:
    """The models to time, and one held-out input to time them on."""
    case = bench_int8.CASES[name]()
    fp32, int8 = work / f"{name}-fp32.onnx", work / f"{name}-int8.onnx"
    onnxopt.save(case.model, fp32)
    bench_int8.onnxopt_recipe(case, ["int8"], int8)
    paths = {"fp32": fp32, "empty": work / f"{name}-empty.onnx"}
    fp32_proto = onnx.load(fp32)
    onnx.save(empty_like(fp32_proto), paths["empty"])
    runs = as_runtime_runs_it(int8, work / f"{name}-int8-ort.onnx")
    for count in range(1, len(runs.graph.node)):
        label = f"int8 cut after {count} ({runs.graph.node[count - 1].op_type})"
        paths[label] = work / f"{name}-cut{count}.onnx"
        onnx.save(cut_after(runs, count), paths[label])
    paths["int8"] = int8
    with contextlib.redirect_stdout(io.StringIO()):
        paths["ort-dynamic"] = bench_int8.ort_dynamic(fp32, work / f"{name}-dynamic.onnx")
        nbits = matmul_nbits(fp32_proto)
    if nbits is not None:
        paths["matmul-nbits-8"] = work / f"{name}-nbits8.onnx"
        onnx.save(nbits, paths["matmul-nbits-8"])
    return paths, {k: v[:1] for k, v in case.evaluation.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="torch-mlp,keras-mlp")
    parser.add_argument("--budget", type=float, default=8.0,
                        help="seconds of interleaved rounds per thread count")
    args = parser.parse_args(argv)
    logging.getLogger().setLevel(logging.ERROR)
    for name in args.models.split(","):
        with tempfile.TemporaryDirectory(prefix="bench-mlp-floor-") as tmp:
            paths, feeds = variants(name, Path(tmp))
            result = benchmark(list(paths.values()), names=list(paths), threads=[1, 2],
                               feeds=feeds, time_budget_s=args.budget, measure_memory=False)
        print(f"\n{name}: p50 in µs (speed-up over fp32)\n")
        print("| variant | 1 thread | 2 threads |\n|---|---|---|")
        for label in paths:
            cells = [f"{1000 * result.row(label, t)['p50_ms']:.2f} "
                     f"({result.row(label, t)['speedup']:.2f}x)" for t in (1, 2)]
            print(f"| {label} | {cells[0]} | {cells[1]} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
