"""The conformance zoo's harness (``make zoo``) on its quickest cell: real child processes, the
real CLI, and the table it writes. The full zoo runs with ``make zoo``, not here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ZOO = Path(__file__).resolve().parents[1] / "benchmarks" / "zoo"
sys.path.insert(0, str(ZOO))
from architectures import ARCHITECTURES  # noqa: E402


def test_zoo_covers_four_sources_and_25_architectures() -> None:
    sources = {a.source for a in ARCHITECTURES.values()}
    assert sources == {"hf", "keras", "torch", "onnx"}
    assert len(ARCHITECTURES) >= 25


@pytest.mark.slow
def test_zoo_cell_runs_the_cli_and_records_macs(tmp_path: Path) -> None:
    out = tmp_path / "zoo"
    proc = subprocess.run(
        [sys.executable, str(ZOO / "run.py"), "--models", "torch-control-flow", "--recipes",
         "cleanup,default", "--out", str(out), "--timeout", "300"],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    for recipe in ("cleanup", "default"):
        cell = results[f"torch-control-flow/{recipe}"]
        assert cell["status"] == "ok"
        assert cell["macs_after"] == cell["macs_before"] > 0
        assert cell["peak_rss_mb"] > 0
    assert "| torch-control-flow | cleanup | ok |" in (out / "table.md").read_text()
