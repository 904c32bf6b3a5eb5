"""Models over 2 GB, at a small scale: the same code paths with the external-data threshold
lowered to 1 MiB and an 8 MiB model, so they run in seconds. The real >2 GB run (inspect,
cleanup, fuse, dynamic INT8, share-weights, bench, report; peak RSS against model size) is
``benchmarks/bench_big_model.py``, figures in ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxopt import model_io, runner
from onnxopt.cli import main
from onnxopt.errors import InputError
from onnxopt.memory import (activation_bytes_per_sample, calibration_batch_size,
                            memory_needed, parse_size)
from onnxopt.model_io import load_model, release_mappings

LAYERS, WIDTH = 8, 512  # 8 MiB of weights
SMALL_THRESHOLD = 1 << 20


def external_mlp(folder: Path, layers: int = LAYERS, width: int = WIDTH) -> Path:
    """MatMul + Add + Relu layers; weights in ``mlp.onnx.data`` (onnx's own writer)."""
    rng = np.random.default_rng(0)
    inits, nodes, cur = [], [], "x"
    for i in range(layers):
        w = (rng.standard_normal((width, width)) / math.sqrt(width)).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"),
                  numpy_helper.from_array(rng.standard_normal(width).astype(np.float32), f"b{i}")]
        nodes += [helper.make_node("MatMul", [cur, f"w{i}"], [f"m{i}"], name=f"fc{i}"),
                  helper.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}"], name=f"fc{i}_bias"),
                  helper.make_node("Relu", [f"a{i}"], [f"r{i}"], name=f"relu{i}")]
        cur = f"r{i}"
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, ["N", width])], [helper.make_tensor_value_info(
            cur, TensorProto.FLOAT, ["N", width])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = folder / "mlp.onnx"
    onnx.save(model, path, save_as_external_data=True, location="mlp.onnx.data",
              size_threshold=1024)
    return path


@pytest.fixture
def mlp_path(tmp_path: Path) -> Path:
    folder = tmp_path / "model"
    folder.mkdir()
    return external_mlp(folder)


@pytest.fixture
def small_threshold(monkeypatch: pytest.MonkeyPatch) -> None:
    """Everything over 1 MiB counts as "too big for one protobuf", as 2 GB does for real."""
    monkeypatch.setattr(model_io, "EXTERNAL_DATA_THRESHOLD", SMALL_THRESHOLD)


def _outputs(path: Path, x: np.ndarray) -> np.ndarray:
    return runner.run(runner.reference_session(str(path)), {"x": x})[f"r{LAYERS - 1}"]


def _external_locations(path: Path) -> list[tuple[str, int]]:
    proto = onnx.load(str(path), load_external_data=False)
    return [({e.key: e.value for e in t.external_data}["location"],
             int({e.key: e.value for e in t.external_data}.get("offset", 0)))
            for t in proto.graph.initializer if t.data_location == TensorProto.EXTERNAL]


def test_inspect_reads_no_tensor_and_counts_every_byte(mlp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(mlp_path), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["params"] == LAYERS * (WIDTH * WIDTH + WIDTH)
    data = mlp_path.with_name("mlp.onnx.data")
    assert stats["size_bytes"] == mlp_path.stat().st_size + data.stat().st_size


@pytest.mark.usefixtures("small_threshold")
def test_fuse_over_the_threshold_keeps_external_data_and_is_verified(
        tmp_path: Path, mlp_path: Path) -> None:
    out, report = tmp_path / "out" / "fused.onnx", tmp_path / "report"
    assert main(["optimize", str(mlp_path), "-o", str(out), "--recipe", "fuse",
                 "--report", str(report)]) == 0
    assert {loc for loc, _ in _external_locations(out)} == {"fused.onnx.data"}  # automatically
    rec = json.loads((report / "report.json").read_text())["passes"][-1]
    assert rec["name"] == "fuse" and rec["modified"] and rec["fidelity"]  # verified via a file
    x = np.random.default_rng(1).standard_normal((3, WIDTH)).astype(np.float32)
    np.testing.assert_allclose(_outputs(out, x), _outputs(mlp_path, x), rtol=1e-4, atol=1e-4)
    assert sorted(p.name for p in out.parent.iterdir()) == ["fused.onnx", "fused.onnx.data"]


@pytest.mark.slow
@pytest.mark.usefixtures("small_threshold")
def test_dynamic_int8_over_the_threshold(tmp_path: Path, mlp_path: Path) -> None:
    """The prepared model and ORT's quantizer keep external data; the INT8 output (2 MiB, still
    over the lowered threshold) is written with external data, matches FP32, and a second run
    writes the same bytes."""
    out, report = tmp_path / "out" / "int8.onnx", tmp_path / "report"
    argv = ["--recipe", "int8", "--set", "quantize.mode=dynamic",
            "--set", "quantize.measure_latency=false"]
    assert main(["optimize", str(mlp_path), "-o", str(out), *argv, "--report", str(report)]) == 0
    again = tmp_path / "again" / "int8.onnx"
    assert main(["optimize", str(mlp_path), "-o", str(again), *argv]) == 0
    for name in ("int8.onnx", "int8.onnx.data"):
        assert (again.parent / name).read_bytes() == (out.parent / name).read_bytes(), name
    notes = json.loads((report / "report.json").read_text())["passes"][-1]["notes"]
    assert any("external-data threshold" in n for n in notes["prepare"]), notes["prepare"]
    assert notes["decision"].startswith("INT8: dynamic"), notes["decision"]
    assert {loc for loc, _ in _external_locations(out)} == {"int8.onnx.data"}
    ops = {n.op_type for n in onnx.load(out).graph.node}
    assert "MatMulInteger" in ops or "DynamicQuantizeLinear" in ops, ops
    x = np.random.default_rng(1).standard_normal((3, WIDTH)).astype(np.float32)
    ref, got = _outputs(mlp_path, x), _outputs(out, x)
    cosine = float((ref * got).sum() / (np.linalg.norm(ref) * np.linalg.norm(got)))
    assert cosine > 0.99, cosine
    assert sorted(p.name for p in out.parent.iterdir()) == ["int8.onnx", "int8.onnx.data"]


@pytest.mark.usefixtures("small_threshold")
def test_share_weights_over_the_threshold(tmp_path: Path) -> None:
    mlp_path = external_mlp(tmp_path, layers=2)  # 2 MiB: over the lowered threshold, k-means quick
    recipe = tmp_path / "share.json"
    recipe.write_text(json.dumps({"steps": ["cleanup", "share-weights"]}))
    out = tmp_path / "shared.onnx"
    assert main(["optimize", str(mlp_path), "-o", str(out), "--recipe", str(recipe)]) == 0
    onnx.checker.check_model(str(out))
    runner.reference_session(str(out))  # loads, external data included when any is left


@pytest.mark.slow
def test_bench_and_report_on_external_data(tmp_path: Path, mlp_path: Path) -> None:
    results = tmp_path / "bench.json"
    assert main(["bench", str(mlp_path), "--threads", "1", "--json", str(results)]) == 0
    assert json.loads(results.read_text())["rows"][0]["peak_rss_mb"] > 0
    report = tmp_path / "report"
    assert main(["optimize", str(mlp_path), "-o", str(tmp_path / "o.onnx"), "--recipe", "cleanup",
                 "--report", str(report)]) == 0
    assert main(["report", str(report / "report.json"), "-o", str(tmp_path / "r.md")]) == 0
    assert (tmp_path / "r.md").stat().st_size > 0


def _rss_file_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1])
    pytest.skip("no /proc/self/status RssFile on this OS")


