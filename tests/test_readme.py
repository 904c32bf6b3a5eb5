"""The README's examples run as written, so none can break unnoticed (issue 16).

Every ```bash / ```sh / ```python block of README.md runs, in document order, in one temporary
folder: later blocks use the files earlier ones write (the quick start makes its own model). A
block after ``<!-- file: NAME -->`` is saved as NAME instead of run; one after ``<!-- no-test -->``
is skipped, and those are listed here so that skipping stays the exception.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import pkgutil
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest

import onnxopt

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
RUN = {"bash", "sh", "python"}
SHOWN = {"text", "toml", "json", ""}  # fenced blocks that are not programs
# The only blocks the test does not run (they build a venv or install packages), by first line.
SKIPPED = {"make demo    # creates .venv, installs, trains two digit classifiers, optimizes them, "
           "writes demo-report/",
           "pip install -c constraints.txt -e '.[torch]'    # extras: torch, tensorflow, report "
           "(HTML), all"}
MARKER = re.compile(r"<!--\s*(no-test|file:\s*(\S+))\s*-->")


@dataclasses.dataclass
class Block:
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    marker: str | None  # "no-test", "file", or None
    file: str | None = None


def readme_blocks(text: str) -> list[Block]:
    """Fenced blocks with their language and the marker comment on the line before, if any."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        fence = re.match(r"^```(\S*)", lines[i])
        if not fence:
            i += 1
            continue
        start, body = i, []
        i += 1
        while i < len(lines) and not lines[i].startswith("```"):
            body.append(lines[i])
            i += 1
        assert i < len(lines), f"README.md:{start + 1}: unclosed code block"
        prev = next((lines[j] for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        mark = MARKER.fullmatch(prev.strip())
        kind = None if not mark else ("no-test" if mark.group(1) == "no-test" else "file")
        blocks.append(Block(start + 1, fence.group(1), "\n".join(body) + "\n", kind,
                            mark.group(2) if mark else None))
        i += 1
    return blocks


BLOCKS = readme_blocks(README.read_text())


def test_blocks_are_marked_and_few_are_skipped() -> None:
    """Every block is a known kind; only the listed ones skip; markers sit on runnable blocks."""
    for b in BLOCKS:
        assert b.lang in RUN | SHOWN, f"README.md:{b.line}: unknown block language {b.lang!r}"
        if b.marker:
            assert b.lang in RUN, f"README.md:{b.line}: marker on a {b.lang!r} block"
    skipped = {b.code.splitlines()[0] for b in BLOCKS if b.marker == "no-test"}
    assert skipped == SKIPPED
    assert sum(b.lang in RUN and b.marker is None for b in BLOCKS) >= 6


@pytest.mark.slow
def test_readme_blocks_run(tmp_path: Path) -> None:
    """Each runnable block exits 0, in order, in one folder, with the CLI of this checkout."""
    # `onnxopt` on the PATH is this checkout's CLI under this interpreter, whatever is installed.
    bin_dir = tmp_path / "_bin"
    bin_dir.mkdir()
    shim = bin_dir / "onnxopt"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m onnxopt "$@"\n')
    shim.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}
    ran = 0
    for b in BLOCKS:
        if b.lang not in RUN or b.marker == "no-test":
            continue
        if b.marker == "file":
            (tmp_path / b.file).write_text(b.code)
            continue
        if b.lang == "python":
            script = tmp_path / f"_readme_line{b.line}.py"
            script.write_text(b.code)
            cmd = [sys.executable, str(script)]
        else:
            cmd = ["bash", "-euo", "pipefail", "-c", b.code]
        proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, (
            f"README.md:{b.line} ({b.lang}) exited {proc.returncode}\n{b.code}\n"
            f"--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-3000:]}")
        ran += 1
    assert ran >= 6
    # What the quick start promises to leave behind.
    for name in ("model.onnx", "model.opt.onnx", "model.int8.onnx", "report/report.json",
                 "keras.onnx", "keras.fp16.onnx", "bench.json", "report.html"):
        assert (tmp_path / name).stat().st_size > 0, name


def test_links_resolve() -> None:
    """Relative links in README.md and docs/ name files that exist."""
    for page in [README, *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            path = (page.parent / target.split("#")[0]).resolve()
            assert path.exists(), f"{page.relative_to(ROOT)}: broken link {target}"


def test_api_names_are_not_shadowed_by_submodules() -> None:
    """A submodule named like an API function replaces it once imported (``onnxopt.benchmark``
    did: ``TypeError: 'module' object is not callable``); only ``export`` is guarded."""
    modules = {m.name for m in pkgutil.iter_modules(onnxopt.__path__)}
    assert modules & set(onnxopt.__all__) <= {"export"}
    for loaded in ("onnxopt.benchmarking", "onnxopt.export", "onnxopt.export._verify"):
        importlib.import_module(loaded)  # what a user session loads along the way

    for name in onnxopt.__all__:
        value = getattr(onnxopt, name)
        assert not isinstance(value, types.ModuleType), f"onnxopt.{name} is a module"
        assert callable(value), name
