"""The benchmark suite: every suite model against FP32, ORT's quantizers and onnxopt's recipes.

    .venv/bin/python benchmarks/suite.py            # everything (make bench); rewrites RESULTS.md
    .venv/bin/python benchmarks/suite.py --quick    # a few small models, CI smoke (< 3 min)
    .venv/bin/python benchmarks/suite.py --models 'light-*' --recipes int8 --out /tmp/run
    .venv/bin/python benchmarks/suite.py --update --models keras-vgg16   # re-run one model

For each model (built by ``benchmarks/models.py``) the candidates are: the FP32 export (the
reference), ORT ``quantize_dynamic`` and ``quantize_static`` with defaults, and every built-in
recipe (``onnxopt.recipes.builtin_recipes()``, so new passes join without edits here), each given
calibration data and evaluation data (with labels where the task has them). A recipe that refuses
a model is recorded as not applicable; one that fails or runs out of time is recorded with its
one-line error, and the suite goes on.

Every candidate and every intermediate step of every recipe (the per-pass waterfall, from the
pipeline's checkpoints) is measured: size, zipped size, params, MACs, quality, and latency
interleaved with the FP32 file in one process at each thread count.

Writes ``OUT/results.json`` (schema: :mod:`onnxopt.report.schema`), ``OUT/report.html``,
``OUT/report.md``, ``OUT/suite.log`` and ``OUT/logs/`` (stderr of failed children); a full run
(no ``--quick``, ``--models`` or ``--recipes``) also regenerates the suite section of
``benchmarks/RESULTS.md``. Models are built, and candidates produced, in child processes under a
time and memory limit; the suite's own process only measures.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import logging
import os
import shlex
import shutil
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# models, suite_candidates, suite_measure: siblings in benchmarks/ (the script folder is on path)
import models
import numpy as np
import suite_candidates as produce
import suite_measure as measure

from onnxopt import report
from onnxopt.errors import InputError
from onnxopt.model_io import one_line, write_bytes_atomic
from onnxopt.recipes import builtin_recipes
from onnxopt.report.sensitivity import find_sensitivity
from onnxopt.runner import ORT_ERRORS, machine_info

HERE = Path(__file__).resolve().parent
RESULTS_MD = HERE / "RESULTS.md"
BEGIN, END = "<!-- suite:begin -->", "<!-- suite:end -->"
VERSIONED = ("onnxopt", "onnx", "onnx-ir", "onnxscript", "onnxruntime", "numpy", "torch",
             "tensorflow-cpu", "keras", "tf2onnx", "transformers", "scikit-learn", "matplotlib")

log = logging.getLogger("onnxopt.suite")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="benchmarks/suite.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small models only (CI smoke, < 3 min)")
    p.add_argument("--models", default="", help="comma-separated names or globs (see --list)")
    p.add_argument("--recipes", default="", help="comma-separated recipe names or globs")
    p.add_argument("--out", type=Path, default=HERE / "out", help="output folder")
    p.add_argument("--threads", default="1,2", help="intra-op thread counts")
    p.add_argument("--seconds-per-model", type=float, default=None,
                   help="timed seconds per file and thread count (default 0.6, quick 0.15)")
    p.add_argument("--recipe-timeout", type=float, default=1200.0,
                   help="seconds per candidate (recipe or ORT baseline)")
    p.add_argument("--build-timeout", type=float, default=3600.0, help="seconds per model build")
    p.add_argument("--max-child-memory", type=float, default=None,
                   help="MB a build or recipe child may hold resident (default: 60%% of RAM, "
                        "at most 16 GB)")
    p.add_argument("--no-memory", action="store_true", help="skip peak-memory child processes")
    p.add_argument("--results-md", choices=("auto", "yes", "no"), default="auto",
                   help="rewrite the suite section of benchmarks/RESULTS.md (auto: full runs)")
    p.add_argument("--keep-models", action="store_true", help="keep OUT/work/ (model files)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--list", action="store_true", help="list the models and recipes, then exit")
    p.add_argument("--update", action="store_true",
                   help="re-run the selected models into OUT/results.json, replacing their "
                        "records and keeping the others (RESULTS.md too if that run was full)")
    p.add_argument("--render-only", action="store_true",
                   help="re-render OUT/results.json (reports; RESULTS.md with --results-md yes)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    try:
        specs = models.select(_split(args.models), args.quick)
        recipes, aliases = select_recipes(_split(args.recipes))
        threads = [int(t) for t in args.threads.split(",") if t.strip()]
    except (InputError, ValueError) as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    if args.list:
        for s in models.SPECS:
            sys.stdout.write(f"{s.name:22} {'quick ' if s.quick else '      '}{s.description}\n")
        for name, steps in recipes.items():
            sys.stdout.write(f"recipe {name}: {' -> '.join(steps)}\n")
        return 0
    if args.render_only:  # the figures stay those of the run that measured them
        try:
            write_outputs(report.load_results(args.out / "results.json"), args.out,
                          results_md=args.results_md == "yes")
        except InputError as exc:
            sys.stderr.write(f"error: {exc}\n")
            return 2
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    _log_to(args.out / "suite.log")
    full = not (args.quick or args.models or args.recipes)
    if args.update:
        try:
            doc = _updated_document(args.out / "results.json", argv, specs)
        except InputError as exc:
            sys.stderr.write(f"error: {exc}\n")
            return 2
        full = bool(doc["settings"].get("full"))
    else:
        doc = new_document(argv, args, threads, recipes, aliases)
        doc["settings"]["full"] = full
    start = time.perf_counter()
    for spec in specs:
        log.info("model %s", spec.name)
        record = run_model(spec, recipes, args, threads)
        record["load_average"] = _load_average()  # how busy the machine was
        _put_model(doc, record)
        if not args.update:
            doc["duration_s"] = time.perf_counter() - start
        _write_json(doc, args.out / "results.json")  # progress survives an interrupted run
    write_outputs(doc, args.out, results_md=args.results_md == "yes" or
                  (args.results_md == "auto" and full))
    log.info("done in %.1f min: %s", (time.perf_counter() - start) / 60, args.out)
    return 0


def _updated_document(path: Path, argv: list[str],
                      specs: list[models.ModelSpec]) -> dict[str, Any]:
    """The earlier run's document, with this re-run recorded in its ``updates`` (a model fixed
    after a long full run is measured again without repeating the others)."""
    doc = report.load_results(path)
    python, script = _as_typed(sys.executable), _as_typed(__file__)
    doc.setdefault("updates", []).append({
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join([python, script, *argv]),
        "models": [s.name for s in specs],
    })
    return doc


def _put_model(doc: dict[str, Any], record: dict[str, Any]) -> None:
    """Replace the model's earlier record in place, or append it."""
    names = [m["name"] for m in doc["models"]]
    if record["name"] in names:
        doc["models"][names.index(record["name"])] = record
    else:
        doc["models"].append(record)


