"""``onnxopt demo``: train two digit classifiers, export, optimize and measure them, write a report.

The two models of the original design, a PyTorch MLP 784-128-64-10 and a Keras MLP 784-256-128-10
(ReLU), are trained on scikit-learn's digits at 28x28, exported with :func:`onnxopt.export.export`
and run through the ``default`` recipe, whatever passes it holds today, and through ``int8`` when
a pass module has registered it. Accuracy is measured on the held-out test split, latency with
:func:`onnxopt.benchmarking.benchmark` (interleaved, batch 1, 1 and 2 threads). ``out_dir`` receives
``report.md``, ``report.json``, ``report.html`` (the page ``onnxopt report`` renders, when
matplotlib is installed) and every ONNX file, each written atomically.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxopt import runner
from onnxopt.api import optimize
from onnxopt.benchmarking import BenchmarkResult, benchmark
from onnxopt.digits import DigitsData, load_digits_28, train_keras_mlp, train_torch_mlp
from onnxopt.errors import InputError
from onnxopt.evaluation import fidelity, predict, top1_accuracy
from onnxopt.export import ExportCheck, export
from onnxopt.feeds import Feeds, input_specs
from onnxopt.model_io import save_model, write_bytes_atomic
from onnxopt.pipeline import OptimizationReport, jsonable
from onnxopt.report import write_report
from onnxopt.recipes import builtin_recipes
from onnxopt.stats import model_stats

SCHEMA_VERSION = 1
SEED = 0
VALIDATION_SIZE = 0.1  # of all samples, taken from the training part: passes may search on it
CALIBRATION_SAMPLES = 256
CALIBRATION_BATCH = 32
THREADS = (1, 2)
OPTIONAL_RECIPES = ("int8",)  # run when a pass module registers them

Progress = Callable[[str], None]


@dataclasses.dataclass(frozen=True)
class _Classifier:
    """One model of the demo: how to train it (full and quick) and how to export it."""

    key: str
    title: str
    framework: str
    epochs: int
    quick_epochs: int
    train: Callable[[DigitsData, int], Any]
    example: Callable[[DigitsData], Any]


def _torch_example(data: DigitsData) -> Any:
    import torch

    return (torch.from_numpy(data.train_flat[:4]),)


CLASSIFIERS = (
    _Classifier("torch_mlp", "PyTorch MLP 784-128-64-10", "pytorch", 30, 10,
                lambda data, epochs: train_torch_mlp(data, (128, 64), epochs=epochs, seed=SEED),
                _torch_example),
    _Classifier("keras_mlp", "Keras MLP 784-256-128-10", "keras", 20, 8,
                lambda data, epochs: train_keras_mlp(data, (256, 128), epochs=epochs, seed=SEED),
                lambda data: data.train_flat[:4]),
)


def run_demo(out_dir: Path, *, progress: Progress | None = None, quick: bool = False
             ) -> dict[str, Any]:
    """Run the whole demo; write ``report.md``, ``report.json``, ``report.html`` and the models.

    ``quick`` trains for fewer epochs and benchmarks for less time; the code path is the same.
    Returns the report (what ``report.json`` holds).
    """
    out_dir = Path(out_dir)
    say = progress or (lambda message: None)
    start = time.perf_counter()
    say("loading digits")
    data = load_digits_28(seed=SEED, val_size=VALIDATION_SIZE)
    recipes = recipes_to_run()
    models = {c.key: _run_classifier(c, data, recipes, out_dir, quick, say) for c in CLASSIFIERS}
    report = {
        "schema_version": SCHEMA_VERSION,
        "quick": quick,
        "seconds": round(time.perf_counter() - start, 1),
        "data": {
            "source": "sklearn.datasets.load_digits, 8x8 upsampled bilinearly to 28x28, [0, 1]",
            "split": "stratified", "seed": SEED, "train": len(data.y_train),
            "validation": len(data.y_val), "test": len(data.y_test),
            "calibration_samples": min(CALIBRATION_SAMPLES, len(data.y_train)),
        },
        "recipes": {name: builtin_recipes()[name] for name in recipes},
        "models": models,
        "machine": runner.machine_info(),
        "versions": _versions(),
    }
    report = jsonable(report)
    write_bytes_atomic(json.dumps(report, indent=2).encode(), out_dir / "report.json")
    write_bytes_atomic(render_markdown(report).encode(), out_dir / "report.md")
    try:
        write_report(report, out_dir / "report.html")
    except InputError as exc:  # matplotlib missing: the Markdown and JSON still stand
        say(f"no report.html: {exc}")
    say(f"done in {report['seconds']:.0f} s")
    return report


def recipes_to_run() -> list[str]:
    """``default``, plus every optional recipe a pass module has registered."""
    available = builtin_recipes()
    return ["default"] + [name for name in OPTIONAL_RECIPES if name in available]


def _run_classifier(spec: _Classifier, data: DigitsData, recipes: list[str], out_dir: Path,
                    quick: bool, say: Progress) -> dict[str, Any]:
    """Train, export, optimize with each recipe, evaluate and benchmark one classifier."""
    epochs = spec.quick_epochs if quick else spec.epochs
    say(f"{spec.title}: training {epochs} epochs")
    t0 = time.perf_counter()
    net = spec.train(data, epochs)
    say(f"{spec.title}: exporting")
    t1 = time.perf_counter()
    fp32 = export(net, spec.example(data))
    t2 = time.perf_counter()
    check = ExportCheck.from_model(fp32)
    name = input_specs(fp32)[0][0]
    variants = {"fp32": _variant(fp32, None, out_dir / f"{spec.key}.fp32.onnx", data, name, None)}
    for recipe in recipes:
        def on_pass(index: int, pass_name: str, recipe: str = recipe) -> None:
            say(f"{spec.title}: recipe {recipe}, pass {index + 1} ({pass_name})")

        optimized, opt_report = _optimize(fp32, recipe, data, name, on_pass)
        path = out_dir / f"{spec.key}.{recipe}.onnx"
        variants[recipe] = _variant(optimized, opt_report, path, data, name, fp32)
    say(f"{spec.title}: benchmarking")
    bench = benchmark(
        [out_dir / v["file"] for v in variants.values()], names=list(variants), threads=THREADS,
        feeds={name: data.test_flat[:1]}, time_budget_s=0.5 if quick else 3.0,
        progress=lambda f, d: say(f"{spec.title}: benchmark {f:.0%} {d}"),
    )
    for key, variant in variants.items():
        variant["latency"] = _latency(bench, key)
    return {
        "title": spec.title, "framework": spec.framework, "epochs": epochs,
        "train_seconds": round(t1 - t0, 2), "export_seconds": round(t2 - t1, 2),
        "export_check": dataclasses.asdict(check) if check else None,
        "export_summary": check.summary() if check else "not verified",
        "input": name, "variants": variants, "benchmark": bench.to_dict(),
        "benchmark_markdown": bench.to_markdown(),
    }


def _optimize(model: ir.Model, recipe: str, data: DigitsData, name: str,
              on_pass: Callable[[int, str], None]) -> tuple[ir.Model, OptimizationReport]:
    """Calibrate on training samples; verify on, and let accuracy-aware passes search on, the
    validation split (the test split stays unseen until the accuracy is measured)."""
    calibration = _batches({name: data.train_flat[:CALIBRATION_SAMPLES]}, CALIBRATION_BATCH)
    validation: Feeds = {name: data.val_flat}
    return optimize(model, recipe, calibration=calibration, evaluation=(validation, data.y_val),
                    verify_feeds=[validation], seed=SEED, progress=on_pass)


def _batches(feeds: Feeds, size: int) -> list[Feeds]:
    n = len(next(iter(feeds.values())))
    return [{k: v[i:i + size] for k, v in feeds.items()} for i in range(0, n, size)]


def _variant(model: ir.Model, opt_report: OptimizationReport | None, path: Path,
             data: DigitsData, name: str, reference: ir.Model | None) -> dict[str, Any]:
    """Save one model and measure it: file size, statistics, accuracy, fidelity to FP32."""
    save_model(model, path)
    stats = model_stats(model)
    record: dict[str, Any] = {
        "file": path.name,
        "file_bytes": path.stat().st_size,
        "params": stats.params,
        "zipped_bytes": stats.zipped_bytes,
        "total_macs": stats.total_macs,
        "nodes": stats.nodes,
        "op_histogram": stats.op_histogram,
        "top1": top1_accuracy(model, data.test_flat, data.y_test),
    }
    if reference is not None:
        record["fidelity_vs_fp32"] = fidelity(reference, model, {name: data.test_flat})
        record["test_predictions_agreeing_with_fp32"] = _agreement(reference, model, data.test_flat)
    if opt_report is not None:
        record["optimization"] = opt_report.to_dict()
        record["waterfall_markdown"] = opt_report.to_markdown()
    return record


def _agreement(reference: ir.Model, model: ir.Model, x: np.ndarray) -> float:
    """Percent of test samples whose top-1 class is the same in both models."""
    return float(100.0 * np.mean(predict(reference, x).argmax(-1) == predict(model, x).argmax(-1)))


def _latency(bench: BenchmarkResult, model: str) -> dict[str, dict[str, Any]]:
    """p50 and speed-up against FP32 per thread count."""
    result = {}
    for t in THREADS:
        row = bench.row(model, t)
        result[str(t)] = {"p50_ms": row["p50_ms"], "speedup": row["speedup"],
                          "speedup_ci95": row["speedup_ci95"]}
    return result


def _versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for dist in ("onnxopt", "onnx", "onnxruntime", "onnx-ir", "onnxscript", "torch",
                 "tensorflow-cpu", "keras", "tf2onnx", "scikit-learn"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    return versions


# ----------------------------------------------------------------------------------------------
# Markdown


def render_markdown(report: dict[str, Any]) -> str:
    """The human summary: one table over every model and variant, then details per model."""
    data = report["data"]
    lines = [
        "# onnxopt demo: two digit classifiers, exported, optimized, measured",
        "",
        f"Data: {data['source']}; stratified split (seed {data['seed']}): {data['train']} train, "
        f"{data['validation']} validation, {data['test']} test. Calibration: "
        f"{data['calibration_samples']} training samples. Recipes: "
        + "; ".join(f"`{name}` = {_steps(steps)}" for name, steps in report["recipes"].items())
        + ".",
        "",
        "## Summary",
        "",
        summary_table(report),
        "Accuracy: top-1 on the test split through ONNX Runtime. Latency: batch 1, p50, "
        "interleaved in one process; speed-up = FP32 p50 / p50 with its 95% bootstrap interval (on a busy "
        "machine, even identical models can differ by tens of percent at these microsecond "
        "scales: trust the interval).",
        "",
    ]
    for model in report["models"].values():
        lines += [
            f"## {model['title']}",
            "",
            f"Trained {model['epochs']} epochs in {model['train_seconds']:.1f} s; exported in "
            f"{model['export_seconds']:.1f} s. Export check: {model['export_summary']}.",
            "",
        ]
        for key, variant in model["variants"].items():
            if "waterfall_markdown" in variant:
                agree = variant["test_predictions_agreeing_with_fp32"]
                lines += [variant["waterfall_markdown"],
                          f"Top-1 agreement with FP32 on the test split: {agree:.1f}%.", ""]
        lines += ["### Latency", "", model["benchmark_markdown"]]
    versions = ", ".join(f"{k} {v}" for k, v in report["versions"].items() if v)
    machine = report["machine"]
    lines += [f"Machine: {machine.get('cpu_model')} ({machine.get('arch')}); {versions}. "
              f"Total demo time {report['seconds']:.0f} s.", ""]
    return "\n".join(lines)


def summary_table(report: dict[str, Any]) -> str:
    """Accuracy, size, parameters, MACs and latency of every model and variant."""
    head = ("| model | variant | top-1 % | Δ pt | file KiB | params | MACs | "
            + " | ".join(f"p50 {t}T ms | speed-up {t}T" for t in THREADS) + " |")
    rows = [head, "|---|---|---:|---:|---:|---:|---:|" + "---:|---:|" * len(THREADS)]
    for model in report["models"].values():
        base = model["variants"]["fp32"]
        for key, v in model["variants"].items():
            latency = " | ".join(_latency_cells(v["latency"][str(t)]) for t in THREADS)
            rows.append(
                f"| {model['title']} | {key} | {v['top1']:.2f} | {v['top1'] - base['top1']:+.2f} "
                f"| {v['file_bytes'] / 1024:.1f} | {v['params']:,} | {v['total_macs']:,} "
                f"| {latency} |")
    return "\n".join(rows) + "\n"


def _latency_cells(latency: dict[str, Any]) -> str:
    lo, hi = latency["speedup_ci95"]
    return f"{latency['p50_ms']:.4f} | {latency['speedup']:.2f}x ({lo:.2f}-{hi:.2f})"


def _steps(steps: list[Any]) -> str:
    names = [s if isinstance(s, str) else s.get("pass", "?") for s in steps]
    return " → ".join(names)
