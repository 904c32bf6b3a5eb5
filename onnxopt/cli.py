"""The ``onnxopt`` command line: export, inspect, optimize, bench, list-passes, demo.

Exit codes: 0 success, 1 a quality gate not met (verification, accuracy budget, regression),
2 bad input. Errors are one line naming the file and the problem; ``--debug`` (anywhere on the
command line) shows the traceback instead.
"""

from __future__ import annotations

import json
import logging
import sys
import traceback
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from onnxopt.errors import InputError, OnnxoptError, QualityGateError

app = typer.Typer(
    help="Export, optimize and measure neural networks as ONNX; every pass verified.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)
out = Console()


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks (accepted anywhere)."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log what each step does."),
) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )


def _progress() -> Progress:
    return Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                    TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(),
                    console=console, transient=True, disable=not console.is_terminal)


def _parse_threads(text: str) -> list[int]:
    try:
        threads = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        threads = []
    if not threads or min(threads) < 1:
        raise InputError(f"bad --threads '{text}': expected a list like 1,2")
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


@app.command()
def export(
    src: str = typer.Argument(..., help=".onnx | .keras | SavedModel dir | .pt2 | pkg.module:factory"),
    output: Path = typer.Option(..., "-o", "--output", help="Where to write the ONNX model."),
    opset: int = typer.Option(18, help="ONNX opset for framework exports."),
    static_batch: bool = typer.Option(False, "--static-batch", help="Keep the batch axis fixed."),
    force: bool = typer.Option(False, "--force", help="Allow overwriting the source file."),
) -> None:
    """Export a model to ONNX and verify it numerically against its framework."""
    from onnxopt.export import export_to_file

    with console.status(f"exporting {src}"):
        path = export_to_file(src, output, force=force, opset=opset, dynamic_batch=not static_batch)
    console.print(f"wrote {path}")


