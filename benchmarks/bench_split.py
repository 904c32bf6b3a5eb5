"""Peak memory of a cascade (`onnxopt split`) against the whole model: VGG.

``--model vgg19`` (default): the onnx wheel's ``light_vgg19`` architecture with seeded weights
(``onnxopt.zoo.light_model``; 144 M parameters, 548 MB of float32 weights, the VGG layout whose
first fully connected layer alone holds 392 MB). ``--model keras-vgg16``:
``keras.applications.VGG16(weights=None)`` exported with ``onnxopt.export.export`` (138 M
parameters, 528 MB); with tf2onnx 1.17 that export needed more than 15 GB of memory here (the
process was OOM-killed at 19.4 GB on a 24 GB machine), see ``benchmarks/RESULTS.md``, "Split".

The model is split into 2, 3 and 4 stages. For each, the whole model and the cascade run in a
fresh runner process each (``onnxopt.runner``, batch 1, ORT optimizations "all", 1 warm-up + 3
runs), which reads its peak resident memory (VmHWM); the cascade's outputs are checked
identical to the whole model's (ORT reference settings) by ``split_model`` itself.

    .venv/bin/python benchmarks/bench_split.py [--model vgg19|keras-vgg16] [--parts 2,3,4]
        [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def vgg16_onnx(folder: Path) -> Path:
    import keras
    import numpy as np

    from onnxopt.export import export
    from onnxopt.model_io import save_model

    keras.utils.set_random_seed(0)
    model = keras.applications.VGG16(weights=None)
    example = np.random.default_rng(0).standard_normal((1, 224, 224, 3)).astype(np.float32)
    return save_model(export(model, example), folder / "vgg16.onnx")


def zoo_vgg19(folder: Path) -> Path:
    from onnxopt.model_io import save_model
    from onnxopt.zoo import light_model

    return save_model(light_model("vgg19"), folder / "vgg19.onnx")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["vgg19", "keras-vgg16"], default="vgg19")
    parser.add_argument("--parts", default="2,3,4")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    from onnxopt import runner
    from onnxopt.split import split_model

    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-split-") as tmp:
        started = time.perf_counter()
        path = (vgg16_onnx if args.model == "keras-vgg16" else zoo_vgg19)(Path(tmp))
        print(f"{args.model}: {path.stat().st_size / 2**20:.0f} MiB, made in "
              f"{time.perf_counter() - started:.0f} s", flush=True)
        rows = []
        for parts in (int(p) for p in args.parts.split(",")):
            started = time.perf_counter()
            result = split_model(path, parts, Path(tmp) / f"split{parts}")
            m = result.memory
            assert m is not None
            results[parts] = result.to_dict()
            weights = " / ".join(f"{s['weight_bytes'] / 2**20:.0f}" for s in result.stages)
            rows.append(
                f"| {parts} | {weights} | {m['whole_peak_rss_mb']:.0f} "
                f"| {m['cascade_peak_rss_mb']:.0f} | {m['reduction']:+.0%} "
                f"| {m['whole_p50_ms']:.0f} -> {m['cascade_p50_ms']:.0f} "
                f"| {'identical' if result.verification['identical'] else 'DIFFERENT'} "
                f"| {time.perf_counter() - started:.0f} |")
            print(f"## {parts} parts\n\n{result.to_markdown()}", flush=True)
    machine = runner.machine_info()
    print(f"{machine['cpu_model']}, {machine['usable_cores']} cores, onnxruntime "
          f"{machine['versions']['onnxruntime']}\n")
    print("| parts | stage weights MiB | whole peak RSS MB | cascade peak RSS MB | change "
          "| p50 ms whole -> cascade | outputs | split s |")
    print("|---:|---|---:|---:|---:|---:|---|---:|")
    print("\n".join(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
