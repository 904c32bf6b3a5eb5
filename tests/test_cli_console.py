"""What a person sees on the console: optimize's summary, progress text, --help, inspect's
inputs and a quiet export. Real CLI runs in a subprocess (stderr as a user gets it)."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import onnx
import pytest

from onnxopt.cli_summary import step_description
from onnxopt.stats import file_bytes
from onnxopt.recipes import builtin_recipes


def onnxopt(*args: str, cwd: Path | None = None,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "onnxopt", *args], capture_output=True,
                          text=True, cwd=cwd, env=env, timeout=300)


def test_optimize_summary_warns_when_int8_keeps_fp32(tmp_path: Path, mlp_path: Path) -> None:
    """A 4-5-3 MLP: Q/DQ overhead cannot pay, quantize keeps FP32 and the console says why."""
    output = tmp_path / "int8.onnx"
    run = onnxopt("optimize", str(mlp_path), "-o", str(output), "--recipe", "int8",
                  "--threads", "1")
    assert run.returncode == 0, run.stderr
    lines = run.stderr.splitlines()
    rows = {line.split()[0]: line for line in lines if line.split()}
    for name in ("cleanup", "fuse", "fuse-transformer", "quantize"):
        assert name in rows, run.stderr
    assert "5 -> 4" in rows["cleanup"] and "cosine" in rows["cleanup"]
    assert " kept " in rows["quantize"]
    warning = [line for line in lines if line.startswith("warning: quantize: ")]
    assert len(warning) == 1 and "kept FP32" in warning[0], run.stderr
    wrote = [line for line in lines if line.startswith(f"wrote {output}: ")]
    assert len(wrote) == 1, run.stderr
    sizes = re.search(r": ([\d,]+) -> ([\d,]+) bytes on disk", wrote[0])
    assert sizes is not None, wrote[0]
    assert int(sizes.group(1).replace(",", "")) == mlp_path.stat().st_size
    assert int(sizes.group(2).replace(",", "")) == output.stat().st_size == file_bytes(output)
    assert "MACs 35" in wrote[0] and "nodes 5 -> 3" in wrote[0]


def test_progress_text_counts_steps() -> None:
    # the bar is disabled when stderr is not a terminal, so its text is checked directly
    assert step_description(0, 4, "cleanup") == "step 1/4: cleanup"
    assert step_description(3, 4, "quantize") == "step 4/4: quantize"


@pytest.mark.parametrize("command", ["optimize", "bench", "export", "inspect", "tune", "split"])
def test_help_placeholders_are_for_people(command: str) -> None:
    run = onnxopt(command, "--help", env={**os.environ, "COLUMNS": "200"})
    assert run.returncode == 0, run.stderr
    for python_type in ("<bool>", "list[str]", "list[Path]", "<str>", "<int>", "<float>"):
        assert python_type not in run.stdout, f"{command} --help shows {python_type}"
    if command == "optimize":
        for name in builtin_recipes():
            assert name in run.stdout
        assert "PASS.OPTION=VALUE" in run.stdout and "1,2" in run.stdout


def test_inspect_shows_inputs_and_outputs(mlp_path: Path) -> None:
    run = onnxopt("inspect", str(mlp_path))
    assert run.returncode == 0, run.stderr
    assert re.search(r"input\s.*\bx\s+float\s+\[Nx4\]", run.stdout), run.stdout
    assert re.search(r"output\s.*\by\s+float\s+\[Nx3\]", run.stdout), run.stdout
    as_json = onnxopt("inspect", str(mlp_path), "--json")
    assert '"inputs"' in as_json.stdout and '"name": "x"' in as_json.stdout


TINY_MODELS = textwrap.dedent('''
    def torch_net():
        import torch
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU()), (torch.randn(2, 4),)

    def keras_net():
        import keras
        inp = keras.Input((4,))
        return keras.Model(inp, keras.layers.Dense(3, activation="relu")(inp))
''')


@pytest.mark.slow
@pytest.mark.parametrize("factory,framework", [("torch_net", "torch"), ("keras_net", "keras")])
def test_export_is_quiet_unless_verbose(tmp_path: Path, factory: str, framework: str) -> None:
    if importlib.util.find_spec(framework) is None:
        pytest.skip(f"{framework} not installed")
    (tmp_path / "tinymods.py").write_text(TINY_MODELS)
    output = tmp_path / f"{factory}.onnx"
    run = onnxopt("export", f"tinymods:{factory}", "-o", str(output), cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    onnx.checker.check_model(str(output))
    assert run.stderr.strip().splitlines() == [f"wrote {output}"], run.stderr
    if framework == "torch":  # the noise is still there for whoever asks
        verbose = onnxopt("--verbose", "export", f"tinymods:{factory}", "-o", str(output),
                          cwd=tmp_path)
        assert "torchvision" in verbose.stderr or "FutureWarning" in verbose.stderr
