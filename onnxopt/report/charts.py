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
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)  # a renderer to measure text with before the SVG is written
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
    fig = tradeoff_figure(model, threads)
    if fig is None:
        return None
    return _svg(fig, chart_id, f"{model['name']} latency versus quality with the Pareto front")


def tradeoff_figure(model: Mapping[str, Any], threads: str) -> Any:
    """The trade-off scatter as a laid-out figure (None with fewer than two points).

    Labels are placed where they overlap no other label and no marker (:func:`_place_labels`);
    a label with no free place is named in the legend with its coordinates instead.
    """
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
    unplaced: list[str] = []
    for _ in range(2):  # a second layout when some labels went into the legend
        fig, ax = _tradeoff_axes(model, threads, points, kinds, unplaced)
        left = _place_labels(ax, points, names, skip=unplaced)
        if not left:
            break
        unplaced += [f"{name}: {x:.2f}, {y:.4g}" for (x, y), name in left]
    return fig


def _tradeoff_axes(model: Mapping[str, Any], threads: str, points: list[tuple[float, float]],
                   kinds: list[str], extra_legend: list[str]) -> tuple[Any, Any]:
    """The scatter without labels, laid out (legend outside the axes), then frozen."""
    metric = model.get("metric", "cosine")
    front = schema.pareto_front(points)
    fig = _figure(6.4, 3.8)
    ax = fig.add_subplot()
    for kind in ("reference", "baseline", "recipe"):
        idx = [i for i, k in enumerate(kinds) if k == kind]
        if idx:
            ax.scatter([points[i][0] for i in idx], [points[i][1] for i in idx], s=MARKER_AREA,
                       color=COLORS[kind], label=kind, zorder=3)
    ax.plot([points[i][0] for i in front], [points[i][1] for i in front], color=COLORS["front"],
            linewidth=1.2, linestyle="--", label="Pareto front", zorder=2)
    for text in extra_legend:  # named here: no free place for the label on the plot
        ax.plot([], [], " ", label=_short(text, 48))
    ax.set_xlabel(f"latency / FP32 latency ({threads} thread{'s' if threads != '1' else ''}, p50)"
                  " (lower is better)")
    ax.set_ylabel("top-1 accuracy (%)" if metric == "top1" else "cosine vs FP32")
    ax.axvline(1.0, color="#999999", linewidth=0.8, zorder=1)
    ax.grid(True, alpha=0.3)
    ax.margins(0.12, 0.15)  # room for labels next to the outermost points
    fig.legend(fontsize=7, loc="outside lower center", ncols=4 if not extra_legend else 2,
               frameon=False)
    ax.set_title(f"{model['name']}: latency vs {'accuracy' if metric == 'top1' else 'fidelity'}",
                 fontsize=9)
    fig.canvas.draw()  # the constrained layout runs once, here; labels must not move it
    fig.set_layout_engine("none")
    return fig, ax


MARKER_AREA = 36  # points^2 of a scatter marker (a 6 pt disc)
LABEL_GAP = 1.5  # points kept free around every label
OFFSETS = [(dx * r, dy * r) for r in (5, 10, 16, 24, 34)
           for dx, dy in ((1, 1), (1, -1), (-1, 1), (-1, -1), (1, 0), (-1, 0), (0, 1), (0, -1))]


def _place_labels(ax: Any, points: list[tuple[float, float]], names: list[str],
                  skip: Sequence[str] = ()) -> list[tuple[tuple[float, float], str]]:
    """Label each group of coinciding points at the first offset whose text box is inside the
    axes and clear of every marker and label placed so far; returns the groups not placed.

    Written simply on purpose: a fixed list of offsets, nearest first, checked against boxes in
    display space after the layout is final, so the page shows exactly the boxes tested here.
    """
    from matplotlib.transforms import Bbox

    renderer = ax.figure.canvas.get_renderer()
    scale = ax.figure.dpi / 72.0
    gap = LABEL_GAP * scale
    frame = ax.get_window_extent(renderer)
    radius = (MARKER_AREA ** 0.5) / 2 * scale
    shown = [ax.transData.transform(p) for p in points]
    taken = [Bbox.from_extents(x - radius, y - radius, x + radius, y + radius) for x, y in shown]
    left = []
    skipped = {text.split(": ")[0] for text in skip}
    for (x, y), label in _label_clusters(points, names, shown, 2 * radius):
        if label in skipped:
            continue
        for dx, dy in OFFSETS:
            ann = ax.annotate(
                label, (x, y), xytext=(dx, dy), textcoords="offset points", fontsize=7,
                ha="left" if dx > 0 else "right" if dx < 0 else "center",
                va="bottom" if dy > 0 else "top" if dy < 0 else "center", zorder=4,
                arrowprops=({"arrowstyle": "-", "color": "#777777", "linewidth": 0.6}
                            if max(abs(dx), abs(dy)) >= 10 else None))
            box = _text_box(ann, renderer)
            padded = Bbox.from_extents(box.x0 - gap, box.y0 - gap, box.x1 + gap, box.y1 + gap)
            inside = (box.x0 >= frame.x0 and box.x1 <= frame.x1 and box.y0 >= frame.y0
                      and box.y1 <= frame.y1)
            if inside and not any(padded.overlaps(t) for t in taken):
                taken.append(padded)
                break
            ann.remove()
        else:
            left.append(((x, y), label))
    return left


def _text_box(ann: Any, renderer: Any) -> Any:
    """The box of an annotation's text alone (without its leader line)."""
    from matplotlib.text import Text

    ann.update_positions(renderer)  # an annotation places its text only when drawn
    return Text.get_window_extent(ann, renderer)


def label_boxes(fig: Any) -> list[Any]:
    """The text boxes of a trade-off figure's point labels, after drawing it again: what tests
    check for overlaps."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    return [_text_box(t, renderer) for ax in fig.axes for t in ax.texts]


def _label_clusters(points: list[tuple[float, float]], names: list[str],
                    shown: list[Any], distance: float) -> list[tuple[tuple[float, float], str]]:
    """One label per group of points whose markers overprint each other (closer than
    ``distance`` on the page), naming every candidate in it."""
    clusters: list[tuple[tuple[float, float], Any, list[str]]] = []
    for point, xy, name in sorted(zip(points, shown, names), key=lambda t: t[0]):
        for _, cxy, members in clusters:
            if abs(cxy[0] - xy[0]) < distance and abs(cxy[1] - xy[1]) < distance:
                members.append(name)
                break
        else:
            clusters.append((point, xy, [name]))
    return [(point, _short(", ".join(members), 40)) for point, _, members in clusters]


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
