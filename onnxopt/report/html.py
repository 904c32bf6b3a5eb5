"""The self-contained HTML report: one file, inline CSS and inline SVG charts, no network.

Nothing on the page loads from elsewhere (no scripts, fonts, images or style sheets by URL), so
it opens the same from a CI artifact, an e-mail or an air-gapped machine.
"""

from __future__ import annotations

import html
import re
from collections.abc import Mapping
from typing import Any

from onnxopt.report import charts, schema, tables

CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0 auto;
       max-width: 1400px; padding: 1em 2em; color: #222; background: #fff; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; }
h2 { margin-top: 2em; border-bottom: 1px solid #ccc; }
h3 { margin-top: 1.4em; font-size: 1.05em; }
table { border-collapse: collapse; margin: 0.6em 0 1em; font-size: 12.5px; }
th, td { border: 1px solid #ddd; padding: 3px 6px; white-space: nowrap; }
th { background: #f3f4f7; text-align: left; white-space: normal; vertical-align: bottom; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td .aside { display: block; color: #666; font-size: 11px; }
tr.status-failed td, tr.status-timeout td { background: #fdecec; }
tr.status-not-applicable td { color: #888; } tr.status-budget-missed td { background: #fff6e0; }
.charts { display: flex; flex-wrap: wrap; gap: 1em; align-items: flex-start; }
svg.chart { max-width: 100%; height: auto; border: 1px solid #eee; }
.meta { color: #555; font-size: 12.5px; } .meta li { margin: 0; }
code { background: #f3f4f7; padding: 0 3px; border-radius: 3px; }
nav a { margin-right: 0.8em; } .scroll { overflow-x: auto; }
.errors li { font-family: ui-monospace, monospace; font-size: 12px; }
"""


def render_html(doc: Mapping[str, Any]) -> str:
    """The report page for a results document (see :mod:`onnxopt.report.schema`)."""
    threads = schema.thread_counts(doc)
    title = tables.title(doc)
    body = [f"<h1>{_e(title)}</h1>", _provenance(doc), _nav(doc),
            _overview(doc, threads)]
    for i, model in enumerate(doc.get("models") or []):
        body.append(_model_section(model, threads, f"m{i}"))
    body.append(f'<p class="meta">results schema_version {_e(doc.get("schema_version"))}; '
                "rendered by <code>onnxopt report</code>.</p>")
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            f"<title>{_e(title)}</title>\n"
            f"<style>{CSS}</style>\n</head>\n<body>\n" + "\n".join(body) + "\n</body>\n</html>\n")


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def anchor(name: str) -> str:
    return "model-" + re.sub(r"[^A-Za-z0-9_-]+", "-", name)


def table(t: tables.Table, caption: str | None = None) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in t.headers)
    rows = []
    for i, row in enumerate(t.rows):
        status = t.row_status[i] if i < len(t.row_status) else "ok"
        cells = "".join(f'<td class="num">{_cell(c)}</td>' if num else f"<td>{_e(c)}</td>"
                        for c, num in zip(row, t.numeric))
        rows.append(f'<tr class="status-{_e(status)}">{cells}</tr>')
    cap = f"<caption>{_e(caption)}</caption>" if caption else ""
    return (f'<div class="scroll"><table>{cap}<thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table></div>')


def _cell(text: str) -> str:
    """A figure with its aside, '1.71x (1.66-1.76)', on two lines: the tables fit the page."""
    value, sep, aside = text.partition(" (")
    if not sep:
        return _e(text)
    return f'{_e(value)}<span class="aside">({_e(aside)}</span>'


def _provenance(doc: Mapping[str, Any]) -> str:
    items = [f"<li>command: <code>{_e(doc.get('command'))}</code></li>"]
    if doc.get("created"):
        duration = doc.get("duration_s")
        items.append(f"<li>run {_e(doc['created'])}"
                     + (f", {duration / 60:.1f} min" if duration else "") + "</li>")
    items += [f"<li>{_e(line)}</li>" for line in tables.machine_lines(doc)]
    return f'<ul class="meta">{"".join(items)}</ul><p class="meta">{_e(tables.method_note(doc))}</p>'


def _nav(doc: Mapping[str, Any]) -> str:
    links = "".join(f'<a href="#{anchor(m["name"])}">{_e(m["name"])}</a>'
                    for m in doc.get("models") or [])
    return f"<nav>{links}</nav>"


def _overview(doc: Mapping[str, Any], threads: list[str]) -> str:
    parts = ["<h2 id=\"overview\">Overview</h2>"]
    for t in threads:
        parts += [f"<h3>Speed-up over FP32 at {t} thread(s)</h3>",
                  table(tables.overview_table(doc, [t]))]
    if threads:
        parts.append(f'<p class="meta">* best recipe: the fastest onnxopt recipe at least '
                     f"{tables.MIN_SPEEDUP}x faster than FP32 with top-1 drop &le; "
                     f"{tables.MAX_TOP1_DROP} pt (digits models) or cosine &ge; "
                     f"{tables.MIN_COSINE}.</p>")
    parts += ["<h3>Zipped size, times smaller than FP32</h3>",
              table(tables.size_overview_table(doc)),
              "<h3>Quality (top-1 change in points, or cosine vs FP32)</h3>",
              table(tables.quality_overview_table(doc))]
    fails = tables.failures(doc)
    if fails:
        parts += ["<h3>Failures and budget misses</h3>",
                  '<ul class="errors">' + "".join(f"<li>{_e(f)}</li>" for f in fails) + "</ul>"]
    return "\n".join(parts)


def _model_section(model: Mapping[str, Any], threads: list[str], key: str) -> str:
    parts = [f'<section id="{anchor(model["name"])}">', f"<h2>{_e(model['name'])}</h2>"]
    if model.get("description"):
        parts.append(f"<p>{_e(model['description'])}</p>")
    if model.get("status") == "failed":
        parts.append(f"<p>Failed to build: <code>{_e(model.get('error'))}</code></p></section>")
        return "\n".join(parts)
    parts.append(table(tables.summary_table(model, threads)))
    figures = [charts.tradeoff_chart(model, t, f"{key}-tradeoff{t}") for t in threads]
    figures.append(charts.size_chart(model, f"{key}-size"))
    parts.append('<div class="charts">' + "".join(f for f in figures if f) + "</div>")
    ref = schema.reference(model) or {}
    for j, c in enumerate(model.get("candidates") or []):
        if c.get("steps"):
            steps = " → ".join(str(s.get("name")) for s in c["steps"])
            chart = charts.waterfall_chart(ref, c, threads[0] if threads else "1", f"{key}-wf{j}")
            parts += [f"<h3>Waterfall of <code>{_e(c['name'])}</code> ({_e(steps)})</h3>",
                      '<div class="charts">' + table(tables.waterfall_table(model, c, threads))
                      + (chart or "") + "</div>"]
        sens = c.get("sensitivity")
        if sens and sens.get("rows"):
            title = (f"{model['name']} / {c['name']}: per-node sensitivity "
                     f"({sens.get('metric')}, pass {sens.get('pass')})")
            parts += [f"<h3>Sensitivity in <code>{_e(c['name'])}</code></h3>",
                      charts.sensitivity_chart(sens, title, f"{key}-sens{j}") or "",
                      "<details><summary>nodes, most sensitive first</summary>"
                      + table(tables.sensitivity_table(sens, limit=len(sens["rows"])))
                      + "</details>"]
    parts.append("</section>")
    return "\n".join(parts)
