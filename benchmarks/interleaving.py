"""How the interleaving scheme of ``onnxopt.benchmarking`` distorts latency, on two identical models.

The true speed-up of a model over an identical copy is 1.0 and its latency is what it shows when
it runs alone. Table 1 measures both under four schemes (single-run alternation A B A B versus
blocks with untimed settle runs after each switch; ORT thread spinning on versus off) at 1 and 2
threads, next to the model measured alone in the same process. Table 2 shows how far the measured
speed-up of the identical copy strays from 1.0 for several block lengths.

    .venv/bin/python benchmarks/interleaving.py [--repeats 5] [--budget 1.0]
"""

from __future__ import annotations

import argparse

import numpy as np
import onnx_ir as ir

from onnxopt import runner
from onnxopt.benchmarking import benchmark
from onnxopt.feeds import synthesize_feeds

SCHEMES = {
    "single-run alternation, spinning on": {"block": 1, "settle": 0},
    "blocks + settle runs, spinning on (default)": {},
    "single-run alternation, spinning off": {
        "block": 1, "settle": 0, "session_config": {"session.intra_op.allow_spinning": "0"}},
    "blocks + settle runs, spinning off": {
        "session_config": {"session.intra_op.allow_spinning": "0"}},
}


def mlp(name: str, width: int = 1024, layers: int = 4, seed: int = 0) -> ir.Model:
    """A 256 -> width x layers -> 10 ReLU MLP (a few hundred microseconds: threads matter)."""
    rng = np.random.default_rng(seed)
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([1, 256]))
    nodes, inits, prev, fan_in = [], [], x, 256
    for i, fan_out in enumerate([width] * layers + [10]):
        w = ir.Value(name=f"w{i}", const_value=ir.tensor(
            (rng.standard_normal((fan_in, fan_out)) / np.sqrt(fan_in)).astype(np.float32)))
        inits.append(w)
        mm = ir.node("MatMul", [prev, w])
        nodes.append(mm)
        prev = mm.outputs[0]
        if i < layers:
            relu = ir.node("Relu", [prev])
            nodes.append(relu)
            prev = relu.outputs[0]
        fan_in = fan_out
    prev.name = "y"
    graph = ir.Graph([x], [prev], nodes=nodes, initializers=inits, opset_imports={"": 17},
                     name=name)
    return ir.Model(graph, ir_version=8)


def alone_p50(model: ir.Model, threads: int, budget: float) -> float:
    """p50 (ms) with no other session alive in the process."""
    session = runner.create_session(ir.serde.serialize_model(model).SerializeToString(),
                                    threads=threads)
    feeds = synthesize_feeds(model)
    return runner.measure(session, feeds, warmup=20, time_budget_s=budget)["p50_ms"]


def scheme_table(repeats: int, budget: float) -> None:
    """Latency inflation and identical-model speed-up under each interleaving scheme."""
    a, b = mlp("A"), mlp("B")
    print("| threads | scheme | A p50 / A alone | speed-up of identical B (true 1.00), "
          "each repeat | 95% CI (median) |")
    print("|---:|---|---:|---:|---|")
    for threads in (1, 2):
        results: dict[str, list[tuple[float, float, list[float]]]] = {s: [] for s in SCHEMES}
        for _ in range(repeats):
            alone = alone_p50(a, threads, budget)
            for scheme, kwargs in SCHEMES.items():
                res = benchmark([a, b], threads=[threads], names=["A", "B"],
                                time_budget_s=budget, measure_memory=False, **kwargs)
                row_a, row_b = res.rows
                results[scheme].append(
                    (row_a["p50_ms"] / alone, row_b["speedup"], row_b["speedup_ci95"]))
        for scheme, runs in results.items():
            inflation = np.median([r[0] for r in runs])
            speedup = np.median([r[1] for r in runs])
            lo, hi = np.median([r[2][0] for r in runs]), np.median([r[2][1] for r in runs])
            spread = ", ".join(f"{r[1]:.2f}" for r in runs)
            print(f"| {threads} | {scheme} | {inflation:.2f}x | {speedup:.3f} ({spread}) "
                  f"| {lo:.3f}-{hi:.3f} |")


def block_table(repeats: int, budget: float) -> None:
    """How far the speed-up of an identical model strays from 1.0, by block length."""
    print("| model | threads | block | rounds | median / max abs(log speed-up) "
          "| median CI width | CI holds 1.0 |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for width, label in ((64, "MLP 256-64x4-10 (~5 us)"), (1024, "MLP 256-1024x4-10")):
        a, b = mlp("A", width=width), mlp("B", width=width)
        for threads in (1, 2):
            for block_s in (0.05, 0.02, 0.01, 0.005):
                rows = [benchmark([a, b], threads=[threads], time_budget_s=budget,
                                  block_s=block_s, measure_memory=False).rows[1]
                        for _ in range(repeats)]
                err = np.abs(np.log([r["speedup"] for r in rows]))
                width_ci = np.median([r["speedup_ci95"][1] - r["speedup_ci95"][0] for r in rows])
                holds = sum(r["speedup_ci95"][0] <= 1.0 <= r["speedup_ci95"][1] for r in rows)
                rounds = int(np.median([r["rounds"] for r in rows]))
                print(f"| {label} | {threads} | {block_s * 1000:.0f} ms | {rounds} "
                      f"| {np.median(err):.3f} / {err.max():.3f} | {width_ci:.3f} "
                      f"| {holds}/{repeats} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--budget", type=float, default=1.0, help="seconds per measurement")
    args = parser.parse_args()
    machine = runner.machine_info()
    print(f"{machine['cpu_model']}, {machine['usable_cores']} cores, onnxruntime "
          f"{machine['versions']['onnxruntime']}; {args.repeats} repeats\n")
    scheme_table(args.repeats, args.budget)
    print()
    block_table(args.repeats, args.budget)


if __name__ == "__main__":
    main()
