"""Deep Compression benchmark: how small do LeNets get post-training, and at what accuracy?

Two models trained here on scikit-learn digits at 28x28 (stratified split: 55% train, 20%
validation, 25% test), each exported with onnxopt's exporter and compressed by the built-in
``deep-compression`` recipe (cleanup -> fuse -> deep-compress) with 600 training images as
calibration data and the validation split as the evaluation data its search checks the budget on
(top-1 drop <= 0.5 points). Quality is reported on the test split, which the search never sees.

* LeNet-300-100 analogue (MLP 784-300-100-10). Target: zipped file >= 40x smaller than the FP32
  file, test top-1 drop <= 0.5 points.
* LeNet-5 analogues. Target: >= 30x, drop <= 0.5 points. ``lenet-5-caffe`` is the LeNet-5 of
  the paper's Table 1 (Caffe's MNIST example: C5(20)-pool-C5(50)-pool-500-10, 431k weights,
  1,720 KB -> 44 KB, 39x, with retraining); ``lenet-5`` is LeCun's classic
  C5(6)-pool-C5(16)-pool-120-84-10 (61k weights), a much less redundant model.
* Each model is compressed twice: with the recipe's defaults (the smallest model within the
  budget) and with its size target as ``min_ratio`` (the candidate within budget that meets the
  target with the highest validation output cosine: what a user with a size limit asks for).
* Weight sharing alone (``share-weights`` with its defaults, FC 5 bits / Conv 8 bits, on the FP32
  model) must leave latency unchanged: speed-up against FP32 within 0.95-1.05, measured with
  :func:`onnxopt.benchmarking.benchmark` (interleaved blocks, one process). The deep-compressed model
  is timed too (ORT decodes its weights once, at session load).

Run: ``.venv/bin/python benchmarks/bench_compression.py [--seeds 0 1 2] [--assign gptq] [--json FILE]``
(prints Markdown; about 2 minutes per seed on 2 busy cores).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from onnxopt.passes.compress.deep_compress import compression_table

from onnxopt import digits
from onnxopt.api import optimize
from onnxopt.benchmarking import benchmark
from onnxopt.evaluation import top1_accuracy
from onnxopt.export import export
from onnxopt.stats import model_stats

CALIBRATION_SAMPLES = 600
MAX_DROP = 0.5
TARGETS = {"lenet-300-100": 40.0, "lenet-5": 30.0, "lenet-5-caffe": 30.0}


def build(name: str, data: digits.DigitsData, seed: int) -> tuple[Any, bool]:
    """The trained, exported FP32 model and whether it takes flat inputs."""
    import torch

    if name == "lenet-300-100":
        net = digits.train_torch_mlp(data, hidden=(300, 100), seed=seed)
        return export(net, (torch.from_numpy(data.test_flat[:2]),)), True
    net = digits.train_torch_lenet5(data, seed=seed, caffe=name == "lenet-5-caffe")
    return export(net, (torch.from_numpy(data.test_images[:2]),)), False


def run_model(name: str, seed: int, budget_s: float, assign: str = "nearest") -> dict[str, Any]:
    data = digits.load_digits_28(seed=seed, test_size=0.25, val_size=0.2)
    start = time.perf_counter()
    fp32, flat = build(name, data, seed)
    train_s = time.perf_counter() - start
    train = data.train_flat if flat else data.train_images
    val = data.val_flat if flat else data.val_images
    test = data.test_flat if flat else data.test_images
    calibration = [{"input": train[i:i + 100]} for i in range(0, CALIBRATION_SAMPLES, 100)]

    start = time.perf_counter()
    compressed, report = optimize(fp32, "deep-compression", calibration=calibration,
                                  evaluation=({"input": val}, data.y_val),
                                  overrides={"max_drop": MAX_DROP, "assign": assign})
    search_s = time.perf_counter() - start
    start = time.perf_counter()
    targeted, targeted_report = optimize(
        fp32, "deep-compression", calibration=calibration, evaluation=({"input": val}, data.y_val),
        overrides={"max_drop": MAX_DROP, "assign": assign, "min_ratio": TARGETS[name]})
    targeted_s = time.perf_counter() - start
    shared, share_report = optimize(fp32, ["share-weights"], calibration=calibration)

    before, after = model_stats(fp32), model_stats(compressed)
    notes = next(r.notes for r in report.passes if r.name == "deep-compress")
    result: dict[str, Any] = {
        "model": name, "seed": seed, "train_s": round(train_s, 1), "search_s": round(search_s, 1),
        "fp32_bytes": before.size_bytes, "fp32_zipped": before.zipped_bytes,
        "bytes": after.size_bytes, "zipped": after.zipped_bytes,
        "ratio_zipped": before.size_bytes / after.zipped_bytes,
        "ratio_file": before.size_bytes / after.size_bytes,
        "ratio_weights": notes["layers"][-1]["ratio"],
        "top1_fp32": top1_accuracy(fp32, test, data.y_test),
        "top1": top1_accuracy(compressed, test, data.y_test),
        "val_fp32": notes["baseline_top1"], "val": notes["final"]["top1"],
        "kept_pct": notes["kept_pct"], "bits": notes["bits"], "notes": notes,
        "shared_zipped": model_stats(shared).zipped_bytes,
        "shared_top1": top1_accuracy(shared, test, data.y_test),
        "shared_bits": {r["layer"]: r["bits"] for r in share_report.passes[-1].notes["layers"]},
    }
    result["drop"] = result["top1_fp32"] - result["top1"]
    targeted_notes = next(r.notes for r in targeted_report.passes if r.name == "deep-compress")
    result["targeted"] = {
        "search_s": round(targeted_s, 1), "zipped": model_stats(targeted).zipped_bytes,
        "top1": top1_accuracy(targeted, test, data.y_test), "val": targeted_notes["final"],
        "kept_pct": targeted_notes["kept_pct"], "bits": targeted_notes["bits"],
        "met": targeted_notes["size_target"]["met"]}
    result["targeted"]["ratio_zipped"] = before.size_bytes / result["targeted"]["zipped"]
    result["targeted"]["drop"] = result["top1_fp32"] - result["targeted"]["top1"]
    timing = benchmark([fp32, shared, compressed], threads=[1, 2],
                       feeds={"input": test[:1]}, names=["fp32", "shared", "compressed"],
                       time_budget_s=budget_s, measure_memory=False)
    for label in ("shared", "compressed"):
        for t in (1, 2):
            row = timing.row(label, t)
            result[f"{label}_speedup_{t}t"] = [row["speedup"], *row["speedup_ci95"]]
    result["fp32_p50_ms"] = {t: timing.row("fp32", t)["p50_ms"] for t in (1, 2)}
    fp32_ops = loaded_ops(fp32)
    result["same_graph_after_load"] = {
        "shared": loaded_ops(shared) == fp32_ops, "compressed": loaded_ops(compressed) == fp32_ops}
    return result


def loaded_ops(model: Any) -> list[str]:
    """The op types of the graph ONNX Runtime runs after its load-time optimizations."""
    import onnx
    import onnxruntime as ort

    from onnxopt import runner
    from onnxopt.model_io import to_proto

    with tempfile.TemporaryDirectory() as tmp:
        options = runner.session_options(threads=1, opt_level="all")
        options.optimized_model_filepath = str(Path(tmp) / "loaded.onnx")
        ort.InferenceSession(to_proto(model).SerializeToString(), options,
                             providers=["CPUExecutionProvider"])
        return [n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node]


def markdown(results: list[dict[str, Any]]) -> str:
    lines = [
        ("| model | seed | FP32 file | compressed file / zipped | zipped ratio (target) | "
         "test top-1 FP32 -> compressed (drop) | val top-1 (search) | weights kept | bits |"),
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        bits = ", ".join(str(b) for b in r["bits"].values())
        lines.append(
            f"| {r['model']} | {r['seed']} | {r['fp32_bytes']:,} B | {r['bytes']:,} / "
            f"{r['zipped']:,} B | **{r['ratio_zipped']:.1f}x** (>= {TARGETS[r['model']]:.0f}x) | "
            f"{r['top1_fp32']:.2f} -> {r['top1']:.2f} (**{r['drop']:+.2f}**) | "
            f"{r['val_fp32']:.2f} -> {r['val']:.2f} | {r['kept_pct']:.1f}% | {bits} |")
    lines += ["", "With the size target (`min_ratio` = the target ratio): of the candidates "
              "within budget that meet it, the one with the highest validation cosine:", "",
              ("| model | seed | zipped ratio (target) | test top-1 drop | val cosine / top-1 | "
               "weights kept | bits | search s |"), "|---|---:|---:|---:|---:|---:|---|---:|"]
    for r in results:
        t = r["targeted"]
        bits = ", ".join(str(b) for b in t["bits"].values())
        lines.append(
            f"| {r['model']} | {r['seed']} | **{t['ratio_zipped']:.1f}x** (>= "
            f"{TARGETS[r['model']]:.0f}x{'' if t['met'] else ', not reached'}) | "
            f"**{t['drop']:+.2f}** | {t['val']['cosine']:.4f} / {t['val']['top1']:.2f} | "
            f"{t['kept_pct']:.1f}% | {bits} | {t['search_s']:.0f} |")
    lines += ["", "Latency against FP32 (speed-up, 95% CI), same process, interleaved:", "",
              ("| model | seed | FP32 p50 1t / 2t | share-weights only 1t | 2t | deep-compressed "
               "1t | 2t | graph ORT runs = FP32's | share-weights only: zipped, test top-1 |"),
              "|---|---:|---:|---:|---:|---:|---:|---|---:|"]
    for r in results:
        cells = []
        for label in ("shared", "compressed"):
            for t in (1, 2):
                s, lo, hi = r[f"{label}_speedup_{t}t"]
                cells.append(f"{s:.2f}x ({lo:.2f}-{hi:.2f})")
        p50 = r["fp32_p50_ms"]
        same = r["same_graph_after_load"]
        lines.append(f"| {r['model']} | {r['seed']} | {p50[1] * 1000:.0f} / {p50[2] * 1000:.0f} us "
                     f"| {' | '.join(cells)} | shared {'yes' if same['shared'] else 'NO'}, "
                     f"compressed {'yes' if same['compressed'] else 'NO'} | "
                     f"{r['shared_zipped']:,} B, {r['shared_top1']:.2f} |")
    for r in results:
        if r["seed"] != results[0]["seed"]:
            continue
        lines += ["", f"Per layer, {r['model']} seed {r['seed']} (the paper's Tables 2-5):", "",
                  compression_table(r["notes"]).rstrip(), "",
                  ("| stage | file B | zipped B | ratio vs FP32 file (zipped) | val top-1 | "
                   "val cosine |"), "|---|---:|---:|---:|---:|---:|"]
        for s in r["notes"]["stages"]:
            lines.append(f"| {s['stage']} | {s['size_bytes']:,} | {s['zipped_bytes']:,} | "
                         f"{s['ratio_vs_fp32_file']:.1f}x ({s['zipped_ratio_vs_fp32_file']:.1f}x)"
                         f" | {s['top1']:.2f} | {s['cosine']:.4f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--models", nargs="+", default=list(TARGETS))
    parser.add_argument("--budget-s", type=float, default=2.0,
                        help="seconds of interleaved timing per thread count")
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    parser.add_argument("--assign", choices=["nearest", "gptq"], default="nearest",
                        help="deep-compress's code assignment")
    args = parser.parse_args(argv)
    results = []
    for seed in args.seeds:
        for name in args.models:
            results.append(run_model(name, seed, args.budget_s, args.assign))
            r = results[-1]
            t = r["targeted"]
            print(f"{name} seed {seed}: {r['ratio_zipped']:.1f}x zipped, drop {r['drop']:+.2f} "
                  f"(train {r['train_s']} s, search {r['search_s']} s); with the size target "
                  f"{t['ratio_zipped']:.1f}x, drop {t['drop']:+.2f} ({t['search_s']} s)",
                  file=sys.stderr)
    print(markdown(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