def test_tensors_are_memory_mapped_and_released(mlp_path: Path) -> None:
    """External tensors are mapped, not copied (reading them grows file-backed RSS, not the
    heap); release_mappings gives those pages back between pipeline steps."""
    model = load_model(mlp_path)
    tensors = [v.const_value for v in model.graph.initializers.values()]
    assert all(isinstance(t, ir.ExternalTensor) for t in tensors if t.nbytes > 1024)
    before = _rss_file_kib()
    total = sum(float(np.asarray(t.numpy()).sum()) for t in tensors)  # touch every page
    touched = _rss_file_kib()
    release_mappings(model)
    released = _rss_file_kib()
    assert touched - before > 6 * 1024  # ~8 MiB of weights came in through the maps
    assert touched - released > 6 * 1024
    assert math.isfinite(total)


def test_max_memory_sizes_calibration_batches(tmp_path: Path, mlp_path: Path) -> None:
    model = load_model(mlp_path)
    per_sample = activation_bytes_per_sample(model)
    assert per_sample == LAYERS * 3 * WIDTH * 4  # MatMul, Add, Relu outputs, float32, batch 1
    assert memory_needed(model, 5) - memory_needed(model, 4) == int(2.5 * per_sample)
    assert calibration_batch_size(model, memory_needed(model, 5)) == 5
    assert calibration_batch_size(model, memory_needed(model, 5) - 1) == 4
    assert calibration_batch_size(model, 1 << 40) == 32  # never above the default
    with pytest.raises(InputError, match="below what calibrating one sample needs"):
        calibration_batch_size(model, model_io.tensor_bytes(model))
    assert parse_size("1.5G") == 3 << 29 and parse_size("512M") == 512 << 20


def test_max_memory_and_int8_of_an_external_model_under_the_threshold(
        tmp_path: Path, mlp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Calibration batches and the accuracy check's batches sized by ``--max-memory``; and
    below the threshold, external tensors
    come into memory, so the quantizer (written for in-memory models) works and the output is
    one self-contained file."""
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.random.default_rng(0).standard_normal((40, WIDTH)).astype(np.float32))
    model = load_model(mlp_path)
    budget = memory_needed(model, 4)
    out, report = tmp_path / "int8.onnx", tmp_path / "report"
    fast = ["--set", "quantize.measure_latency=false"]
    assert main(["optimize", str(mlp_path), "-o", str(out), "--recipe", "int8", *fast,
                 "--calib", str(calib), "--max-memory", str(budget),
                 "--report", str(report)]) == 0
    notes = json.loads((report / "report.json").read_text())["passes"][-1]["notes"]
    assert "40 samples in batches of 4" in notes["calibration_data"]
    # the same budget over the fused model (Gemm + Relu: 2 outputs per layer, not 3) fits 6
    assert notes["accuracy"]["samples"] == 40 and notes["accuracy"]["batch_size"] == 6
    assert _external_locations(out) == [] and not out.with_name("int8.onnx.data").exists()
    ops = {n.op_type for n in onnx.load(out).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops or "MatMulInteger" in ops, ops
    assert main(["optimize", str(mlp_path), "-o", str(out), "--recipe", "int8", *fast,
                 "--calib", str(calib), "--max-memory", "1M"]) == 2
    assert "below what calibrating one sample needs" in capsys.readouterr().err
