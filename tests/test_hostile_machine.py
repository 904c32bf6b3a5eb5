"""A hostile machine and hostile numbers: every case ends in one ``error:`` line naming the path,
option or pass and the cause, with the exit code that says what went wrong (2 bad input, 3 an
internal limitation), no traceback, and nothing left behind (no model, no temporary file, no empty
folder).

The corpus is generated at test time: a read-only bind mount (as root, permission bits do not
stop writes, a read-only mount does), a 64 KiB tmpfs filled to the last byte (disk full), a
folder where a file goes and a file where a folder goes, a model declaring a 10**12-element
input, a factory that raises, NaN and infinite data and options. Mounting needs root (or
CAP_SYS_ADMIN); without it the machine cases are skipped, saying so.

``python tests/test_hostile_machine.py`` (as root) prints the cases as the Markdown table in
benchmarks/RESULTS.md, "Reliability".
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

sys.path.insert(0, str(Path(__file__).parent))
from conftest import make_mlp  # noqa: E402

from onnxopt.cli import main  # noqa: E402
from onnxopt.registry import PASSES, OptPass, register  # noqa: E402

READ_ONLY = "Read-only file system"
DISK_FULL = "No space left on device"


@dataclasses.dataclass(frozen=True)
class Case:
    """``onnxopt <argv>`` (``{name}`` placeholders are paths of the machine) must exit ``code``
    with an ``error:`` line holding every one of ``needles`` (a ``warning:`` line for exit 0)."""

    id: str
    argv: tuple[str, ...]
    code: int
    needles: tuple[str, ...]
    machine: bool = False  # needs the read-only and the full mount


def _case(id: str, cmd: str, code: int, *needles: str) -> Case:
    return Case(id, tuple(cmd.split()), code, needles, "{ro}" in cmd or "{full}" in cmd)


OPT = "optimize {model} -o {work}/out.onnx"
WRITES = [
    _case("optimize -o read-only", "optimize {model} -o {ro}/out.onnx", 2, "{ro}/out.onnx", READ_ONLY),
    _case("optimize -o disk full", "optimize {model} -o {full}/out.onnx", 2, "{full}/out.onnx", DISK_FULL),
    _case("optimize -o a folder", "optimize {model} -o {folder}", 2, "{folder}", "is a directory"),
    _case("optimize --report a file", OPT + " --report {file}", 2, "{file}", "is a file"),
    _case("optimize --report read-only", OPT + " --report {ro}/rep", 2, "{ro}/rep", READ_ONLY),
    _case("optimize --report disk full", OPT + " --report {full}/rep", 2, "{full}/rep/report", DISK_FULL),
    _case("optimize -o disk full, --report fine", "optimize {model} -o {full}/out.onnx --report "
          "{work}/rep3", 2, "{full}/out.onnx", DISK_FULL),  # the staged report is not left
    _case("optimize --checkpoints a file", OPT + " --checkpoints {file}", 2, "{file}", "is a file"),
    _case("optimize --checkpoints read-only", OPT + " --checkpoints {ro}/ck", 2, "{ro}/ck", READ_ONLY),
    _case("optimize --checkpoints disk full", OPT + " --checkpoints {full}/ck/sub", 2,
          "{full}/ck/sub/01-cleanup.onnx", DISK_FULL),
    _case("export -o read-only", "export {model} -o {ro}/e.onnx", 2, "{ro}/e.onnx", READ_ONLY),
    _case("export -o disk full", "export {model} -o {full}/e.onnx", 2, "{full}/e.onnx", DISK_FULL),
    _case("export -o a folder", "export {model} -o {folder}", 2, "{folder}", "is a directory"),
    _case("bench --json read-only", "bench {model} --threads 1 --json {ro}/b.json", 2,
          "{ro}/b.json", READ_ONLY),
    _case("bench --json disk full", "bench {model} --threads 1 --json {full}/b.json", 2,
          "{full}/b.json", DISK_FULL),
    _case("bench --json a folder", "bench {model} --threads 1 --json {folder}", 2, "{folder}",
          "is a directory"),
    _case("report -o read-only", "report {report} -o {ro}/r.md", 2, "{ro}/r.md", READ_ONLY),
    _case("report -o disk full", "report {report} -o {full}/r.html", 2, "{full}/r.html", DISK_FULL),
    _case("report -o a folder", "report {report} -o {folder_md}", 2, "{folder_md}", "is a directory"),
]
INPUTS = [
    _case("bench a 10^12-element input", "bench {model} {huge} --threads 1", 2, "{huge}",
          "input 'x'", "1,000,000,000,000 elements"),
    _case("bench --baseline holding a JSON list", "bench {model} --baseline {list_json}", 2,
          "{list_json}", "JSON list"),
    _case("export a factory that raises", "export hostile_factory:make -o {work}/f.onnx", 2,
          "hostile_factory:make", "RuntimeError: no weights at /nonexistent/w.pt"),
    _case("bench --threads 999 (2 cores: capped)", "bench {model} --threads 999 --json "
          "{work}/t.json", 0, "--threads 999", "capping"),
    _case("--max-drop nan", OPT + " --recipe int8 --max-drop nan", 2, "--max-drop", "nan"),
    _case("--max-drop -1", OPT + " --recipe int8 --max-drop -1", 2, "--max-drop", ">= 0"),
    _case("recipe candidates = -3", OPT + " --recipe {bad_recipe}", 2, "{bad_recipe}",
          "'candidates'", ">= 1", "-3"),
    _case("--set quantize.calibration_samples=-1",
          OPT + " --recipe int8 --set quantize.calibration_samples=-1", 2,
          "'calibration_samples'", ">= 1"),
    _case("--set quantize.percentile=NaN", OPT + " --recipe int8 --set quantize.percentile=NaN",
          2, "'percentile'", "finite"),
    _case("--set quantize.min_speedup=Infinity",
          OPT + " --recipe int8 --set quantize.min_speedup=Infinity", 2, "'min_speedup'",
          "finite"),
    _case("recipe min_cosine = 2 (above max 1)", OPT + " --recipe {cosine_recipe}", 2,
          "'min_cosine'", "[0, 1]"),
    _case("NaN in calibration data", OPT + " --recipe int8 --calib {calib_nan}", 2,
          "{calib_nan}", "input 'x'", "NaN"),
    _case("inf in calibration data", OPT + " --recipe int8 --calib {calib_inf}", 2,
          "{calib_inf}", "input 'x'", "infinite"),
    _case("NaN in evaluation inputs", OPT + " --recipe int8 --eval {eval_nan}", 2,
          "{eval_nan}", "input 'x'", "NaN"),
    _case("all-NaN evaluation labels", OPT + " --recipe int8 --eval {labels_nan}", 2,
          "{labels_nan}", "'labels'", "NaN"),
    _case("a pass that fails on a valid model", OPT + " --recipe {buggy_recipe}", 3,
          "pass 'test-hostile-bug'", "IndexError: list index out of range", "--debug"),
]
CASES = WRITES + INPUTS


class BuggyPass(OptPass):
    """Stands for any pass with a bug on some valid model (an internal limitation: exit 3)."""

    name = "test-hostile-bug"
    summary = "test only: fails like a pass with a bug"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        return [][0]


# --- the machine -----------------------------------------------------------------------------


def _mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True, capture_output=True, text=True)


def _fill(folder: Path) -> None:
    """Write until the file system says it is full."""
    fd = os.open(folder / "filler", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        with contextlib.suppress(OSError):  # unbuffered: every byte written or refused here
            while True:
                os.write(fd, b"\0" * 1024)
    finally:
        os.close(fd)


@contextlib.contextmanager
def mounts(root: Path) -> Iterator[str | None]:
    """``root/ro`` a read-only bind mount, ``root/full`` a full 64 KiB tmpfs; yields None, or
    why they could not be made."""
    ro, full = root / "ro", root / "full"
    ro.mkdir()
    full.mkdir()
    mounted: list[Path] = []
    why = None
    try:
        _mount("--bind", str(ro), str(ro))
        mounted.append(ro)
        _mount("-o", "remount,bind,ro", str(ro))
        _mount("-t", "tmpfs", "-o", "size=64k", "tmpfs", str(full))
        mounted.append(full)
        _fill(full)
    except (OSError, subprocess.CalledProcessError) as exc:
        why = f"cannot mount a read-only bind mount and a tmpfs here ({getattr(exc, 'stderr', '') or exc})"
    try:
        yield why
    finally:
        for path in reversed(mounted):
            subprocess.run(["umount", str(path)], check=False, capture_output=True)


def build(root: Path) -> dict[str, str]:
    """The files the cases read, under ``root/work``; returns the placeholders' paths."""
    work = root / "work"
    work.mkdir()
    onnx.save(make_mlp(), work / "mlp.onnx")
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "huge",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [10**6, 10**6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [10**6, 10**6])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]),
              work / "huge.onnx")
    (work / "folder").mkdir()
    (work / "folder.md").mkdir()
    (work / "file").write_text("a file, not a folder\n")
    (work / "list.json").write_text("[1, 2, 3]\n")
    (work / "bad.toml").write_text('[[steps]]\npass = "deep-compress"\ncandidates = -3\n')
    (work / "cosine.toml").write_text('[[steps]]\npass = "prune"\nmin_cosine = 2\n')
    (work / "buggy.toml").write_text('[[steps]]\npass = "test-hostile-bug"\n')
    (work / "hostile_factory.py").write_text(
        "def make():\n    raise RuntimeError('no weights at /nonexistent/w.pt')\n")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 4)).astype(np.float32)
    with_nan = x.copy()
    with_nan[17, 2] = np.nan
    np.savez(work / "calib_nan.npz", x=with_nan)
    np.savez(work / "calib_inf.npz", x=np.where(x > 2, np.float32(np.inf), x))
    np.savez(work / "eval_nan.npz", x=with_nan, labels=np.zeros(64, np.int64))
    np.savez(work / "labels_nan.npz", x=x, labels=np.full(64, np.nan))
    # an optimize report for the report command (written by onnxopt itself)
    with contextlib.redirect_stderr(io.StringIO()):
        assert main(["optimize", str(work / "mlp.onnx"), "-o", str(work / "opt.onnx"),
                     "--report", str(work / "rep")]) == 0
    os.unlink(work / "opt.onnx")
    names = dict(work=work, ro=root / "ro", full=root / "full", model=work / "mlp.onnx",
                 huge=work / "huge.onnx", folder=work / "folder", folder_md=work / "folder.md",
                 file=work / "file", list_json=work / "list.json", bad_recipe=work / "bad.toml",
                 cosine_recipe=work / "cosine.toml", buggy_recipe=work / "buggy.toml",
                 report=work / "rep" / "report.json", calib_nan=work / "calib_nan.npz",
                 calib_inf=work / "calib_inf.npz", eval_nan=work / "eval_nan.npz",
                 labels_nan=work / "labels_nan.npz")
    return {k: str(v) for k, v in names.items()}


