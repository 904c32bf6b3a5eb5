"""The self-contained runner: its JSON document, outputs, errors; it runs as a bare file."""

from __future__ import annotations

import ast
import hashlib
import json
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx.parser
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from onnxopt import runner
from onnxopt.feeds import synthesize_feeds
from onnxopt.model_io import to_ir

RUNNER_FILE = Path(runner.__file__)


def mlp_model() -> onnx.ModelProto:
    """MatMul + Add + Relu with a symbolic batch dim."""
    model = onnx.parser.parse_model(
        """
        <ir_version: 8, opset_import: ["" : 17]>
        mlp (float[N, 16] x) => (float[N, 8] y) {
          h = MatMul(x, W)
          a = Add(h, B)
          y = Relu(a)
        }
        """
    )
    rng = np.random.default_rng(0)
    model.graph.initializer.extend([
        numpy_helper.from_array(rng.standard_normal((16, 8)).astype(np.float32), "W"),
        numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "B"),
    ])
    onnx.checker.check_model(model)
    return model


@pytest.fixture
def model_path(tmp_path: Path) -> Path:
    path = tmp_path / "mlp.onnx"
    onnx.save(mlp_model(), path)
    return path


def run_bare_runner(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run a lone copy of runner.py where importing onnxopt fails, as on a board without it."""
    board = tmp_path / "board"
    board.mkdir(exist_ok=True)
    shutil.copy(RUNNER_FILE, board / "runner.py")
    poison = tmp_path / "poison" / "onnxopt"
    poison.mkdir(parents=True, exist_ok=True)
    (poison / "__init__.py").write_text("raise ImportError('the runner must not import onnxopt')\n")
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(poison.parent)}
    return subprocess.run([sys.executable, "runner.py", *args], cwd=board, env=env,
                          capture_output=True, text=True, timeout=120)


def test_runner_imports_only_stdlib_numpy_onnxruntime() -> None:
    tree = ast.parse(RUNNER_FILE.read_text())
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "relative import in runner.py"
            roots.add(node.module.split(".")[0])
    foreign = roots - set(sys.stdlib_module_names) - {"numpy", "onnxruntime", "__future__"}
    assert not foreign


def test_bare_runner_file_prints_json_and_writes_outputs(tmp_path: Path, model_path: Path) -> None:
    out = tmp_path / "out" / "y.npz"
    done = run_bare_runner(tmp_path, str(model_path), "--threads", "1", "--iterations", "25",
                           "--warmup", "2", "--shape", "N=3", "--seed", "7", "--outputs", str(out))
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)

    assert doc["schema_version"] == runner.SCHEMA_VERSION
    assert doc["model"]["sha256"] == hashlib.sha256(model_path.read_bytes()).hexdigest()
    assert doc["model"]["bytes"] == model_path.stat().st_size
    assert doc["machine"]["arch"] == platform.machine()
    assert doc["machine"]["versions"]["onnxruntime"] == ort.__version__
    assert doc["session"]["threads"] == 1
    assert doc["inputs"] == {"x": {"shape": [3, 16], "dtype": "float32", "source": "synthesized"}}
    lat = doc["latency"]
    assert lat["iterations"] == 25 and lat["warmup"] == 2
    assert 0 < lat["min_ms"] <= lat["p50_ms"] <= lat["p90_ms"] <= lat["p99_ms"] <= lat["max_ms"]
    assert lat["throughput"] == pytest.approx(1000.0 / lat["mean_ms"], rel=1e-6)
    assert doc["load_s"] > 0
    assert doc["energy_proxy"]["cpu_seconds_per_inference"] > 0
    assert 0 < doc["rss_before_load_mb"] <= doc["peak_rss_mb"]

    # Same inputs as onnxopt.feeds (the conventions are repeated in runner.py) and same outputs
    # as a direct ORT run with the same session options.
    feeds = synthesize_feeds(to_ir(mlp_model()), shapes={"N": [3]}, seed=7)
    session = runner.create_session(str(model_path), threads=1)
    expected = session.run(None, feeds)[0]
    with np.load(out) as saved:
        assert saved.files == ["y"]
        np.testing.assert_allclose(saved["y"], expected, rtol=1e-6, atol=1e-6)
    checksum = doc["outputs"]["y"]
    assert checksum["shape"] == [3, 8] and checksum["dtype"] == "float32"
    assert checksum["sum"] == pytest.approx(float(expected.astype(np.float64).sum()), rel=1e-6)
    assert checksum["abs_sum"] == pytest.approx(float(np.abs(expected).sum()), rel=1e-6)
    assert doc["outputs_file"]["names"] == ["y"]


def test_npz_inputs_are_used(tmp_path: Path, model_path: Path,
                             capsys: pytest.CaptureFixture[str]) -> None:
    x = np.linspace(-1, 1, 32, dtype=np.float32).reshape(2, 16)
    np.savez(tmp_path / "feeds.npz", x=x)
    code = runner.main([str(model_path), "--inputs", str(tmp_path / "feeds.npz"),
                        "--iterations", "3", "--warmup", "0", "--samples"])
    assert code == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["inputs"]["x"] == {"shape": [2, 16], "dtype": "float32", "source": "npz"}
    assert len(doc["latency"]["samples_ms"]) == 3
    expected = runner.reference_session(str(model_path)).run(None, {"x": x})[0]
    assert doc["outputs"]["y"]["sum"] == pytest.approx(float(expected.sum()), rel=1e-5)


def test_bare_runner_bad_model_exits_2_with_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    done = run_bare_runner(tmp_path, str(bad))
    assert done.returncode == 2
    assert done.stdout == ""
    assert len(done.stderr.strip().splitlines()) == 1
    assert "bad.onnx" in done.stderr and "cannot load" in done.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["missing.onnx"], "no such file"),
        (["{model}", "--shape", "x=2by16"], "bad --shape"),
        (["{model}", "--shape", "x=2x5"], "cannot run it"),
        (["{model}", "--inputs", "{feeds}"], "do not match"),
        (["{model}", "--inputs", "{model}"], "not a readable .npz"),
        (["{model}", "--config", "novalue"], "bad --config"),
        (["{model}", "--iterations", "0"], "--iterations must be >= 1"),
        (["{model}", "--iterations", "3", "--time-budget", "1"], "not allowed with"),
        (["{model}", "--no-such-flag"], "unrecognized arguments"),
    ],
)
def test_user_mistakes_exit_2_with_one_line(tmp_path: Path, model_path: Path,
                                            capsys: pytest.CaptureFixture[str],
                                            args: list[str], message: str) -> None:
    np.savez(tmp_path / "wrong.npz", z=np.zeros((1, 16), np.float32))
    argv = [a.format(model=model_path, feeds=tmp_path / "wrong.npz") for a in args]
    try:
        code = runner.main(argv)
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    captured = capsys.readouterr()
    assert code == 2
    assert captured.out == ""
    assert len(captured.err.strip().splitlines()) == 1
    assert message in captured.err


def test_measure_statistics_agree_with_samples(model_path: Path) -> None:
    session = runner.create_session(str(model_path), threads=1)
    feeds = {"x": np.ones((1, 16), np.float32)}
    stats = runner.measure(session, feeds, warmup=1, iterations=40, keep_samples=True)
    samples = np.array(stats["samples_ms"])
    assert stats["iterations"] == len(samples) == 40
    assert stats["p50_ms"] == pytest.approx(np.percentile(samples, 50))
    assert stats["p99_ms"] == pytest.approx(np.percentile(samples, 99))
    assert stats["min_ms"] == samples.min()
    assert stats["std_ms"] == pytest.approx(samples.std(ddof=1))
    assert stats["total_s"] * 1000 >= samples.sum()
    budget = runner.measure(session, feeds, warmup=0, time_budget_s=0.01, min_iterations=5)
    assert budget["iterations"] >= 5 and "samples_ms" not in budget
    capped = runner.measure(session, feeds, warmup=0, iterations=4, time_budget_s=60)
    assert capped["iterations"] == 4


def test_peak_rss_is_the_child_process_own_and_grows() -> None:
    # The parent holds 256 MiB: Linux's ru_maxrss would carry that peak into the child.
    hog = np.ones(256 * 1024 * 1024 // 8)
    code = (
        "import runpy, numpy as np\n"
        f"peak = runpy.run_path({str(RUNNER_FILE)!r})['peak_rss_mb']\n"
        "before = peak()\n"
        "block = np.ones(64 * 1024 * 1024 // 8)\n"
        "print(before, peak(), block.sum() > 0)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, check=True)
    before, after, touched = done.stdout.split()
    assert hog.sum() > 0 and touched == "True"
    assert float(after) >= float(before) + 48  # the 64 MiB block shows
    assert float(after) < 256  # numpy + onnxruntime + 64 MiB, not the parent's 256 MiB


def test_machine_info_without_proc_files(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runner, "_read_text", lambda path: "")
    info = runner.machine_info()
    assert info["arch"] == platform.machine()
    assert info["midr_el1"] == [] and info["cpu_parts"] == [] and info["board"] is None
    assert info["mem_total_mb"] is None
    assert not any(info["isa"].values())
    assert info["versions"]["numpy"] == np.__version__
    json.dumps(info)


ARM_CPUINFO = "".join(
    f"processor\t: {i}\nBogoMIPS\t: 108.00\n"
    "Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm "
    f"lrcpc dcpop asimddp\nCPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x4\n"
    f"CPU part\t: {'0xd0b' if i >= 4 else '0xd05'}\nCPU revision\t: 1\n\n"
    for i in range(8)
)


def test_machine_info_reads_an_arm_board(monkeypatch: pytest.MonkeyPatch) -> None:
    files = {
        "/proc/cpuinfo": ARM_CPUINFO,
        "/sys/firmware/devicetree/base/model": "Raspberry Pi 5 Model B Rev 1.0\x00",
        "/sys/devices/system/cpu/cpu0/regs/identification/midr_el1": "0x00000000414fd0b1\n",
    }
    monkeypatch.setattr(runner, "_read_text", lambda path: files.get(path, ""))
    monkeypatch.setattr(runner, "_cpu_dirs", lambda: ["/sys/devices/system/cpu/cpu0"])
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    info = runner.machine_info()
    assert info["cpu_model"] == "Cortex-A55 x4 + Cortex-A76 x4"
    assert info["cpu_parts"] == ["0xd05", "0xd0b"]
    assert info["isa"]["asimddp"] and not info["isa"]["i8mm"] and not info["isa"]["sve"]
    assert "avx2" not in info["isa"]
    assert info["midr_el1"] == ["0x00000000414fd0b1"]
    assert info["board"] == "Raspberry Pi 5 Model B Rev 1.0"
