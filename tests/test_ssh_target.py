"""The ssh:// target end to end, against an sshd the test starts on 127.0.0.1 only.

The sshd listens on a free loopback port with a host key and an authorized key generated in the
test's temporary folder; the client trusts exactly that host key. Without OpenSSH's server and
client installed (``.ci/run`` installs them) these tests skip and say so.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnx.parser
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from onnxopt import runner
from onnxopt.cli import main
from onnxopt.targets import RunOptions, SshTarget, TargetError, parse_target

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"
LOOPBACK = "127.0.0.1"


def model_with_external_data(folder: Path) -> Path:
    """A MatMul+Relu model whose weight lives in an external-data file next to it."""
    model = onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[N, 64] x) => (float[N, 32] y) {
          h = MatMul(x, W)
          y = Relu(h)
        }""")
    weight = np.random.default_rng(0).standard_normal((64, 32)).astype(np.float32)
    model.graph.initializer.append(numpy_helper.from_array(weight, "W"))
    path = folder / "ext.onnx"
    onnx.save(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
              location="ext.weights", size_threshold=0)
    return path


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """An sshd on a free 127.0.0.1 port, and the ssh options that reach it."""
    if not (os.path.isfile(SSHD) and os.access(SSHD, os.X_OK)):
        pytest.skip("OpenSSH server (sshd) is not installed: apt-get install openssh-server")
    if shutil.which("ssh") is None or shutil.which("ssh-keygen") is None:
        pytest.skip("OpenSSH client (ssh, ssh-keygen) is not installed")
    home = tmp_path_factory.mktemp("sshd")
    for key in ("host_key", "client_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(home / key)],
                       check=True)
    shutil.copy(home / "client_key.pub", home / "authorized_keys")
    if os.geteuid() == 0 and not os.path.isdir("/run/sshd"):
        # sshd run as root refuses to start without its privilege-separation folder (the
        # openssh-server package creates it at boot; a container may not have it yet)
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
    process = None
    for _ in range(5):  # a free port can be taken between the probe and sshd's bind
        port = _free_port()
        (home / "sshd_config").write_text("\n".join([
            f"ListenAddress {LOOPBACK}:{port}",  # loopback only
            f"HostKey {home / 'host_key'}",
            f"AuthorizedKeysFile {home / 'authorized_keys'}",
            "PasswordAuthentication no", "KbdInteractiveAuthentication no", "UsePAM no",
            "StrictModes no", "PidFile none", "PermitRootLogin prohibit-password",
            "Subsystem sftp internal-sftp", "LogLevel ERROR", ""]))
        process = subprocess.Popen([SSHD, "-D", "-e", "-f", str(home / "sshd_config")],
                                   stderr=subprocess.PIPE, text=True)
        if _wait_listening(port, process):
            break
        process.kill()
        process.wait()
        process = None
    if process is None:
        pytest.skip("could not start sshd on a loopback port")
    host_key = (home / "host_key.pub").read_text().split()[:2]
    (home / "known_hosts").write_text(f"[{LOOPBACK}]:{port} {' '.join(host_key)}\n")
    options = [f"IdentityFile={home / 'client_key'}", "IdentitiesOnly=yes",
               f"UserKnownHostsFile={home / 'known_hosts'}", "StrictHostKeyChecking=yes"]
    user = subprocess.run(["id", "-un"], capture_output=True, text=True, check=True).stdout
    yield {"port": port, "options": options, "user": user.strip(), "home": home}
    process.terminate()
    process.wait(timeout=10)


