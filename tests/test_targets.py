"""Targets (local here; ssh and qemu in their own files), session configuration documents, the
runner's new options, and RAPL energy counters."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import onnx.parser
import pytest
from onnx import numpy_helper

from onnxopt import runner
from onnxopt.benchmarking import benchmark
from onnxopt.errors import InputError
from onnxopt.targets import (
    LocalTarget,
    RunOptions,
    agreement,
    benchmark_on_target,
    model_files,
    parse_target,
)


def mlp() -> onnx.ModelProto:
    model = onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 16] x) => (float[N, 8] y) {
          h = MatMul(x, W)
          y = Relu(h)
        }""")
    weight = np.random.default_rng(0).standard_normal((16, 8)).astype(np.float32)
    model.graph.initializer.append(numpy_helper.from_array(weight, "W"))
    return model


@pytest.fixture
def model_path(tmp_path: Path) -> Path:
    path = tmp_path / "mlp.onnx"
    onnx.save(mlp(), path)
    return path


CONFIG = {
    "schema": runner.SESSION_CONFIG_SCHEMA, "schema_version": runner.SESSION_CONFIG_VERSION,
    "intra_op_num_threads": 1, "inter_op_num_threads": 2, "execution_mode": "parallel",
    "enable_cpu_mem_arena": False, "enable_mem_pattern": False,
    "config_entries": {"session.intra_op.allow_spinning": "0"},
    "tuned": {"ignored": True},
}


@pytest.mark.parametrize(("spec", "message"), [
    ("ssh://", "bad target"), ("ssh://u@h:99999", "bad ssh port"), ("ssh://u@h:x", "bad target"),
    ("board", "unknown target"), ("qemu-aarch64:bad name", "bad qemu CPU"),
])
def test_bad_target_specs(spec: str, message: str) -> None:
    with pytest.raises(InputError, match=message):
        parse_target(spec)


def test_ssh_only_options_are_refused_elsewhere() -> None:
    for spec in ("local", "qemu-aarch64"):
        with pytest.raises(InputError, match="ssh:// targets only"):
            parse_target(spec, bootstrap=True)
    assert parse_target(None).spec == "local"
    assert parse_target("qemu-aarch64").spec == "qemu-aarch64:neoverse-n1"


def test_local_target_runs_the_runner_in_a_child(tmp_path: Path, model_path: Path) -> None:
    x = np.random.default_rng(3).standard_normal((2, 16)).astype(np.float32)
    np.savez(tmp_path / "feeds.npz", x=x)
    options = RunOptions(session_config=CONFIG, warmup=1, iterations=4)
    doc = LocalTarget().run(model_path, options, inputs=tmp_path / "feeds.npz",
                            outputs=tmp_path / "out" / "y.npz")
    assert doc["target"] == {"spec": "local", "kind": "local", "emulated": False,
                             "timing": "native", "note": None, "notes": []}
    session = doc["session"]
    assert (session["threads"], session["inter_op_threads"], session["parallel"]) == (1, 2, True)
    assert session["cpu_mem_arena"] is False and session["mem_pattern"] is False
    assert session["config"] == {"session.intra_op.allow_spinning": "0"}
    assert doc["latency"]["iterations"] == 4
    assert doc["energy_proxy"]["cpu_seconds_per_inference"] > 0
    assert "proxy" in doc["energy_proxy"]["note"]
    with np.load(tmp_path / "out" / "y.npz") as out:
        expected = runner.reference_session(str(model_path)).run(None, {"x": x})[0]
        np.testing.assert_array_equal(out["y"], expected)


def test_local_target_turns_runner_mistakes_into_input_errors(tmp_path: Path,
                                                               model_path: Path) -> None:
    np.savez(tmp_path / "wrong.npz", z=np.zeros((1, 16), np.float32))
    with pytest.raises(InputError, match="do not match"):
        LocalTarget().run(model_path, inputs=tmp_path / "wrong.npz")
    with pytest.raises(InputError, match="no such file"):
        LocalTarget().run(tmp_path / "absent.onnx")


def test_runner_session_config_file_and_flags_over_it(tmp_path: Path, model_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "cfg.json").write_text(json.dumps(CONFIG))
    code = runner.main([str(model_path), "--session-config", str(tmp_path / "cfg.json"),
                        "--threads", "2", "--config", "session.intra_op.allow_spinning=1",
                        "--iterations", "2", "--warmup", "0"])
    assert code == 0
    session = json.loads(capsys.readouterr().out)["session"]
    assert session["threads"] == 2 and session["inter_op_threads"] == 2  # flag over file
    assert session["config"] == {"session.intra_op.allow_spinning": "1"}
    assert session["cpu_mem_arena"] is False


