"""A model over 2 GB through the CLI: inspect, cleanup, fuse, dynamic INT8, share-weights, bench
and the report; peak resident memory of each step against the model's size.

The model is a synthetic MLP written tensor by tensor (never whole in memory): ``--layers``
blocks of MatMul(width x width) + Add(bias) + Relu, weights in external data aligned to 64 KiB.
The default, 34 blocks of 4096 x 4096 float32, is 2.28 GB (protobuf's limit is 2 GiB).

Each step is one ``onnxopt`` process; its peak RSS is the kernel's ``ru_maxrss`` of that process
(``os.wait4``), which counts memory-mapped file pages it touched as well as its heap, so
"tensors memory-mapped rather than copied" shows up as file-backed pages, not as a lower number.
The acceptance line is peak RSS <= 1.5 x model bytes (``.onnx`` + ``.data``). ``bench``'s own
row also gives the peak of the child that ran the model (``peak_rss_mb``).

Calibration memory (``calib-default``, ``calib-budget``): static INT8 of a CNN with 0.2 MB of
weights and 77 MB of activations per 224x224 sample, calibrated on 256 samples streamed from an
``.npz``, without and with ``--max-memory 1G`` (which sizes the calibration batches).

    .venv/bin/python benchmarks/bench_big_model.py [--work benchmarks/out/big] [--layers 34]
        [--width 4096] [--steps inspect,cleanup,fuse,int8,share,bench,report]
        [--share-iterations 5] [--json FILE]

Needs about 12 GB of free disk (model, one output at a time, verification copies) and 4 GB of
memory (share-weights peaks at 1.4x the model); about 10 minutes on 2 shared cores, most of it
share-weights' k-means (3-4 min with 2 iterations).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ALIGN = 65536
STEPS = ("inspect", "cleanup", "fuse", "int8", "share", "bench", "report", "calib-default",
         "calib-budget")
CALIB_BUDGET = "1G"


def write_big_mlp(folder: Path, width: int, layers: int, seed: int = 0) -> Path:
    """The synthetic model, streamed to ``folder/big.onnx`` + ``big.onnx.data``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    data_name = "big.onnx.data"
    inits, nodes, cur = [], [], "x"
    with open(folder / data_name, "wb") as f:
        for i in range(layers):
            w = rng.standard_normal((width, width), dtype=np.float32)
            w *= np.float32(1 / math.sqrt(width))
            offset = -(-f.tell() // ALIGN) * ALIGN
            f.seek(offset)
            f.write(w.data)
            t = TensorProto(name=f"w{i}", data_type=TensorProto.FLOAT, dims=[width, width])
            t.data_location = TensorProto.EXTERNAL
            for key, value in (("location", data_name), ("offset", str(offset)),
                               ("length", str(w.nbytes))):
                entry = t.external_data.add()
                entry.key, entry.value = key, value
            bias = (rng.standard_normal(width) * 0.1).astype(np.float32)
            inits += [t, numpy_helper.from_array(bias, f"b{i}")]
            nodes += [helper.make_node("MatMul", [cur, f"w{i}"], [f"m{i}"], name=f"fc{i}"),
                      helper.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}"], name=f"fc{i}_bias"),
                      helper.make_node("Relu", [f"a{i}"], [f"r{i}"], name=f"relu{i}")]
            cur = f"r{i}"
            del w
    graph = helper.make_graph(
        nodes, "big_mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", width])],
        [helper.make_tensor_value_info(cur, TensorProto.FLOAT, ["N", width])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, folder / "big.onnx")
    return folder / "big.onnx"


