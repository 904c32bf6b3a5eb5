"""Hostile external data: every location that could read outside the model's folder is refused
with one line (exit 2) before the file it names is opened (CVE-2024-27318/27319 territory).

"Before it is opened" is checked two ways: targets that are FIFOs (opening one for reading
blocks until a writer comes, so any open would hang the command into its time limit), and a
Python audit hook in the command's process that records every ``open`` of the target.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import fuzz_corpus as fc
from onnxopt import isolation
from onnxopt.errors import InputError
from onnxopt.model_io import load_model

TIMEOUT_S = 60.0  # a command that opened a FIFO would block until here


def _model_with_external(location: str, *, offset: int = 0, length: int = 16) -> onnx.ModelProto:
    """y = x + w, where w (4 floats) lives in external data at ``location``."""
    w = numpy_helper.from_array(np.arange(4, dtype=np.float32), "w")
    w.ClearField("raw_data")
    w.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = w.external_data.add()
        entry.key, entry.value = key, value
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"])], "hostile",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.fixture
def layout(tmp_path: Path) -> dict[str, Path]:
    """model/ (where the model goes) and outside/ holding a secret file and a FIFO."""
    model_dir, outside = tmp_path / "model", tmp_path / "outside"
    model_dir.mkdir()
    outside.mkdir()
    (outside / "secret.bin").write_bytes(np.arange(4, dtype=np.float32).tobytes())
    os.mkfifo(outside / "fifo")
    return {"model_dir": model_dir, "outside": outside}


def _opened_paths(argv: list[str], watched: str) -> tuple[int, str, list[str]]:
    """In a child: run the CLI with an audit hook recording opens of paths containing
    ``watched``; returns (exit code, stderr text, opened paths)."""
    import io
    import sys

    opened: list[str] = []

    def hook(event: str, args: tuple) -> None:
        if event == "open" and args and watched in str(args[0]):
            opened.append(str(args[0]))

    sys.addaudithook(hook)
    err = io.StringIO()
    sys.stderr = err
    from onnxopt.cli import main

    code = main(argv)
    return code, err.getvalue(), opened


def _refused(model: Path, watched: str, expected: str) -> None:
    """Every command refuses ``model`` in one line naming ``expected``, and never opens
    ``watched``; a FIFO target that were opened would block into the time limit."""
    for argv in (["inspect", str(model)],
                 ["optimize", str(model), "-o", str(model.parent / "out.onnx")],
                 ["bench", str(model), "--threads", "1"]):
        outcome = isolation.run_in_child(_opened_paths, argv, watched, timeout=TIMEOUT_S)
        assert not outcome.timed_out, f"{argv[0]} blocked: it opened the FIFO"
        assert outcome.signal_name is None, outcome
        code, err, opened = outcome.value
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error:"), err
        assert expected in lines[0] and "refusing" in lines[0], lines[0]
        assert opened == [], f"{argv[0]} opened {opened}"
    assert not (model.parent / "out.onnx").exists()


def test_absolute_location(layout: dict[str, Path]) -> None:
    target = layout["outside"] / "fifo"
    model = layout["model_dir"] / "m.onnx"
    onnx.save(_model_with_external(str(target)), model)
    _refused(model, "fifo", "is an absolute path")


def test_dot_dot_location(layout: dict[str, Path]) -> None:
    model = layout["model_dir"] / "m.onnx"
    onnx.save(_model_with_external("../outside/secret.bin"), model)
    _refused(model, "secret.bin", "contains '..'")
    # Even when it comes back inside the folder: the policy is no '..' at all.
    (layout["model_dir"] / "w.bin").write_bytes(bytes(16))
    (layout["model_dir"] / "sub").mkdir()
    onnx.save(_model_with_external("sub/../w.bin"), model)
    _refused(model, "w.bin", "contains '..'")


def test_symlink_out_of_the_folder(layout: dict[str, Path]) -> None:
    model_dir = layout["model_dir"]
    (model_dir / "link.bin").symlink_to(layout["outside"] / "fifo")
    model = model_dir / "m.onnx"
    onnx.save(_model_with_external("link.bin"), model)
    _refused(model, "fifo", "symbolic link")
    # A symlinked folder on the way out is refused the same way.
    (model_dir / "linkdir").symlink_to(layout["outside"])
    onnx.save(_model_with_external("linkdir/secret.bin"), model)
    _refused(model, "secret.bin", "symbolic link")


def test_device_file(layout: dict[str, Path]) -> None:
    model_dir = layout["model_dir"]
    model = model_dir / "m.onnx"
    onnx.save(_model_with_external("/dev/zero"), model)  # absolute, and a device
    _refused(model, "/dev/zero", "is an absolute path")
    try:  # a device node inside the folder (needs CAP_MKNOD; a FIFO stands in otherwise)
        os.mknod(model_dir / "zero", 0o600 | stat.S_IFCHR, os.makedev(1, 5))
        name = "zero"
    except PermissionError:
        os.mkfifo(model_dir / "zero-fifo")
        name = "zero-fifo"
    onnx.save(_model_with_external(name), model)
    _refused(model, name, "is not a regular file")


def test_fifo_in_the_folder(layout: dict[str, Path]) -> None:
    os.mkfifo(layout["model_dir"] / "w.fifo")
    model = layout["model_dir"] / "m.onnx"
    onnx.save(_model_with_external("w.fifo"), model)
    _refused(model, "w.fifo", "is not a regular file")


def test_model_file_that_is_a_device_is_refused() -> None:
    with pytest.raises(InputError, match="not a regular file"):
        load_model("/dev/zero")  # reading it would never end


def test_extent_beyond_the_file_and_wrong_length(layout: dict[str, Path]) -> None:
    model_dir = layout["model_dir"]
    (model_dir / "w.bin").write_bytes(bytes(16))
    model = model_dir / "m.onnx"
    onnx.save(_model_with_external("w.bin", offset=1 << 40), model)
    with pytest.raises(InputError, match="holds 16"):
        load_model(model)
    onnx.save(_model_with_external("w.bin", length=8), model)
    with pytest.raises(InputError, match="need 16"):
        load_model(model)


def test_valid_external_data_loads_and_runs(layout: dict[str, Path]) -> None:
    """The checks do not refuse the normal case: data in a file next to the model."""
    model_dir = layout["model_dir"]
    (model_dir / "w.bin").write_bytes(np.arange(4, dtype=np.float32).tobytes())
    model = model_dir / "m.onnx"
    onnx.save(_model_with_external("w.bin"), model)
    out = model_dir / "out.onnx"
    outcome = fc.run_command(["optimize", str(model), "-o", str(out), "--recipe", "cleanup"],
                             output=out)
    assert outcome.exitcode == 0 and outcome.output_problem is None, outcome.describe()


@pytest.mark.parametrize("dtype, per_byte", [("uint2", 4), ("uint4", 2), ("uint8", 1)])
def test_packed_codes_in_external_data_have_their_packed_length(
        tmp_path: Path, dtype: str, per_byte: int) -> None:
    """share-weights writes 2- and 4-bit codes; saved with external data they must load."""
    codes = numpy_helper.from_array(np.ones((7, 5), getattr(ml_dtypes, dtype, np.uint8)), "codes")
    book = numpy_helper.from_array(np.array([0.0, 1.5, -2.0, 0.5], np.float32), "book")
    graph = helper.make_graph(
        [helper.make_node("Cast", ["codes"], ["i"], to=TensorProto.INT64),
         helper.make_node("Gather", ["book", "i"], ["w"]),
         helper.make_node("Add", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [7, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [7, 5])], [codes, book])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 25)])
    path = tmp_path / "m.onnx"
    onnx.save(proto, path, save_as_external_data=True, location="m.data", size_threshold=0)
    assert (tmp_path / "m.data").stat().st_size == -(-35 // per_byte) + 16
    load_model(path)  # no "holds N bytes; its dims need M"
