"""The ``onnxopt`` command line: export, inspect, optimize, bench, tune, split, report,
list-passes, demo.

Exit codes (docs/cli-exit-codes.md): 0 success, 1 a quality gate not met (verification, accuracy
budget, regression), 2 bad input (including a file that cannot be written), 3 an internal
limitation or bug (a pass that cannot handle a valid model). Errors are one line naming the file
or pass and the problem; ``--debug`` (anywhere on the command line) shows the traceback too.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import sys
import traceback
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from onnxopt.errors import InputError, InternalError, OnnxoptError, QualityGateError, write_error
from onnxopt.recipes import builtin_recipes

class _HumanHelp:
    """Help placeholders for people (``PATH``, ``N``, ``NAME=VALUE``), not Python types: typer
    shows ``<bool>`` after flags and ``<list[str]>`` after repeatable options otherwise. Options
    with their own ``metavar`` keep it; flags (and ``--help``) show none."""

    _BY_TYPE = {"path": "PATH", "int": "N", "float": "NUMBER", "str": "TEXT"}

    def get_params(self, ctx: Any) -> list[Any]:
        params = super().get_params(ctx)  # type: ignore[misc]
        for param in params:
            if param.metavar is not None:
                continue
            if getattr(param, "is_flag", False):
                param.metavar = ""
                continue
            bare = param.display_type(ctx).strip("<>").removeprefix("list[").removesuffix("]")
            human = self._BY_TYPE.get(bare.lower(), bare.upper())
            if param.param_type_name == "argument":  # name column MODEL, type column PATH
                param.metavar = param.name.upper()
                kind = human + ("..." if param.nargs != 1 else "")
                param.display_type_rich = lambda ctx, kind=kind: kind
            else:
                param.metavar = human
        return params


class _Command(_HumanHelp, typer.core.TyperCommand):
    pass


class _Group(_HumanHelp, typer.core.TyperGroup):
    pass


app = typer.Typer(
    cls=_Group,
    help="Export, optimize and measure neural networks as ONNX; every pass verified.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    epilog="Exit codes: 0 success; 1 a quality gate not met (verification, accuracy budget, "
    "regression); 2 bad input (a file, option or value; also a path that cannot be written); "
    "3 an internal limitation or bug (names the pass; rerun with --debug for the traceback); "
    "128+N stopped by signal N.",
)
console = Console(stderr=True)
out = Console()
for _stream in (console, out):
    if not _stream.is_terminal:  # redirected to a file or a pipe: tables are not hard-wrapped at 80
        _stream.width = 10_000


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks (accepted anywhere)."),
    isolate: bool = typer.Option(
        False, "--isolate", help="Run the command in a child process, so a native crash on a "
        "hostile model is a one-line error with exit 2 (accepted anywhere)."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log what each step does."),
) -> None:
    from onnxopt import quiet

    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    quiet.install(verbose)  # before any framework import: no framework noise unless --verbose


def _progress() -> Progress:
    return Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                    TimeElapsedColumn(),
                    console=console, transient=True, disable=not console.is_terminal)


def _parse_threads(text: str, *, local: bool = True) -> list[int]:
    """``1,2`` -> [1, 2]. Locally, counts above the usable cores are capped with a warning:
    999 threads spinning on 2 cores would measure nothing but contention, for hours."""
    try:
        threads = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        threads = []
    if not threads or min(threads) < 1:
        raise InputError(f"bad --threads '{text}': expected a list like 1,2")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cores = max(1, cores or 1)
    if local and max(threads) > cores:
        console.print(f"warning: --threads {text}: this machine has {cores} usable core(s); "
                      f"capping each count at {cores}", markup=False, highlight=False,
                      soft_wrap=True)
        threads = list(dict.fromkeys(min(t, cores) for t in threads))
    return threads


def _parse_settings(settings: list[str] | None) -> dict[str, Any]:
    """``--set quantize.mode=static`` -> {"quantize.mode": "static"}; values parsed as JSON if they can be."""
    overrides: dict[str, Any] = {}
    for item in settings or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise InputError(f"bad --set '{item}': expected PASS.OPTION=VALUE or OPTION=VALUE")
        try:
            overrides[key] = json.loads(raw)
        except json.JSONDecodeError:
            overrides[key] = raw
    return overrides


@app.command(cls=_Command)
def export(
    src: str = typer.Argument(..., help=".onnx | .keras | SavedModel dir | .pt2 | pkg.module:factory"),
    output: Path = typer.Option(..., "-o", "--output", help="Where to write the ONNX model."),
    opset: int = typer.Option(18, help="ONNX opset for framework exports."),
    static_batch: bool = typer.Option(False, "--static-batch", help="Keep the batch axis fixed."),
    force: bool = typer.Option(False, "--force", help="Allow overwriting the source file."),
) -> None:
    """Export a model to ONNX and verify it numerically against its framework."""
    from onnxopt.export import export_to_file
    from onnxopt.model_io import check_writable
    from onnxopt.quiet import native_stderr_filtered

    check_writable(output)  # before the export, which can take minutes
    with console.status(f"exporting {src}"), native_stderr_filtered():
        path = export_to_file(src, output, force=force, opset=opset, dynamic_batch=not static_batch)
    console.print(f"wrote {path}")


@app.command(cls=_Command)
def inspect(
    model: Path = typer.Argument(..., help="An ONNX file."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    shape: Optional[list[str]] = typer.Option(None, "--shape", metavar="NAME=DIMS", help="NAME=1x3x224x224 or DIM=4 for MACs."),
) -> None:
    """Inputs and outputs (name, dtype, shape: the names an .npz of feeds uses), parameters,
    size (raw and zipped), MACs per op type and the op histogram."""
    from onnxopt.api import load
    from onnxopt.feeds import graph_io, parse_shape_overrides
    from onnxopt.stats import macs_text, model_stats

    loaded = load(model)  # once: the statistics and the inputs come from the same model
    stats = model_stats(loaded, parse_shape_overrides(shape), file=model)
    io = graph_io(loaded)
    if as_json:
        out.print_json(json.dumps({**stats.to_dict(), **io}))
        return
    table = Table(title=str(model), show_header=False)
    for kind in ("inputs", "outputs"):
        for v in io[kind]:
            dims = "unknown" if v["shape"] is None else "x".join(map(str, v["shape"])) or "scalar"
            table.add_row(kind[:-1], f"{v['name']}  {v['dtype']}  [{dims}]")
    table.add_row("parameters", f"{stats.params:,}")
    table.add_row("size", f"{stats.size_bytes:,} B")
    table.add_row("zipped", f"{stats.zipped_bytes:,} B")
    table.add_row("MACs", f"{macs_text(stats)}  " + ", ".join(f"{k} {v:,}" for k, v in stats.macs.items()))
    table.add_row("nodes", f"{stats.nodes}  " + ", ".join(f"{k} {v}" for k, v in stats.op_histogram.items()))
    out.print(table)


@app.command(cls=_Command)
def optimize(
    model: Path = typer.Argument(..., help="An ONNX file (never modified)."),
    output: Path = typer.Option(..., "-o", "--output", help="Where to write the optimized model."),
    recipe: str = typer.Option(
        "default", "--recipe", metavar="NAME|FILE",
        help=f"Built-in recipe ({', '.join(builtin_recipes())}) or a .toml/.json file."),
    calib: Optional[Path] = typer.Option(None, "--calib", help=".npz of stacked calibration inputs."),
    eval_data: Optional[Path] = typer.Option(
        None, "--eval", help=".npz of evaluation inputs, plus optional 'labels' array."),
    max_drop: Optional[float] = typer.Option(
        None, "--max-drop", help="Accuracy budget in points for accuracy-aware passes."),
    target: Optional[str] = typer.Option(None, "--target", metavar="ISA", help="CPU target override (e.g. x86-vnni, arm64-dotprod)."),
    settings: Optional[list[str]] = typer.Option(None, "--set", metavar="PASS.OPTION=VALUE", help="PASS.OPTION=VALUE (repeatable)."),
    report: Optional[Path] = typer.Option(None, "--report", help="Folder for report.json and report.md."),
    checkpoints: Optional[Path] = typer.Option(None, "--checkpoints", help="Save the model after each pass here."),
    seed: int = typer.Option(0, help="Seed for synthesized inputs and any randomness."),
    force: bool = typer.Option(False, "--force", help="Allow writing over the input model."),
    max_memory: Optional[str] = typer.Option(
        None, "--max-memory", metavar="SIZE", help="Memory budget (e.g. 4G) for calibration and INT8's accuracy "
        "check: batches are sized so the weights plus one batch of activations fit."),
    threads: Optional[str] = typer.Option(
        None, "--threads", metavar="1,2", help="Comma-separated intra-op thread counts the model will run at; "
        "latency decisions (INT8 or FP32, LayerNorm forms) are made at these (default: 1 and "
        "all usable cores)."),
) -> None:
    """Run a recipe of passes; each pass is verified against ONNX Runtime."""
    from onnxopt.api import load, optimize as run_optimize
    from onnxopt.cli_summary import print_summary, step_description
    from onnxopt.feeds import load_evaluation
    from onnxopt.memory import parse_size
    from onnxopt.model_io import save_model
    from onnxopt.recipes import load_recipe

    budget = parse_size(max_memory) if max_memory is not None else None
    thread_counts = _parse_threads(threads) if threads else None
    _check_destinations(output, report, checkpoints)
    source = load(model)
    overrides = _parse_settings(settings)
    if max_drop is not None:
        overrides["max_drop"] = _finite(max_drop, "--max-drop", low=0.0)
    evaluation = load_evaluation(eval_data, source) if eval_data is not None else None
    total = len(load_recipe(recipe)[1])
    with _progress() as bar:
        task = bar.add_task("optimizing", total=total)

        def on_step(index: int, name: str) -> None:
            bar.update(task, description=step_description(index, total, name), completed=index)

        try:
            result, rep = run_optimize(
                source, recipe, calibration=calib, evaluation=evaluation, seed=seed, isa=target,
                checkpoint_dir=checkpoints, overrides=overrides, progress=on_step,
                max_memory=budget, threads=thread_counts)
        except QualityGateError as exc:
            partial = getattr(exc, "partial", None)
            if partial is not None:  # the best candidate is saved even when the budget is missed
                with _staged_report(report, partial[1]):
                    save_model(partial[0], output, protect=None if force else model)
                print_summary(console, partial[1], model, output)  # warnings say what fell short
                console.print("that is the best candidate found; the quality gate was not met")
            raise
    with _staged_report(report, rep):  # the report is written first: a full disk stops both
        save_model(result, output, protect=None if force else model)
    print_summary(console, rep, model, output)


def _staged_report(folder: Optional[Path], rep: Any) -> contextlib.AbstractContextManager[Any]:
    """report.json and report.md staged beside ``folder`` on entry, moved in when the block
    (writing the model) succeeds: never a model without its report, nor half a report folder."""
    from onnxopt.model_io import staged_folder

    if folder is None:
        return contextlib.nullcontext()
    return staged_folder(folder, {"report.json": rep.to_json().encode(),
                                  "report.md": rep.to_markdown().encode()})


def _check_destinations(output: Path, report: Optional[Path], checkpoints: Optional[Path]) -> None:
    """Reliability: an unwritable -o, --report or --checkpoints fails before minutes of work."""
    from onnxopt.model_io import check_writable

    check_writable(output)
    for folder in (report, checkpoints):
        if folder is not None:
            check_writable(folder, folder=True)


def _finite(value: float, option: str, *, low: float | None = None) -> float:
    """``value`` when it is a finite number not below ``low``; else a one-line InputError."""
    if not math.isfinite(value) or (low is not None and value < low):
        bound = f" >= {low:g}" if low is not None else ""
        raise InputError(f"bad {option} {value!r}: expected a finite number{bound}")
    return value


@app.command(cls=_Command)
def bench(
    models: list[Path] = typer.Argument(..., help="ONNX files; speed-ups are against the first."),
    threads: Optional[str] = typer.Option(
        None, "--threads", metavar="1,2", help="Comma-separated intra-op thread counts (default 1,2, or the "
        "--session-config's; on a --target, ORT's default)."),
    inputs: Optional[Path] = typer.Option(None, "--inputs", help=".npz with the model inputs."),
    shape: Optional[list[str]] = typer.Option(None, "--shape", metavar="NAME=DIMS", help="NAME=1x3x224x224 or DIM=4."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the results as JSON here."),
    baseline: Optional[Path] = typer.Option(
        None, "--baseline", help="A stored bench --json: exit 1 when a speed-up regressed."),
    max_regression: str = typer.Option(
        "10%", "--max-regression", metavar="PERCENT", help="Allowed drop of each speed-up (10% or 0.1)."),
    target: str = typer.Option(
        "local", "--target", metavar="WHERE", help="local | ssh://user@host[:port] | qemu-aarch64[:cpu] (emulated: "
        "checks loading and outputs, timings are not ARM performance)."),
    bootstrap: bool = typer.Option(
        False, "--bootstrap", help="ssh target: make a venv there with this onnxruntime version."),
    ssh_option: Optional[list[str]] = typer.Option(
        None, "--ssh-option", metavar="KEY=VALUE", help="ssh -o option for the target, e.g. IdentityFile=~/.ssh/board."),
    remote_python: Optional[str] = typer.Option(
        None, "--remote-python", help="ssh target: the Python to run (default: the --bootstrap "
        "venv if there is one, else python3)."),
    session_config: Optional[Path] = typer.Option(
        None, "--session-config", help="Session configuration JSON (onnxopt tune -o)."),
) -> None:
    """Latency percentiles, memory and speed-ups, measured interleaved in one process (with
    --target: on a board over ssh, or emulated aarch64, one runner process per row)."""
    from onnxopt.benchmarking import benchmark as run_benchmark
    from onnxopt.benchmarking import check_benchmark_document, compare_to_baseline
    from onnxopt.feeds import parse_shape_overrides
    from onnxopt.model_io import write_bytes_atomic
    from onnxopt.targets import benchmark_on_target, parse_target

    # Read the baseline first: a bad --baseline fails before minutes of measuring.
    allowed = _parse_fraction(max_regression, "--max-regression")
    old = _read_json(baseline) if baseline is not None else None
    if old is not None:
        check_benchmark_document(old, "--baseline", baseline)
    if json_path is not None:
        from onnxopt.model_io import check_writable

        check_writable(json_path)  # before minutes of measuring, not after
    _check_benchmarkable(models, inputs, parse_shape_overrides(shape))
    where = parse_target(target, ssh_options=ssh_option or (), bootstrap=bootstrap,
                         python=remote_python)
    # a target gets the document's settings as runner flags; local bench reads the file itself
    config = _read_json(session_config) if session_config is not None and where.kind != "local" \
        else None
    # Paths, not loaded models: bench measures the files exactly as stored (no opset upgrade).
    with _progress() as bar:
        task = bar.add_task("benchmarking", total=1.0)

        def on_progress(fraction: float, text: str) -> None:
            bar.update(task, completed=fraction, description=text)

        if where.kind == "local":
            result: Any = run_benchmark(
                models, threads=_parse_threads(threads) if threads else None, feeds=inputs,
                shapes=parse_shape_overrides(shape), names=[str(m) for m in models],
                session_config=session_config, progress=on_progress)
        else:  # one runner process per model and thread count on the target
            counts = _parse_threads(threads, local=where.kind != "ssh") if threads else None
            result = benchmark_on_target(
                where, models, threads=counts, feeds=inputs,
                shapes=parse_shape_overrides(shape), session_config=config, progress=on_progress)
            for note in result.notes:
                console.print(f"warning: {note}", markup=False, highlight=False, soft_wrap=True)
    out.print(result.to_markdown())
    if json_path is not None:
        write_bytes_atomic(json.dumps(result.to_dict(), indent=2).encode(), json_path)
    if old is not None:  # the regression gate compares speed-up ratios, never absolute times
        problems = compare_to_baseline(result.to_dict(), old, allowed)
        for problem in problems:
            console.print(f"regression: {problem}", markup=False, highlight=False, soft_wrap=True)
        if problems:
            raise QualityGateError(
                f"{len(problems)} speed-up(s) regressed by more than {allowed:.0%}", baseline)
        console.print(f"no speed-up regressed by more than {allowed:.0%} against {baseline}")


def _check_benchmarkable(models: list[Path], inputs: Optional[Path],
                         shapes: dict[str, Any]) -> None:
    """Reliability: refuse in one line what would otherwise crash or hang the benchmark: inputs
    that cannot be synthesized, and a model that does not finish one inference within the time
    limit (an endless Loop). Load and run errors are left to the benchmark's own messages."""
    from onnxopt import runner
    from onnxopt.feeds import load_npz
    from onnxopt.isolation import RunTimeLimit, bounded_run
    from onnxopt.model_io import load_model
    from onnxopt.safety import check_feedable

    for path in models:
        model = load_model(path, upgrade=False)  # hostile files are refused here
        if inputs is None:  # every model: each is run once below on its own synthesized inputs
            check_feedable(model, shapes, batch=1, path=path)
        try:
            session = runner.create_session(str(path), threads=1, opt_level="disabled")
            feeds = (load_npz(inputs) if inputs is not None
                     else runner.synthesize_inputs(session, shapes=shapes))
            bounded_run(session, feeds)
        except RunTimeLimit as exc:
            raise InputError(f"{exc}; not benchmarking it", path) from exc
        except (*runner.ORT_ERRORS, runner.RunnerError, ValueError):
            pass  # the benchmark reports these in its own words


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise InputError("no such file", path) from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"not a JSON file ({exc})", path) from exc


