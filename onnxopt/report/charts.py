"""The report's charts, drawn with matplotlib and returned as SVG text to inline in HTML.

Why inline SVG: the page must work offline as one file (no network, no side files), stay sharp at
any zoom, and keep its text selectable. matplotlib is imported here only, so the core package
never needs it (``pip install onnxopt[report]``).
"""

from __future__ import annotations

import io
import re
from collections.abc import Mapping, Sequence
from typing import Any

from onnxopt.errors import InputError
from onnxopt.report import schema

COLORS = {"reference": "#555555", "baseline": "#d08020", "recipe": "#2060c0", "front": "#c02040"}
WATERFALL_SERIES = (  # (label, how to read the figure of a step)
    ("params", lambda s, t: schema.stat(s, "params")),
    ("zipped size", lambda s, t: schema.stat(s, "zipped_bytes")),
    ("MACs", lambda s, t: schema.stat(s, "total_macs")),
    ("latency", lambda s, t: None if not schema.speedup(s, t) else 1.0 / schema.speedup(s, t)),
)
WATERFALL_COLORS = ("#7090d0", "#50a070", "#d0a040", "#c05050")


def _figure(width: float, height: float) -> Any:
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise InputError("the HTML report needs matplotlib: pip install 'onnxopt[report]'") from exc
    fig = Figure(figsize=(width, height), layout="constrained")
    return fig


def _svg(fig: Any, chart_id: str, label: str) -> str:
    """The figure as an ``<svg>`` element that can live next to others in one HTML page.

    matplotlib writes a standalone file: an XML prolog, a DOCTYPE naming the SVG DTD by URL,
    namespace declarations and element ids (``figure_1``) that repeat in every figure. Inline in
    HTML the prolog and namespaces are not needed, and ids are prefixed so charts never clash.
    """
    import matplotlib

    buffer = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": chart_id}):
        fig.savefig(buffer, format="svg",
                    metadata={"Date": None, "Creator": None, "Format": None, "Type": None})
    text = buffer.getvalue()
    text = text[text.index("<svg"):]
    text = re.sub(r'\s+xmlns(:\w+)?="[^"]*"', "", text)
    text = re.sub(r'\bid="([^"]+)"', rf'id="{chart_id}-\1"', text)
    text = re.sub(r'url\(#([^)]+)\)', rf'url(#{chart_id}-\1)', text)
    text = re.sub(r'href="#([^"]+)"', rf'href="#{chart_id}-\1"', text)
    return text.replace("<svg", f'<svg class="chart" role="img" aria-label="{_attr(label)}"', 1)


def _attr(text: str) -> str:
    return text.replace("&", "&amp;").replace('"', "&quot;").replace("<", "&lt;")


def _short(name: str, limit: int = 28) -> str:
    return name if len(name) <= limit else name[: limit - 1] + "…"


def tradeoff_chart(model: Mapping[str, Any], threads: str, chart_id: str) -> str | None:
    """Latency (relative to FP32) against quality, every measured candidate, Pareto front drawn."""
    metric = model.get("metric", "cosine")
    points, names, kinds = [], [], []
    for c in model.get("candidates") or []:
        s, q = schema.speedup(c, threads), schema.quality(c, metric)
        if c.get("status") in schema.MEASURED and s and q is not None:
            points.append((1.0 / s, q))
            names.append(c["name"])
            kinds.append(c.get("kind", "recipe"))
    if len(points) < 2:
        return None
    front = schema.pareto_front(points)
    fig = _figure(6.4, 3.6)
    ax = fig.add_subplot()
    for kind in ("reference", "baseline", "recipe"):
        idx = [i for i, k in enumerate(kinds) if k == kind]
        if idx:
            ax.scatter([points[i][0] for i in idx], [points[i][1] for i in idx], s=36,
                       color=COLORS[kind], label=kind, zorder=3)
    ax.plot([points[i][0] for i in front], [points[i][1] for i in front], color=COLORS["front"],
            linewidth=1.2, linestyle="--", label="Pareto front", zorder=2)
    for k, ((x, y), label) in enumerate(_label_clusters(points, names)):
        ax.annotate(label, (x, y), textcoords="offset points", fontsize=7,
                    xytext=(4, 4 if k % 2 == 0 else -10))
    ax.set_xlabel(f"latency / FP32 latency ({threads} thread{'s' if threads != '1' else ''}, p50)"
                  " (lower is better)")
    ax.set_ylabel("top-1 accuracy (%)" if metric == "top1" else "cosine vs FP32")
    ax.axvline(1.0, color="#999999", linewidth=0.8, zorder=1)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    ax.set_title(f"{model['name']}: latency vs {'accuracy' if metric == 'top1' else 'fidelity'}",
                 fontsize=9)
    return _svg(fig, chart_id, f"{model['name']} latency versus quality with the Pareto front")