def snapshot(root: Path) -> dict[str, int]:
    """Every path under ``root`` (hidden ones too) with its size, to see what a case left."""
    found = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(folder, name)
            found[str(path.relative_to(root))] = -1 if path.is_dir() else path.stat().st_size
    return found


@dataclasses.dataclass
class Outcome:
    code: int
    stderr: str
    message: str  # the error: line (or the warning: line of a case that succeeds)
    left_behind: list[str]


def run_case(case: Case, paths: dict[str, str], root: Path) -> Outcome:
    """Run one case in this process (cwd: the work folder, for the factory module)."""
    argv = [a.format(**paths) for a in case.argv]
    before = snapshot(root)
    err = io.StringIO()
    cwd = os.getcwd()
    os.chdir(paths["work"])
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = main(argv)
    finally:
        os.chdir(cwd)
        sys.modules.pop("hostile_factory", None)
    after = snapshot(root)
    expected_new = {"t.json"} if case.code == 0 else set()
    left = sorted(p for p in after.keys() - before.keys()
                  if Path(p).name not in expected_new)
    left += sorted(p for p in before.keys() & after.keys() if before[p] != after[p])
    lines = [line for line in err.getvalue().splitlines() if line.strip()]
    prefix = "warning:" if case.code == 0 else "error:"
    message = next((line for line in lines if line.startswith(prefix)), "")
    return Outcome(code, err.getvalue(), message, left)