def _split(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def select_recipes(patterns: list[str]) -> tuple[dict[str, list[str]], dict[str, str]]:
    """Built-in recipes (step names) matching ``patterns``; recipes with identical steps run once.

    Returns ``(recipes, aliases)`` where ``aliases`` maps a skipped name to the one that ran.
    """
    import fnmatch

    chosen: dict[str, list[str]] = {}
    aliases: dict[str, str] = {}
    seen: dict[str, str] = {}
    everything = builtin_recipes()
    for name, steps in everything.items():
        if patterns and not any(fnmatch.fnmatch(name, p) for p in patterns):
            continue
        key = json.dumps(steps, sort_keys=True)
        if key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        chosen[name] = [s if isinstance(s, str) else str(s.get("pass")) for s in steps]
    if patterns and not chosen:
        raise InputError(f"no recipe matches {', '.join(patterns)} "
                         f"(recipes: {', '.join(everything)})")
    return chosen, aliases


def new_document(argv: list[str], args: argparse.Namespace, threads: list[int],
                 recipes: dict[str, list[str]], aliases: dict[str, str]) -> dict[str, Any]:
    python, script = _as_typed(sys.executable), _as_typed(__file__)
    return {
        "schema_version": report.SCHEMA_VERSION,
        "kind": "onnxopt.suite",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join([python, script, *argv]),
        "duration_s": None,
        "machine": machine_info(),
        "versions": _versions(),
        "settings": {
            "threads": threads, "quick": args.quick, "seed": args.seed,
            "seconds_per_model": _seconds_per_model(args),
            "recipe_timeout_s": args.recipe_timeout, "memory": not args.no_memory,
            "group_bytes": measure.GROUP_BYTES, "recipe_aliases": aliases,
            "latency_feeds": "batch 1: the first evaluation sample",
        },
        "recipes": recipes,
        "models": [],
    }


def _as_typed(path: str) -> str:
    """``path`` as the user would type it from here: relative when below the working directory."""
    relative = os.path.relpath(path)
    return path if relative.startswith("..") else relative


def _seconds_per_model(args: argparse.Namespace) -> float:
    if args.seconds_per_model is not None:
        return args.seconds_per_model
    return 0.15 if args.quick else 0.6


def _load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages: on a shared machine they say how noisy the figures are."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    for dist in VERSIONED:
        try:
            found[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            found[dist] = None
    return found


# ----------------------------------------------------------------------------------------------
# One model


def run_model(spec: models.ModelSpec, recipes: dict[str, list[str]], args: argparse.Namespace,
              threads: list[int]) -> dict[str, Any]:
    """Build, produce every candidate, measure, and return the model's results record."""
    record: dict[str, Any] = {
        "name": spec.name, "description": spec.description, "metric": "cosine", "inputs": {},
        "data": {}, "status": "ok", "error": None, "build_s": None, "candidates": [],
        "benchmark": [],
    }
    work = args.out / "work" / spec.name
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        # Built in a child: torch and TensorFlow never load into the suite's process, and a build
        # that crashes or exhausts memory (tf2onnx on VGG16 can) costs one model, not the run.
        built = produce.run_child(
            [sys.executable, str(HERE / "models.py"), spec.name, str(args.seed),
             "quick" if args.quick else "full", str(work)],
            work / "build.log", timeout_s=args.build_timeout, max_rss_mb=_max_child_mb(args))
        record["build_s"] = built.wall_s
        if built.code != 0:
            _keep_log(work / "build.log", args.out, spec.name, "build")
            log.error("%s: build failed: %s", spec.name, built.error_line())
            return {**record, "status": "failed", "error": f"build: {built.error_line()}"}
        saved = models.load_saved(work)
        record["metric"] = "top1" if saved.labels is not None else "cosine"
        record["inputs"] = {k: {"shape": list(v.shape), "dtype": str(v.dtype)}
                            for k, v in saved.bench_feeds().items()}
        record["data"] = {part: int(len(next(iter(getattr(saved, part).values()))))
                          for part in models.PARTS}
        produced = produce_candidates(saved, recipes, work, args)
        candidates, bench_docs = measure_candidates(saved, produced, args, threads)
        record["candidates"], record["benchmark"] = candidates, bench_docs
    # The suite boundary: whatever breaks while measuring one model (ORT refusing the FP32 file,
    # a pass's output that trips the measurement) is recorded with its one-line reason and the
    # traceback in suite.log; the other models still run.
    except Exception as exc:  # noqa: BLE001
        log.error("%s: failed\n%s", spec.name, traceback.format_exc())
        record.update(status="failed", error=one_line(exc))
    finally:
        if not args.keep_models:
            shutil.rmtree(work, ignore_errors=True)
    return record


def _keep_log(log_file: Path, out: Path, model: str, what: str) -> None:
    """Copy a failed child's stderr to OUT/logs/ (the work folder is removed after each model)."""
    if log_file.is_file():
        (out / "logs").mkdir(exist_ok=True)
        shutil.copyfile(log_file, out / "logs" / f"{model}--{what}.log")


def _max_child_mb(args: argparse.Namespace) -> float:
    if args.max_child_memory is not None:
        return args.max_child_memory
    total = machine_info().get("mem_total_mb") or 16_000
    return min(16_000.0, 0.6 * total)


def produce_candidates(saved: models.Saved, recipes: dict[str, list[str]], work: Path,
                       args: argparse.Namespace) -> list[tuple[str, str, produce.Produced]]:
    """(name, kind, produced) for FP32, the ORT baselines and every recipe."""
    out: list[tuple[str, str, produce.Produced]] = [
        ("fp32", "reference", produce.Produced("ok", saved.path))]
    jobs = [("ort-dynamic", "baseline", "ort-dynamic"), ("ort-static", "baseline", "ort-static")]
    jobs += [(name, "recipe", "recipe") for name in recipes]
    for name, kind, job in jobs:
        log.info("  %s %s", kind, name)
        result = produce.produce(job, name, saved.path, work / "candidates" / name,
                                 calibration=work / "calibration.npz",
                                 evaluation=work / "tuning.npz", seed=args.seed,
                                 timeout_s=args.recipe_timeout, max_rss_mb=_max_child_mb(args))
        if result.status != "ok":
            log.info("    %s: %s", result.status, result.error)
            _keep_log(work / "candidates" / name / "stderr.log", args.out, work.name, name)
        out.append((name, kind, result))
    return out


def measure_candidates(saved: models.Saved, produced: list[tuple[str, str, produce.Produced]],
                       args: argparse.Namespace, threads: list[int]
                       ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Stats, quality and latency of every distinct file; the candidates' result records."""
    files: dict[str, measure.Measured] = {}

    def measured(path: Path, name: str) -> measure.Measured:
        key = measure.sha256(path)
        if key not in files:
            files[key] = measure.Measured(path, name)
        return files[key]

    fp32_path = produced[0][2].path
    assert fp32_path is not None
    reference = measured(fp32_path, "fp32")
    finals: dict[str, measure.Measured] = {}
    steps: dict[str, list[measure.Measured | None]] = {}
    for name, _, p in produced:
        if p.path is None:
            continue
        if p.report is not None:
            steps[name] = _step_files(name, p, reference, measured)
            last = steps[name][-1] if steps[name] else None
            if last is not None and not p.report["passes"][-1].get("modified", True):
                finals[name] = last  # the recipe's output is the unchanged model before it
                continue
        finals[name] = measured(p.path, name)
        if steps.get(name):  # the last checkpoint is the output before its provenance stamp:
            steps[name][-1] = finals[name]  # one model, measured once (one speed-up per file)
    log.info("  measuring %d distinct files", len(files))
    ref_outputs = measure.reference_outputs(fp32_path, saved.evaluation)
    for m in files.values():
        m.stats = measure.stats_of(m.path, _shapes(saved))  # MACs at batch 1
        try:
            m.quality = measure.quality_of(m.path, saved.evaluation, ref_outputs, saved.labels)
        except ORT_ERRORS as exc:
            m.error = f"ONNX Runtime cannot run it: {one_line(exc)}"
    runnable_finals = _unique([m for m in finals.values() if m is not reference and not m.error])
    final_ids = {id(m) for m in runnable_finals}
    intermediates = _unique([m for ms in steps.values() for m in ms
                             if m is not None and m is not reference and not m.error
                             and id(m) not in final_ids])
    bench_docs = []
    feeds = saved.bench_feeds()
    seconds = _seconds_per_model(args)
    for label, members, memory in (("candidates", runnable_finals, not args.no_memory),
                                   ("steps", intermediates, False)):
        if not members and label == "steps":
            continue
        for group in measure.latency_groups(reference, members):
            log.info("  latency of %d %s", len(group) - 1, label)
            doc = measure.measure_latency(group, feeds, threads=threads, seconds_per_model=seconds,
                                          memory=memory, keep_first=bool(reference.latency),
                                          progress=lambda what: None)
            bench_docs.append(doc)
    records = [_candidate_record(name, kind, p, finals.get(name), steps.get(name), p.report)
               for name, kind, p in produced]
    return records, bench_docs


def _step_files(name: str, p: produce.Produced, reference: measure.Measured,
                measured: Any) -> list[measure.Measured | None]:
    """The model after each pass of a recipe, from the pipeline's checkpoints.

    A pass that reports no change shares the figures of the model it received: its checkpoint
    is the same graph re-serialized, and measuring it again would only add noise (and time).
    """
    assert p.report is not None
    by_index = {ck.name[:2]: ck for ck in p.checkpoints}
    files: list[measure.Measured | None] = []
    previous: measure.Measured | None = reference
    for i, rec in enumerate(p.report["passes"]):
        if not rec.get("modified", True):
            files.append(previous)
            continue
        ck = by_index.get(f"{i + 1:02d}")
        previous = None if ck is None else measured(ck, f"{name}/{ck.stem}")
        files.append(previous)
    return files


def _shapes(saved: models.Saved) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in saved.bench_feeds().items()}


def _unique(items: list[measure.Measured]) -> list[measure.Measured]:
    seen: set[int] = set()
    out = []
    for m in items:
        if id(m) not in seen:
            seen.add(id(m))
            out.append(m)
    return out


def _candidate_record(name: str, kind: str, p: produce.Produced, final: measure.Measured | None,
                      steps: list[measure.Measured | None] | None,
                      rep: dict[str, Any] | None) -> dict[str, Any]:
    from onnxopt.report.schema import new_candidate

    status, error = p.status, p.error
    if final is not None and final.error:
        status, error = "failed", final.error
    c = new_candidate(name, kind, status=status, error=error, optimize_s=p.optimize_s,
                      wall_s=p.wall_s)
    if final is not None and not final.error:
        c.update(stats=final.stats, latency=final.latency, peak_rss_mb=final.peak_rss_mb,
                 quality=final.quality)
    if rep is not None:
        c["steps"] = [_step_record(rec, steps[i] if steps and i < len(steps) else None)
                      for i, rec in enumerate(rep.get("passes") or [])]
        c["sensitivity"] = find_sensitivity(c["steps"])
    return c


def _step_record(rec: dict[str, Any], m: measure.Measured | None) -> dict[str, Any]:
    ok = m is not None and not m.error
    return {
        "name": rec.get("name"), "modified": rec.get("modified"), "seconds": rec.get("seconds"),
        "options": rec.get("options") or {}, "budget": rec.get("budget"),
        "stats": m.stats if ok else rec.get("stats") or {},
        "latency": m.latency if ok else {}, "quality": m.quality if ok else {},
        "error": m.error if m is not None else None,
        "notes": rec.get("notes") or {},
    }


# ----------------------------------------------------------------------------------------------
# Outputs


def write_outputs(doc: dict[str, Any], out: Path, *, results_md: bool) -> None:
    """results.json, report.md, report.html (when matplotlib is there) and RESULTS.md."""
    _write_json(doc, out / "results.json")
    report.write_report(doc, out / "report.md")
    try:
        report.write_report(doc, out / "report.html")
    except InputError as exc:  # matplotlib missing: the Markdown and JSON still stand
        log.warning("no report.html: %s", exc.message)
    if results_md:
        text = RESULTS_MD.read_text() if RESULTS_MD.exists() else "# Benchmark results\n"
        section = report.render_results_section(doc)
        write_bytes_atomic(report.replace_between_markers(text, BEGIN, END, section).encode(),
                           RESULTS_MD)
        log.info("updated %s", RESULTS_MD)


def _write_json(doc: dict[str, Any], path: Path) -> None:
    write_bytes_atomic(json.dumps(_plain(doc), indent=1, allow_nan=False).encode(), path)


def _plain(value: Any) -> Any:
    """Strict JSON values: numpy scalars as Python numbers, NaN and infinities as null."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def _log_to(path: Path) -> None:
    fmt = logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S")
    for handler in (logging.StreamHandler(sys.stderr), logging.FileHandler(path, mode="w")):
        handler.setFormatter(fmt)
        log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    sys.exit(main())
