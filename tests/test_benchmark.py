"""Interleaved benchmark: result structure, speed-up interval, memory, input checks, gate."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnx.parser
import pytest
from onnx import numpy_helper

from onnxopt.benchmarking import (
    MIN_BLOCK_RUNS,
    MIN_SETTLE_RUNS,
    SCHEMA_VERSION,
    THREADED_SETTLE_S,
    BenchmarkResult,
    _weighted_p50,
    benchmark,
    compare_to_baseline,
    measure_interleaved,
)
from onnxopt.errors import InputError

ROW_KEYS = {
    "model", "threads", "p50_ms", "p90_ms", "p99_ms", "mean_ms", "std_ms", "min_ms", "max_ms",
    "throughput", "iterations", "rounds", "block", "settle", "load_s",
    "cpu_seconds_per_inference", "peak_rss_mb", "session_rss_mb", "speedup", "speedup_ci95",
}


def mlp(chain: int = 0, width: int = 64, input_name: str = "x") -> onnx.ModelProto:
    """MatMul-Relu-MatMul-Add; ``chain`` extra width x width MatMul+Relu layers make it slower."""
    body = "".join(f"  c{i} = MatMul({'h' if i == 0 else f'r{i - 1}'}, C)\n  r{i} = Relu(c{i})\n"
                   for i in range(chain))
    last = f"r{chain - 1}" if chain else "h"
    model = onnx.parser.parse_model(f"""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 32] {input_name}) => (float[N, 10] y) {{
          m = MatMul({input_name}, W)
          h = Relu(m)
        {body}  z = MatMul({last}, W2)
          y = Add(z, B)
        }}
    """)
    rng = np.random.default_rng(0)
    inits = {"W": (32, width), "W2": (width, 10), "B": (10,)}
    if chain:
        inits["C"] = (width, width)
    model.graph.initializer.extend(
        numpy_helper.from_array((rng.standard_normal(s) / np.sqrt(s[0])).astype(np.float32), n)
        for n, s in inits.items()
    )
    onnx.checker.check_model(model)
    return model


@pytest.mark.slow
def test_benchmark_two_models_interleaved() -> None:
    fractions: list[float] = []
    result = benchmark(
        [mlp(), mlp(chain=6, width=384)], threads=(1, 2), names=["base", "heavy"],
        time_budget_s=0.3, progress=lambda f, _: fractions.append(f),
    )
    assert isinstance(result, BenchmarkResult)
    assert [(r["model"], r["threads"]) for r in result.rows] == [
        ("base", 1), ("heavy", 1), ("base", 2), ("heavy", 2)]
    for row in result.rows:
        assert set(row) == ROW_KEYS
        assert 0 < row["min_ms"] <= row["p50_ms"] <= row["p90_ms"] <= row["p99_ms"] <= row["max_ms"]
        assert row["iterations"] == row["rounds"] * row["block"] and row["rounds"] >= 5
        assert row["peak_rss_mb"] > 0 and row["session_rss_mb"] >= 0
        lo, hi = row["speedup_ci95"]
        assert lo <= row["speedup"] <= hi
    for threads in (1, 2):
        ref, heavy = result.row("base", threads), result.row("heavy", threads)
        assert ref["speedup"] == 1.0 and ref["speedup_ci95"] == [1.0, 1.0]
        assert heavy["speedup"] == pytest.approx(ref["p50_ms"] / heavy["p50_ms"])
        # ~37x the MACs of the base model: a ratio, not a wall-clock threshold
        assert heavy["speedup"] < 0.8
    # memory is read once per model, so it is the same at every thread count
    assert result.row("heavy", 1)["peak_rss_mb"] == result.row("heavy", 2)["peak_rss_mb"]

    doc = result.to_dict()
    assert doc["schema_version"] == SCHEMA_VERSION
    assert json.loads(json.dumps(doc)) == doc
    assert doc["feeds"] == {"x": {"shape": [1, 32], "dtype": "float32", "source": "synthesized"}}
    assert doc["machine"]["logical_cores"] >= 1
    assert doc["settings"]["spinning"] == "on"
    assert [m["name"] for m in doc["models"]] == ["base", "heavy"]
    table = result.to_markdown()
    assert table.count("\n| base |") == 2 and table.count("\n| heavy |") == 2
    assert fractions == sorted(fractions) and fractions[-1] == 1.0


def test_benchmark_paths_npz_feeds_fixed_rounds(tmp_path: Path) -> None:
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    onnx.save(mlp(), a)
    onnx.save(mlp(chain=1), b)
    np.savez(tmp_path / "feeds.npz", x=np.ones((4, 32), np.float32))
    result = benchmark([a, b], threads=[1], feeds=tmp_path / "feeds.npz", rounds=3, block=4,
                       warmup=1, settle=1, measure_memory=False,
                       session_config={"session.intra_op.allow_spinning": "0"})
    assert [r["model"] for r in result.rows] == ["a", "b"]
    for row in result.rows:
        assert (row["rounds"], row["block"], row["settle"], row["iterations"]) == (3, 4, 1, 12)
        assert row["peak_rss_mb"] is None
    assert result.feeds["x"] == {"shape": [4, 32], "dtype": "float32", "source": "given"}
    assert result.models[0]["source"] == str(a)
    assert result.settings["spinning"] == "off"


def test_models_with_different_inputs_are_refused() -> None:
    with pytest.raises(InputError, match="different inputs"):
        benchmark([mlp(), mlp(input_name="pixels")], threads=[1], measure_memory=False)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"feeds": {"pixels": np.ones((1, 32), np.float32)}}, "missing input"),
        ({"feeds": {"x": np.ones((1, 32), np.float64)}}, "dtype"),
        ({"names": ["only-one"]}, "1 name"),
        ({"names": ["same", "same"]}, "duplicate"),
        ({"threads": [0]}, "positive"),
        ({"rounds": 0}, "rounds must be"),
        ({"opt_level": "max"}, "opt_level"),
    ],
)
def test_bad_arguments_raise_input_error(kwargs: dict, message: str) -> None:
    with pytest.raises(InputError, match=message):
        benchmark([mlp(), mlp()], measure_memory=False, **kwargs)


def test_unreadable_model_path_raises_input_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"garbage")
    with pytest.raises(InputError, match=r"bad\.onnx"):
        benchmark([bad], measure_memory=False)


def test_bootstrap_p50_equals_numpy_on_the_resampled_multiset() -> None:
    rng = np.random.default_rng(3)
    rounds = [np.sort(rng.gamma(2.0, 1.0, size=n)) for n in (1, 4, 7, 2, 5)]
    counts = rng.multinomial(len(rounds), np.full(len(rounds), 1 / len(rounds)), size=40)
    counts = np.vstack([np.ones(len(rounds), dtype=np.int64), counts])
    got = _weighted_p50(rounds, counts)
    for row, value in zip(counts, got, strict=True):
        multiset = np.concatenate([np.tile(x, k) for x, k in zip(rounds, row, strict=True)])
        assert value == pytest.approx(np.percentile(multiset, 50))


def _doc(speedups: dict[tuple[str, int], float], reference: str = "fp32") -> dict:
    return {
        "schema_version": SCHEMA_VERSION,
        "models": [{"name": reference}],
        "rows": [{"model": m, "threads": t, "speedup": s, "speedup_ci95": [s * 0.95, s * 1.05]}
                 for (m, t), s in speedups.items()],
    }


def test_compare_to_baseline_flags_regressions_only() -> None:
    old = _doc({("fp32", 1): 1.0, ("int8", 1): 2.0, ("int8", 2): 1.8})
    same_within_budget = _doc({("fp32", 1): 1.0, ("int8", 1): 1.85, ("int8", 2): 1.9})
    assert compare_to_baseline(same_within_budget, old, max_regression=0.10) == []

    slower = _doc({("fp32", 1): 1.0, ("int8", 1): 1.7, ("int8", 2): 1.8})
    problems = compare_to_baseline(slower, old, max_regression=0.10)
    assert len(problems) == 1 and "int8 at 1 thread(s)" in problems[0] and "1.700x" in problems[0]

    missing = _doc({("fp32", 1): 1.0, ("int8", 1): 2.0})
    assert compare_to_baseline(missing, old, max_regression=0.10) == [
        "int8 at 2 thread(s): in the baseline but not in the new results"]

    other_reference = _doc({("fp16", 1): 1.0, ("int8", 1): 2.0, ("int8", 2): 1.8}, "fp16")
    assert "reference model differs" in compare_to_baseline(other_reference, old, 0.1)[0]


def test_compare_to_baseline_rejects_bad_documents() -> None:
    old = _doc({("fp32", 1): 1.0})
    with pytest.raises(InputError, match="max_regression"):
        compare_to_baseline(old, old, max_regression=1.5)
    with pytest.raises(InputError, match="schema_version"):
        compare_to_baseline({"rows": []}, old, max_regression=0.1)


def test_millisecond_callables_get_several_runs_per_block_and_settle() -> None:
    """With 2 threads the first runs after a switch are slow: a block of one run after one
    settle run measured MiniLM's INT8 model at twice its latency, so blocks keep at least
    MIN_BLOCK_RUNS timed runs and MIN_SETTLE_RUNS untimed ones, however long a run is."""
    calls = {"a": 0, "b": 0}

    def slow(name: str) -> Callable[[], None]:
        def run() -> None:
            calls[name] += 1
            time.sleep(0.004)  # 4 ms: BLOCK_S and SETTLE_S alone would give 1 run each
        return run

    stats, used = measure_interleaved([slow("a"), slow("b")], ["a", "b"], warmup=1, rounds=2)
    assert used["block"] == {"a": MIN_BLOCK_RUNS, "b": MIN_BLOCK_RUNS}
    assert used["settle"] == {"a": MIN_SETTLE_RUNS, "b": MIN_SETTLE_RUNS}
    assert [s["iterations"] for s in stats] == [2 * MIN_BLOCK_RUNS] * 2
    per_model = 1 + 2 * (MIN_SETTLE_RUNS + MIN_BLOCK_RUNS)  # warm-up, 2 rounds
    assert calls == {"a": per_model, "b": per_model}


def test_several_threads_settle_past_the_spinning_of_the_previous_session(tmp_path: Path) -> None:
    """At 2 threads the previous session's idle workers spin for about 70 ms after its last run,
    slowing whatever runs next (MiniLM INT8 up to 2.5x): a switch then settles for
    THREADED_SETTLE_S and blocks last THREADED_BLOCK_S. At 1 thread, or with spinning off, the
    short settle stays."""
    path = tmp_path / "m.onnx"
    onnx.save(mlp(), path)
    feeds = {"x": np.ones((1, 32), np.float32)}

    def settled_seconds(threads: int, config: dict[str, str] | None = None) -> float:
        result = benchmark([path, path], threads=[threads], feeds=feeds, names=["a", "b"],
                           rounds=1, measure_memory=False, session_config=config)
        used = result.settings["per_thread_count"][str(threads)]
        return used["settle"]["a"] * used["warmup_estimate_ms"]["a"] / 1000

    assert settled_seconds(2) >= 0.5 * THREADED_SETTLE_S
    assert settled_seconds(1) < 0.1 * THREADED_SETTLE_S
    assert settled_seconds(2, {"session.intra_op.allow_spinning": "0"}) < 0.1 * THREADED_SETTLE_S
