"""Producing the suite's candidates in child processes: ORT's quantizer baselines and the recipes.

Baselines are what a user tries first, with defaults: ``quantize_dynamic`` on the FP32 file, and
``quantize_static`` (MinMax, QDQ) after ``quant_pre_process``, calibrated on the model's data.
Recipes go through :func:`onnxopt.api.optimize` with calibration batches, evaluation data and a
checkpoint folder, and are written the way ``onnxopt optimize`` writes them, with its exit codes:
0 done, 1 a budget missed (the best candidate is still written) or a verification failure, 2 the
recipe refused the model. (The API rather than the command: ``--calib`` slices an ``.npz`` into
batches of 32, which models with a fixed batch of 1, the light zoo, reject.)

Every job runs in a child process (this file run as a script, or ``models.py`` for builds) under a
time limit and a memory limit, so one model's or recipe's crash, runaway memory or endless search
is recorded and the suite goes on, and the suite's own process never grows with the models.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

CALIBRATION_BATCH = 32  # samples per calibration batch when the batch axis is free (as the CLI)
POLL_S = 0.5


@dataclasses.dataclass
class Produced:
    """What producing one candidate gave: a model file (or why not) and what it cost."""

    status: str  # ok | budget-missed | not-applicable | failed | timeout
    path: Path | None
    error: str | None = None
    optimize_s: float | None = None
    wall_s: float | None = None
    report: dict[str, Any] | None = None  # the pipeline's OptimizationReport, for recipes
    checkpoints: list[Path] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class ChildResult:
    """How a child process ended: its exit code, or why the suite stopped it."""

    code: int | None
    stopped: str | None  # "no result after ..." or "... MB resident ..."
    stderr: str
    wall_s: float

    @property
    def timed_out(self) -> bool:
        return self.stopped is not None and self.stopped.startswith("no result")

    def error_line(self) -> str:
        """Why it stopped, the CLI-style one-line error, or the last line of a traceback."""
        if self.stopped:
            return self.stopped
        lines = [line.strip() for line in self.stderr.splitlines() if line.strip()]
        for line in reversed(lines):
            if line.startswith("error:"):
                return line.removeprefix("error:").strip()
        if self.code is not None and self.code < 0:
            hint = " (out of memory?)" if self.code == -signal.SIGKILL else ""
            return f"killed by signal {-self.code}{hint}"
        return lines[-1] if lines else f"exit code {self.code}"


def run_child(command: list[str], log: Path, *, timeout_s: float, max_rss_mb: float) -> ChildResult:
    """Run ``command`` in its own session, killing it past ``timeout_s`` or ``max_rss_mb``."""
    start = time.perf_counter()
    stopped = None
    with open(log, "w+") as err:
        child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=err,
                                 start_new_session=True)
        code: int | None = None
        try:
            while True:
                try:
                    code = child.wait(timeout=POLL_S)
                    break
                except subprocess.TimeoutExpired:
                    pass
                rss = _rss_mb(child.pid)
                if time.perf_counter() - start > timeout_s:
                    stopped = f"no result after {timeout_s:.0f} s"
                elif rss is not None and rss > max_rss_mb:
                    stopped = f"stopped at {rss:,.0f} MB resident (limit {max_rss_mb:,.0f} MB)"
                if stopped:
                    break
        finally:  # stopped, or the suite itself interrupted: the child must not outlive it
            if child.poll() is None:
                os.killpg(child.pid, signal.SIGKILL)  # the child's own process group only
                child.wait()
            if stopped:
                code = None
        err.seek(0)
        stderr = err.read()
    return ChildResult(code, stopped, stderr, time.perf_counter() - start)


def _rss_mb(pid: int) -> float | None:
    """Resident memory of a process from /proc (None where there is no /proc)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def produce(kind: str, name: str, fp32: Path, workdir: Path, *, calibration: Path,
            evaluation: Path, seed: int, timeout_s: float, max_rss_mb: float) -> Produced:
    """One candidate (``kind``: ``ort-dynamic``, ``ort-static`` or ``recipe``) in a child."""
    workdir.mkdir(parents=True, exist_ok=True)
    job = {"kind": kind, "name": name, "model": str(fp32), "calibration": str(calibration),
           "evaluation": str(evaluation), "seed": seed, "output": str(workdir / "model.onnx"),
           "report": str(workdir / "report.json"), "checkpoints": str(workdir / "steps")}
    (workdir / "job.json").write_text(json.dumps(job))
    done = run_child([sys.executable, __file__, str(workdir / "job.json")], workdir / "stderr.log",
                     timeout_s=timeout_s, max_rss_mb=max_rss_mb)
    out = Path(job["output"])
    report = _read_json(Path(job["report"]))
    if done.timed_out:
        return Produced("timeout", None, done.error_line(), wall_s=done.wall_s)
    if kind != "recipe":
        seconds = report.get("seconds") if report else None
        if done.code == 0 and out.is_file():
            return Produced("ok", out, optimize_s=seconds, wall_s=done.wall_s)
        return Produced("failed", None, done.error_line(), wall_s=done.wall_s)
    steps = sorted(Path(job["checkpoints"]).glob("*.onnx"))
    optimize_s = sum(p.get("seconds") or 0.0 for p in report["passes"]) if report else None
    produced = Produced("ok", out, None, optimize_s, done.wall_s, report, steps)
    if done.code == 0 and out.is_file():
        return produced
    produced.error = done.error_line()
    if done.code == 1 and out.is_file() and "Traceback" not in done.stderr:
        produced.status = "budget-missed"  # the best candidate found was saved
    elif done.code == 2 and "after pass" not in done.stderr:
        produced.status, produced.path = "not-applicable", None
    else:  # a pass broke its tolerance, wrote a model ORT cannot run, crashed or ran out of memory
        produced.status, produced.path = "failed", None
    return produced


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


