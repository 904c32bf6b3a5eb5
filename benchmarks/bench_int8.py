"""INT8: onnxopt's ``int8`` recipe against ONNX Runtime FP32 and ORT's own quantizers.

For each model of issue 3 (digits MLPs from PyTorch and Keras, the digits CNN, MiniLM-L6 at
sequence length 128, the ResNet50 architecture from the onnx wheel's light zoo) this builds the
FP32 model, then the candidates a user would try first and onnxopt's:

* ``ort-dynamic``: ``quantize_dynamic`` with its defaults (for MiniLM also per-channel);
* ``ort-static``: ``quant_pre_process`` then ``quantize_static`` with its defaults (QDQ, MinMax,
  signed activations), calibrated on the same samples as onnxopt;
* ``onnxopt-int8``: ``onnxopt.optimize(model, "int8", calibration=..., evaluation=...)`` with
  the model's accuracy budget (``--max-drop`` semantics); for MiniLM also
  ``onnxopt-int8-without-fuse-transformer`` (what ``fuse-transformer``, and with it QAttention,
  buys inside the recipe).

All candidates and the FP32 model run interleaved in one process (:func:`onnxopt.benchmarking.
benchmark`: blocks of runs, untimed settle runs after each switch) at 1 and 2 threads, batch 1.
Quality is measured on held-out data: top-1 (digits) and the mean per-sample cosine against FP32
(and, for MiniLM, against PyTorch). MiniLM's inputs are real sentences (the first paragraphs
of standard-library docstrings, :func:`onnxopt.zoo.minilm_sentences`), split into disjoint
calibration, tuning and held-out sets.

    .venv/bin/python benchmarks/bench_int8.py \
        [--models torch-mlp,keras-mlp,digits-cnn,minilm,resnet50] [--threads 1,2] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import logging
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/models.py

import models  # noqa: E402

import onnxopt  # noqa: E402
from onnxopt.benchmarking import benchmark  # noqa: E402
from onnxopt.errors import QualityGateError  # noqa: E402
from onnxopt.evaluation import run_batched, session_for  # noqa: E402

Arrays = dict[str, np.ndarray]


@dataclasses.dataclass
class Case(models.Built):
    """A suite model and its data, with the accuracy budget and timing this benchmark gives it."""

    max_drop: float = 0.01  # top-1 points with labels, cosine units without
    time_budget_s: float = 4.0  # interleaved timing per thread count
    reference: Arrays | None = None  # the source framework's outputs on ``evaluation``
    recipes: tuple[tuple[str, list[str]], ...] = (("onnxopt-int8", ["int8"]),)
    baselines: tuple[str, ...] = ("ort-dynamic", "ort-static")


def _digits_case(model: ir.Model, flat: bool, budget_s: float) -> Case:
    from onnxopt.digits import load_digits_28

    data = load_digits_28(seed=0, test_size=0.25, val_size=0.15)
    name = model.graph.inputs[0].name
    pick = (lambda d: d.reshape(len(d), -1)) if flat else (lambda d: d)
    return Case(model, {name: pick(data.train_images)[:256]}, {name: pick(data.val_images)},
                data.y_val, {name: pick(data.test_images)}, data.y_test, max_drop=0.3,
                time_budget_s=budget_s)


def torch_mlp() -> Case:
    """The issue's PyTorch MLP 784-256-128-10, trained on the digits."""
    import torch

    from onnxopt.digits import load_digits_28, train_torch_mlp

    data = load_digits_28(seed=0, test_size=0.25, val_size=0.15)
    net = train_torch_mlp(data, hidden=(256, 128))
    model = onnxopt.export(net, torch.from_numpy(data.train_flat[:2]), input_names=["x"],
                           output_names=["logits"])
    return _digits_case(model, flat=True, budget_s=4.0)


def keras_mlp() -> Case:
    return _digits_case(models.build_keras_mlp(0, False).model, flat=True, budget_s=4.0)


def digits_cnn() -> Case:
    return _digits_case(models.build_digits_cnn(0, False).model, flat=False, budget_s=4.0)


