"""Latency decisions (:mod:`onnxopt.passes._shared.timing`): an interval that straddles the
threshold asks for a longer measurement, a clear one decides, and the notes say which thread
count decided. The rules are tested on given timing figures: no test here times anything (the one
real quantize run asserts on notes keys and thread counts, never on speed)."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
from compression_models import mlp_proto

from onnxopt.cli import main
from onnxopt.passes._shared.timing import (CLEARS, FAILS, STRADDLES, UNCERTAIN, Timing, decide,
                                           deploy_threads, pending, verdict)


def timing(**per_threads: tuple[float, float, float]) -> Timing:
    """``t1=(speedup, lo, hi)`` ... as a Timing (p50s are irrelevant to decisions)."""
    counts = {int(k[1:]): v for k, v in per_threads.items()}
    return Timing({t: v[0] for t, v in counts.items()}, {t: v[1:] for t, v in counts.items()},
                  {t: 1.0 for t in counts}, {t: 1 for t in counts})


# The make-demo reading that kept the PyTorch MLP in FP32: clear at 1 thread, noisy at 2.
DEMO = timing(t1=(1.25, 1.244, 1.249), t2=(0.92, 0.906, 1.266))


def test_verdict_by_where_the_interval_lies() -> None:
    assert verdict(1.25, (1.244, 1.249), 1.05) == CLEARS
    assert verdict(0.92, (0.906, 1.266), 1.05) == STRADDLES
    assert verdict(0.9, (0.85, 0.95), 1.05) == FAILS
    assert verdict(1.1, (1.2, 1.3), 1.15) == STRADDLES  # a point outside its interval counts too


def test_a_straddling_interval_asks_for_more_at_that_thread_count_only() -> None:
    assert pending(DEMO, 1.05) == [2]
    undecided = decide(DEMO, 1.05)
    assert (undecided.verdict, undecided.threads, undecided.passed) == (UNCERTAIN, 2, False)


def test_a_longer_measurement_that_clears_decides_for_the_candidate() -> None:
    longer = DEMO.updated(timing(t2=(1.6, 1.5, 1.7)))
    assert longer.measurements == {1: 1, 2: 2} and longer.speedups[1] == 1.25
    assert pending(longer, 1.05) == []
    decision = decide(longer, 1.05)
    assert decision.passed and decision.verdict == CLEARS
    assert decision.threads == 1  # every count clears: the closest call is named
    assert decision.to_dict()["deciding_threads"] == 1


def test_a_failing_thread_count_decides_without_measuring_more() -> None:
    t = timing(t1=(1.1, 0.95, 1.3), t2=(0.8, 0.7, 0.9))
    assert pending(t, 1.05) == []
    decision = decide(t, 1.05)
    assert (decision.passed, decision.verdict, decision.threads) == (False, FAILS, 2)


def test_still_uncertain_the_point_estimate_at_the_deciding_count_rules() -> None:
    above = timing(t1=(1.5, 1.4, 1.6), t2=(1.1, 0.95, 1.3))
    decision = decide(above, 1.05)
    assert (decision.passed, decision.verdict, decision.threads) == (True, UNCERTAIN, 2)
    assert "uncertain" in decision.describe() and "2 thread(s)" in decision.describe()
    below = timing(t1=(1.5, 1.4, 1.6), t2=(1.0, 0.9, 1.2))
    assert decide(below, 1.05).passed is False


def test_the_geomean_rule_weighs_every_thread_count() -> None:
    close = timing(t1=(1.02, 0.97, 1.08), t2=(1.01, 0.9, 1.1))
    assert pending(close, 1.0, "geomean") == [1, 2]
    clear = timing(t1=(1.4, 1.3, 1.5), t2=(0.95, 0.9, 1.0))  # 1 thread carries the mean
    assert pending(clear, 1.0, "geomean") == []
    decision = decide(clear, 1.0, "geomean")
    assert decision.passed and decision.threads is None
    assert decision.to_dict()["deciding_threads"] == "geometric mean"


def test_speedups_over_another_candidate_keep_a_conservative_interval() -> None:
    split = timing(t1=(2.0, 1.8, 2.2))
    fp32 = timing(t1=(1.25, 1.2, 1.3))
    ratio = split.over(fp32)
    assert ratio.speedups[1] == pytest.approx(1.6)
    lo, hi = ratio.ci95[1]
    assert lo == pytest.approx(1.8 / 1.3) and hi == pytest.approx(2.2 / 1.2) and lo < 1.6 < hi


def test_deployed_thread_counts() -> None:
    assert deploy_threads([1]) == [1]
    assert deploy_threads([2, 1, 2]) == [2, 1]
    default = deploy_threads(None)
    assert default[0] == 1 and len(default) <= 2 and all(t >= 1 for t in default)


def test_threads_option_reaches_quantize_and_its_notes_name_the_deciding_count(
        tmp_path: Path) -> None:
    """A real run: `optimize --threads 1` times INT8 against FP32 at 1 thread only, and the
    notes say so. Which way it decides is the machine's business: not asserted."""
    model = tmp_path / "mlp.onnx"
    onnx.save(mlp_proto(sizes=(64, 64, 64, 8)), model)
    args = ["optimize", str(model), "-o", str(tmp_path / "out.onnx"), "--recipe", "int8",
            "--threads", "1", "--set", "quantize.latency_budget_s=0.05", "--set",
            "quantize.max_drop=1.0", "--report", str(tmp_path / "report")]
    assert main(args) == 0
    doc = json.loads((tmp_path / "report" / "report.json").read_text())
    notes = next(p for p in doc["passes"] if p["name"] == "quantize")["notes"]
    assert all(set(t) == {"1 thread(s)"} for t in notes["latency"].values())
    decision = notes["latency_decision"]
    assert decision["threads"] == [1] and decision["deciding_threads"] == 1
    assert decision["verdict"] in (CLEARS, FAILS, UNCERTAIN) and decision["rule"] == "worst"
    assert set(notes["latency_decisions"]) == set(notes["latency"]) - {"fp32"}


def test_bad_threads_is_a_one_line_input_error(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    model = tmp_path / "mlp.onnx"
    onnx.save(mlp_proto(), model)
    assert main(["optimize", str(model), "-o", str(tmp_path / "o.onnx"), "--threads", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--threads" in err and len(err.splitlines()) == 1