# --- the tests -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def machine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[dict[str, str], Path, str | None]]:
    root = tmp_path_factory.mktemp("hostile-machine")
    register(BuggyPass)
    try:
        with mounts(root) as why:
            yield build(root), root, why
    finally:
        PASSES.pop(BuggyPass.name, None)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_case(case: Case, machine: tuple[dict[str, str], Path, str | None]) -> None:
    paths, root, why = machine
    if case.machine and why is not None:
        pytest.skip(why)
    outcome = run_case(case, paths, root)
    assert "Traceback" not in outcome.stderr, outcome.stderr
    assert outcome.code == case.code, outcome.stderr
    if case.code != 0:
        errors = [line for line in outcome.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, outcome.stderr
        assert outcome.stderr.strip().splitlines()[-1] == errors[0], outcome.stderr
    for needle in case.needles:
        assert needle.format(**paths) in outcome.message, (needle, outcome.stderr)
    assert outcome.left_behind == [], outcome.left_behind
    if case.code == 0:  # --threads 999 on this machine: measured at the usable core count
        import json

        doc = json.loads(Path(paths["work"], "t.json").read_text())
        assert {r["threads"] for r in doc["rows"]} == {len(os.sched_getaffinity(0))}


def test_debug_shows_the_traceback_of_an_internal_error(
        machine: tuple[dict[str, str], Path, str | None]) -> None:
    """--debug: the same exit 3 and error line, after the traceback a bug report needs."""
    paths, root, _ = machine
    case = next(c for c in INPUTS if c.code == 3)
    outcome = run_case(dataclasses.replace(case, argv=(*case.argv, "--debug")), paths, root)
    assert outcome.code == 3 and "Traceback" in outcome.stderr and "IndexError" in outcome.stderr
    assert outcome.stderr.strip().splitlines()[-1].startswith("error: pass 'test-hostile-bug'")


def test_report_staged_then_moved_in(machine: tuple[dict[str, str], Path, str | None]) -> None:
    """A report folder that exists already gets both files; no staging folder stays beside."""
    paths, root, _ = machine
    work = Path(paths["work"])
    rep = work / "rep2"
    for _ in range(2):  # first into a new folder, then into the existing one
        with contextlib.redirect_stderr(io.StringIO()):
            assert main(["optimize", paths["model"], "-o", str(work / "o2.onnx"),
                         "--report", str(rep)]) == 0
        assert sorted(os.listdir(rep)) == ["report.json", "report.md"]
        assert not [p for p in os.listdir(work) if p.startswith(".onnxopt-")]
    assert oct(rep.stat().st_mode & 0o777) == oct(0o777 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def markdown_table() -> str:
    """The cases as RESULTS.md shows them: case, command, exit code, message."""
    rows = ["| case | command | exit | message |", "|---|---|---:|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        register(BuggyPass)
        try:
            with mounts(root) as why:
                if why:
                    raise SystemExit(why)
                paths = build(root)
                for case in CASES:
                    outcome = run_case(case, paths, root)
                    cmd = " ".join(a.format(**paths) for a in case.argv)
                    left = f" (left: {outcome.left_behind})" if outcome.left_behind else ""
                    rows.append(f"| {case.id} | `onnxopt {_short(cmd, root)}` | {outcome.code} | "
                                f"`{_short(outcome.message, root)}`{left} |")
        finally:
            PASSES.pop(BuggyPass.name, None)
    return "\n".join(rows)


def _short(text: str, root: Path) -> str:
    """Paths relative to the machine's root (the work folder's files by name); no pipes."""
    return (text.replace(f"{root}/work/", "").replace(f"{root}/", "").replace(str(root), ".")
            .replace("|", "/"))


if __name__ == "__main__":
    print(markdown_table())