def minilm() -> Case:
    """Real English text (stdlib docstrings through MiniLM's tokenizer, padded to 128 tokens):
    half the sentences calibrate, a quarter tune (the pass's budget), a quarter are held out.
    Random token ids gave activation outliers real text does not (see RESULTS.md)."""
    from onnxopt.zoo import minilm as zoo_minilm
    from onnxopt.zoo import minilm_reference, minilm_sentences, minilm_text_feeds

    text = minilm_sentences()
    split = {part: [s for i, s in enumerate(text) if i % 4 in keep]
             for part, keep in (("calibration", (0, 1)), ("tuning", (2,)), ("held-out", (3,)))}
    model, evaluation, torch_out = zoo_minilm(seq_len=128, sentences=split["held-out"])
    return Case(model, minilm_text_feeds(split["calibration"]),
                minilm_text_feeds(split["tuning"]), None, evaluation, None, max_drop=0.01,
                time_budget_s=30.0, reference=torch_out,
                baselines=("ort-dynamic", "ort-dynamic-per-channel", "ort-static"),
                recipes=(("onnxopt-int8", ["int8"]),
                         ("onnxopt-int8-without-fuse-transformer",
                          ["cleanup", "fuse", "quantize"])))


def resnet50() -> Case:
    from onnxopt.zoo import light_model

    model = light_model("resnet50", seed=0)
    name = model.graph.inputs[0].name
    rng = np.random.default_rng(1)

    def images(n: int) -> Arrays:
        return {name: rng.standard_normal((n, 3, 224, 224)).astype(np.float32)}

    # Random weights: 53 layers of INT8 noise accumulate (every layer ~31-33 dB alone), so the
    # budget is the fidelity ORT's own static quantizer reaches, not 0.99 (see RESULTS.md).
    return Case(model, images(16), images(8), None, images(8), None, max_drop=0.05,
                time_budget_s=40.0)


CASES: dict[str, Callable[[], Case]] = {
    "torch-mlp": torch_mlp, "keras-mlp": keras_mlp, "digits-cnn": digits_cnn,
    "minilm": minilm, "resnet50": resnet50,
}


# --- candidates ----------------------------------------------------------------------------


def ort_dynamic(fp32: Path, out: Path, per_channel: bool = False) -> Path:
    from onnxruntime.quantization import quantize_dynamic

    quantize_dynamic(str(fp32), str(out), per_channel=per_channel)
    return out


def ort_static(fp32: Path, out: Path, calibration: Arrays, fixed_batch: int | None) -> Path:
    from onnxruntime.quantization import CalibrationDataReader, quant_pre_process, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            n = len(next(iter(calibration.values())))
            step = fixed_batch or 32
            self._batches = iter([{k: v[i:i + step] for k, v in calibration.items()}
                                  for i in range(0, n - (n % step if fixed_batch else 0), step)])

        def get_next(self) -> Arrays | None:
            return next(self._batches, None)

    pre = out.with_name("pre.onnx")
    # A failed symbolic inference leaves a temporary <uuid>.data in the working directory.
    with contextlib.chdir(out.parent):
        try:
            quant_pre_process(str(fp32), str(pre))
        except Exception:  # noqa: BLE001 - MiniLM: "Incomplete symbolic shape inference"
            quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)  # usual workaround
    quantize_static(str(pre), str(out), Reader())
    return out


def onnxopt_recipe(case: Case, recipe: list[str], out: Path) -> tuple[Path, dict[str, Any]]:
    """The recipe through the library API, as ``onnxopt optimize --max-drop`` runs it."""
    start = time.perf_counter()
    recipe_arg: Any = recipe[0] if len(recipe) == 1 else recipe
    try:
        model, report = onnxopt.optimize(
            case.model, recipe_arg, calibration=case.calibration,
            evaluation=(case.tuning, case.tuning_labels), overrides={"max_drop": case.max_drop})
        status = "ok"
    except QualityGateError as exc:
        model, report = exc.partial  # type: ignore[attr-defined]
        status = f"budget missed: {exc.message}"
    seconds = time.perf_counter() - start
    onnxopt.save(model, out)
    notes = report.passes[-1].notes
    return out, {"status": status, "optimize_s": round(seconds, 1),
                 "decision": notes.get("decision"), "int8_mac_share": notes.get("int8_mac_share"),
                 "unsafe_tensors": [t["tensor"] for t in notes.get("unsafe_tensors", [])],
                 "target": notes.get("target", {}).get("choice"),
                 "layer_norms": notes.get("layer_norms")}


# --- measurement ---------------------------------------------------------------------------


def quality(path: Path, case: Case, fp32_out: Arrays) -> dict[str, float]:
    out = run_batched(session_for(path), case.evaluation, batch_size=64)
    result = {"cosine_vs_fp32": _mean_cosine(out, fp32_out)}
    if case.labels is not None:
        logits = next(iter(out.values()))
        result["top1"] = float(100.0 * np.mean(logits.argmax(axis=-1) == case.labels))
    if case.reference is not None:
        result["cosine_vs_source"] = _mean_cosine(out, case.reference)
    return result


