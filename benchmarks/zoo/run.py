"""``make zoo``: every built-in recipe on every zoo model, one child process per cell.

    .venv/bin/python benchmarks/zoo/run.py                    # everything, resumable
    .venv/bin/python benchmarks/zoo/run.py --quick            # the small models (make test runs a few)
    .venv/bin/python benchmarks/zoo/run.py --models 'hf-*' --recipes int8 --out /tmp/zoo

Each model is built once by ``architectures.py`` in a child (``OUT/models/NAME``), then each
recipe runs as the real CLI (``onnxopt optimize ... --report``) in a child under a time limit and
an address-space limit; its exit code, wall time, peak resident memory (``wait4``), sizes, MACs
before and after, output fidelity against FP32 (cosine, SQNR) and the passes' warnings are
recorded in ``OUT/results.json``. A cell already in the results is not run again (``--redo`` runs
it anyway), so an interrupted run resumes. ``--speed`` adds a 1-thread speed-up
(``onnxopt bench``, interleaved) for cells that finished.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from architectures import ARCHITECTURES  # noqa: E402

from onnxopt.recipes import builtin_recipes  # noqa: E402

RESULTS_MD = HERE.parent / "RESULTS.md"
BEGIN, END = "<!-- zoo-table:begin -->", "<!-- zoo-table:end -->"
INT8_OPS = {"QuantizeLinear", "DynamicQuantizeLinear", "MatMulInteger", "ConvInteger", "QGemm",
            "QLinearConv", "QLinearMatMul", "DynamicQuantizeMatMul", "QAttention", "MatMulNBits"}
STATUS = {0: "ok", 1: "quality gate", 2: "bad input", 3: "internal error", 130: "interrupted"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=HERE.parent / "out" / "zoo")
    p.add_argument("--models", default="*", help="comma-separated name patterns")
    p.add_argument("--recipes", default="*", help="comma-separated recipe patterns")
    p.add_argument("--quick", action="store_true", help="only models not marked slow")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per cell")
    p.add_argument("--max-gb", type=float, default=16.0, help="address-space limit per child")
    p.add_argument("--redo", action="store_true", help="run cells already in the results")
    p.add_argument("--speed", action="store_true", help="also time FP32 vs result at 1 thread")
    p.add_argument("--results-md", action="store_true",
                   help="write the table into benchmarks/RESULTS.md (between its zoo markers)")
    return p.parse_args(argv)


def selected(patterns: str, names: list[str]) -> list[str]:
    pats = [p.strip() for p in patterns.split(",") if p.strip()]
    return [n for n in names if any(fnmatch.fnmatch(n, p) for p in pats)]


def run_child(cmd: list[str], timeout: float, max_gb: float, log: Path) -> dict[str, Any]:
    """Run ``cmd`` with limits; exit code, seconds, peak RSS and the last stderr line."""
    limit = int(max_gb * 2**30)

    def limits() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TF_CPP_MIN_LOG_LEVEL": "3"}
    start = time.monotonic()
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, stdout=err, stderr=subprocess.STDOUT, preexec_fn=limits,
                                env=env)
        timed_out = False
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() - start > timeout:
                proc.kill()
                timed_out = True
            time.sleep(0.2)
    code = os.waitstatus_to_exitcode(status)
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    message = next((ln for ln in reversed(lines) if ln.startswith(("error", "warning"))),
                   lines[-1] if lines else "")
    return {"exit": code, "timed_out": timed_out, "seconds": round(time.monotonic() - start, 1),
            "peak_rss_mb": round(usage.ru_maxrss / 1024), "message": message[:300]}


def build_model(name: str, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    folder = out / "models" / name
    if (folder / "model.onnx").exists() and (folder / "eval.npz").exists():
        return {"exit": 0}
    folder.parent.mkdir(parents=True, exist_ok=True)
    return run_child([sys.executable, str(HERE / "architectures.py"), name, str(folder)],
                     args.timeout, args.max_gb, out / "logs" / f"{name}.build.log")


def run_cell(name: str, recipe: str, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    folder = out / "models" / name
    cell = out / "cells" / name / recipe
    cell.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "onnxopt", "optimize", str(folder / "model.onnx"),
           "-o", str(cell / "model.onnx"), "--recipe", recipe, "--calib",
           str(folder / "calib.npz"), "--eval", str(folder / "eval.npz"), "--report",
           str(cell / "report")]
    rec = run_child(cmd, args.timeout, args.max_gb, cell / "log.txt")
    rec["status"] = ("timeout" if rec["timed_out"] else
                     STATUS.get(rec["exit"], f"crash (exit {rec['exit']})"))
    rec |= summarize(cell / "report" / "report.json", folder / "model.onnx")
    if args.speed and rec["exit"] == 0:
        rec["speedup_1t"] = speedup(folder, cell, args)
    return rec


def summarize(report: Path, model: Path) -> dict[str, Any]:
    """What the table shows, from the pipeline's report.json."""
    if not report.exists():
        return {}
    doc = json.loads(report.read_text())
    before, after = doc.get("before", {}), doc.get("after", {})
    # drift: each pass's outputs against the original FP32 model; the last pass that has it
    drift = next((p["drift"] for p in reversed(doc.get("passes", [])) if p.get("drift")), {})
    cosines = [float(v["cosine"]) for v in drift.values() if v.get("cosine") is not None]
    sqnrs = [float(v["sqnr_db"]) for v in drift.values() if v.get("sqnr_db") is not None]
    ops = set(after.get("op_histogram", {}))
    # a pass that kept the model or fell short says why in notes["warning"] (the CLI prints it)
    warnings = [f"{p['name']}: {p['notes']['warning']}" for p in doc.get("passes", [])
                if (p.get("notes") or {}).get("warning")]
    return {
        "size_before": model.stat().st_size, "size_after": after.get("size_bytes"),
        "macs_before": before.get("total_macs"), "macs_after": after.get("total_macs"),
        "macs_unknown_before": before.get("macs_unknown_nodes"),
        "macs_unknown_after": after.get("macs_unknown_nodes"),
        "cosine": min(cosines) if cosines else None, "sqnr_db": min(sqnrs) if sqnrs else None,
        "int8": bool(ops & INT8_OPS), "warnings": warnings,
    }


