"""ONNX Runtime's residual LayerNorm kernels, timed alone: why ``fuse-transformer`` splits them.

One residual LayerNorm of a BERT block, ``LayerNormalization(x + skip + bias)`` over [1, rows,
hidden], written three ways:

* ``skip-layer-norm``: com.microsoft ``SkipLayerNormalization`` (what ``fuse-transformer``'s
  fusions and ORT's own optimizer write);
* ``add-layer-norm``: ``Add``, ``Add``, ``LayerNormalization``, which ORT fuses into
  ``SkipLayerNormalization`` when it loads the model (the "graph ORT runs" column says);
* ``split``: the same after :func:`onnxopt.passes.fusion._layer_norms.split_layer_norm_rules`
  (``Add(x, bias)``, ``Sum`` with ``skip``, ``LayerNormalization``), which ORT leaves alone.

Timed with :func:`onnxopt.benchmarking.benchmark` (interleaved, one process), ORT optimizations
"all". Run: ``.venv/bin/python benchmarks/bench_layer_norm.py [--hidden 256 384 768 1024]
[--rows 128] [--budget 2]`` (about a minute).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnx import TensorProto, helper

from onnxopt import runner
from onnxopt.benchmarking import benchmark
from onnxopt.passes.fusion._layer_norms import split_layer_norm_rules

VARIANTS = ("skip-layer-norm", "add-layer-norm", "split")


def residual_layer_norm(variant: str, rows: int, hidden: int) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    weights = [onnx.numpy_helper.from_array(rng.standard_normal(hidden).astype(np.float32), n)
               for n in ("gamma", "beta", "bias")]
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, rows, hidden])
              for n in ("x", "skip")]
    if variant == "skip-layer-norm":
        nodes = [helper.make_node("SkipLayerNormalization", ["x", "skip", "gamma", "beta", "bias"],
                                  ["y"], domain="com.microsoft", epsilon=1e-12)]
    else:
        nodes = [helper.make_node("Add", ["x", "bias"], ["biased"]),
                 helper.make_node("Add", ["biased", "skip"], ["summed"]),
                 helper.make_node("LayerNormalization", ["summed", "gamma", "beta"], ["y"],
                                  axis=-1, epsilon=1e-12)]
    graph = helper.make_graph(nodes, variant, inputs,
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    if variant == "split":
        ir_model = ir.serde.deserialize_model(onnx.shape_inference.infer_shapes(model))
        if not split_layer_norm_rules().apply_to_model(ir_model):
            raise RuntimeError("the split rule did not match")
        model = ir.serde.serialize_model(ir_model)
    return model


def loaded_ops(model: onnx.ModelProto) -> list[str]:
    """The op types of the graph ONNX Runtime runs after its load-time optimizations."""
    with tempfile.TemporaryDirectory() as tmp:
        options = runner.session_options(threads=1, opt_level="all")
        options.optimized_model_filepath = str(Path(tmp) / "loaded.onnx")
        ort.InferenceSession(model.SerializeToString(), options,
                             providers=["CPUExecutionProvider"])
        ops = [n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node]
    return [op for op in ops if op not in ("Shape", "Constant")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, nargs="+", default=[256, 384, 768, 1024])
    parser.add_argument("--rows", type=int, default=128)
    parser.add_argument("--budget", type=float, default=2.0,
                        help="seconds of interleaved timing per thread count")
    args = parser.parse_args(argv)
    print("| hidden | form | graph ORT runs | p50 µs 1 thread | p50 µs 2 threads | "
          "speed-up over skip-layer-norm 1t / 2t |")
    print("|---:|---|---|---:|---:|---|")
    rng = np.random.default_rng(1)
    for hidden in args.hidden:
        models = [residual_layer_norm(v, args.rows, hidden) for v in VARIANTS]
        feeds = {n: rng.standard_normal((1, args.rows, hidden)).astype(np.float32)
                 for n in ("x", "skip")}
        result = benchmark(models, threads=[1, 2], feeds=feeds, names=list(VARIANTS),
                           time_budget_s=args.budget, measure_memory=False)
        for variant, model in zip(VARIANTS, models):
            one, two = result.row(variant, 1), result.row(variant, 2)
            print(f"| {hidden} | {variant} | {', '.join(loaded_ops(model))} | "
                  f"{one['p50_ms'] * 1000:.1f} | {two['p50_ms'] * 1000:.1f} | "
                  f"{one['speedup']:.2f}x / {two['speedup']:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
