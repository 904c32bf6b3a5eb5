"""The long fuzz run: generated and mutated models through inspect, optimize (every built-in
recipe) and bench, each command in a child process with a time limit; counts per case kind.

The corpus and the contract are ``tests/fuzz_corpus.py`` (the suite runs a small derandomized
share of it in ``tests/test_fuzz.py``). Here every kind gets ``--cases`` seeds, every case goes
through ``inspect`` and ``optimize`` with every built-in recipe (synthesized calibration and
evaluation data where a recipe takes them), and every ``--bench-every``-th case through
``bench``. Reports, per kind: cases, commands, exit codes, contract violations (with a one-line
repro each), and "pass failures": a pass raised an unexpected exception, which the pipeline
turned into a one-line error (exit 3); the contract holds, but each is a bug in that pass.

    .venv/bin/python benchmarks/bench_fuzz.py [--cases 20] [--bench-every 10]
        [--max-minutes M] [--json FILE]
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the shared corpus

import fuzz_corpus as fc  # noqa: E402

from onnxopt.recipes import builtin_recipes  # noqa: E402


def run(cases: int, bench_every: int, first_seed: int,
        max_minutes: float | None = None) -> dict[str, Any]:
    """Seed by seed over every kind, so a time limit still covers every kind evenly."""
    recipes = sorted(builtin_recipes())
    per_kind: dict[str, collections.Counter[str]] = {k: collections.Counter() for k in fc.KINDS}
    violations: list[dict[str, str]] = []
    findings: dict[str, dict[str, str]] = {}
    start = time.perf_counter()
    stopped_early = False
    for seed, kind in ((s, k) for s in range(first_seed, first_seed + cases) for k in fc.KINDS):
        if max_minutes is not None and time.perf_counter() - start > 60 * max_minutes:
            stopped_early = True
            break
        counts = per_kind[kind]
        case = fc.make_case(kind, seed)
        counts["cases"] += 1
        with tempfile.TemporaryDirectory(prefix="fuzz-") as tmp:
            folder = Path(tmp)
            model = folder / "model.onnx"
            model.write_bytes(case.data)
            data = fc.prepare_data(model, folder)
            commands: list[tuple[list[str], Path | None]] = [(["inspect", str(model)], None)]
            for recipe in recipes:
                out = folder / f"out-{recipe}.onnx"
                commands.append((fc.optimize_argv(model, out, recipe, data), out))
            if seed % bench_every == 0:
                commands.append((["bench", str(model), "--threads", "1"], None))
            for argv, out in commands:
                outcome = fc.run_command(argv, output=out)
                counts["commands"] += 1
                counts[f"exit {outcome.exitcode}"] += 1
                if "cannot handle this model" in outcome.stderr:  # a pass bug, caught
                    counts["pass failures"] += 1
                    findings.setdefault(_finding(outcome.stderr), {
                        "case": case.label, "command": argv[0] + " " + " ".join(
                            a for a in argv[1:] if not a.startswith(str(folder)))})
                problem = fc.contract_violation(outcome)
                if problem:
                    counts["violations"] += 1
                    shown = [a if not a.startswith(str(folder)) else Path(a).name
                             for a in argv]
                    violations.append({"case": case.label, "problem": problem,
                                       "repro": f"fuzz_corpus.make_case({kind!r}, {seed}); "
                                                f"onnxopt {' '.join(shown)}",
                                       "stderr_tail": outcome.stderr[-400:]})
        print(json.dumps({kind: dict(counts)}), flush=True)
    return {"cases_per_kind": cases, "first_seed": first_seed, "recipes": recipes,
            "seconds": round(time.perf_counter() - start), "stopped_early": stopped_early,
            "per_kind": per_kind, "violations": violations, "pass_failures": findings}


def _finding(stderr: str) -> str:
    """The pass and exception type of a 'cannot handle this model' line (one entry per kind)."""
    line = next(x for x in stderr.splitlines() if "cannot handle this model" in x)
    head = line.split("cannot handle this model (", 1)
    return head[0].split("pass ", 1)[-1].strip() + " " + head[1].split(":", 1)[0]


def markdown(result: dict[str, Any]) -> str:
    codes = sorted({k for c in result["per_kind"].values() for k in c if k.startswith("exit")})
    codes.append("pass failures")
    lines = ["| kind | cases | commands | " + " | ".join(codes) + " | violations |",
             "|---|---:|---:|" + "---:|" * len(codes) + "---:|"]
    total: collections.Counter[str] = collections.Counter()
    for kind, c in result["per_kind"].items():
        total.update(c)
        lines.append(f"| {kind} | {c['cases']} | {c['commands']} | "
                     + " | ".join(str(c.get(k, 0)) for k in codes) + f" | {c.get('violations', 0)} |")
    lines.append(f"| **all** | {total['cases']} | {total['commands']} | "
                 + " | ".join(str(total.get(k, 0)) for k in codes)
                 + f" | {total.get('violations', 0)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=20, help="seeds per case kind")
    parser.add_argument("--bench-every", type=int, default=10)
    parser.add_argument("--first-seed", type=int, default=1000,
                        help="first seed (the suite's examples are drawn elsewhere)")
    parser.add_argument("--max-minutes", type=float, default=None,
                        help="start no new case after this long (seed by seed over every kind)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    result = run(args.cases, args.bench_every, args.first_seed, args.max_minutes)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    print(markdown(result))
    print(f"\n{result['seconds']} s; violations: {len(result['violations'])}")
    for v in result["violations"]:
        print(f"- {v['case']}: {v['problem']} -- {v['repro']}")
    print("\npass failures turned into one-line errors (exit 3), first case of each:")
    for what, where in result["pass_failures"].items():
        print(f"- {what}: {where['case']}, onnxopt {where['command']}")
    return 1 if result["violations"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
