"""The report's tables as plain rows of text, shared by the HTML and Markdown renderers.

Every figure is formatted here once, so both formats always show the same numbers.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

from onnxopt.report import schema

# What "keeps quality" means for the overview's pick of the best recipe, and the speed-up it
# must reach to count as faster at all (ratios within a few percent of 1 are noise).
MAX_TOP1_DROP = 0.5  # points
MIN_COSINE = 0.99
MIN_SPEEDUP = 1.05
# Next to a figure of a recipe whose held-out quality is below its budget.
BUDGET_MARK = "†"


@dataclasses.dataclass
class Table:
    """Column headers, rows of cells, and which columns are numeric (right-aligned)."""

    headers: list[str]
    rows: list[list[str]]
    numeric: list[bool]
    # Per row, the status of the candidate, so renderers can mark failures.
    row_status: list[str] = dataclasses.field(default_factory=list)


def count(value: float | None) -> str:
    """1234567 -> '1.23M'; exact below 10,000."""
    if value is None:
        return ""
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= 10_000 and abs(value) >= scale:
            return f"{value / scale:.3g}{suffix}"
    return f"{value:,.0f}"


def megabytes(value: float | None) -> str:
    if value is None:
        return ""
    mb = value / 1e6
    return f"{mb:.3g}" if mb >= 0.01 else f"{mb:.2g}"


def ratio(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}x"


def milliseconds(value: float | None) -> str:
    if value is None:
        return ""
    return f"{value:.4f}" if value < 0.1 else f"{value:.3f}" if value < 10 else f"{value:.1f}"


def seconds(value: float | None) -> str:
    if value is None:
        return ""
    return f"{value:.2f}" if value < 10 else f"{value:.0f}"


def times_smaller(base: float | None, value: float | None) -> str:
    """'4.1x smaller', '1.04x smaller', or '0.95x' when ``value`` is the bigger one."""
    if not (base and value):
        return ""
    r = base / value
    if r < 1.005:
        return f"{r:.2f}x"
    return f"{r:.1f}x smaller" if r >= 2 else f"{r:.2f}x smaller"


def quality_text(entry: Mapping[str, Any], ref: Mapping[str, Any] | None, metric: str) -> str:
    """'96.89 (-0.22)' for top-1 (points against FP32), '0.99987' for cosine."""
    value = schema.quality(entry, metric)
    if value is None:
        return ""
    if metric == "top1":
        base = schema.quality(ref, metric) if ref is not None else None
        if base is None or entry is ref:
            return f"{value:.2f}"
        return f"{value:.2f} ({value - base:+.2f})"
    return f"{value:.5f}"


def speedup_text(entry: Mapping[str, Any], threads: str) -> str:
    s = schema.speedup(entry, threads)
    if s is None:
        return ""
    ci = ((entry.get("latency") or {}).get(threads) or {}).get("speedup_ci95")
    if isinstance(ci, list) and len(ci) == 2 and all(schema._number(v) is not None for v in ci):
        return f"{s:.2f}x ({ci[0]:.2f}-{ci[1]:.2f})"
    return f"{s:.2f}x"


def _latency_cells(entry: Mapping[str, Any], threads: list[str]) -> list[str]:
    cells = []
    for t in threads:
        row = (entry.get("latency") or {}).get(t) or {}
        p50, p90 = schema._number(row.get("p50_ms")), schema._number(row.get("p90_ms"))
        cells += [speedup_text(entry, t),
                  "" if p50 is None else f"{milliseconds(p50)} / {milliseconds(p90)}"]
    return cells


def _latency_headers(threads: list[str]) -> list[str]:
    heads = []
    for t in threads:
        heads += [f"speed-up {t}T (95% CI)", f"p50 / p90 ms {t}T"]
    return heads


def metric_header(metric: str) -> str:
    return "top-1 % (Δ pt)" if metric == "top1" else "cosine vs FP32"


def top1_budget(candidate: Mapping[str, Any]) -> float:
    """Points of top-1 a recipe may lose: the strictest ``max_drop`` its steps were given, else
    :data:`MAX_TOP1_DROP` (the accuracy-aware passes' default)."""
    given = [schema._number((s.get("options") or {}).get("max_drop"))
             for s in candidate.get("steps") or []]
    given = [g for g in given if g is not None]
    return min(given) if given else MAX_TOP1_DROP


def cosine_budget(candidate: Mapping[str, Any]) -> float | None:
    """The loosest cosine floor among the recipe's changing steps (``cosine >= X``), or None."""
    floors = []
    for s in candidate.get("steps") or []:
        found = re.search(r"cosine >= ([0-9.]+)", str(s.get("budget") or ""))
        if found and s.get("modified", True):
            floors.append(float(found.group(1)))
    return min(floors) if floors else None


def budget_miss(model: Mapping[str, Any], candidate: Mapping[str, Any]) -> str | None:
    """Why a measured recipe's quality breaks its budget, or None. The passes check their budget
    on the data they were given; this checks the figure the page shows (held-out data)."""
    if candidate.get("kind") != "recipe" or candidate.get("status") not in schema.MEASURED:
        return None
    if model.get("metric", "cosine") == "top1":
        ref = schema.reference(model)
        q, base = schema.quality(candidate, "top1"), schema.quality(ref, "top1") if ref else None
        allowed = top1_budget(candidate)
        if q is not None and base is not None and base - q > allowed + 1e-9:
            return f"top-1 {q - base:+.2f} pt against FP32, budget {allowed:g} pt"
        return None
    q, floor = schema.quality(candidate, "cosine"), cosine_budget(candidate)
    if q is not None and floor is not None and q < floor - 1e-12:
        return f"cosine {q:.4f} against FP32, budget >= {floor:g}"
    return None


def shown_status(model: Mapping[str, Any], candidate: Mapping[str, Any]) -> str:
    """The candidate's status, ``budget-missed`` when its shown quality breaks its budget."""
    status = str(candidate.get("status", ""))
    return "budget-missed" if status == "ok" and budget_miss(model, candidate) else status


def _marked(text: str, model: Mapping[str, Any], candidate: Mapping[str, Any]) -> str:
    return text + BUDGET_MARK if text and shown_status(model, candidate) == "budget-missed" \
        else text


def summary_table(model: Mapping[str, Any], threads: list[str]) -> Table:
    """One row per candidate: size, params, MACs, latency, memory, quality, time."""
    metric = model.get("metric", "cosine")
    ref = schema.reference(model)
    ref_zip = schema.stat(ref, "zipped_bytes") if ref else None
    headers = (["candidate", "status", "params", "size MB", "zipped MB", "zipped ratio", "MACs"]
               + _latency_headers(threads)
               + ["peak RSS MB", metric_header(metric)]
               + (["cosine vs FP32"] if metric == "top1" else [])
               + ["optimize s"])
    rows, status = [], []
    for c in model.get("candidates") or []:
        zipped = schema.stat(c, "zipped_bytes")
        row = [
            c["name"], shown_status(model, c), count(schema.stat(c, "params")),
            megabytes(schema.stat(c, "size_bytes")), megabytes(zipped),
            times_smaller(ref_zip, zipped),
            count(schema.stat(c, "total_macs")),
            *_latency_cells(c, threads),
            "" if schema._number(c.get("peak_rss_mb")) is None or c.get("status") not in
            schema.MEASURED else f"{c['peak_rss_mb']:.0f}",
            _marked(quality_text(c, ref, metric), model, c),
            *([quality_text(c, ref, "cosine")] if metric == "top1" else []),
            seconds(schema._number(c.get("optimize_s"))),
        ]
        rows.append(row)
        status.append(shown_status(model, c))
    numeric = [False, False] + [True] * (len(headers) - 2)
    return Table(headers, rows, numeric, status)


def waterfall_table(model: Mapping[str, Any], candidate: Mapping[str, Any],
                    threads: list[str]) -> Table:
    """One row per pass of a recipe: the figures after it, and what it changed."""
    metric = model.get("metric", "cosine")
    ref = schema.reference(model) or {}
    headers = (["step", "params", "zipped KB", "MACs", "nodes"]
               + [f"speed-up {t}T" for t in threads]
               + [metric_header(metric), "pass s"])

    def row(name: str, entry: Mapping[str, Any], secs: float | None) -> list[str]:
        zipped = schema.stat(entry, "zipped_bytes")
        return [name, count(schema.stat(entry, "params")),
                "" if zipped is None else f"{zipped / 1024:,.1f}",
                count(schema.stat(entry, "total_macs")), count(schema.stat(entry, "nodes")),
                *[ratio(schema.speedup(entry, t)) for t in threads],
                quality_text(entry, ref, metric), seconds(secs)]

    rows = [row("fp32 (original)", ref, None)]
    for step in schema.waterfall_steps(candidate):
        label = str(step.get("name")) + ("" if step.get("modified", True) else " (no change)")
        rows.append(row(label, step, schema._number(step.get("seconds"))))
    return Table(headers, rows, [False] + [True] * (len(headers) - 1), ["ok"] * len(rows))


def overview_table(doc: Mapping[str, Any], threads: list[str]) -> Table:
    """One row per model: FP32 latency, the baselines' and recipes' speed-ups at the first thread
    count, and the best recipe that keeps quality."""
    names = schema.candidate_names(doc, include_reference=False)
    t = threads[0] if threads else "1"
    headers = ["model", f"FP32 p50 ms {t}T"] + [f"{n} {t}T" for n in names] + ["best recipe*"]
    rows, status = [], []
    for m in doc.get("models") or []:
        by_name = {c["name"]: c for c in m.get("candidates") or []}
        ref = schema.reference(m)
        cells = [m["name"], milliseconds(schema.p50_ms(ref, t)) if ref else ""]
        for n in names:
            c = by_name.get(n)
            if c is None:
                cells.append("")
            elif c.get("status") not in schema.MEASURED:
                cells.append(str(c.get("status")))
            else:
                cells.append(_marked(ratio(schema.speedup(c, t)), m, c))
        best = best_recipe(m, t)
        if m.get("status") == "failed":
            cells[1], best_text = "model failed", ""
        else:
            best_text = ("none" if best is None
                         else f"{best['name']} {ratio(schema.speedup(best, t))}")
        cells.append(best_text)
        rows.append(cells)
        status.append(m.get("status", "ok"))
    return Table(headers, rows, [False] + [True] * (len(headers) - 1), status)


def size_overview_table(doc: Mapping[str, Any]) -> Table:
    """One row per model: FP32 zipped size and each candidate's zipped-size ratio."""
    names = schema.candidate_names(doc, include_reference=False)
    headers = ["model", "FP32 zipped MB"] + names
    rows, status = [], []
    for m in doc.get("models") or []:
        by_name = {c["name"]: c for c in m.get("candidates") or []}
        ref = schema.reference(m)
        base = schema.stat(ref, "zipped_bytes") if ref else None
        cells = [m["name"], megabytes(base)]
        for n in names:
            c = by_name.get(n)
            z = schema.stat(c, "zipped_bytes") if c and c.get("status") in schema.MEASURED else None
            cells.append("" if not (z and base) else
                         f"{base / z:.1f}x" if base / z >= 2 else f"{base / z:.2f}x")
        rows.append(cells)
        status.append(m.get("status", "ok"))
    return Table(headers, rows, [False] + [True] * (len(headers) - 1), status)


def quality_overview_table(doc: Mapping[str, Any]) -> Table:
    """One row per model: the FP32 quality and each candidate's (top-1 delta or cosine)."""
    names = schema.candidate_names(doc, include_reference=False)
    headers = ["model", "metric", "FP32"] + names
    rows, status = [], []
    for m in doc.get("models") or []:
        metric = m.get("metric", "cosine")
        by_name = {c["name"]: c for c in m.get("candidates") or []}
        ref = schema.reference(m)
        base = schema.quality(ref, metric) if ref else None
        cells = [m["name"], "top-1 %" if metric == "top1" else "cosine",
                 "" if base is None else (f"{base:.2f}" if metric == "top1" else f"{base:.5f}")]
        for n in names:
            c = by_name.get(n)
            q = schema.quality(c, metric) if c and c.get("status") in schema.MEASURED else None
            if q is None:
                cells.append("")
            elif metric == "top1" and base is not None:
                cells.append(_marked(f"{q - base:+.2f}", m, c))
            else:
                cells.append(_marked(f"{q:.4f}" if metric != "top1" else f"{q:.2f}", m, c))
        rows.append(cells)
        status.append(m.get("status", "ok"))
    return Table(headers, rows, [False, False] + [True] * (len(headers) - 2), status)


def best_recipe(model: Mapping[str, Any], threads: str) -> Mapping[str, Any] | None:
    """The fastest onnxopt recipe at least ``MIN_SPEEDUP`` faster whose quality holds (top-1 drop
    <= ``MAX_TOP1_DROP`` points, or cosine >= ``MIN_COSINE``); None when no recipe qualifies."""
    metric = model.get("metric", "cosine")
    ref = schema.reference(model)
    base = schema.quality(ref, metric) if ref else None
    best = None
    for c in model.get("candidates") or []:
        if c.get("kind") != "recipe" or shown_status(model, c) != "ok":
            continue
        s, q = schema.speedup(c, threads), schema.quality(c, metric)
        if s is None or q is None:
            continue
        if metric == "top1":
            keeps = base is not None and q >= base - MAX_TOP1_DROP
        else:
            keeps = q >= MIN_COSINE
        if keeps and s >= MIN_SPEEDUP and (best is None or s > schema.speedup(best, threads)):
            best = c
    return best


def sensitivity_table(sensitivity: Mapping[str, Any], limit: int) -> Table:
    """The most sensitive nodes: name, metric, and op / INT8 / reason when the pass gave them."""
    rows_in = list(sensitivity.get("rows") or [])[:limit]
    extra = [k for k in ("op_type", "int8", "reason") if any(k in r for r in rows_in)]
    headers = ["node", str(sensitivity.get("metric"))] + [
        {"op_type": "op", "int8": "INT8", "reason": "why kept in FP32"}[k] for k in extra]
    rows = []
    for r in rows_in:
        cells = [str(r["node"]), f"{r['value']:.4g}"]
        for k in extra:
            v = r.get(k)
            cells.append({None: "", True: "yes", False: "no"}.get(v, str(v))
                         if v is None or isinstance(v, bool) else str(v))
        rows.append(cells)
    return Table(headers, rows, [False, True] + [False] * len(extra), ["ok"] * len(rows))


def failures(doc: Mapping[str, Any]) -> list[str]:
    """One line per model or candidate that did not produce figures, with its error."""
    lines = []
    for m in doc.get("models") or []:
        if m.get("status") == "failed":
            lines.append(f"{m['name']}: model failed to build: {m.get('error')}")
        for c in m.get("candidates") or []:
            if c.get("status") not in ("ok",):
                lines.append(f"{m['name']} / {c['name']}: {c.get('status')}: {c.get('error') or ''}"
                             .rstrip(": "))
            elif budget_miss(m, c):
                lines.append(f"{m['name']} / {c['name']}: budget-missed on held-out data: "
                             f"{budget_miss(m, c)}")
    return lines


def machine_lines(doc: Mapping[str, Any]) -> list[str]:
    """The machine record as 'key: value' lines (CPU, ISA, cores, memory, OS, versions); a fact
    the document does not record (an optimize report has no machine) is left out, not 'None'."""
    m = doc.get("machine") or {}
    lines = []
    if m.get("cpu_model") or m.get("arch"):
        lines.append(f"CPU: {m.get('cpu_model') or 'unknown model'}"
                     + (f" ({m['arch']})" if m.get("arch") else ""))
    isa = ", ".join(k for k, v in (m.get("isa") or {}).items() if v)
    if isa:
        lines.append(f"ISA: {isa}")
    facts = []
    if m.get("usable_cores") or m.get("logical_cores"):
        facts.append(f"cores: {m.get('usable_cores') or '?'} usable of "
                     f"{m.get('logical_cores') or '?'} logical")
    if schema._number(m.get("mem_total_mb")):
        facts.append(f"memory {m['mem_total_mb']:,.0f} MB")
    if facts:
        lines.append("; ".join(facts))
    if m.get("os"):
        lines.append(f"OS: {m['os']}")
    loads = [x[1] for x in (mm.get("load_average") for mm in doc.get("models") or [])
             if isinstance(x, list) and len(x) == 3]
    cores = m.get("usable_cores") or m.get("logical_cores")
    if loads:
        lines.append(f"load average (5 min) after each model: {min(loads):.1f} to {max(loads):.1f}"
                     + (f" on {cores} cores" if cores else ""))
    versions = {**(m.get("versions") or {}), **(doc.get("versions") or {})}
    if any(versions.values()):
        lines.append("versions: " + ", ".join(f"{k} {v}" for k, v in versions.items() if v))
    return lines


def title(doc: Mapping[str, Any]) -> str:
    return {"demo": "onnxopt demo report", "optimize": "onnxopt optimization report",
            "bench": "onnxopt bench report"}.get(doc.get("source", "suite"),
                                                 "onnxopt benchmark report")


def method_note(doc: Mapping[str, Any]) -> str:
    """How the page's figures were measured, saying only what applies to this document."""
    parts = []
    if any(schema.speedup(c, t) is not None for m in doc.get("models") or []
           for c in m.get("candidates") or [] for t in (c.get("latency") or {})):
        parts.append("Speed-ups are p50(FP32) / p50(candidate), measured interleaved in one "
                     "process at batch 1 (95% interval: paired bootstrap over rounds).")
    parts.append("Sizes are ratios against the FP32 file.")
    metrics = {m.get("metric", "cosine") for m in doc.get("models") or []}
    source = doc.get("source", "suite")
    quality = []
    if "top1" in metrics:
        quality.append("top-1 on held-out digits" if source in ("demo", "suite")
                       else "top-1 on held-out labelled inputs")
    if "cosine" in metrics:
        quality.append("the worst output cosine against the original model on the "
                       "verification inputs" if source == "optimize"
                       else "cosine against FP32 on held-out inputs")
    if quality and source != "bench":
        parts.append("Quality is " + ", or ".join(quality) + ".")
    if any(budget_miss(m, c) for m in doc.get("models") or [] for c in m.get("candidates") or []):
        parts.append(f"{BUDGET_MARK} marks a recipe whose quality on held-out data is below its "
                     "budget (listed under Failures and budget misses).")
    return " ".join(parts)