# ----------------------------------------------------------------------------------------------
# The child's side


def batch_of(model_path: str) -> int | None:
    """The fixed batch size of the model's first input, or None when the batch axis is free."""
    import onnx

    model = onnx.load(model_path, load_external_data=False)
    initializers = {t.name for t in model.graph.initializer}
    first = next(i for i in model.graph.input if i.name not in initializers)
    dims = first.type.tensor_type.shape.dim
    return dims[0].dim_value if dims and dims[0].HasField("dim_value") else None


def calibration_batches(path: str, model_path: str) -> list[dict[str, np.ndarray]]:
    """The stacked samples of ``path`` cut into batches that fit the model's batch axis."""
    from onnxopt.feeds import load_npz

    arrays = load_npz(path)
    step = batch_of(model_path) or CALIBRATION_BATCH
    n = len(next(iter(arrays.values())))
    return [{k: v[i:i + step] for k, v in arrays.items()} for i in range(0, n, step)]


class _Reader:
    """An ``onnxruntime.quantization.CalibrationDataReader`` over prepared batches."""

    def __init__(self, batches: list[dict[str, np.ndarray]]) -> None:
        self._batches = iter(batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


def _ort_baseline(job: dict[str, Any]) -> int:
    """``quantize_dynamic`` or ``quant_pre_process`` + ``quantize_static``, all defaults."""
    from onnxruntime.quantization import quantize_dynamic, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    start = time.perf_counter()
    if job["kind"] == "ort-dynamic":
        quantize_dynamic(job["model"], job["output"])
    else:
        pre = str(Path(job["output"]).with_name("preprocessed.onnx"))
        with contextlib.chdir(Path(pre).parent):  # ORT may leave temporary files in the cwd
            quant_pre_process(job["model"], pre)
        quantize_static(pre, job["output"], _Reader(calibration_batches(job["calibration"], pre)))
    Path(job["report"]).write_text(json.dumps({"seconds": time.perf_counter() - start}))
    return 0


def _recipe(job: dict[str, Any]) -> int:
    """``onnxopt optimize`` through the API; returns the command's exit code."""
    from onnxopt.api import load, optimize
    from onnxopt.errors import OnnxoptError, QualityGateError
    from onnxopt.feeds import load_npz
    from onnxopt.model_io import save_model, write_bytes_atomic

    evaluation = load_npz(job["evaluation"])
    labels = evaluation.pop("labels", None)

    def write(result: Any, rep: Any) -> None:
        save_model(result, job["output"])
        write_bytes_atomic(rep.to_json().encode(), job["report"])

    try:
        result, rep = optimize(load(job["model"]), job["name"],
                               calibration=calibration_batches(job["calibration"], job["model"]),
                               evaluation=(evaluation, labels), seed=job["seed"],
                               checkpoint_dir=job["checkpoints"])
    except OnnxoptError as exc:
        partial = getattr(exc, "partial", None)
        if isinstance(exc, QualityGateError) and partial is not None:
            write(*partial)
        sys.stderr.write(f"error: {exc}\n")
        return exc.exit_code
    write(result, rep)
    return 0


if __name__ == "__main__":  # the child process of produce()
    the_job = json.loads(Path(sys.argv[1]).read_text())
    sys.exit(_recipe(the_job) if the_job["kind"] == "recipe" else _ort_baseline(the_job))
