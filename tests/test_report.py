"""Reports from results JSON (HTML, Markdown), the Pareto front, and the bench regression gate."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import onnx
import pytest
from conftest import make_mlp

from onnxopt.cli import main
from onnxopt.errors import InputError
from onnxopt.model_io import to_ir
from onnxopt.pipeline import Pipeline
from onnxopt.report import as_suite_document, pareto_front, render_markdown
from onnxopt.report.sensitivity import find_sensitivity

# ----------------------------------------------------------------------------------------------
# A small hand-written results document: two models, baselines, a recipe with a waterfall and a
# sensitivity ranking, a recipe that did not apply, one that failed, and a model that failed.


def _latency(s1: float, s2: float, base_ms: float = 0.02) -> dict[str, Any]:
    return {str(t): {"p50_ms": base_ms / s, "p90_ms": 1.1 * base_ms / s, "speedup": s,
                     "speedup_ci95": [0.97 * s, 1.03 * s]} for t, s in ((1, s1), (2, s2))}


def _stats(params: int, size: int, zipped: int, macs: int, nodes: int) -> dict[str, int]:
    return {"params": params, "size_bytes": size, "zipped_bytes": zipped, "total_macs": macs,
            "nodes": nodes}


def _candidate(name: str, kind: str, stats: dict, latency: dict, quality: dict, **extra: Any
               ) -> dict[str, Any]:
    base = {"name": name, "kind": kind, "status": "ok", "error": None, "stats": stats,
            "latency": latency, "peak_rss_mb": 60.0, "quality": quality, "optimize_s": None,
            "wall_s": None, "steps": [], "sensitivity": None}
    return {**base, **extra}


def sample_results() -> dict[str, Any]:
    quantize_notes = {"sensitivity": [{"node": "fc1", "sqnr_db": 31.5},
                                      {"node": "fc2", "sqnr_db": 24.0}]}
    steps = [
        {"name": "fuse", "modified": True, "seconds": 0.1,
         "stats": _stats(109386, 437000, 404000, 109184, 4), "latency": _latency(1.05, 1.02),
         "quality": {"top1": 96.89, "cosine": 1.0}, "notes": {}},
        {"name": "quantize", "modified": True, "seconds": 1.2,
         "stats": _stats(109386, 112000, 98000, 109184, 12), "latency": _latency(1.71, 1.62),
         "quality": {"top1": 96.67, "cosine": 0.9991}, "notes": quantize_notes},
    ]
    mlp = [
        _candidate("fp32", "reference", _stats(109386, 438000, 405000, 109184, 7), _latency(1, 1),
                   {"top1": 96.89, "cosine": 1.0}),
        _candidate("ort-dynamic", "baseline", _stats(109386, 113000, 99000, 109184, 14),
                   _latency(1.55, 1.40), {"top1": 96.89, "cosine": 0.9995}),
        _candidate("ort-static", "baseline", _stats(109386, 114000, 99500, 109184, 20),
                   _latency(1.30, 1.20), {"top1": 96.44, "cosine": 0.998}),
        _candidate("int8", "recipe", steps[-1]["stats"], steps[-1]["latency"], steps[-1]["quality"],
                   steps=steps, sensitivity=find_sensitivity(steps), optimize_s=1.3),
        _candidate("prune-channels", "recipe", {}, {}, {}, status="not-applicable",
                   error="no prunable channel group"),
        _candidate("deep-compression", "recipe", {}, {}, {}, status="failed",
                   error="pass 'share-weights' failed: boom"),
    ]
    resnet = [
        _candidate("fp32", "reference",
                   _stats(25_557_032, 102_300_000, 94_000_000, 4_089_184_256, 122),
                   _latency(1, 1, 45.0), {"cosine": 1.0}),
        _candidate("int8", "recipe", _stats(25_557_032, 25_900_000, 23_000_000, 4_089_184_256, 300),
                   _latency(2.9, 2.1, 45.0), {"cosine": 0.9962}),
    ]

    def model(name: str, metric: str, candidates: list, **extra: Any) -> dict[str, Any]:
        return {"name": name, "description": f"{name} for the test", "metric": metric, "inputs": {},
                "status": "ok", "error": None, "build_s": 1.0, "candidates": candidates,
                "benchmark": [], **extra}

    return {
        "schema_version": 1, "kind": "onnxopt.suite", "created": "2026-01-01T00:00:00+00:00",
        "command": "python benchmarks/suite.py --quick", "duration_s": 100.0,
        "machine": {"arch": "x86_64", "cpu_model": "Test CPU", "isa": {"avx512_vnni": True},
                    "logical_cores": 2, "usable_cores": 2, "mem_total_mb": 4096.0, "os": "Linux",
                    "versions": {"onnxruntime": "1.0"}},
        "versions": {}, "settings": {"threads": [1, 2]}, "recipes": {"int8": ["fuse", "quantize"]},
        "models": [model("torch-mlp", "top1", mlp), model("resnet50", "cosine", resnet),
                   model("keras-vgg16", "cosine", [], status="failed",
                         error="export ran out of memory")],
    }


def crowded_results() -> dict[str, Any]:
    """One digits model with many candidates close together on the scatter (labels would
    overprint), a deep-compression recipe 1.33 points below FP32 against a 0.5 budget, and a
    waterfall whose last checkpoint was measured apart from the output (1.24x against 0.85x)."""
    doc = sample_results()
    stats = _stats(109386, 438000, 405000, 109184, 7)
    cands = [_candidate("fp32", "reference", stats, _latency(1, 1), {"top1": 96.89, "cosine": 1.0})]
    names = ["ort-dynamic", "ort-static", "cleanup", "default", "fuse", "transformer", "fp16",
             "int8", "int8-static", "prune-channels", "share-weights", "prune"]
    for i, name in enumerate(names):
        kind = "baseline" if name.startswith("ort-") else "recipe"
        s = 1.02 + 0.012 * i
        cands.append(_candidate(name, kind, stats, _latency(s, s + 0.01),
                                {"top1": 96.89 - 0.02 * (i % 4), "cosine": 0.9999}))
    steps = [
        {"name": "cleanup", "modified": False, "seconds": 0.01, "stats": stats, "latency": {},
         "quality": {}, "notes": {}, "options": {}, "budget": "allclose(rtol=0.0001, atol=1e-05)"},
        {"name": "fuse", "modified": True, "seconds": 0.1, "stats": stats,
         "latency": _latency(1.01, 1.03), "quality": {"top1": 96.89}, "notes": {}, "options": {},
         "budget": "allclose(rtol=0.0001, atol=1e-05)"},
        {"name": "deep-compress", "modified": True, "seconds": 9.0,
         "stats": _stats(30000, 120000, 40000, 109184, 7), "latency": _latency(1.24, 1.25),
         "quality": {"top1": 95.9}, "notes": {}, "options": {"max_drop": 0.5},
         "budget": "unchecked"},
    ]
    cands.append(_candidate("deep-compression", "recipe", _stats(30000, 120000, 40000, 109184, 7),
                            _latency(0.85, 0.86), {"top1": 96.89 - 1.33, "cosine": 0.998},
                            steps=steps, optimize_s=9.1))
    doc["models"] = [{**doc["models"][0], "name": "crowded-mlp", "candidates": cands}]
    return doc


@pytest.fixture
def results_path(tmp_path: Path) -> Path:
    path = tmp_path / "results.json"
    path.write_text(json.dumps(sample_results()))
    return path


# ----------------------------------------------------------------------------------------------
# Rendering


def test_markdown_has_tables_waterfall_and_failures() -> None:
    text = render_markdown(sample_results())
    assert ("| torch-mlp | 0.0200 | 1.55x | 1.30x | 1.71x | not-applicable | failed "
            "| int8 1.71x |") in text
    assert "| resnet50 | 45.0 |  |  | 2.90x |  |  | int8 2.90x |" in text
    assert "| keras-vgg16 | model failed |  |  |  |  |  |  |" in text
    assert "| int8 | ok | 109k | 0.112 | 0.098 | 4.1x smaller |" in text
    assert "### Waterfall of `int8` (fuse → quantize)" in text
    assert "| quantize | 109k | 95.7 | 109k | 12 | 1.71x | 1.62x | 96.67 (-0.22) | 1.20 |" in text
    assert "| fc2 | 24 |" in text.split("### Sensitivity in `int8`")[1]  # most sensitive first
    assert "torch-mlp / deep-compression: failed: pass 'share-weights' failed: boom" in text
    assert "keras-vgg16: model failed to build: export ran out of memory" in text


@pytest.mark.slow
def test_html_is_self_contained_with_tables_and_charts() -> None:
    pytest.importorskip("matplotlib")
    from onnxopt.report import render_html

    page = render_html(sample_results())
    assert not re.search(r"https?://", page)  # nothing on the page points at the network
    assert not re.search(r"<(script|link|img|iframe)\b", page)
    # Two trade-off scatters (1 and 2 threads) and a size chart per measured model, one
    # waterfall and one sensitivity chart for the int8 recipe of torch-mlp.
    assert page.count("<svg") == 2 * 3 + 2
    assert len(re.findall(r">\s*Pareto front\s*<", page)) == 4  # the legend text of each scatter
    assert "<td>ort-dynamic</td>" in page and "<td>quantize</td>" in page
    ids = re.findall(r'\bid="([^"]+)"', page)
    assert len(ids) == len(set(ids)), "element ids must be unique across the inline charts"


def test_cli_report_writes_html_and_markdown(tmp_path: Path, results_path: Path) -> None:
    pytest.importorskip("matplotlib")
    assert main(["report", str(results_path), "-o", str(tmp_path / "r.html")]) == 0
    assert main(["report", str(results_path), "-o", str(tmp_path / "r.md")]) == 0
    assert (tmp_path / "r.html").read_text().startswith("<!DOCTYPE html>")
    assert "| torch-mlp |" in (tmp_path / "r.md").read_text()


def test_cli_report_bad_input(tmp_path: Path, results_path: Path,
                              capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", str(results_path), "-o", str(tmp_path / "r.txt")]) == 2
    assert main(["report", str(tmp_path / "missing.json"), "-o", str(tmp_path / "r.md")]) == 2
    future = {**sample_results(), "schema_version": 99}
    (tmp_path / "future.json").write_text(json.dumps(future))
    assert main(["report", str(tmp_path / "future.json"), "-o", str(tmp_path / "r.md")]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 3 and "schema_version 99" in errors[-1]
    assert not (tmp_path / "r.md").exists()


def test_optimization_report_renders_as_waterfall() -> None:
    _, rep = Pipeline.from_recipe("cleanup").run(to_ir(make_mlp()))
    doc = as_suite_document(json.loads(rep.to_json()))
    text = render_markdown(doc)
    assert "### Waterfall of `cleanup` (cleanup)" in text
    assert "| cleanup | 40 |" in text  # the Identity is gone, all 40 weights stay


def test_unknown_document_is_an_input_error() -> None:
    with pytest.raises(InputError, match="not a document onnxopt writes; .onnxopt report. takes"):
        as_suite_document({"hello": 1})
    broken = sample_results()
    broken["models"][0]["candidates"][1]["status"] = "great"
    with pytest.raises(InputError, match="status 'great'"):
        as_suite_document(broken)


def test_budget_miss_is_flagged_and_one_number_per_file() -> None:
    text = render_markdown(crowded_results())
    row = next(line for line in text.splitlines() if line.startswith("| deep-compression |"))
    assert "| budget-missed |" in row and "95.56 (-1.33)†" in row
    assert ("crowded-mlp / deep-compression: budget-missed on held-out data: top-1 -1.33 pt "
            "against FP32, budget 0.5 pt") in text
    # The last pass's model is the output: the waterfall shows the output's 0.85x, not the 1.24x
    # of a separate measurement of its checkpoint.
    waterfall = text.split("### Waterfall of `deep-compression`")[1]
    assert "| deep-compress | 30k | 39.1 | 109k | 7 | 0.85x | 0.86x | 95.56 (-1.33) | 9.00 |" \
        in waterfall
    assert "1.24x" not in text and "0.85x†" in text  # overview: the same figure, flagged
    assert "best recipe" in text and "deep-compression 0.85x" not in text


def test_report_of_an_optimize_report_shows_only_known_facts(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]
                                                             ) -> None:
    _, rep = Pipeline.from_recipe("cleanup").run(to_ir(make_mlp()))
    (tmp_path / "report.json").write_text(rep.to_json())
    assert main(["report", str(tmp_path / "report.json")]) == 0
    text = capsys.readouterr().out
    assert "# onnxopt optimization report" in text and "### Waterfall of `cleanup`" in text
    assert "None" not in text and "memory 0 MB" not in text and "CPU:" not in text
    assert "digits" not in text and "versions: onnxopt " in text


def test_cli_report_refuses_other_json_in_one_line(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "other.json").write_text('{"hello": 1}')
    assert main(["report", str(tmp_path / "other.json")]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "other.json" in line and "optimize --report" in line and "bench --json" in line
    assert "demo's report.json" in line


def test_redirected_tables_are_not_wrapped_at_80_columns(tmp_path: Path) -> None:
    (tmp_path / "results.json").write_text(json.dumps(sample_results()))
    done = subprocess.run([sys.executable, "-m", "onnxopt", "report",
                           str(tmp_path / "results.json")], capture_output=True, text=True,
                          timeout=120, check=False, env={**os.environ, "COLUMNS": "80"})
    assert done.returncode == 0, done.stderr
    rows = [line for line in done.stdout.splitlines() if line.startswith("| int8 | ok |")]
    assert rows and len(rows[0]) > 120 and rows[0].endswith("|")
    # Every command's stdout console (rich tables too) is wide when redirected.
    width = subprocess.run([sys.executable, "-c", "from onnxopt.cli import out; print(out.width)"],
                           capture_output=True, text=True, timeout=120, check=True,
                           env={**os.environ, "COLUMNS": "80"})
    assert int(width.stdout) >= 1000


@pytest.mark.slow
def test_scatter_labels_do_not_overlap() -> None:
    pytest.importorskip("matplotlib")
    from onnxopt.report import charts

    model = crowded_results()["models"][0]
    fig = charts.tradeoff_figure(model, "1")
    boxes = charts.label_boxes(fig)
    ax = fig.axes[0]
    frame = ax.get_window_extent(fig.canvas.get_renderer())
    assert len(boxes) >= 6  # most points are labelled on the plot
    for i, a in enumerate(boxes):
        assert frame.x0 <= a.x0 and a.x1 <= frame.x1 and frame.y0 <= a.y0 and a.y1 <= frame.y1
        for b in boxes[i + 1:]:
            assert not a.overlaps(b), (a, b)
    # every candidate is named: on the plot, or in the legend when there was no free place
    legend = " ".join(t.get_text() for t in fig.legends[0].get_texts())
    on_plot = " ".join(t.get_text() for t in ax.texts)
    for c in model["candidates"]:
        assert c["name"] in on_plot or c["name"] + ":" in legend, c["name"]
    # the check sees an overlap when there is one
    ax.annotate(ax.texts[0].get_text(), ax.texts[0].xy, xytext=ax.texts[0].xyann,
                textcoords="offset points", fontsize=7)
    again = charts.label_boxes(fig)
    assert any(a.overlaps(b) for i, a in enumerate(again) for b in again[i + 1:])


# ----------------------------------------------------------------------------------------------
# Pareto front and sensitivity


def test_pareto_front_on_known_points() -> None:
    points = [(1.0, 96.9), (0.6, 96.7), (0.65, 96.9), (0.8, 96.4), (0.6, 96.7), (0.5, 90.0)]
    # (1.0, 96.9) loses to (0.65, 96.9); (0.8, 96.4) loses to (0.6, 96.7); equal points both stay.
    assert pareto_front(points) == [5, 1, 4, 2]
    assert pareto_front([(1.0, 1.0)]) == [0]
    assert pareto_front([]) == []


@pytest.mark.parametrize("notes", [
    {"sensitivity": [{"node": "a", "sqnr_db": 30.0}, {"node": "b", "sqnr_db": 12.0}]},
    {"quantize": {"sensitivity": {"rows": [{"name": "a", "sqnr_db": 30.0, "macs": 5},
                                           {"name": "b", "sqnr_db": 12.0, "macs": 9}]}}},
    {"node_sensitivity": {"a": {"sqnr_db": 30.0}, "b": {"sqnr_db": 12.0}}},
])
def test_sensitivity_found_in_any_shape(notes: dict[str, Any]) -> None:
    found = find_sensitivity([{"name": "fuse", "notes": {}}, {"name": "quantize", "notes": notes}])
    assert found is not None and found["pass"] == "quantize" and found["metric"] == "sqnr_db"
    assert [r["node"] for r in found["rows"]] == ["b", "a"]  # lowest SQNR = most sensitive first


def test_no_sensitivity_without_data() -> None:
    assert find_sensitivity([{"name": "fuse", "notes": {"fused": 3}}]) is None
    assert find_sensitivity([{"name": "q", "notes": {"sensitivity": "n/a"}}]) is None
    kept_fp32 = [{"node": "conv", "macs": 900, "sqnr_db": None, "int8": False}]  # nothing measured
    assert find_sensitivity([{"name": "q", "notes": {"sensitivity": kept_fp32}}]) is None


# ----------------------------------------------------------------------------------------------
# The HTML page in a real browser


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _chromium(page: Path, profile: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run",
         f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", *extra,
         page.as_uri()],
        capture_output=True, text=True, timeout=120, check=False)


# Injected into a copy of the page (the report itself has no script): widths after layout.
WIDTH_CHECK = """<script>window.addEventListener('load', () => {
  const hidden = [...document.querySelectorAll('*')].filter(e => e.scrollWidth > e.clientWidth + 1
    && getComputedStyle(e).overflowX !== 'visible').map(e => e.tagName + '.' + e.className);
  document.body.setAttribute('data-widths', JSON.stringify({page: document.documentElement
    .scrollWidth, window: window.innerWidth, hidden}));
});</script>"""


def _widths_at_1400(page: Path, profile: Path) -> tuple[dict[str, Any], str]:
    """Page and window width, and elements hiding content behind a scrollbar, at 1400 px."""
    probe = page.with_suffix(".probe.html")
    probe.write_text(page.read_text().replace("</body>", WIDTH_CHECK + "</body>"))
    done = _chromium(probe, profile, "--window-size=1400,900", "--dump-dom")
    assert done.returncode == 0, done.stderr[-2000:]
    found = re.search(r'data-widths="([^"]*)"', done.stdout)
    assert found, done.stdout[-2000:]
    return json.loads(found.group(1).replace("&quot;", '"')), done.stdout


def _console_messages(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if ":CONSOLE" in line]


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed "
                    "(.ci/run installs Debian's 'chromium' with apt-get)")
def test_html_renders_in_headless_chromium(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from onnxopt.report import write_report

    page = write_report(sample_results(), tmp_path / "report.html")
    done = _chromium(page, tmp_path / "profile", "--dump-dom")
    assert done.returncode == 0, done.stderr[-2000:]
    dom = done.stdout
    assert dom.count("<svg") == 8
    assert "<td>ort-dynamic</td>" in dom and "<td>quantize</td>" in dom
    # overview (4), torch-mlp summary, waterfall and sensitivity, resnet50 summary
    assert dom.count("<table") == 4 + 3 + 1
    assert _console_messages(done.stderr) == []
    # At 1400 px: no horizontal scrollbar, no table hiding columns behind one.
    for doc, name in ((sample_results(), "sample"), (crowded_results(), "crowded")):
        widths, dom = _widths_at_1400(write_report(doc, tmp_path / f"{name}.html"),
                                      tmp_path / "profile")
        assert widths["window"] == 1400 and widths["page"] <= widths["window"], widths
        assert widths["hidden"] == [], widths
    # The crowded page: the budget miss is flagged, and the output of deep-compression shows one
    # speed-up at 1 thread everywhere (overview, summary, waterfall), never its checkpoint's.
    assert '<tr class="status-budget-missed"><td>deep-compression</td><td>budget-missed</td>' in dom
    assert '95.56<span class="aside">(-1.33)†</span>' in dom and "budget-missed on held-out" in dom
    assert dom.count(">0.85x") == 3 and "1.24x" not in dom
    # The width check sees a table hidden behind a scrollbar when there is one.
    wide = tmp_path / "wide.html"
    wide.write_text('<!DOCTYPE html><body><div style="overflow-x:auto"><table><tr><td style='
                    '"white-space:nowrap">' + "x " * 2000 + "</td></tr></table></div></body>")
    widths, _ = _widths_at_1400(wide, tmp_path / "profile")
    assert widths["hidden"] == ["DIV."]
    # The check sees console errors when a page has them.
    bad = tmp_path / "bad.html"
    bad.write_text("<!DOCTYPE html><p>x</p><script>console.error('broken'); nope();</script>")
    done = _chromium(bad, tmp_path / "profile2", "--dump-dom")
    assert len(_console_messages(done.stderr)) == 2


# ----------------------------------------------------------------------------------------------
# The regression gate: onnxopt bench --baseline OLD.json --max-regression 10%


@pytest.fixture
def two_models(tmp_path: Path) -> list[str]:
    paths = []
    for seed in (0, 1):
        path = tmp_path / f"m{seed}.onnx"
        onnx.save(make_mlp(seed), path)
        paths.append(str(path))
    return paths


def _scaled(doc: dict[str, Any], factor: float, path: Path) -> Path:
    """A stored baseline whose speed-ups against the first model are ``factor`` times ours."""
    scaled = copy.deepcopy(doc)
    reference = scaled["models"][0]["name"]
    for row in scaled["rows"]:
        if row["model"] != reference:
            row["speedup"] *= factor
    path.write_text(json.dumps(scaled))
    return path


@pytest.mark.slow
def test_regression_gate_exit_codes(tmp_path: Path, two_models: list[str],
                                    capsys: pytest.CaptureFixture[str]) -> None:
    bench = ["bench", *two_models, "--threads", "1"]
    assert main([*bench, "--json", str(tmp_path / "run.json")]) == 0
    run = json.loads((tmp_path / "run.json").read_text())
    capsys.readouterr()
    # The second model is the same MLP shape: its speed-up is near 1x. A baseline that recorded
    # 0.5x of that is beaten; one that recorded 2x is a regression far beyond 10%.
    slower = _scaled(run, 0.5, tmp_path / "slower.json")
    assert main([*bench, "--baseline", str(slower), "--max-regression", "10%"]) == 0
    assert "no speed-up regressed" in capsys.readouterr().err
    faster = _scaled(run, 2.0, tmp_path / "faster.json")
    assert main([*bench, "--baseline", str(faster), "--max-regression", "0.1"]) == 1
    err = capsys.readouterr().err
    assert "regression: " in err and "1 speed-up(s) regressed by more than 10%" in err


def test_regression_gate_bad_input(tmp_path: Path, two_models: list[str], results_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    bench = ["bench", *two_models, "--threads", "1"]
    assert main([*bench, "--baseline", str(tmp_path / "none.json")]) == 2
    assert main([*bench, "--baseline", str(results_path), "--max-regression", "150%"]) == 2
    assert "bad --max-regression '150%'" in capsys.readouterr().err
