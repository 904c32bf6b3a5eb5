"""What ``onnxopt optimize`` prints when it is done: a summary a person reads in five seconds.

The report's JSON holds everything; the console shows, per pass, what changed (nodes, size,
MACs), the fidelity or accuracy that was measured, the speed-up where one was measured, a
``warning:`` line for every pass that kept the model or fell short (its ``notes["warning"]``),
and one last line with the sizes of the files on disk (not a re-serialization, which can differ
by metadata bytes).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from onnxopt.pipeline import OptimizationReport, PassRecord
from onnxopt.stats import file_bytes, macs_text


def step_description(index: int, total: int, name: str) -> str:
    """The progress bar's text before step ``index`` (0-based) of ``total``: ``step 2/3: fuse``."""
    return f"step {index + 1}/{total}: {name}"


def print_summary(console: Console, rep: OptimizationReport, source: Path, output: Path) -> None:
    """The per-pass table, the warnings and the ``wrote`` line, on ``console``."""
    columns = ["pass", "result", "nodes", "size (B)", "MACs", "fidelity / accuracy", "speed-up"]
    rows, previous = [], rep.before
    for record in rep.passes:
        stats = record.stats or previous
        rows.append([record.name, _result(record), _change(previous["nodes"], stats["nodes"]),
                     _change(previous["size_bytes"], stats["size_bytes"], "{:,}"),
                     _macs_change(previous, stats), _quality(record), _speedup(record)])
        previous = stats
    shown = [i for i, _ in enumerate(columns) if i < 5 or any(row[i] for row in rows)]
    table = Table(*(columns[i] for i in shown), box=None, pad_edge=False, show_edge=False,
                  header_style="bold")
    for row in rows:
        table.add_row(*(row[i] for i in shown))
    console.print(table, markup=False, highlight=False)
    for line in warning_lines(rep):
        console.print(line, markup=False, highlight=False, soft_wrap=True)
    console.print(wrote_line(rep, file_bytes(source), output), markup=False, highlight=False,
                  soft_wrap=True)


def warning_lines(rep: OptimizationReport) -> list[str]:
    """``warning: PASS: reason`` for every pass that kept the model or fell short."""
    return [f"warning: {r.name}: {r.notes['warning']}" for r in rep.passes
            if r.notes.get("warning")]


def wrote_line(rep: OptimizationReport, source_bytes: int, output: Path) -> str:
    """``wrote out.onnx: A -> B bytes on disk (Nx smaller), MACs, nodes``."""
    size = file_bytes(output)
    ratio = source_bytes / size if size else float("inf")
    how = (f"{ratio:.2f}x smaller" if ratio >= 1.005 else
           f"{1 / ratio:.2f}x larger" if ratio <= 0.995 else "same size")
    before, after = rep.before, rep.after
    return (f"wrote {output}: {source_bytes:,} -> {size:,} bytes on disk ({how}), "
            f"MACs {_macs_change(before, after)}, nodes {before['nodes']} -> {after['nodes']}")


def _result(record: PassRecord) -> str:
    if record.notes.get("verification"):
        return "undone"
    if not record.modified:
        return "kept" if record.notes.get("warning") else "no change"
    return "changed"


def _change(before: Any, after: Any, fmt: str = "{}") -> str:
    return fmt.format(after) if before == after else f"{fmt.format(before)} -> {fmt.format(after)}"


def _macs_change(before: dict[str, Any], after: dict[str, Any]) -> str:
    old, new = macs_text(before), macs_text(after)
    return new if old == new else f"{old} -> {new}"


def _quality(record: PassRecord) -> str:
    """Accuracy where a pass measured it on evaluation data, else the worst output cosine
    against the original model (verification's drift)."""
    notes = record.notes
    decision = notes.get("decision")
    if record.modified and isinstance(decision, str) and decision.startswith("INT8: "):
        return decision.removeprefix("INT8: ").split("; faster")[0]  # metric, FP32, drop
    final = notes.get("final")
    if record.modified and isinstance(final, dict) and "top1" in final:
        return f"top-1 {final['top1']:.4g} (before {notes.get('baseline_top1', '?')})"
    cosines = [m["cosine"] for m in record.drift.values() if "cosine" in m]
    if not record.modified or not cosines:
        return ""
    return f"cosine {min(cosines):.6f}"


def _speedup(record: PassRecord) -> str:
    decision = record.notes.get("latency_decision")
    if not record.modified or not isinstance(decision, dict) or "speedup" not in decision:
        return ""
    where = decision.get("deciding_threads")
    at = f" at {where} thr" if isinstance(where, int) else ""
    return f"{decision['speedup']:.2f}x{at}"