def _label_clusters(points: list[tuple[float, float]], names: list[str]
                    ) -> list[tuple[tuple[float, float], str]]:
    """One label per group of points that would overprint each other (within 2% of the axes),
    naming every candidate in it; labels sorted by x so neighbours alternate above and below."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    span_x, span_y = (max(xs) - min(xs)) or 1.0, (max(ys) - min(ys)) or 1.0
    clusters: list[tuple[tuple[float, float], list[str]]] = []
    for (x, y), name in sorted(zip(points, names)):
        for (cx, cy), members in clusters:
            if abs(cx - x) / span_x < 0.02 and abs(cy - y) / span_y < 0.02:
                members.append(name)
                break
        else:
            clusters.append(((x, y), [name]))
    return [(xy, _short(", ".join(members), 40)) for xy, members in clusters]


def size_chart(model: Mapping[str, Any], chart_id: str) -> str | None:
    """File and zipped size of every candidate that has them, in MB, largest first."""
    rows = [(c["name"], schema.stat(c, "size_bytes"), schema.stat(c, "zipped_bytes"))
            for c in model.get("candidates") or [] if c.get("status") in schema.MEASURED]
    rows = [r for r in rows if r[1]]
    if not rows:
        return None
    fig = _figure(6.4, 0.9 + 0.32 * len(rows))
    ax = fig.add_subplot()
    ys = list(range(len(rows)))
    size = [r[1] / 1e6 for r in rows]
    zipped = [(r[2] or 0) / 1e6 for r in rows]
    ax.barh([y + 0.2 for y in ys], size, height=0.4, color="#7090d0", label="file")
    ax.barh([y - 0.2 for y in ys], zipped, height=0.4, color="#50a070", label="zipped")
    ref = rows[0][1]
    for y, (_, b, _z) in zip(ys, rows):
        ax.annotate(f"{ref / b:.1f}x smaller" if b < ref * 0.995 else "", (b / 1e6, y + 0.2),
                    textcoords="offset points", xytext=(3, -3), fontsize=7)
    ax.set_yticks(ys, [_short(r[0]) for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("MB")
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title(f"{model['name']}: size", fontsize=9)
    ax.grid(True, axis="x", alpha=0.3)
    return _svg(fig, chart_id, f"{model['name']} file and zipped sizes")


def waterfall_chart(reference: Mapping[str, Any], candidate: Mapping[str, Any], threads: str,
                    chart_id: str) -> str | None:
    """Each step's params, zipped size, MACs and latency as % of the FP32 model."""
    steps = [{"name": "fp32", **reference}] + schema.waterfall_steps(candidate)
    if not any(s.get("modified") for s in steps[1:]):
        return None  # every bar would read 100%
    fig = _figure(5.6, 2.4)
    ax = fig.add_subplot()
    width = 0.8 / len(WATERFALL_SERIES)
    highest = 100.0
    for k, ((label, read), color) in enumerate(zip(WATERFALL_SERIES, WATERFALL_COLORS)):
        base = read(reference, threads)
        values = [None if not base or read(s, threads) is None else 100.0 * read(s, threads) / base
                  for s in steps]
        xs = [i + (k - (len(WATERFALL_SERIES) - 1) / 2) * width for i in range(len(steps))]
        shown = [(x, v) for x, v in zip(xs, values) if v is not None]
        if shown:
            highest = max(highest, *(v for _, v in shown))
            ax.bar([x for x, _ in shown], [v for _, v in shown], width=width, color=color,
                   label=label)
    ax.axhline(100.0, color="#999999", linewidth=0.8)
    ax.set_ylim(0, highest * 1.3)  # room for the legend above the bars
    ax.set_xticks(range(len(steps)), [_short(s.get("name") or "?", 16) for s in steps], fontsize=8)
    ax.set_ylabel("% of FP32")
    ax.legend(fontsize=7, ncols=4, loc="upper center")
    ax.set_title(f"recipe {candidate['name']}: after each pass (latency at {threads} thread(s))",
                 fontsize=9)
    ax.grid(True, axis="y", alpha=0.3)
    return _svg(fig, chart_id, f"per-pass waterfall of recipe {candidate['name']}")


def sensitivity_chart(sensitivity: Mapping[str, Any], title: str, chart_id: str) -> str | None:
    """Horizontal bars of the per-node sensitivity metric, most sensitive on top."""
    rows: Sequence[Mapping[str, Any]] = sensitivity.get("rows") or []
    if not rows:
        return None
    fig = _figure(6.4, 0.8 + 0.22 * len(rows))
    ax = fig.add_subplot()
    ys = list(range(len(rows)))
    kept = ["#c07030" if r.get("int8") is False else "#8060b0" for r in rows]
    ax.barh(ys, [r["value"] for r in rows], color=kept)
    if any(r.get("int8") is False for r in rows):
        from matplotlib.patches import Patch

        ax.legend(handles=[Patch(color="#8060b0", label="INT8"),
                           Patch(color="#c07030", label="kept FP32")], fontsize=7)
    ax.set_yticks(ys, [_short(str(r["node"]), 36) for r in rows], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel(str(sensitivity.get("metric")))
    ax.set_title(title, fontsize=9)
    ax.grid(True, axis="x", alpha=0.3)
    return _svg(fig, chart_id, title)