def _mean_cosine(out: Arrays, ref: Arrays) -> float:
    a = next(iter(out.values())).reshape(len(next(iter(out.values()))), -1).astype(np.float64)
    b = next(iter(ref.values())).reshape(len(a), -1).astype(np.float64)
    cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)
    return float(cos.mean())


def run_case(name: str, threads: list[int], work: Path) -> dict[str, Any]:
    print(f"== {name}: building", flush=True)
    case = CASES[name]()
    fp32 = work / f"{name}-fp32.onnx"
    onnxopt.save(case.model, fp32)
    inputs = {i.name: list(i.shape) for i in case.model.graph.inputs}
    firsts = {dims[0] for dims in inputs.values()}
    fixed = next(iter(firsts)) if len(firsts) == 1 and isinstance(next(iter(firsts)), int) else None
    candidates: dict[str, Path] = {"fp32": fp32}
    info: dict[str, dict[str, Any]] = {"fp32": {"status": "ok"}}
    makers = {"ort-dynamic": lambda out: ort_dynamic(fp32, out),
              "ort-dynamic-per-channel": lambda out: ort_dynamic(fp32, out, per_channel=True),
              "ort-static": lambda out: ort_static(fp32, out, case.calibration, fixed)}
    for label in case.baselines:
        make = makers[label]
        start = time.perf_counter()
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                candidates[label] = make(work / f"{name}-{label}.onnx")
            info[label] = {"status": "ok", "optimize_s": round(time.perf_counter() - start, 1)}
        except Exception as exc:  # a baseline that fails is a result, not a crash
            info[label] = {"status": f"failed: {str(exc).splitlines()[0][:160]}"}
    for label, recipe in case.recipes:
        print(f"== {name}: {label}", flush=True)
        path, rec = onnxopt_recipe(case, recipe, work / f"{name}-{label}.onnx")
        candidates[label], info[label] = path, rec
    fp32_out = run_batched(session_for(fp32), case.evaluation, batch_size=64)
    for label, path in candidates.items():
        info[label].update(quality(path, case, fp32_out))
        info[label]["bytes"] = path.stat().st_size
    print(f"== {name}: timing {len(candidates)} models at {threads} thread(s)", flush=True)
    feeds = {k: np.ascontiguousarray(v[:1]) for k, v in case.evaluation.items()}
    result = benchmark(list(candidates.values()), threads=threads, feeds=feeds,
                       names=list(candidates), time_budget_s=case.time_budget_s,
                       measure_memory=False)
    for label in candidates:
        info[label]["latency"] = {
            str(t): {"p50_ms": round(result.row(label, t)["p50_ms"], 4),
                     "speedup": round(result.row(label, t)["speedup"], 3),
                     "ci95": [round(x, 3) for x in result.row(label, t)["speedup_ci95"]]}
            for t in threads}
    return {"model": name, "candidates": info, "machine": result.machine}


def markdown(rows: list[dict[str, Any]], threads: list[int]) -> str:
    head = ("| model | candidate | " + " | ".join(f"speed-up {t}T (95% CI)" for t in threads)
            + " | top-1 | cosine vs FP32 | cosine vs source | notes |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for row in rows:
        for label, c in row["candidates"].items():
            speed = " | ".join(
                f"{c['latency'][str(t)]['speedup']:.2f}x ({c['latency'][str(t)]['ci95'][0]:.2f}"
                f"-{c['latency'][str(t)]['ci95'][1]:.2f})" if "latency" in c else "-"
                for t in threads)
            top1 = f"{c['top1']:.2f}" if "top1" in c else ""
            src = f"{c['cosine_vs_source']:.4f}" if "cosine_vs_source" in c else ""
            note = c.get("decision") or ("" if c["status"] == "ok" else c["status"])
            lines.append(f"| {row['model']} | {label} | {speed} | {top1} | "
                         f"{c.get('cosine_vs_fp32', float('nan')):.4f} | {src} | {note} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(CASES))
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.getLogger().setLevel(logging.ERROR)
    threads = [int(t) for t in args.threads.split(",")]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-int8-") as tmp:
        for name in args.models.split(","):
            rows.append(run_case(name, threads, Path(tmp)))
            print(markdown(rows[-1:], threads), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1, default=str))
    print(markdown(rows, threads))
    return 0


if __name__ == "__main__":
    sys.exit(main())
