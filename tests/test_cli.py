"""The CLI contract: exit codes, one-line errors naming the file, no traceback unless --debug."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from onnxopt.cli import main


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _fail(capsys: pytest.CaptureFixture[str], args: list[str], code: int = 2) -> str:
    assert main(args) == code
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    return err


def test_optimize_writes_output_and_report(tmp_path: Path, mlp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    digest = _sha(mlp_path)
    out = tmp_path / "out.onnx"
    assert main(["optimize", str(mlp_path), "-o", str(out), "--report", str(tmp_path / "rep")]) == 0
    assert _sha(mlp_path) == digest  # input never modified
    onnx.checker.check_model(onnx.load(out))
    report = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert report["schema_version"] == 1 and report["passes"][0]["name"] == "cleanup"
    assert (tmp_path / "rep" / "report.md").read_text().startswith("### Recipe `default`")
    assert "wrote" in capsys.readouterr().err


def test_inspect_json_keys(mlp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(mlp_path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    for key in ("params", "size_bytes", "zipped_bytes", "macs", "nodes", "op_histogram"):
        assert key in data
    assert data["params"] == 20 + 5 + 15
    assert data["size_bytes"] == mlp_path.stat().st_size
    assert data["macs"] == {"MatMul": 4 * 5 + 5 * 3}


def test_list_passes_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list-passes", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    names = [p["name"] for p in data["passes"]]
    assert "cleanup" in names and "default" in data["recipes"]


def test_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "absent.onnx"
    err = _fail(capsys, ["optimize", str(missing), "-o", str(tmp_path / "o.onnx")])
    assert str(missing) in err and "no such file" in err
    assert not (tmp_path / "o.onnx").exists()


@pytest.mark.parametrize("content", [b"not onnx at all", b"\x08\x07\x12\x03abc\x3a\xff\xff"])
def test_not_onnx(tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(content)
    err = _fail(capsys, ["inspect", str(bad)])
    assert str(bad) in err


def test_truncated(tmp_path: Path, mlp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = mlp_path.read_bytes()
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(data[: len(data) * 2 // 3])
    _fail(capsys, ["optimize", str(cut), "-o", str(tmp_path / "o.onnx")])


def test_dangling_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = onnx.parser.parse_model(
        '<ir_version: 8, opset_import: ["" : 17]> g (float[N, 4] x) => (float[N, 4] y) { y = Add(x, ghost) }')
    path = tmp_path / "dangling.onnx"
    onnx.save(model, path)
    assert "ghost" in _fail(capsys, ["inspect", str(path)])


def test_refuses_to_overwrite_input(mlp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    digest = _sha(mlp_path)
    assert "--force" in _fail(capsys, ["optimize", str(mlp_path), "-o", str(mlp_path)])
    assert _sha(mlp_path) == digest
    assert main(["optimize", str(mlp_path), "-o", str(mlp_path), "--force"]) == 0


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--recipe", "nope"], "unknown recipe"),
        (["--set", "cleanup.nope=1"], "takes option"),
        (["--set", "broken"], "bad --set"),
        (["--max-drop", "0.5"], "takes option 'max_drop'"),
    ],
)
def test_bad_recipe_options(tmp_path: Path, mlp_path: Path, capsys: pytest.CaptureFixture[str],
                            extra: list[str], message: str) -> None:
    err = _fail(capsys, ["optimize", str(mlp_path), "-o", str(tmp_path / "o.onnx"), *extra])
    assert message in err


def test_unknown_pass_in_recipe_file(tmp_path: Path, mlp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = tmp_path / "r.toml"
    recipe.write_text('[[steps]]\npass = "warp-speed"\n')
    err = _fail(capsys, ["optimize", str(mlp_path), "-o", str(tmp_path / "o.onnx"), "--recipe", str(recipe)])
    assert str(recipe) in err and "unknown pass 'warp-speed'" in err


@pytest.mark.parametrize(
    "arrays, message",
    [
        ({"y": np.zeros((2, 4), np.float32)}, "missing input"),
        ({"x": np.zeros((2, 4), np.int32)}, "dtype int32"),
        ({"x": np.zeros((2, 7), np.float32)}, "expects"),
    ],
)
def test_bad_calibration_npz(tmp_path: Path, mlp_path: Path, capsys: pytest.CaptureFixture[str],
                             arrays: dict, message: str) -> None:
    npz = tmp_path / "calib.npz"
    np.savez(npz, **arrays)
    err = _fail(capsys, ["optimize", str(mlp_path), "-o", str(tmp_path / "o.onnx"), "--calib", str(npz)])
    assert str(npz) in err and message in err


def test_calibration_npz_used_for_verification(tmp_path: Path, mlp_path: Path) -> None:
    npz = tmp_path / "calib.npz"
    np.savez(npz, x=np.random.default_rng(0).standard_normal((40, 4)).astype(np.float32))
    assert main(["optimize", str(mlp_path), "-o", str(tmp_path / "o.onnx"), "--calib", str(npz)]) == 0


def test_usage_error_exit_2(capsys: pytest.CaptureFixture[str], mlp_path: Path) -> None:
    assert main(["optimize", str(mlp_path)]) == 2  # missing -o
    assert "Traceback" not in capsys.readouterr().err


def test_debug_shows_traceback_via_entry_point(tmp_path: Path) -> None:
    args = [sys.executable, "-m", "onnxopt", "inspect", str(tmp_path / "absent.onnx")]
    plain = subprocess.run(args, capture_output=True, text=True)
    assert plain.returncode == 2 and "Traceback" not in plain.stderr
    assert plain.stderr.strip().startswith("error:")
    debug = subprocess.run([*args, "--debug"], capture_output=True, text=True)
    assert debug.returncode == 2 and "Traceback" in debug.stderr