def speedup(folder: Path, cell: Path, args: argparse.Namespace) -> float | None:
    result = cell / "bench.json"
    run_child([sys.executable, "-m", "onnxopt", "bench", str(folder / "model.onnx"),
               str(cell / "model.onnx"), "--threads", "1", "--inputs", str(folder / "eval.npz"),
               "--json", str(result)], args.timeout, args.max_gb, cell / "bench.log")
    if not result.exists():
        return None
    rows = json.loads(result.read_text()).get("results", [])
    return next((r.get("speedup") for r in rows[1:] if r.get("speedup")), None)


def table(results: dict[str, dict[str, Any]]) -> str:
    head = ("| model | recipe | status | s | peak MB | size ratio | MACs before -> after "
            "| int8 | cosine | SQNR dB | 1-thread | note |\n|" + "---|" * 12 + "\n")
    rows = []
    for key in sorted(results):
        r = results[key]
        name, recipe = key.split("/")

        def macs(value: Any, unknown: Any) -> str:
            if value is None:
                return "?"
            return f"{value / 1e6:.3g}M" + (f" (+{unknown} unknown)" if unknown else "")
        ratio = (f"{r['size_before'] / r['size_after']:.2f}x"
                 if r.get("size_after") else "")
        cos = f"{float(r['cosine']):.4f}" if r.get("cosine") is not None else ""
        sq = f"{float(r['sqnr_db']):.1f}" if r.get("sqnr_db") is not None else ""
        sp = f"{r['speedup_1t']:.2f}x" if r.get("speedup_1t") else ""
        note = "; ".join(r.get("warnings") or []) or (r["message"] if r["exit"] else "")
        rows.append(f"| {name} | {recipe} | {r['status']} | {r['seconds']:.0f} | "
                    f"{r['peak_rss_mb']} | {ratio} | "
                    f"{macs(r.get('macs_before'), r.get('macs_unknown_before'))} -> "
                    f"{macs(r.get('macs_after'), r.get('macs_unknown_after'))} | "
                    f"{'yes' if r.get('int8') else ''} | {cos} | {sq} | {sp} | "
                    f"{note.replace('|', '/')[:160]} |")
    return head + "\n".join(rows) + "\n"


def write_results_md(text: str) -> None:
    doc = RESULTS_MD.read_text()
    if BEGIN in doc:
        start, end = doc.index(BEGIN), doc.index(END) + len(END)
        doc = doc[:start] + BEGIN + "\n" + text + END + doc[end:]
    else:
        doc += f"\n## Conformance zoo\n\nCommand: `make zoo`.\n\n{BEGIN}\n{text}{END}\n"
    RESULTS_MD.write_text(doc)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out: Path = args.out
    (out / "logs").mkdir(parents=True, exist_ok=True)
    results_file = out / "results.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    names = selected(args.models, [n for n, a in ARCHITECTURES.items()
                                   if not (args.quick and a.slow)])
    recipes = selected(args.recipes, list(builtin_recipes()))
    for name in names:
        built = build_model(name, out, args)
        if built["exit"]:
            results[f"{name}/build"] = built | {"status": "build failed"}
            print(f"{name}: build failed: {built.get('message')}", flush=True)
            continue
        for recipe in recipes:
            key = f"{name}/{recipe}"
            if key in results and not args.redo:
                continue
            results[key] = run_cell(name, recipe, out, args)
            r = results[key]
            print(f"{key}: {r['status']} in {r['seconds']:.0f} s, {r['peak_rss_mb']} MB"
                  + (f" ({r['message']})" if r["exit"] else ""), flush=True)
            tmp = results_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(results, indent=1, sort_keys=True))
            os.replace(tmp, results_file)
    text = table(results)
    (out / "table.md").write_text(text)
    if args.results_md:
        write_results_md(text)
    print(text)
    bad = [k for k, r in results.items() if r["status"] not in ("ok", "quality gate")]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
