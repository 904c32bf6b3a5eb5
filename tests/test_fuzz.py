"""Fuzzing: generated and mutated models through ``inspect``, ``optimize`` (every built-in recipe)
and ``bench``; each ends in a valid output model or one ``error:`` line (exit 2, or 1 for a missed
quality budget), never a traceback, a hang or a dead process.

Each command runs in a child process forked from a warm server (``onnxopt.isolation``), so a
native crash is observed rather than taking pytest down. Hypothesis runs derandomized with no
example database, so CI sees the same cases every time. The long run with its figures is
``benchmarks/bench_fuzz.py``.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fuzz_corpus as fc
from onnxopt import isolation, provenance
from onnxopt.recipes import builtin_recipes

RECIPES = sorted(builtin_recipes())
FUZZ = settings(max_examples=12, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _repro(label: str, argv: list[str]) -> str:
    return f"repro: tests/fuzz_corpus.make_case({label.split('/')[0]!r}, {label.split('/')[1]}) " \
           f"then onnxopt {' '.join(argv)}"


def _assert_contract(label: str, argv: list[str], outcome: fc.Outcome) -> None:
    problem = fc.contract_violation(outcome)
    assert problem is None, f"{label}: {problem}\n{_repro(label, argv)}\n{outcome.describe()}"


def _run_case(case: fc.Case, recipe: str, folder: Path) -> list[fc.Outcome]:
    model = folder / "model.onnx"
    model.write_bytes(case.data)
    out = folder / "out.onnx"
    data = fc.prepare_data(model, folder) if recipe in fc.CALIBRATED_RECIPES else None
    outcomes = []
    for argv, output in ((["inspect", str(model)], None),
                         (fc.optimize_argv(model, out, recipe, data), out)):
        outcome = fc.run_command(argv, output=output)
        _assert_contract(case.label, argv, outcome)
        outcomes.append(outcome)
    return outcomes


@FUZZ
@given(kind=st.sampled_from(fc.KINDS), seed=st.integers(0, 10_000),
       recipe=st.sampled_from(RECIPES))
def test_generated_and_mutated_models_keep_the_contract(kind: str, seed: int, recipe: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        _run_case(fc.make_case(kind, seed), recipe, Path(tmp))


@settings(max_examples=4, deadline=None, derandomize=True, database=None)
@given(data=st.binary(min_size=0, max_size=600),
       flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 7)), max_size=6))
def test_random_bytes_and_bit_flips(data: bytes, flips: list[tuple[int, int]]) -> None:
    """Arbitrary bytes, and a valid model with bits flipped where hypothesis chooses."""
    valid = bytearray(fc.random_graph(3).SerializeToString())
    for pos, bit in flips:
        valid[pos % len(valid)] ^= 1 << bit
    with tempfile.TemporaryDirectory() as tmp:
        for label, blob in (("bytes/0", data), ("bit-flipped/hyp", bytes(valid))):
            _run_case(fc.Case(label, blob), "default", Path(tmp))


@pytest.mark.slow
@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_on_valid_models_writes_a_valid_stamped_model(recipe: str,
                                                                  tmp_path: Path) -> None:
    """A valid model must come out valid: exit 0, the checker and ORT accept the output, and
    it carries its provenance. (If/Loop models go through every recipe in the fuzz test.)"""
    outcomes = _run_case(fc.make_case("random", 11), recipe, tmp_path)
    assert outcomes[-1].exitcode == 0, outcomes[-1].describe()
    stamped = provenance.read(onnx.load(tmp_path / "out.onnx"))
    assert stamped["recipe"] == recipe and stamped["seed"] == "0"


@pytest.mark.slow
def test_bench_on_a_valid_and_a_malformed_model(tmp_path: Path) -> None:
    for kind, expected in (("random", 0), ("huge-dims", 2)):
        case = fc.make_case(kind, 2)
        model = tmp_path / f"{kind}.onnx"
        model.write_bytes(case.data)
        argv = ["bench", str(model), "--threads", "1"]
        outcome = fc.run_command(argv)
        _assert_contract(case.label, argv, outcome)
        assert outcome.exitcode == expected, outcome.describe()


# --- the isolation the contract relies on -----------------------------------------------------


def _segfault() -> None:
    ctypes.string_at(0)  # a real SIGSEGV in native code, as a crashing ORT kernel would raise


def _sleep_forever() -> None:
    time.sleep(3600)


def test_native_crash_in_child_is_reported_not_suffered() -> None:
    outcome = isolation.run_in_child(_segfault, timeout=60)
    assert outcome.signal_name == "SIGSEGV" and outcome.crashed and outcome.value is None


def test_hang_in_child_is_cut_at_the_time_limit() -> None:
    start = time.monotonic()
    outcome = isolation.run_in_child(_sleep_forever, timeout=1.0)
    assert outcome.timed_out and outcome.crashed
    assert time.monotonic() - start < 30  # killed, not waited for


_CRASHING_ORT = """
import ctypes
import onnxruntime

_real_init = onnxruntime.InferenceSession.__init__


def _init(self, path_or_bytes, *args, **kwargs):
    if isinstance(path_or_bytes, (bytes, bytearray)) or "crash" in str(path_or_bytes):
        ctypes.string_at(0)  # stands for an ORT kernel segfaulting on a hostile model
    _real_init(self, path_or_bytes, *args, **kwargs)


onnxruntime.InferenceSession.__init__ = _init
"""


def test_isolate_turns_a_native_crash_into_one_line_and_exit_2(tmp_path: Path) -> None:
    """``--isolate``: the command's process dies of SIGSEGV inside ONNX Runtime (made to crash
    here through a ``sitecustomize`` hook); the user sees one line and exit code 2."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(_CRASHING_ORT)
    model = tmp_path / "crash.onnx"
    onnx.save(fc.random_graph(0), model)
    env = {**os.environ, "PYTHONPATH": str(hook)}
    cmd = [sys.executable, "-m", "onnxopt", "optimize", str(model), "-o", str(tmp_path / "o.onnx")]
    isolated = subprocess.run([*cmd, "--isolate"], capture_output=True, text=True, env=env,
                              timeout=300)
    lines = isolated.stderr.strip().splitlines()
    assert isolated.returncode == 2, isolated.stderr
    assert len(lines) == 1 and "crashed in native code (SIGSEGV)" in lines[0], isolated.stderr
    assert not (tmp_path / "o.onnx").exists()