@pytest.mark.parametrize(("doc", "message"), [
    ({"intra_op_num_threads": 2}, "not a session configuration"),
    ({**CONFIG, "schema_version": 99}, "schema_version 99"),
    ({**CONFIG, "execution_mode": "fast"}, "sequential or parallel"),
    ({**CONFIG, "enable_mem_pattern": "no"}, "wrong type"),
    ({**CONFIG, "intra_op_num_threads": 0}, ">= 1 or null"),
])
def test_bad_session_configs_are_one_line_errors(tmp_path: Path, model_path: Path, doc: dict,
                                                 message: str,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "cfg.json").write_text(json.dumps(doc))
    assert runner.main([str(model_path), "--session-config", str(tmp_path / "cfg.json")]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_benchmark_accepts_a_session_configuration(tmp_path: Path, model_path: Path) -> None:
    (tmp_path / "cfg.json").write_text(json.dumps(CONFIG))
    for config in (CONFIG, tmp_path / "cfg.json"):
        result = benchmark([model_path], session_config=config, rounds=5, block=2,
                           measure_memory=False, bootstrap=10)
        assert [r["threads"] for r in result.rows] == [1]  # the document's thread count
        assert result.settings["session_config"] == CONFIG["config_entries"]
        assert result.settings["session_options"] == {
            "inter_op_threads": 2, "parallel": True, "cpu_mem_arena": False,
            "mem_pattern": False}
        assert result.settings["spinning"] == "off"
    with pytest.raises(InputError, match="execution_mode"):
        benchmark([model_path], session_config={**CONFIG, "execution_mode": 1}, rounds=5)


def test_benchmark_on_local_target_compares_outputs_with_the_host(tmp_path: Path,
                                                                   model_path: Path) -> None:
    other = tmp_path / "other.onnx"
    onnx.save(mlp(), other)
    result = benchmark_on_target(LocalTarget(), [model_path, other], threads=[1, 2],
                                 options=RunOptions(warmup=1, iterations=3))
    assert [(r["model"], r["threads"]) for r in result.rows] == [
        (str(model_path), 1), (str(other), 1), (str(model_path), 2), (str(other), 2)]
    for row in result.rows:
        assert row["outputs_vs_host"]["identical"] and row["outputs_vs_host"]["max_abs"] == 0
        assert row["timing"] == "native" and row["peak_rss_mb"] > 0
    assert result.rows[0]["speedup"] == 1.0
    assert "not interleaved" in result.to_markdown()
    json.dumps(result.to_dict())


def test_agreement_reports_exactness_and_worst_error() -> None:
    ref = {"y": np.array([1.0, 2.0], np.float32)}
    assert agreement(ref, {"y": ref["y"].copy()}) == {"identical": True, "max_abs": 0.0,
                                                      "max_rel": 0.0}
    off = agreement(ref, {"y": np.array([1.0, 2.002], np.float32)})
    assert not off["identical"] and off["max_abs"] == pytest.approx(0.002, rel=1e-3)
    assert off["max_rel"] == pytest.approx(0.001, rel=1e-3)
    assert agreement(ref, {"z": ref["y"]})["identical"] is False
    assert agreement(ref, {"y": ref["y"].astype(np.float64)})["max_abs"] == float("inf")


def test_model_files_follow_external_data_and_cascades(tmp_path: Path) -> None:
    onnx.save(mlp(), tmp_path / "ext.onnx", save_as_external_data=True, location="w.bin",
              size_threshold=0)
    assert model_files(tmp_path / "ext.onnx") == ["ext.onnx", "w.bin"]
    (tmp_path / "stages").mkdir()
    onnx.save(mlp(), tmp_path / "stages" / "s0.onnx", save_as_external_data=True,
              location="s0.bin", size_threshold=0)
    onnx.save(mlp(), tmp_path / "s1.onnx")
    (tmp_path / "cascade.json").write_text(json.dumps(
        {"stages": [{"file": "stages/s0.onnx"}, {"file": "s1.onnx"}]}))
    assert model_files(tmp_path / "cascade.json") == [
        "cascade.json", "stages/s0.onnx", "stages/s0.bin", "s1.onnx"]


def _fake_rapl(base: Path, energy: int, limit: int = 1000) -> None:
    for zone, name in (("intel-rapl:0", "package-0"), ("intel-rapl:0:0", "core")):
        (base / zone).mkdir(parents=True, exist_ok=True)
        (base / zone / "name").write_text(name + "\n")
        (base / zone / "energy_uj").write_text(f"{energy}\n")
        (base / zone / "max_energy_range_uj").write_text(f"{limit}\n")


def test_rapl_counters_read_package_zones_and_wrap(tmp_path: Path) -> None:
    _fake_rapl(tmp_path, 900)
    before = runner.rapl_energy_uj(str(tmp_path))
    assert before == {"intel-rapl:0 package-0": (900, 1000)}  # sub-zones are parts of it
    _fake_rapl(tmp_path, 100)  # the counter wrapped at 1000 uJ
    assert runner.rapl_joules(before, runner.rapl_energy_uj(str(tmp_path))) == pytest.approx(
        200e-6)
    os.chmod(tmp_path / "intel-rapl:0" / "energy_uj", 0)
    if os.geteuid() != 0:  # root reads it anyway
        assert runner.rapl_energy_uj(str(tmp_path)) is None
    assert runner.rapl_energy_uj(str(tmp_path / "absent")) is None
    assert runner.rapl_joules(None, before) is None


def test_emulated_results_are_labelled_as_such() -> None:
    from onnxopt.targets import EMULATED_NOTE, TargetBenchResult

    row = {"model": "m.onnx", "threads": None, "p50_ms": 9.0, "p90_ms": 9.5, "mean_ms": 9.1,
           "std_ms": 0.2, "speedup": 1.0, "cpu_seconds_per_inference": 0.02, "load_s": 1.0,
           "peak_rss_mb": 150.0, "outputs_vs_host": {"identical": True}}
    target = {"spec": "qemu-aarch64:max", "emulated": True}
    text = TargetBenchResult(target=target, models=[], rows=[row], machine={"arch": "aarch64"},
                             settings={}, notes=[]).to_markdown()
    assert text.startswith("**EMULATED (qemu-aarch64:max)**") and EMULATED_NOTE in text
    assert "timings EMULATED, not ARM performance" in text and "| identical |" in text
    native = TargetBenchResult(target={"spec": "ssh://pi@b:22", "emulated": False},
                               models=[], rows=[row], machine={}, settings={},
                               notes=["onnxruntime version mismatch"]).to_markdown()
    assert "EMULATED" not in native and "note: onnxruntime version mismatch" in native