@app.command()
def inspect(
    model: Path = typer.Argument(..., help="An ONNX file."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    shape: Optional[list[str]] = typer.Option(None, "--shape", help="NAME=1x3x224x224 or DIM=4 for MACs."),
) -> None:
    """Parameters, size (raw and zipped), MACs per op type and the op histogram."""
    from onnxopt.api import inspect as inspect_model
    from onnxopt.feeds import parse_shape_overrides

    stats = inspect_model(model, parse_shape_overrides(shape))
    if as_json:
        out.print_json(json.dumps(stats.to_dict()))
        return
    table = Table(title=str(model), show_header=False)
    table.add_row("parameters", f"{stats.params:,}")
    table.add_row("size", f"{stats.size_bytes:,} B")
    table.add_row("zipped", f"{stats.zipped_bytes:,} B")
    table.add_row("MACs", f"{stats.total_macs:,}  " + ", ".join(f"{k} {v:,}" for k, v in stats.macs.items()))
    table.add_row("nodes", f"{stats.nodes}  " + ", ".join(f"{k} {v}" for k, v in stats.op_histogram.items()))
    out.print(table)


@app.command()
def optimize(
    model: Path = typer.Argument(..., help="An ONNX file (never modified)."),
    output: Path = typer.Option(..., "-o", "--output", help="Where to write the optimized model."),
    recipe: str = typer.Option("default", "--recipe", help="Built-in recipe name or a .toml/.json file."),
    calib: Optional[Path] = typer.Option(None, "--calib", help=".npz of stacked calibration inputs."),
    eval_data: Optional[Path] = typer.Option(
        None, "--eval", help=".npz of evaluation inputs, plus optional 'labels' array."),
    max_drop: Optional[float] = typer.Option(
        None, "--max-drop", help="Accuracy budget in points for accuracy-aware passes."),
    target: Optional[str] = typer.Option(None, "--target", help="CPU target override (e.g. x86-vnni, arm64-dotprod)."),
    settings: Optional[list[str]] = typer.Option(None, "--set", help="PASS.OPTION=VALUE (repeatable)."),
    report: Optional[Path] = typer.Option(None, "--report", help="Folder for report.json and report.md."),
    checkpoints: Optional[Path] = typer.Option(None, "--checkpoints", help="Save the model after each pass here."),
    seed: int = typer.Option(0, help="Seed for synthesized inputs and any randomness."),
    force: bool = typer.Option(False, "--force", help="Allow writing over the input model."),
) -> None:
    """Run a recipe of passes; each pass is verified against ONNX Runtime."""
    from onnxopt.api import load, optimize as run_optimize
    from onnxopt.feeds import check_feeds, load_npz
    from onnxopt.model_io import save_model

    source = load(model)
    overrides = _parse_settings(settings)
    if max_drop is not None:
        overrides["max_drop"] = max_drop
    evaluation = None
    if eval_data is not None:
        arrays = load_npz(eval_data)
        labels = arrays.pop("labels", None)
        evaluation = (check_feeds(arrays, source, eval_data), labels)
    with _progress() as bar:
        task = bar.add_task("optimizing", total=None)

        def on_step(index: int, name: str) -> None:
            bar.update(task, description=f"pass {name}", completed=index)

        try:
            result, rep = run_optimize(
                source, recipe, calibration=calib, evaluation=evaluation, seed=seed, target=target,
                checkpoint_dir=checkpoints, overrides=overrides, progress=on_step)
        except QualityGateError as exc:
            partial = getattr(exc, "partial", None)
            if partial is not None:  # the best candidate is saved even when the budget is missed
                save_model(partial[0], output, protect=None if force else model)
                if report is not None:
                    _write_report(report, partial[1])
                console.print(f"wrote best candidate to {output}")
            raise
    save_model(result, output, protect=None if force else model)
    if report is not None:
        _write_report(report, rep)
    before, after = rep.before, rep.after
    console.print(
        f"wrote {output}: {before['size_bytes']:,} -> {after['size_bytes']:,} bytes, "
        f"{before['total_macs']:,} -> {after['total_macs']:,} MACs, "
        f"{before['nodes']} -> {after['nodes']} nodes")


def _write_report(folder: Path, rep: Any) -> None:
    from onnxopt.model_io import write_bytes_atomic

    write_bytes_atomic(rep.to_json().encode(), folder / "report.json")
    write_bytes_atomic(rep.to_markdown().encode(), folder / "report.md")


@app.command()
def bench(
    models: list[Path] = typer.Argument(..., help="ONNX files; speed-ups are against the first."),
    threads: str = typer.Option("1,2", "--threads", help="Comma-separated intra-op thread counts."),
    inputs: Optional[Path] = typer.Option(None, "--inputs", help=".npz with the model inputs."),
    shape: Optional[list[str]] = typer.Option(None, "--shape", help="NAME=1x3x224x224 or DIM=4."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the results as JSON here."),
) -> None:
    """Latency percentiles, memory and speed-ups, measured interleaved in one process."""
    from onnxopt.api import load
    from onnxopt.benchmark import benchmark as run_benchmark
    from onnxopt.feeds import load_feeds, parse_shape_overrides
    from onnxopt.model_io import write_bytes_atomic

    loaded = [load(m) for m in models]
    feeds = load_feeds(inputs, loaded[0]) if inputs is not None else None
    with _progress() as bar:
        task = bar.add_task("benchmarking", total=None)

        def on_progress(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        result = run_benchmark(
            loaded, threads=_parse_threads(threads), feeds=feeds,
            shapes=parse_shape_overrides(shape), names=[str(m) for m in models], progress=on_progress)
    out.print(result.to_markdown())
    if json_path is not None:
        write_bytes_atomic(json.dumps(result.to_dict(), indent=2).encode(), json_path)


@app.command("list-passes")
def list_passes(as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Every registered pass with its options, and the built-in recipes."""
    from onnxopt.recipes import builtin_recipes
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


@app.command()
def demo(out_dir: Path = typer.Option(Path("demo-report"), "--out", help="Folder for the report.")) -> None:
    """Train two digit classifiers, export, optimize and measure them; write a report."""
    from onnxopt.demo import run_demo

    with _progress() as bar:
        task = bar.add_task("demo", total=None)

        def on_step(description: str) -> None:
            bar.update(task, description=description)

        run_demo(out_dir, progress=on_step)
    console.print(f"report written to {out_dir / 'report.md'}")


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the app, turning onnxopt's errors into one line and an exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    args = [a for a in args if a != "--debug"]
    try:
        app(args=args, prog_name="onnxopt", standalone_mode=False)
    except OnnxoptError as exc:
        if debug:
            traceback.print_exc()
        console.print(f"error: {exc}", markup=False, highlight=False, soft_wrap=True)
        return exc.exit_code
    except typer.Exit as exc:
        return exc.exit_code
    except typer.Abort:
        console.print("interrupted")
        return 130
    except typer.TyperException as exc:  # usage errors: missing or bad options
        show = getattr(exc, "show", None)
        if show is not None:
            show()
        return getattr(exc, "exit_code", 2) or 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
