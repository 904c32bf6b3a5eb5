"""Smoke run of the benchmark suite on its smallest model, and how it stops runaway children."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_suite_runs_one_tiny_model_end_to_end(tmp_path: Path) -> None:
    results_md = (ROOT / "benchmarks" / "RESULTS.md").read_bytes()
    done = subprocess.run(
        [sys.executable, "benchmarks/suite.py", "--quick", "--models", "sigmoid-3-4-2",
         "--recipes", "cleanup", "--threads", "1", "--seconds-per-model", "0.05", "--no-memory",
         "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=240, check=False,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert done.returncode == 0, done.stderr[-3000:]
    doc = json.loads((tmp_path / "results.json").read_text())
    assert doc["schema_version"] == 1 and doc["kind"] == "onnxopt.suite"
    assert "benchmarks/suite.py --quick --models sigmoid-3-4-2" in doc["command"]
    assert doc["machine"]["logical_cores"] and doc["versions"]["onnxruntime"]
    (model,) = doc["models"]
    assert model["status"] == "ok", model["error"]
    by_name = {c["name"]: c for c in model["candidates"]}
    assert list(by_name) == ["fp32", "ort-dynamic", "ort-static", "cleanup"]
    fp32, cleanup = by_name["fp32"], by_name["cleanup"]
    assert fp32["stats"]["params"] == 3 * 4 + 4 + 4 * 2 + 2
    assert fp32["stats"]["total_macs"] == 3 * 4 + 4 * 2  # batch 1
    assert fp32["latency"]["1"]["speedup"] == 1.0 and fp32["latency"]["1"]["p50_ms"] > 0
    assert cleanup["status"] == "ok" and cleanup["latency"]["1"]["speedup"] > 0
    assert cleanup["quality"]["cosine"] == pytest.approx(1.0, abs=1e-6)  # cleanup is exact
    assert [s["name"] for s in cleanup["steps"]] == ["cleanup"]
    assert cleanup["steps"][0]["stats"]["params"] == fp32["stats"]["params"]
    for baseline in ("ort-dynamic", "ort-static"):  # produced and measured, or a recorded failure
        c = by_name[baseline]
        assert (c["status"] == "ok" and c["latency"]["1"]["speedup"] > 0) or c["error"]
    md = (tmp_path / "report.md").read_text()
    assert "| sigmoid-3-4-2 |" in md and "### Waterfall of `cleanup`" in md
    if (tmp_path / "report.html").exists():
        assert "<svg" in (tmp_path / "report.html").read_text()
    # A filtered run leaves RESULTS.md alone.
    assert (ROOT / "benchmarks" / "RESULTS.md").read_bytes() == results_md
    assert not (tmp_path / "work").exists() or not any((tmp_path / "work").iterdir())
    _check_update_replaces_one_model(tmp_path / "results.json")


def _check_update_replaces_one_model(results: Path) -> None:
    """``--update`` keeps the run's other models, replaces the re-run one, and says so."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import models
        import suite
    finally:
        sys.path.pop(0)
    from onnxopt.report import render_results_section

    (spec,) = models.select(["sigmoid-3-4-2"], quick=True)
    doc = suite._updated_document(results, ["--update", "--models", "sigmoid-3-4-2"], [spec])
    doc["models"].append({**doc["models"][0], "name": "other"})
    suite._put_model(doc, {**doc["models"][0], "status": "failed", "error": "re-run"})
    assert [(m["name"], m["status"]) for m in doc["models"]] == [("sigmoid-3-4-2", "failed"),
                                                                  ("other", "ok")]
    assert "Re-measured sigmoid-3-4-2 with `" in render_results_section(doc)


def _run_child():  # noqa: ANN202 - the suite's helper, imported from benchmarks/
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from suite_candidates import run_child
    finally:
        sys.path.pop(0)
    return run_child


@pytest.mark.parametrize("code, limits, expected", [
    ("import sys; sys.stderr.write('error: bad model\\n'); sys.exit(2)", {}, "bad model"),
    ("import time; time.sleep(60)", {"timeout_s": 1.0}, "no result after 1 s"),
    ("import time; x = bytearray(400_000_000); time.sleep(60)", {"max_rss_mb": 200.0},
     "MB resident (limit 200 MB)"),
])
def test_children_are_stopped_and_explained(tmp_path: Path, code: str, limits: dict,
                                            expected: str) -> None:
    run_child = _run_child()
    done = run_child([sys.executable, "-c", code], tmp_path / "stderr.log",
                     **{"timeout_s": 60.0, "max_rss_mb": 10_000.0, **limits})
    assert expected in done.error_line()
    assert (done.code == 2) if not limits else (done.code is None and done.stopped)