def _parse_fraction(text: str, option: str) -> float:
    """'10%' or '0.1' -> 0.1; anything outside [0, 1) is an error."""
    try:
        value = float(text[:-1]) / 100 if text.strip().endswith("%") else float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value < 1:
        raise InputError(
            f"bad {option} '{text}': expected a percentage like 10% or a fraction like 0.1")
    return value


@app.command(cls=_Command)
def tune(
    model: Path = typer.Argument(..., help="An ONNX file."),
    output: Optional[Path] = typer.Option(
        None, "-o", "--output", help="Write the session configuration JSON here."),
    objective: str = typer.Option("latency", "--objective", metavar="latency|memory", help="latency or memory."),
    threads: Optional[str] = typer.Option(
        None, "--threads", metavar="1,2", help="Intra-op thread counts to try (default 1,2,4.. up to the cores)."),
    inputs: Optional[Path] = typer.Option(None, "--inputs", help=".npz with the model inputs."),
    shape: Optional[list[str]] = typer.Option(None, "--shape", metavar="NAME=DIMS", help="NAME=1x3x224x224 or DIM=4."),
    time_budget: float = typer.Option(1.0, "--time-budget", help="Seconds of rounds per stage."),
) -> None:
    """Find the ORT session settings (threads, execution mode, spinning, memory arena and
    pattern) that run a model fastest (or smallest) here; write them as JSON for bench/runner."""
    from onnxopt.feeds import parse_shape_overrides
    from onnxopt.model_io import write_bytes_atomic
    from onnxopt.tune import tune as run_tune

    if objective not in ("latency", "memory"):
        raise InputError(f"bad --objective '{objective}': expected latency or memory")
    if output is not None:
        from onnxopt.model_io import check_writable

        check_writable(output)  # before the tuning, not after
    with _progress() as bar:
        task = bar.add_task("tuning", total=1.0)

        def on_progress(fraction: float, text: str) -> None:
            bar.update(task, completed=fraction, description=text)

        result = run_tune(model, objective=objective,  # type: ignore[arg-type]
                          threads=_parse_threads(threads) if threads else None, feeds=inputs,
                          shapes=parse_shape_overrides(shape), time_budget_s=time_budget,
                          progress=on_progress)
    out.print(result.to_markdown())
    if output is not None:
        write_bytes_atomic(json.dumps(result.document(), indent=2).encode(), output)
        console.print(f"wrote {output}")