def _wait_listening(port: int, process: subprocess.Popen, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        with socket.socket() as s:
            if s.connect_ex((LOOPBACK, port)) == 0:
                return True
        time.sleep(0.05)
    return False


def target(sshd: dict, **kwargs: object) -> SshTarget:
    return SshTarget(LOOPBACK, user=sshd["user"], port=sshd["port"], ssh_options=sshd["options"],
                     **kwargs)


def remote_leftovers() -> set[str]:
    tmp = os.environ.get("TMPDIR", "/tmp")
    return {p.name for p in Path(tmp).glob("onnxopt-remote.*")}


@pytest.mark.slow
def test_ssh_run_copies_model_with_external_data_and_returns_outputs(
        sshd: dict, tmp_path: Path) -> None:
    model = model_with_external_data(tmp_path)
    x = np.random.default_rng(1).standard_normal((3, 64)).astype(np.float32)
    np.savez(tmp_path / "feeds.npz", x=x)
    before = remote_leftovers()
    ssh = target(sshd, python=sys.executable)  # the "board" is this machine with our venv
    with ssh.open() as workspace:
        doc = workspace.run(model, RunOptions(threads=1, warmup=1, iterations=3),
                            inputs=tmp_path / "feeds.npz", outputs=tmp_path / "out.npz")
        again = workspace.run(model, RunOptions(threads=1, warmup=0, iterations=2),
                              inputs=tmp_path / "feeds.npz")
        folder = workspace.folder
        assert Path(folder, "m0", "ext.weights").is_file()  # the external data went along
    assert not Path(folder).exists()  # removed when the workspace closed
    assert remote_leftovers() == before
    assert doc["target"]["spec"] == f"ssh://{sshd['user']}@{LOOPBACK}:{sshd['port']}"
    assert doc["target"]["onnxruntime"] == {"local": ort.__version__,
                                            "remote": ort.__version__, "match": True}
    assert doc["target"]["timing"] == "native" and doc["target"]["notes"] == []
    assert doc["session"]["threads"] == 1 and doc["latency"]["iterations"] == 3
    assert again["latency"]["iterations"] == 2
    assert doc["model"]["sha256"] == runner.file_sha256(model)
    expected = runner.reference_session(str(model)).run(None, {"x": x})[0]
    with np.load(tmp_path / "out.npz") as out:
        np.testing.assert_allclose(out["y"], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_cli_bench_on_ssh_target(sshd: dict, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    model = model_with_external_data(tmp_path)
    argv = ["bench", str(model), "--target", f"ssh://{sshd['user']}@{LOOPBACK}:{sshd['port']}",
            "--threads", "1,2", "--remote-python", sys.executable, "--json",
            str(tmp_path / "bench.json")]
    for option in sshd["options"]:
        argv += ["--ssh-option", option]
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    doc = json.loads((tmp_path / "bench.json").read_text())
    assert [r["threads"] for r in doc["rows"]] == [1, 2]
    assert all(r["outputs_vs_host"]["identical"] for r in doc["rows"])
    assert all(r["timing"] == "native" and r["cpu_seconds_per_inference"] > 0
               for r in doc["rows"])
    assert "EMULATED" not in captured.out


@pytest.mark.slow
def test_remote_without_onnxruntime_says_to_bootstrap(sshd: dict, tmp_path: Path) -> None:
    # `python -S` skips site-packages: a Python without numpy and onnxruntime
    bare = tmp_path / "bare-python"
    bare.write_text(f'#!/bin/sh\nexec {sys.executable} -S "$@"\n')
    bare.chmod(0o755)
    before = remote_leftovers()
    with pytest.raises(TargetError, match="--bootstrap"):
        target(sshd, python=str(bare)).run(model_with_external_data(tmp_path))
    assert remote_leftovers() == before


@pytest.mark.slow
def test_version_mismatch_is_reported_in_every_record(sshd: dict, tmp_path: Path) -> None:
    # A board with another onnxruntime version, played by this venv reporting a different
    # version string (sitecustomize runs before the runner); nothing else is changed.
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import onnxruntime\nonnxruntime.__version__ = '1.0.0'\n")
    other = tmp_path / "other-python"
    other.write_text(f'#!/bin/sh\nPYTHONPATH={site} exec {sys.executable} "$@"\n')
    other.chmod(0o755)
    doc = target(sshd, python=str(other)).run(model_with_external_data(tmp_path),
                                              RunOptions(warmup=0, iterations=1))
    assert doc["target"]["onnxruntime"] == {"local": ort.__version__, "remote": "1.0.0",
                                            "match": False}
    (note,) = doc["target"]["notes"]
    assert "version mismatch" in note and "--bootstrap" in note


def test_target_specs() -> None:
    t = parse_target("ssh://pi@board.local:2222")
    assert isinstance(t, SshTarget) and (t.user, t.host, t.port) == ("pi", "board.local", 2222)
    assert parse_target("ssh://10.0.0.2").spec == "ssh://10.0.0.2:22"
    assert parse_target("ssh://u@[::1]:22").host == "::1"
    cmd = parse_target("ssh://pi@h:2222", ssh_options=["IdentityFile=/k"]).ssh_command("true")
    assert cmd[:3] == ["ssh", "-p", "2222"] and "IdentityFile=/k" in cmd and "BatchMode=yes" in cmd
    assert cmd[-2:] == ["pi@h", "true"]


@pytest.mark.slow
def test_bootstrap_creates_a_venv_with_this_onnxruntime(sshd: dict, tmp_path: Path) -> None:
    """--bootstrap end to end: the "board" (this machine's system python3, which has no
    onnxruntime) gets a venv with this machine's onnxruntime version, and the run uses it."""
    venv = tmp_path / "board-venv"
    ssh = target(sshd, bootstrap=True, venv=str(venv))
    try:
        ssh.call("python3 -c 'import ensurepip, venv'", what="probe")
    except TargetError:
        pytest.skip("the target's python3 cannot create venvs (Debian: apt-get install python3-venv)")
    try:
        doc = ssh.run(model_with_external_data(tmp_path), RunOptions(warmup=0, iterations=1))
    except TargetError as exc:
        fetch = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q",
                                "-d", str(tmp_path / "wheels"), f"onnxruntime=={ort.__version__}"],
                               capture_output=True, check=False)
        if fetch.returncode != 0:  # no package index reachable from here: nothing to install
            pytest.skip(f"pip cannot fetch onnxruntime=={ort.__version__} here: {exc}")
        raise
    assert (venv / "bin" / "python").is_file()
    assert doc["target"]["python"] == f"{venv}/bin/python"
    assert doc["target"]["onnxruntime"] == {"local": ort.__version__,
                                            "remote": ort.__version__, "match": True}
    assert doc["target"]["notes"] == []
