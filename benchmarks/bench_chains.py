"""The chained recipes (``speed``, ``size``, ``arm``) on the digits CNN of issue 17.

Conv32-BN-ReLU-Pool, Conv64-BN-ReLU-Pool, FC128, FC10, trained here on scikit-learn's digits;
calibration from the training split, the passes' accuracy search on the validation split, top-1
on the held-out test split. Each chain runs as a user runs it (quantize times its candidates
against FP32 and keeps FP32 when INT8 does not pay); ``speed, INT8 taken`` is the same chain with
``quantize.measure_latency=false`` (its preferred static candidate, untimed), to show what the
composition gives when INT8 is kept. Speed-ups: every model against FP32 at 1 thread, interleaved
in blocks with settle runs in one process (``onnxopt.benchmarking``), 95% intervals.

    .venv/bin/python benchmarks/bench_chains.py [--epochs 8] [--budget 20]
"""

from __future__ import annotations

import argparse
import time

import onnx_ir as ir

import onnxopt
from onnxopt.benchmarking import benchmark
from onnxopt.digits import load_digits_28, train_torch_cnn
from onnxopt.evaluation import top1_accuracy
from onnxopt.export import export
from onnxopt.stats import model_stats

# deep-compress on a coarser grid than its defaults: the search in seconds, not minutes.
FAST_COMPRESS = {"deep-compress.keep_fractions": [0.3, 0.12, 0.06],
                 "deep-compress.bits": [5, 3], "deep-compress.candidates": 2}
CHAINS = {
    "speed": ("speed", {}),
    "speed, INT8 taken": ("speed", {"quantize.measure_latency": False}),
    "size": ("size", FAST_COMPRESS),
    "arm": ("arm", {}),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--budget", type=float, default=20.0, help="timing seconds in all")
    parser.add_argument("--max-drop", type=float, default=1.0, help="top-1 points")
    args = parser.parse_args()

    import torch

    data = load_digits_28(seed=0, test_size=0.25, val_size=0.15)
    net = train_torch_cnn(data, channels=(32, 64), fc=(128,), epochs=args.epochs)
    model = export(net, torch.from_numpy(data.train_images[:2]), input_names=["x"],
                   output_names=["logits"])
    calibration = [{"x": data.train_images[i:i + 64]} for i in range(0, 256, 64)]
    evaluation = ({"x": data.val_images}, data.y_val)
    built: dict[str, ir.Model] = {"FP32": model}
    notes: dict[str, str] = {}
    for label, (recipe, overrides) in CHAINS.items():
        start = time.perf_counter()
        out, report = onnxopt.optimize(
            model, recipe, calibration=calibration, evaluation=evaluation, threads=[1],
            overrides={**overrides, **({"max_drop": args.max_drop} if recipe != "arm" else {})})
        built[label] = out
        kept = [r.name for r in report.passes if r.modified]
        quantize = next((r for r in report.passes if r.name == "quantize"), None)
        decision = quantize.notes.get("decision", "") if quantize else ""
        notes[label] = (f"{time.perf_counter() - start:.0f} s; changed by {', '.join(kept)}"
                        + (f"; quantize: {decision[:110]}" if decision else ""))

    timing = benchmark(list(built.values()), threads=[1], names=list(built),
                       feeds={"x": data.test_images[:1]}, time_budget_s=args.budget,
                       measure_memory=False)
    speedups = {row["model"]: row for row in timing.rows}
    print("| model | MACs | zipped KiB | top-1 test % | 1-thread speed-up vs FP32 (95% CI) |")
    print("|---|---:|---:|---:|---|")
    for label, m in built.items():
        stats = model_stats(m)
        row = speedups[label]
        ci = row.get("speedup_ci95") or [row["speedup"], row["speedup"]]
        print(f"| {label} | {stats.total_macs / 1e6:.2f} M | {stats.zipped_bytes / 1024:.0f} | "
              f"{top1_accuracy(m, data.test_images, data.y_test):.2f} | "
              f"{row['speedup']:.2f}x ({ci[0]:.2f}-{ci[1]:.2f}) |")
    print()
    for label, text in notes.items():
        print(f"- {label}: {text}")


if __name__ == "__main__":
    main()
