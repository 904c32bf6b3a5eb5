"""onnxopt tune: the search, its choice rule, and the document bench and the runner accept."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnx.parser
import pytest
from onnx import numpy_helper

from onnxopt import runner
from onnxopt.cli import main
from onnxopt.tune import SessionSettings, tune

STAGES = ["threads", "execution", "spinning", "memory"]


def branchy_model() -> onnx.ModelProto:
    """Two parallel MatMul branches joined by Add (something for parallel execution to use)."""
    model = onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 64] x) => (float[N, 64] y) {
          a = MatMul(x, A)
          ra = Relu(a)
          b = MatMul(x, B)
          rb = Relu(b)
          y = Add(ra, rb)
        }""")
    rng = np.random.default_rng(0)
    for name in ("A", "B"):
        model.graph.initializer.append(numpy_helper.from_array(
            (rng.standard_normal((64, 64)) / 8).astype(np.float32), name))
    return model


@pytest.fixture
def model_path(tmp_path: Path) -> Path:
    path = tmp_path / "branchy.onnx"
    onnx.save(branchy_model(), path)
    return path


def test_settings_document_round_trips_through_the_runner() -> None:
    settings = SessionSettings(threads=2, parallel=True, inter_op_threads=2, spinning=False,
                               cpu_mem_arena=False, mem_pattern=True)
    options = runner.session_config_options(settings.document())
    assert options == {"threads": 2, "inter_op_threads": 2, "parallel": True,
                       "cpu_mem_arena": False, "mem_pattern": True,
                       "config": {"session.intra_op.allow_spinning": "0",
                                  "session.inter_op.allow_spinning": "0"}}
    assert options == settings.session_kwargs()
    assert SessionSettings().document()["intra_op_num_threads"] is None  # ORT decides


def test_tune_tries_every_stage_and_follows_its_rule(model_path: Path) -> None:
    result = tune(model_path, threads=[1, 2], time_budget_s=0.05, memory_repeats=1)
    assert [t["stage"] for t in result.trials][0] == "threads"
    assert sorted({t["stage"] for t in result.trials}, key=STAGES.index) == STAGES
    for stage in STAGES:
        rows = [t for t in result.trials if t["stage"] == stage]
        assert sum(t["chosen"] for t in rows) == 1
        assert rows[0]["speedup"] == 1.0  # the stage's starting point is the reference
        chosen = next(t for t in rows if t["chosen"])
        if chosen is not rows[0]:  # replaced only when surely faster, by at least 2%
            assert chosen["speedup_ci95"][0] > 1.0 and chosen["speedup"] >= 1.02
    labels = {t["settings"] for t in result.trials}
    assert "1 thread(s), sequential, spinning, arena, mem pattern" in labels
    assert any("parallel" in label for label in labels)
    doc = result.document()
    runner.session_config_options(doc)  # a valid session configuration
    assert doc["tuned"]["model"]["sha256"] == runner.file_sha256(model_path)
    assert len(doc["tuned"]["trials"]) == len(result.trials)
    gain = doc["tuned"]["gain"]
    assert gain["peak_rss_mb"]["defaults"] > 0 and gain["peak_rss_mb"]["tuned"] > 0
    if result.best != SessionSettings():  # kept only when the final run confirms it
        assert gain["speedup_ci95"][0] > 1.0 and "unconfirmed" not in gain
    elif "unconfirmed" in gain:
        assert "did not confirm" in result.to_markdown()
    assert "ORT defaults" in result.to_markdown()


def test_nothing_replaces_ort_defaults_without_a_sure_gain(model_path: Path) -> None:
    result = tune(model_path, threads=[1], time_budget_s=0.03, min_gain=10.0,
                  measure_memory=False)
    assert result.best == SessionSettings()
    assert all(t["chosen"] == (t["settings"] == SessionSettings().label())
               for t in result.trials)
    assert result.gain["speedup"] == 1.0
    assert result.gain["peak_rss_mb"] == {"defaults": None, "tuned": None}


@pytest.mark.slow
def test_memory_objective_picks_the_smallest_peak(model_path: Path) -> None:
    result = tune(model_path, objective="memory", threads=[1], time_budget_s=0.03,
                  memory_repeats=1)
    for stage in STAGES:
        rows = [t for t in result.trials if t["stage"] == stage]
        if not rows:
            continue
        assert all(t["peak_rss_mb"] > 0 for t in rows)
        chosen = next(t for t in rows if t["chosen"])
        smallest = min(t["peak_rss_mb"] for t in rows)
        # the smallest wins unless it saves less than 2 MB or 2% (then the incumbent stays)
        incumbent = rows[0]["peak_rss_mb"]
        assert chosen["peak_rss_mb"] == smallest or (
            chosen is rows[0] and incumbent - smallest < max(2.0, 0.02 * incumbent))
    assert result.document()["tuned"]["objective"] == "memory"


@pytest.mark.slow
def test_cli_tune_output_feeds_bench_and_the_runner(tmp_path: Path, model_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "session.json"
    assert main(["tune", str(model_path), "-o", str(config), "--threads", "1",
                 "--time-budget", "0.05"]) == 0
    assert "| stage | settings |" in capsys.readouterr().out
    doc = json.loads(config.read_text())
    expected = runner.session_config_options(doc)
    assert main(["bench", str(model_path), "--session-config", str(config), "--threads", "1",
                 "--json", str(tmp_path / "bench.json")]) == 0
    settings = json.loads((tmp_path / "bench.json").read_text())["settings"]
    assert settings["session_config"] == expected["config"]
    assert settings["session_options"] == {k: expected[k] for k in (
        "inter_op_threads", "parallel", "cpu_mem_arena", "mem_pattern")}
    assert main(["tune", str(model_path), "--objective", "size"]) == 2