@app.command(cls=_Command)
def split(
    model: Path = typer.Argument(..., help="An ONNX file (never modified)."),
    parts: int = typer.Option(..., "--parts", help="Number of sub-models."),
    output: Path = typer.Option(..., "-o", "--output", help="Folder for stages and cascade.json."),
    inputs: Optional[Path] = typer.Option(None, "--inputs", help=".npz with the model inputs."),
    shape: Optional[list[str]] = typer.Option(None, "--shape", metavar="NAME=DIMS", help="NAME=1x3x224x224 or DIM=4."),
    no_memory: bool = typer.Option(False, "--no-memory", help="Skip the peak-memory comparison."),
) -> None:
    """Split a model into a cascade of sub-models loaded one at a time (less peak memory);
    outputs are verified identical to the whole model's."""
    from onnxopt.feeds import parse_shape_overrides
    from onnxopt.model_io import check_writable
    from onnxopt.split import split_model

    check_writable(output, folder=True)
    with _progress() as bar:
        task = bar.add_task("splitting", total=1.0)

        def on_progress(fraction: float, text: str) -> None:
            bar.update(task, completed=fraction, description=text)

        result = split_model(model, parts, output, feeds=inputs,
                             shapes=parse_shape_overrides(shape), measure_memory=not no_memory,
                             progress=on_progress)
    out.print(result.to_markdown())
    console.print(f"wrote {result.manifest} (run it: python runner.py {result.manifest})")


