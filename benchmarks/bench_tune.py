"""What `onnxopt tune` gains over ONNX Runtime's default session settings, on zoo models.

For each model (the onnx wheel's light architectures with seeded weights, batch 1), ``tune``
searches intra-op threads, sequential vs parallel execution, thread spinning, and the memory
arena and pattern, each stage measured interleaved in one process; the chosen settings and ORT's
defaults are then measured side by side once more (``gain``). Peak memory of both comes from a
fresh runner process each.

    .venv/bin/python benchmarks/bench_tune.py [--budget 3] [--models squeezenet,shufflenet,...]
        [--objective latency|memory] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from onnxopt import runner
from onnxopt.tune import tune
from onnxopt.zoo import light_model

DEFAULT_MODELS = "squeezenet,shufflenet,resnet50,inception_v1"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=3.0,
                        help="seconds of interleaved rounds per stage (default 3)")
    parser.add_argument("--models", default=DEFAULT_MODELS)
    parser.add_argument("--objective", choices=["latency", "memory"], default="latency")
    parser.add_argument("--json", help="write every model's tune document here")
    args = parser.parse_args(argv)
    machine = runner.machine_info()
    print(f"{machine['cpu_model']}, {machine['usable_cores']} cores, onnxruntime "
          f"{machine['versions']['onnxruntime']}, load average {_load()}\n")
    rows, documents = [], {}
    models = {name: light_model(name) for name in args.models.split(",")}  # fail early on a typo
    for name, model in models.items():
        started = time.perf_counter()
        result = tune(model, objective=args.objective, time_budget_s=args.budget)
        documents[name] = result.document()
        g = result.gain
        lo, hi = g["speedup_ci95"]
        rss = g["peak_rss_mb"]
        rows.append(
            f"| {name} | {g['p50_ms_defaults']:.2f} | {g['p50_ms_tuned']:.2f} "
            f"| {g['speedup']:.2f}x ({lo:.2f}-{hi:.2f}) | {rss['defaults']:.0f} -> "
            f"{rss['tuned']:.0f} | {result.best.label()} | {time.perf_counter() - started:.0f} |")
        print(f"## {name}\n\n{result.to_markdown()}", flush=True)
    print("| model | p50 ms, ORT defaults | p50 ms, tuned | speed-up (95% CI) | peak RSS MB "
          "| chosen settings | tune s |")
    print("|---|---:|---:|---:|---:|---|---:|")
    print("\n".join(rows))
    print(f"\nload average at the end: {_load()}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(documents, f, indent=2)
    return 0


def _load() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
