"""What fusion buys in ONNX Runtime: MiniLM-L6 (seq 128) and light ResNet50, at 1 and 2 threads.

Models compared per architecture, interleaved in one process by ``onnxopt.benchmarking``:

* ``exported``: the model as exported/loaded (ORT applies its own fusions at load, level "all");
* ``fuse``: after the portable ``cleanup`` + ``fuse`` recipe;
* ``fuse-transformer`` (MiniLM only): after the ``transformer`` recipe (ORT contrib ops);
* ``ort-optimizer`` (MiniLM only): the peer a user tries first, ORT's
  ``onnxruntime.transformers.optimizer.optimize_model(model_type="bert")``.

Speed-ups are p50(exported) / p50(model). The passes run directly (no pipeline verification:
the tests check numerics); the script prints fidelity against the exported model anyway.

    .venv/bin/python benchmarks/bench_fusion.py [--budget 20] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx_ir as ir

from onnxopt import runner
from onnxopt.benchmarking import benchmark
from onnxopt.feeds import synthesize_feeds
from onnxopt.metrics import compare
from onnxopt.passes.cleanup import CleanupPass
from onnxopt.passes.fusion.fuse import FusePass
from onnxopt.passes.fusion.fuse_transformer import FuseTransformerPass
from onnxopt.registry import PassContext
from onnxopt.zoo import light_model, minilm


def _apply(model: ir.Model, passes: list[type],
           feeds: dict[str, np.ndarray] | None = None) -> ir.Model:
    """``passes`` on a copy; ``feeds``: sample inputs for passes that time what they write."""
    copy = model.clone()
    for cls in passes:
        cls(context=PassContext(verify_feeds=[feeds] if feeds else []))(copy)
    return copy


def _outputs(model: ir.Model, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    session = runner.reference_session(ir.serde.serialize_model(model).SerializeToString())
    return runner.run(session, feeds)


def _ort_transformers_optimizer(model: ir.Model) -> ir.Model:
    from onnxruntime.transformers.optimizer import optimize_model

    with tempfile.TemporaryDirectory(prefix="bench-fusion-") as tmp:
        path = Path(tmp) / "model.onnx"
        ir.save(model, path)
        optimized = optimize_model(str(path), model_type="bert", num_heads=12, hidden_size=384)
        return ir.serde.deserialize_model(optimized.model)


def _variants(name: str) -> tuple[list[ir.Model], list[str], dict[str, np.ndarray]]:
    if name == "minilm":
        model, feeds, _ = minilm(seq_len=128, batch=1)
        fused = _apply(model, [CleanupPass, FusePass])
        return ([model, fused, _apply(fused, [FuseTransformerPass], feeds),
                 _ort_transformers_optimizer(model)],
                ["exported", "fuse", "fuse-transformer", "ort-optimizer"], feeds)
    model = light_model(name)
    return [model, _apply(model, [CleanupPass, FusePass])], ["exported", "fuse"], \
        synthesize_feeds(model, seed=0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["minilm", "resnet50"])
    parser.add_argument("--budget", type=float, default=20.0,
                        help="seconds of interleaved rounds per thread count and model set")
    parser.add_argument("--json", type=Path, help="write every result as JSON here")
    args = parser.parse_args(argv)
    results = {}
    for name in args.models:
        models, names, feeds = _variants(name)
        reference = _outputs(models[0], feeds)
        for label, model in zip(names[1:], models[1:], strict=True):
            out = _outputs(model, feeds)
            worst = min(compare(reference[k], out[k])["cosine"] for k in reference)
            contrib = sum(1 for n in model.graph if n.domain == "com.microsoft")
            print(f"{name} {label}: {len(list(model.graph))} nodes, {contrib} contrib ops "
                  f"(exported {len(list(models[0].graph))}), cosine vs exported {worst:.9f}")
        result = benchmark(models, threads=(1, 2), feeds=feeds, names=names,
                           time_budget_s=args.budget, measure_memory=False)
        print(f"\n### {name}\n\n{result.to_markdown()}")
        results[name] = result.to_dict()
        sys.stdout.flush()
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