@app.command(cls=_Command)
def report(
    results: Path = typer.Argument(
        ..., help="A JSON document onnxopt wrote: the suite's results.json, optimize --report's "
        "report.json, bench --json output, or the demo's report.json."),
    output: Optional[Path] = typer.Option(
        None, "-o", "--output", help="report.html or report.md (default: Markdown on stdout)."),
) -> None:
    """Render onnxopt's results as a self-contained HTML page or as Markdown."""
    from onnxopt.report import load_results, render_markdown, write_report

    doc = load_results(results)
    if output is None:
        out.print(render_markdown(doc), markup=False, highlight=False, emoji=False, soft_wrap=True,
                  end="")
        return
    console.print(f"wrote {write_report(doc, output)}", markup=False, highlight=False,
                  soft_wrap=True)


@app.command("list-passes", cls=_Command)
def list_passes(as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Every registered pass with its options, and the built-in recipes."""
    from onnxopt.registry import describe_passes

    passes = describe_passes()
    recipes = builtin_recipes()
    if as_json:
        out.print_json(json.dumps({"passes": passes, "recipes": recipes}, default=str))
        return
    for p in passes:
        out.print(f"[bold]{p['name']}[/bold]  {p['summary']}")
        for o in p["options"]:
            out.print(f"    {o['name']} ({o['type']}, default {o['default']!r}): {o['help']}")
    out.print("\n[bold]recipes[/bold]")
    for name, steps in recipes.items():
        out.print(f"    {name}: " + " -> ".join(s if isinstance(s, str) else s["pass"] for s in steps))


@app.command(cls=_Command)
def demo(out_dir: Path = typer.Option(Path("demo-report"), "--out", help="Folder for the report.")) -> None:
    """Train two digit classifiers, export, optimize and measure them; write a report."""
    from onnxopt.demo import run_demo

    with _progress() as bar:
        task = bar.add_task("demo", total=None)

        def on_step(description: str) -> None:
            bar.update(task, description=description)

        run_demo(out_dir, progress=on_step)
    written = [out_dir / n for n in ("report.html", "report.md") if (out_dir / n).exists()]
    console.print("report written to " + " and ".join(str(p) for p in written))


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the app, turning onnxopt's errors into one line and an exit code.

    Reliability: SIGINT and SIGTERM stop the command through its cleanup (exit 128 + signal): no
    partial output, and every temporary file of the run lives in one private folder removed at
    the end. ``--isolate`` (accepted anywhere) runs the command in a child process, so a native
    crash on a hostile model (ONNX Runtime, onnx) becomes a one-line error with exit code 2.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    isolate = "--isolate" in args
    args = [a for a in args if a not in ("--debug", "--isolate")]
    from onnxopt.isolation import interrupts_as_exceptions, private_tempdir

    try:
        with interrupts_as_exceptions() as received, private_tempdir():
            return _run_isolated(args, debug) if isolate else _run(args, debug, received)
    except KeyboardInterrupt as exc:  # a signal outside the command (before it, or isolated)
        return 128 + getattr(exc, "signum", signal.SIGINT)


def _run(args: list[str], debug: bool, received: list[int]) -> int:
    try:
        code = app(args=args, prog_name="onnxopt", standalone_mode=False)
    except OnnxoptError as exc:
        return _report_error(exc, debug)
    except typer.Exit as exc:
        return exc.exit_code
    except (typer.Abort, KeyboardInterrupt):
        return _interrupted(received)
    except typer.TyperException as exc:  # usage errors: missing or bad options
        show = getattr(exc, "show", None)
        if show is not None:
            show()
        return getattr(exc, "exit_code", 2) or 2
    except OSError as exc:  # reliability: a write or read the command did not wrap itself
        return _report_error(write_error(exc, exc.filename) if exc.filename else
                             InputError(exc.strerror or str(exc)), debug)
    except MemoryError as exc:
        return _report_error(InternalError(
            f"out of memory ({exc or 'allocation failed'}); try --max-memory or smaller "
            "inputs"), debug)
    except Exception as exc:  # reliability: a bug is one line and exit 3, not a traceback
        return _report_error(InternalError(
            f"internal error ({type(exc).__name__}: {' '.join(str(exc).split())[:300]}); "
            "rerun with --debug for the traceback"), debug)
    if received:  # typer turns a KeyboardInterrupt into a returned exit code 130
        return _interrupted(received)
    return code if isinstance(code, int) else 0


def _report_error(exc: OnnxoptError, debug: bool) -> int:
    """One ``error:`` line (the traceback before it under ``--debug``); the exit code."""
    if debug:
        traceback.print_exc()
    console.print(f"error: {exc}", markup=False, highlight=False, soft_wrap=True)
    return exc.exit_code


def _interrupted(received: list[int]) -> int:
    signum = received[0] if received else signal.SIGINT
    console.print(f"error: interrupted by {signal.Signals(signum).name}; "
                  "unfinished outputs and temporary files were removed",
                  markup=False, highlight=False, soft_wrap=True)
    return 128 + signum


def _run_in_child(args: list[str], debug: bool) -> int:
    """The command inside ``--isolate``'s child process (with its own signal handling)."""
    from onnxopt.isolation import interrupts_as_exceptions

    with interrupts_as_exceptions() as received:
        return _run(args, debug, received)


def _run_isolated(args: list[str], debug: bool) -> int:
    from onnxopt.isolation import run_in_child

    outcome = run_in_child(_run_in_child, args, debug)
    if outcome.signal_name is not None:
        console.print(f"error: the command crashed in native code ({outcome.signal_name}), "
                      "most likely on a malformed model; nothing was written",
                      markup=False, highlight=False, soft_wrap=True)
        return 2
    if outcome.value is None:  # a bug: the child printed its traceback
        return outcome.exitcode or 1
    return int(outcome.value)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
