"""Markdown rendering of a results document: for READMEs, pull requests and ``RESULTS.md``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from onnxopt.errors import InputError
from onnxopt.report import schema, tables


def table(t: tables.Table) -> str:
    """A GitHub-flavoured Markdown table (pipes in cells escaped)."""
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    align = ["---:" if n else "---" for n in t.numeric]
    lines = ["| " + " | ".join(cell(h) for h in t.headers) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in t.rows]
    return "\n".join(lines)


def render_markdown(doc: Mapping[str, Any]) -> str:
    """The whole report: overview, then per model its summary table and waterfall tables."""
    threads = schema.thread_counts(doc)
    parts = [f"# {tables.title(doc)}", ""]
    parts += _provenance(doc)
    parts += _overview(doc, threads)
    for model in doc.get("models") or []:
        parts += _model_section(model, threads)
    return "\n".join(parts).rstrip() + "\n"


def render_results_section(doc: Mapping[str, Any]) -> str:
    """The suite's section of ``benchmarks/RESULTS.md``: command, machine, overview tables."""
    threads = schema.thread_counts(doc)
    parts = ["## Benchmark suite (`benchmarks/suite.py`)", ""]
    parts += _provenance(doc)
    parts += _overview(doc, threads)
    parts.append("Per-model tables (sizes, p50/p90, peak memory, per-pass waterfalls) are in the "
                 "run's `report.md` / `report.html`, rendered from its `results.json`.")
    return "\n".join(parts).rstrip() + "\n"


def _provenance(doc: Mapping[str, Any]) -> list[str]:
    lines = [f"Command: `{doc.get('command')}`"]
    if doc.get("created"):
        duration = doc.get("duration_s")
        lines[0] += f" (run {doc['created']}" + (f", {duration / 60:.1f} min)" if duration else ")")
    for update in doc.get("updates", []):  # models measured again after the run
        lines.append(f"Re-measured {', '.join(update['models'])} with `{update['command']}` "
                     f"(run {update['created']}).")
    lines.append("")
    lines += [f"- {line}" for line in tables.machine_lines(doc)]
    lines += ["", tables.method_note(doc), ""]
    return lines


def _overview(doc: Mapping[str, Any], threads: list[str]) -> list[str]:
    parts = []
    for t in threads:
        parts += [f"### Speed-up over FP32 at {t} thread(s)", "",
                  table(tables.overview_table(doc, [t])), ""]
    if threads:
        parts += [f"\\* best recipe: the fastest onnxopt recipe at least {tables.MIN_SPEEDUP}x "
                  f"faster than FP32 with top-1 drop <= {tables.MAX_TOP1_DROP} pt (digits models) "
                  f"or cosine >= {tables.MIN_COSINE}.", ""]
    parts += ["### Zipped size, times smaller than FP32", "",
              table(tables.size_overview_table(doc)), ""]
    parts += ["### Quality (top-1 change in points, or cosine vs FP32)", "",
              table(tables.quality_overview_table(doc)), ""]
    fails = tables.failures(doc)
    if fails:
        parts += ["### Failures and budget misses", ""] + [f"- {line}" for line in fails] + [""]
    return parts


def _model_section(model: Mapping[str, Any], threads: list[str]) -> list[str]:
    parts = [f"## {model['name']}", ""]
    if model.get("description"):
        parts += [str(model["description"]), ""]
    if model.get("status") == "failed":
        return parts + [f"Failed to build: {model.get('error')}", ""]
    parts += [table(tables.summary_table(model, threads)), ""]
    for c in model.get("candidates") or []:
        if c.get("steps"):
            steps = " → ".join(str(s.get("name")) for s in c["steps"])
            parts += [f"### Waterfall of `{c['name']}` ({steps})", "",
                      table(tables.waterfall_table(model, c, threads)), ""]
        sens = c.get("sensitivity")
        if sens and sens.get("rows"):
            parts += [f"### Sensitivity in `{c['name']}` (pass `{sens.get('pass')}`, "
                      f"{sens.get('metric')}, most sensitive first)", ""]
            parts.append(table(tables.sensitivity_table(sens, limit=15)))
            parts.append("")
    return parts


def replace_between_markers(text: str, begin: str, end: str, body: str) -> str:
    """``text`` with what lies between the ``begin`` and ``end`` marker lines replaced by ``body``.

    The markers are appended (with a blank line before) when ``text`` has none, so a file other
    people also write to keeps everything outside the markers byte for byte.
    """
    block = f"{begin}\n{body.rstrip()}\n{end}"
    start = text.find(begin)
    if start < 0:
        return text.rstrip("\n") + "\n\n" + block + "\n"
    stop = text.find(end, start)
    if stop < 0:
        raise InputError(f"'{begin}' has no matching '{end}'")
    return text[:start] + block + text[stop + len(end):]
