"""Interruption: SIGINT or SIGTERM during ``optimize`` or ``bench`` leaves no partial output and no
temporary files. (Concurrent runs on different files: ``test_determinism.py`` runs two optimize
processes and a bench at once and compares their outputs byte for byte.)

End-to-end cases signal a real ``onnxopt`` process at a known point: when ``optimize`` has
written its first checkpoint (so it is between passes), when ``bench`` has made its working
folder (so it is measuring). The write itself is interrupted in-process by a tripwire tensor
that raises the signal while ``save_model`` is streaming it out.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxopt import model_io
from onnxopt.isolation import Interrupted, interrupts_as_exceptions
from onnxopt.model_io import save_model

LAYERS, WIDTH = 8, 512  # 8 MB of weights: a second or two of optimizing or benchmarking


@pytest.fixture(scope="module")
def model_8mb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = np.random.default_rng(0)
    inits, nodes, cur = [], [], "x"
    for i in range(LAYERS):
        w = (rng.standard_normal((WIDTH, WIDTH)) / np.sqrt(WIDTH)).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nodes.append(helper.make_node("MatMul", [cur, f"w{i}"], [f"h{i}"], name=f"fc{i}"))
        cur = f"h{i}"
    graph = helper.make_graph(nodes, "deep", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, ["N", WIDTH])], [helper.make_tensor_value_info(
            cur, TensorProto.FLOAT, ["N", WIDTH])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path_factory.mktemp("interrupt") / "deep.onnx"
    onnx.save(model, path)
    return path


def _signal_when(cmd: list[str], tmpdir: Path, ready: Callable[[], bool], signum: int,
                 delay: float = 0.0) -> subprocess.CompletedProcess[str]:
    """Run ``onnxopt <cmd>`` with its own TMPDIR; once ``ready()``, wait ``delay`` and signal."""
    env = {**os.environ, "TMPDIR": str(tmpdir)}
    proc = subprocess.Popen([sys.executable, "-m", "onnxopt", *cmd], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not ready():
        assert proc.poll() is None, f"finished before the signal: {proc.communicate()}"
        assert time.monotonic() < deadline, "never reached the signal point"
        time.sleep(0.005)
    time.sleep(delay)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _leftovers(tmpdir: Path) -> list[str]:
    """Files the run left in its TMPDIR, except ONNX Runtime's ``.ses`` (a session-id file its
    native library writes on import, before any command starts, and reuses across processes)."""
    return sorted(p.name for p in tmpdir.iterdir() if p.name != ".ses")


def _assert_stopped_cleanly(done: subprocess.CompletedProcess[str], signum: int) -> None:
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 128 + signum, done.stderr
    assert "Traceback" not in done.stderr
    assert lines[-1] == (f"error: interrupted by {signal.Signals(signum).name}; unfinished "
                         "outputs and temporary files were removed"), done.stderr


@pytest.mark.slow
def test_sigterm_between_passes_leaves_nothing(tmp_path: Path, model_8mb: Path) -> None:
    """SIGTERM (what CI runners and ``kill`` send): without onnxopt's handler it would kill the
    process with no cleanup at all. (SIGINT takes the same path: see the in-process tests.)"""
    signum = signal.SIGTERM
    out_dir, checkpoints, tmpdir = tmp_path / "out", tmp_path / "checkpoints", tmp_path / "tmp"
    for d in (out_dir, tmpdir):
        d.mkdir()
    cmd = ["optimize", str(model_8mb), "-o", str(out_dir / "opt.onnx"), "--report",
           str(out_dir / "report"), "--checkpoints", str(checkpoints)]
    done = _signal_when(cmd, tmpdir, lambda: (checkpoints / "01-cleanup.onnx").exists(), signum)
    _assert_stopped_cleanly(done, signum)
    assert list(out_dir.iterdir()) == []  # no model, no report, no staging folder
    assert _leftovers(tmpdir) == []  # no temporary file of the run is left
    assert [p.name for p in checkpoints.iterdir()] == ["01-cleanup.onnx"]  # finished ones stay


@pytest.mark.slow
def test_sigint_during_bench_leaves_nothing(tmp_path: Path, model_8mb: Path) -> None:
    tmpdir, results = tmp_path / "tmp", tmp_path / "results"
    tmpdir.mkdir()
    results.mkdir()
    other = tmp_path / "other.onnx"
    other.write_bytes(model_8mb.read_bytes())
    cmd = ["bench", str(model_8mb), str(other), "--threads", "1,2", "--json",
           str(results / "bench.json")]

    def measuring() -> bool:  # the benchmark's working folder inside the run's private one
        return any(p.name.startswith("onnxopt-bench-") for run in tmpdir.glob("onnxopt-run-*")
                   for p in run.iterdir())

    done = _signal_when(cmd, tmpdir, measuring, signal.SIGINT, delay=0.3)
    _assert_stopped_cleanly(done, signal.SIGINT)
    assert list(results.iterdir()) == []
    assert _leftovers(tmpdir) == []


class _Tripwire(ir.Tensor):
    """A tensor that sends its process ``signum`` when its bytes are read, i.e. mid-save."""

    def __init__(self, array: np.ndarray, signum: int, name: str) -> None:
        super().__init__(array, name=name)
        self._signum = signum

    def tobytes(self) -> bytes:
        os.kill(os.getpid(), self._signum)
        return super().tobytes()

    def numpy(self) -> np.ndarray:
        os.kill(os.getpid(), self._signum)
        return super().numpy()


def _model_with_tripwire(signum: int) -> ir.Model:
    proto = onnx.parser.parse_model(
        '<ir_version: 8, opset_import: ["" : 17]> g (float[4] x) => (float[4] y) '
        "{ a = Add(x, w0)\n y = Add(a, w1) }")
    proto.graph.initializer.extend([numpy_helper.from_array(np.ones(4, np.float32), "w0")])
    model = ir.serde.deserialize_model(proto)
    w1 = ir.Value(name="w1", const_value=_Tripwire(np.ones(4, np.float32), signum, "w1"))
    model.graph.initializers["w1"] = w1
    for node in model.graph:
        for i, value in enumerate(node.inputs):
            if value is not None and value.name == "w1":
                node.replace_input_with(i, w1)
    return model


@pytest.mark.parametrize("external", [False, True])
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_while_writing_keeps_the_old_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   signum: int, external: bool) -> None:
    """A signal in the middle of writing: the exception ends the save, the staging folder goes,
    and an existing output (with its external data) is left exactly as it was."""
    if external:  # the >2 GB path, at a small scale: every tensor to external data
        monkeypatch.setattr(model_io, "EXTERNAL_DATA_THRESHOLD", 0)
    out = tmp_path / "model.onnx"
    previous = ir.serde.deserialize_model(onnx.parser.parse_model(
        '<ir_version: 8, opset_import: ["" : 17]> g (float[4] x) => (float[4] y) '
        "<float[4] w = {1, 2, 3, 4}> { y = Add(x, w) }"))
    save_model(previous, out)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(Interrupted), interrupts_as_exceptions():
        save_model(_model_with_tripwire(signum), out)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


_STALLED = """
import os, sys
from pathlib import Path
from onnxopt import isolation, instruments as pipeline
isolation.FORCED_EXIT_GRACE_S = 1.0
_run = pipeline.bounded_run