def write_wide_cnn(folder: Path, samples: int, channels: int = 32, size: int = 224,
                   layers: int = 6, seed: int = 0) -> tuple[Path, Path]:
    """A small-weight, large-activation CNN (calibration memory is all activations) and an
    ``.npz`` of ``samples`` calibration images for it."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    inits, nodes, cur, c_in = [], [], "x", 3
    for i in range(layers):
        w = (rng.standard_normal((channels, c_in, 3, 3)) / math.sqrt(9 * c_in)).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nodes += [helper.make_node("Conv", [cur, f"w{i}"], [f"c{i}"], name=f"conv{i}", pads=[1] * 4),
                  helper.make_node("Relu", [f"c{i}"], [f"r{i}"], name=f"relu{i}")]
        cur, c_in = f"r{i}", channels
    nodes.append(helper.make_node("GlobalAveragePool", [cur], ["y"], name="pool"))
    graph = helper.make_graph(
        nodes, "wide_cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                          ["N", 3, size, size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", channels, 1, 1])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, folder / "cnn.onnx")
    calib = folder / "calib.npz"
    np.savez(calib, x=rng.standard_normal((samples, 3, size, size), dtype=np.float32))
    return folder / "cnn.onnx", calib


def model_bytes(path: Path) -> int:
    """The ``.onnx`` file plus every external data file next to it that it names."""
    proto = onnx.load(str(path), load_external_data=False)
    names = {e.value for t in proto.graph.initializer for e in t.external_data
             if e.key == "location"}
    return path.stat().st_size + sum((path.parent / n).stat().st_size for n in names)


def run_step(argv: list[str], log: Path) -> dict[str, Any]:
    """``onnxopt <argv>`` as its own process: exit code, seconds, peak RSS, last stderr line."""
    start = time.perf_counter()
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "onnxopt", *argv], stdout=err,
                                stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    lines = [line for line in log.read_text().splitlines() if line.strip()]
    return {"command": "onnxopt " + " ".join(argv), "exit": proc.returncode,
            "seconds": round(time.perf_counter() - start, 1),
            "peak_rss_bytes": usage.ru_maxrss * 1024,  # KiB on Linux
            "last_line": lines[-1] if lines else ""}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("benchmarks/out/big"))
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=34)
    parser.add_argument("--steps", default=",".join(STEPS))
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--share-iterations", type=int, default=5,
                        help="k-means iterations of share-weights (its default, 50, takes hours "
                             "on 34 tensors of 16.7M weights)")
    args = parser.parse_args(argv)
    work = args.work.resolve()
    model = work / "model" / "big.onnx"
    if not model.exists():
        print(f"writing {model} ...", file=sys.stderr)
        write_big_mlp(model.parent, args.width, args.layers)
    size = model_bytes(model)
    out = work / "out"
    out.mkdir(parents=True, exist_ok=True)
    share_recipe = work / "share.json"
    share_recipe.write_text(json.dumps({"steps": ["cleanup", "share-weights"]}))
    commands = {
        "inspect": ["inspect", str(model), "--json"],
        "cleanup": ["optimize", str(model), "-o", str(out / "cleanup.onnx"), "--recipe",
                    "cleanup", "--report", str(out / "report-cleanup")],
        "fuse": ["optimize", str(model), "-o", str(out / "fuse.onnx"), "--recipe", "fuse",
                 "--report", str(out / "report-fuse")],
        "int8": ["optimize", str(model), "-o", str(out / "int8.onnx"), "--recipe", "int8",
                 "--set", "quantize.mode=dynamic", "--set", "quantize.measure_latency=false"],
        "share": ["optimize", str(model), "-o", str(out / "share.onnx"), "--recipe",
                  str(share_recipe), "--report", str(out / "report-share"),
                  "--set", f"share-weights.iterations={args.share_iterations}"],
        "bench": ["bench", str(model), "--threads", "1", "--json", str(out / "bench.json")],
        "report": ["report", str(out / "report-fuse" / "report.json"), "-o",
                   str(out / "report.html")],
    }
    cnn, calib = work / "cnn" / "cnn.onnx", work / "cnn" / "calib.npz"
    if any(step.startswith("calib") for step in args.steps.split(",")) and not calib.exists():
        write_wide_cnn(cnn.parent, samples=256)
    static = ["--recipe", "int8", "--calib", str(calib), "--set", "quantize.mode=static",
              "--set", "quantize.measure_latency=false"]
    commands["calib-default"] = ["optimize", str(cnn), "-o", str(out / "calib-default.onnx"),
                                 *static, "--report", str(out / "report-calib-default")]
    commands["calib-budget"] = ["optimize", str(cnn), "-o", str(out / "calib-budget.onnx"),
                                *static, "--max-memory", CALIB_BUDGET,
                                "--report", str(out / "report-calib-budget")]
    results: dict[str, Any] = {"model": str(model), "model_bytes": size,
                               "layers": args.layers, "width": args.width, "steps": {}}
    for step in args.steps.split(","):
        row = run_step(commands[step], out / f"{step}.log")
        row["peak_rss_over_model"] = round(row["peak_rss_bytes"] / size, 3)
        written = out / f"{step}.onnx"
        if written.exists():
            row["output_bytes"] = model_bytes(written)
            row["output_external"] = written.with_name(written.name + ".data").exists()
        if step.startswith("calib") and row["exit"] == 0:
            report = json.loads((out / f"report-{step}" / "report.json").read_text())
            row["calibration_data"] = report["passes"][-1]["notes"].get("calibration_data")
            row["peak_rss_over_model"] = None  # the model is tiny; activations are the memory
        if step == "bench" and row["exit"] == 0:
            bench = json.loads((out / "bench.json").read_text())
            row["runner_peak_rss_mb"] = bench["rows"][0]["peak_rss_mb"]
            row["p50_ms"] = bench["rows"][0]["p50_ms"]
        results["steps"][step] = row
        print(json.dumps({step: row}), flush=True)
        for leftover in out.glob(f"{step}.onnx*"):  # keep the disk footprint to one output
            leftover.unlink()
    text = json.dumps(results, indent=2)
    if args.json:
        args.json.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