def marked_run(*args, **kwargs):  # tells the test the inference is starting (timing only)
    Path(os.environ["STALL_MARK"]).touch()
    return _run(*args, **kwargs)

pipeline.bounded_run = marked_run
from onnxopt.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_sigterm_while_stuck_in_native_code(tmp_path: Path) -> None:
    """A model whose Loop never ends keeps ONNX Runtime busy in C++, where Python cannot run its
    signal handler: the watchdog removes the run's temporary folder and exits by itself after
    the grace period (1 s here), instead of ignoring SIGTERM until the time limit."""
    import fuzz_corpus as fc

    model = tmp_path / "endless.onnx"
    model.write_bytes(fc.make_case("endless-loop", 0).data)
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    mark = tmp_path / "inference-started"
    env = {**os.environ, "TMPDIR": str(tmpdir), "STALL_MARK": str(mark)}
    proc = subprocess.Popen([sys.executable, "-c", _STALLED, "optimize", str(model), "-o",
                             str(tmp_path / "out.onnx")], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (mark.exists() and list(tmpdir.glob("onnxopt-run-*"))):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.01)
    time.sleep(1.5)  # into the endless inference (on a busy machine too: it has started)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert err.strip().splitlines()[-1] == ("error: interrupted by SIGTERM; stuck in native code "
                                            "for 1 s, so stopped forcibly; temporary files were "
                                            "removed")
    assert _leftovers(tmpdir) == [] and not (tmp_path / "out.onnx").exists()
