"""Where the runner runs: this machine, a board over SSH, or an emulated aarch64 CPU (tests only).

Every target runs the same self-contained ``onnxopt/runner.py`` (standard library + numpy +
onnxruntime) on a model and returns its JSON document, with a ``target`` record added:

* ``local``: a child process on this machine (its peak memory is the model's own).
* ``ssh://user@host[:port]``: the system OpenSSH client in subprocesses. A temporary folder is
  made on the board, the runner, inputs and models are copied there (a tar stream over ssh: no
  scp/sftp subsystem needed, external-data files and cascade stages keep their layout), the runner
  runs, its JSON and outputs are read back, and the folder is removed. The board's onnxruntime
  version is checked against this machine's; a mismatch is reported in every record (results of
  two versions are not the same experiment). ``bootstrap=True`` creates a venv on the board with
  this machine's onnxruntime version (``~/.cache/onnxopt/venv-ort-<version>``), used from then on.
* ``qemu-aarch64[:cpu]``: the runner on an emulated aarch64 CPU (:mod:`onnxopt.arm_emulation`),
  to check that models load and agree with the host. Its timings are labelled ``emulated`` and
  are never ARM performance (qemu is 100-600x off native).
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import hashlib
import io
import json
import math
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from google.protobuf.message import DecodeError

from onnxopt import runner
from onnxopt.errors import InputError

RUNNER_TIMEOUT_S = 3600
SSH_TIMEOUT_S = 120
EMULATED_NOTE = ("emulated: qemu user-mode timings are 100-600x off native and say nothing "
                 "about ARM performance; this run checks that the model loads and what it outputs")
DEFAULT_QEMU_CPU = "neoverse-n1"
# runpy, not -m onnxopt.runner: the child imports only numpy and onnxruntime, as on a board.
_RUNPY = ("import runpy, sys; sys.argv = sys.argv[1:]; "
          "runpy.run_path(sys.argv[0], run_name='__main__')")


class TargetError(InputError):
    """A target that cannot be reached or used (ssh fails, no Python or onnxruntime there)."""


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """How the runner measures: session options, warm-up, and iterations or a time budget."""

    threads: int | None = None
    session_config: Mapping[str, Any] | None = None  # a document as ``onnxopt tune`` writes
    opt_level: str = "all"
    warmup: int = 10
    iterations: int | None = None
    time_budget_s: float | None = None
    seed: int = 0
    shapes: tuple[str, ...] = ()  # runner --shape strings

    def flags(self) -> list[str]:
        """The runner's command-line flags (model, inputs and outputs excluded)."""
        options: dict[str, Any] = {}
        if self.session_config is not None:
            try:
                options = runner.session_config_options(self.session_config)
            except runner.RunnerError as exc:
                raise InputError(str(exc)) from exc
        if self.threads is not None:
            options["threads"] = self.threads
        options["opt_level"] = self.opt_level
        flags = runner.option_flags(options) + ["--warmup", str(self.warmup), "--seed",
                                                 str(self.seed)]
        if self.iterations is not None:
            flags += ["--iterations", str(self.iterations)]
        elif self.time_budget_s is not None:
            flags += ["--time-budget", str(self.time_budget_s)]
        for shape in self.shapes:
            flags += ["--shape", shape]
        return flags


class Workspace(abc.ABC):
    """An open target: files staged there stay until the workspace is closed."""

    def __init__(self, target: Target):
        self.target = target
        self.notes: list[str] = []  # said once per workspace, e.g. a version mismatch

    @abc.abstractmethod
    def _run(self, model: Path, flags: list[str], inputs: Path | None,
             outputs: Path | None) -> dict[str, Any]:
        """Run the runner; return its parsed JSON (outputs written to ``outputs`` if given)."""

    def run(self, model: str | Path, options: RunOptions | None = None, *,
            inputs: str | Path | None = None, outputs: str | Path | None = None) -> dict[str, Any]:
        """The runner's JSON document for ``model`` (an .onnx or a cascade.json), labelled.

        ``inputs``: an .npz (default: the runner's seeded synthesized inputs). ``outputs``: where
        to write the model's outputs as .npz on this machine.
        """
        model = Path(model)
        if not model.is_file():
            raise InputError("no such file", model)
        if inputs is not None and not Path(inputs).is_file():
            raise InputError("no such file", inputs)
        options = options or self.target.default_options()
        doc = self._run(model, options.flags(), None if inputs is None else Path(inputs),
                        None if outputs is None else Path(outputs))
        doc["target"] = self.target.describe(doc) | {"notes": list(self.notes)}
        if self.target.emulated:
            doc["latency"]["timing"] = "emulated"
            doc["energy_proxy"]["timing"] = "emulated"
        return doc


class Target(abc.ABC):
    """A place the runner can run; :meth:`open` stages files, :meth:`run` is one-shot."""

    kind: str = ""
    emulated: bool = False

    @property
    @abc.abstractmethod
    def spec(self) -> str:
        """The ``--target`` text that names this target."""

    @abc.abstractmethod
    def open(self) -> contextlib.AbstractContextManager[Workspace]:
        """A workspace on the target, cleaned up when the context ends."""

    def default_options(self) -> RunOptions:
        return RunOptions()

    def describe(self, doc: Mapping[str, Any]) -> dict[str, Any]:
        """The ``target`` record added to every runner document."""
        return {"spec": self.spec, "kind": self.kind, "emulated": self.emulated,
                "timing": "emulated" if self.emulated else "native",
                "note": EMULATED_NOTE if self.emulated else None}

    def run(self, model: str | Path, options: RunOptions | None = None, *,
            inputs: str | Path | None = None, outputs: str | Path | None = None) -> dict[str, Any]:
        """Open, run once, close."""
        with self.open() as workspace:
            return workspace.run(model, options, inputs=inputs, outputs=outputs)


def parse_target(spec: str | None, *, ssh_options: Sequence[str] = (),
                 bootstrap: bool = False, python: str | None = None) -> Target:
    """``local`` (default), ``ssh://user@host[:port]`` or ``qemu-aarch64[:cpu]``.

    ``ssh_options``, ``bootstrap`` and ``python`` (the remote interpreter) apply to ssh only.
    """
    text = (spec or "local").strip()
    if not text.startswith("ssh://") and (bootstrap or python or ssh_options):
        raise InputError("--bootstrap, --remote-python and --ssh-option apply to ssh:// "
                         "targets only")
    if text == "local":
        return LocalTarget()
    if text.startswith("ssh://"):
        match = re.fullmatch(r"ssh://(?:([^@/:\s]+)@)?(\[[0-9a-fA-F:.]+\]|[^@/:\s\[\]]+)"
                             r"(?::(\d{1,5}))?/?", text)
        if match is None:
            raise InputError(f"bad target '{text}': expected ssh://user@host[:port]")
        user, host, port = match.groups()
        return SshTarget(host.strip("[]"), user=user, port=int(port or 22),
                         ssh_options=tuple(ssh_options), bootstrap=bootstrap, python=python)
    if text == "qemu-aarch64" or text.startswith("qemu-aarch64:"):
        cpu = text.partition(":")[2] or DEFAULT_QEMU_CPU
        return QemuTarget(cpu)
    raise InputError(f"unknown target '{text}': expected local, ssh://user@host[:port] "
                     "or qemu-aarch64[:cpu]")


# ---------------------------------------------------------------------------------------------
# Parsing the runner's answer
# ---------------------------------------------------------------------------------------------


def _parse_answer(done: subprocess.CompletedProcess[str], what: str, model: Path,
                  model_arg: str) -> dict[str, Any]:
    """The runner's JSON, or its one-line error as InputError (exit 2) / TargetError.

    ``model_arg`` is the model path the runner was given (its messages start with it).
    """
    if done.returncode == 0:
        try:
            return json.loads(done.stdout)
        except json.JSONDecodeError as exc:
            raise TargetError(f"{what}: the runner printed no JSON ({exc})", model) from exc
    lines = done.stderr.strip().splitlines()
    error = next((line for line in reversed(lines) if line.startswith("error: ")), None)
    if done.returncode == 2 and error:
        message = error.removeprefix("error: ").removeprefix(f"{model_arg}: ")
        raise InputError(f"{message} [on {what}]", model)
    tail = " | ".join(lines[-3:]) or "no message"
    raise TargetError(f"{what}: the runner failed (exit {done.returncode}): {tail}", model)


# ---------------------------------------------------------------------------------------------
# local
# ---------------------------------------------------------------------------------------------


class LocalTarget(Target):
    """The runner in a child process on this machine."""

    kind = "local"

    @property
    def spec(self) -> str:
        return "local"

    @contextlib.contextmanager
    def open(self) -> Iterator[Workspace]:
        yield _LocalWorkspace(self)


class _LocalWorkspace(Workspace):
    def _run(self, model: Path, flags: list[str], inputs: Path | None,
             outputs: Path | None) -> dict[str, Any]:
        model_arg = str(model.resolve())
        cmd = [sys.executable, "-c", _RUNPY, runner.__file__, model_arg, *flags]
        if inputs is not None:
            cmd += ["--inputs", str(inputs.resolve())]
        if outputs is not None:
            cmd += ["--outputs", str(outputs.resolve())]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=RUNNER_TIMEOUT_S,
                              check=False)
        return _parse_answer(done, "local runner", model, model_arg)


# ---------------------------------------------------------------------------------------------
# qemu-aarch64 (tests and portability checks only)
# ---------------------------------------------------------------------------------------------


class QemuTarget(Target):
    """The runner on an emulated aarch64 CPU model (``max``, ``neoverse-n1``, ``cortex-a53``...).

    The environment is built (or found cached) on first use; see :mod:`onnxopt.arm_emulation`.
    """

    kind = "qemu-aarch64"
    emulated = True

    def __init__(self, cpu: str = DEFAULT_QEMU_CPU, cache: str | Path | None = None):
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", cpu):
            raise InputError(f"bad qemu CPU model name '{cpu}' (e.g. neoverse-n1, max)")
        self.cpu = cpu
        self.cache = cache
        self._env: Any = None  # the Aarch64Environment, once opened

    @property
    def spec(self) -> str:
        return f"qemu-aarch64:{self.cpu}"

    def default_options(self) -> RunOptions:
        return RunOptions(warmup=1, iterations=3)  # emulation is slow and its timings moot

    def describe(self, doc: Mapping[str, Any]) -> dict[str, Any]:
        record = super().describe(doc)
        identity = self._env.identity(self.cpu) if self._env is not None else None
        if identity is not None:
            record["emulated_cpu"] = {"model": self.cpu, "midr_el1": f"0x{identity.midr:08x}",
                                      "features": identity.features}
        return record

    @contextlib.contextmanager
    def open(self) -> Iterator[Workspace]:
        from onnxopt import arm_emulation

        try:
            self._env = arm_emulation.ensure_environment(self.cache)
            root = self._env.cpu_root(self.cpu)
        except arm_emulation.EmulationUnavailableError as exc:
            raise TargetError(f"{self.spec}: {exc}") from exc
        with tempfile.TemporaryDirectory(prefix="onnxopt-qemu-") as tmp:
            script = Path(tmp) / "runner.py"
            shutil.copyfile(runner.__file__, script)
            yield _QemuWorkspace(self, root, script)


class _QemuWorkspace(Workspace):
    def __init__(self, target: QemuTarget, root: Path, script: Path):
        super().__init__(target)
        self.root, self.script = root, script

    def _host_path(self, path: Path) -> str:
        """An absolute host path the guest sees as the host's (qemu -L looks in the root
        first, so a path that also exists there would be shadowed)."""
        absolute = path.resolve()
        if (self.root / absolute.relative_to("/")).exists():
            raise TargetError(f"{absolute} also exists inside the emulated root, so the guest "
                              "would read that one; move the file elsewhere (e.g. /tmp)")
        return str(absolute)

    def _run(self, model: Path, flags: list[str], inputs: Path | None,
             outputs: Path | None) -> dict[str, Any]:
        target = self.target
        assert isinstance(target, QemuTarget)
        model_arg = self._host_path(model)
        args = [str(self.script), model_arg, *flags]
        if inputs is not None:
            args += ["--inputs", self._host_path(inputs)]
        if outputs is not None:
            outputs.parent.mkdir(parents=True, exist_ok=True)
            args += ["--outputs", self._host_path(outputs)]
        done = target._env.run(target.cpu, args, timeout=RUNNER_TIMEOUT_S)
        return _parse_answer(done, target.spec, model, model_arg)


# ---------------------------------------------------------------------------------------------
# ssh://user@host[:port]
# ---------------------------------------------------------------------------------------------

# Runs on the board with its python: what it has, as JSON, and never fails.
_REMOTE_PROBE = """
import json, platform, sys
info = {"python": platform.python_version(), "arch": platform.machine(),
        "onnxruntime": None, "numpy": None, "error": None}
try:
    import numpy
    info["numpy"] = numpy.__version__
    import onnxruntime
    info["onnxruntime"] = onnxruntime.__version__
except ImportError as exc:
    info["error"] = str(exc)
print(json.dumps(info))
"""


class SshTarget(Target):
    """The runner on a machine reached with the system's OpenSSH client.

    ``ssh_options`` are passed as ``-o`` options (``IdentityFile=...``,
    ``UserKnownHostsFile=...``); everything else comes from the user's ssh configuration.
    Connections run in batch mode: a password prompt is a failure, not a hang. The board's
    Python is ``python`` if given, else the bootstrapped venv's if there is one, else
    ``python3``; ``venv`` is where ``bootstrap`` creates it (a remote shell path).
    """

    kind = "ssh"

    def __init__(self, host: str, *, user: str | None = None, port: int = 22,
                 ssh_options: Sequence[str] = (), bootstrap: bool = False,
                 python: str | None = None, venv: str | None = None):
        if not 0 < port < 65536:
            raise InputError(f"bad ssh port {port}")
        if python is not None and bootstrap:
            raise InputError("--bootstrap makes its own venv; do not also name a remote python")
        self.host, self.user, self.port = host, user, port
        self.ssh_options = tuple(ssh_options)
        self.bootstrap = bootstrap
        self.python = python
        self.venv = venv or f"$HOME/.cache/onnxopt/venv-ort-{ort.__version__}"
        self.remote: dict[str, Any] = {}

    @property
    def spec(self) -> str:
        user = f"{self.user}@" if self.user else ""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"ssh://{user}{host}:{self.port}"

    def describe(self, doc: Mapping[str, Any]) -> dict[str, Any]:
        record = super().describe(doc)
        remote = doc.get("machine", {}).get("versions", {}).get("onnxruntime")
        record["onnxruntime"] = {"local": ort.__version__, "remote": remote,
                                 "match": remote == ort.__version__}
        record["python"] = self.remote.get("python_path")
        return record

    def ssh_command(self, remote_command: str) -> list[str]:
        """argv of ``ssh`` running ``remote_command`` (a shell command line) on the target."""
        if shutil.which("ssh") is None:
            raise TargetError("the OpenSSH client (ssh) is not installed")
        cmd = ["ssh", "-p", str(self.port), "-o", "BatchMode=yes", "-o", "ConnectTimeout=15"]
        for option in self.ssh_options:
            cmd += ["-o", option]
        destination = f"{self.user}@{self.host}" if self.user else self.host
        return [*cmd, destination, remote_command]

    def call(self, remote_command: str, *, stdin: bytes | None = None,
             timeout: float = SSH_TIMEOUT_S, what: str = "ssh") -> bytes:
        """Run a remote shell command; its stdout, or TargetError with ssh's own message."""
        try:
            done = subprocess.run(self.ssh_command(remote_command), input=stdin,
                                  capture_output=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired as exc:
            raise TargetError(f"{self.spec}: {what} timed out after {timeout:.0f} s") from exc
        if done.returncode != 0:
            lines = done.stderr.decode(errors="replace").strip().splitlines()
            detail = " | ".join(lines[-3:]) or f"exit {done.returncode}"
            raise TargetError(f"{self.spec}: {what} failed: {detail}")
        return done.stdout

    @contextlib.contextmanager
    def open(self) -> Iterator[Workspace]:
        folder, python, info = self._prepare()
        workspace = _SshWorkspace(self, folder, python)
        if info["onnxruntime"] != ort.__version__:
            workspace.notes.append(
                f"onnxruntime version mismatch: {info['onnxruntime']} on {self.spec}, "
                f"{ort.__version__} here (rerun with --bootstrap to install {ort.__version__} "
                "there)")
        try:
            yield workspace
        finally:
            with contextlib.suppress(TargetError):
                self.call(f"rm -rf {shlex.quote(folder)}", what="cleanup")

    def _prepare(self) -> tuple[str, str, dict[str, Any]]:
        """Make the remote folder, pick the remote Python, check onnxruntime (bootstrap it)."""
        folder, python, info = self._probe(make_folder=True)
        if self.bootstrap and info["onnxruntime"] != ort.__version__:
            self._bootstrap(folder)
            _, python, info = self._probe(make_folder=False)
        if info["onnxruntime"] is None or info["numpy"] is None:
            with contextlib.suppress(TargetError):
                self.call(f"rm -rf {shlex.quote(folder)}", what="cleanup")
            raise TargetError(
                f"{self.spec}: {python} cannot import numpy and onnxruntime ({info['error']}); "
                f"rerun with --bootstrap to create a venv with onnxruntime=={ort.__version__}")
        self.remote = {**info, "python_path": python}
        return folder, python, info

    def _probe(self, make_folder: bool) -> tuple[str, str, dict[str, Any]]:
        script = "\n".join([
            "set -e",
            'd=$(mktemp -d "${TMPDIR:-/tmp}/onnxopt-remote.XXXXXX")' if make_folder else "d=-",
            f'venv="{self.venv}"',
            f"py={shlex.quote(self.python)}" if self.python else
            'if [ -x "$venv/bin/python" ]; then py="$venv/bin/python"; '
            "else py=$(command -v python3 || true); fi",
            'if [ -z "$py" ]; then echo "no python3 on the target" >&2; exit 3; fi',
            'printf "%s\\n%s\\n" "$d" "$py"',
            f'"$py" -c {shlex.quote(_REMOTE_PROBE)}',
        ])
        lines = self.call(script, what="connecting").decode(errors="replace").splitlines()
        try:
            folder, python, info = lines[0], lines[1], json.loads(lines[-1])
        except (IndexError, json.JSONDecodeError) as exc:
            raise TargetError(f"{self.spec}: unexpected answer from the target: "
                              f"{' | '.join(lines[-3:])}") from exc
        return folder, python, info

    def _bootstrap(self, folder: str) -> None:
        """A venv with this machine's onnxruntime version (and numpy) on the target."""
        script = "\n".join([
            "set -e",
            f'venv="{self.venv}"',
            'mkdir -p "$(dirname "$venv")"',
            '[ -x "$venv/bin/python" ] || python3 -m venv "$venv"',
            '"$venv/bin/python" -m pip install --quiet --disable-pip-version-check '
            f'"onnxruntime=={ort.__version__}" numpy',
        ])
        try:
            self.call(script, timeout=1800, what="bootstrap (python3 -m venv + pip install)")
        except TargetError:
            with contextlib.suppress(TargetError):
                self.call(f"rm -rf {shlex.quote(folder)}", what="cleanup")
            raise


_COPY_FAILED = 97  # exit status of the remote command when unpacking the files failed


class _SshWorkspace(Workspace):
    """A temporary folder on the target; each file is copied there once (keyed by content).

    One ssh session per run: a tar stream on stdin carries the files not yet copied, the runner
    runs, and a tar stream on stdout brings back its JSON and outputs. So a run costs one
    connection, and the board needs only a shell, ``tar`` and Python (no scp or sftp server).
    """

    def __init__(self, target: SshTarget, folder: str, python: str):
        super().__init__(target)
        self.ssh, self.folder, self.python = target, folder, python
        self._uploaded: dict[tuple[str, str], str] = {}
        self._pending: list[tuple[Path, str]] = [(Path(runner.__file__), "runner.py")]

    def _stage_model(self, model: Path) -> str:
        """Queue a model with its companion files; its remote path (relative to the folder)."""
        key = ("model", _digest(model))
        if key not in self._uploaded:
            sub = f"m{len(self._uploaded)}"
            self._pending += [(model.parent / rel, f"{sub}/{rel}") for rel in model_files(model)]
            self._uploaded[key] = f"{sub}/{model.name}"
        return self._uploaded[key]

    def _stage_inputs(self, inputs: Path) -> str:
        key = ("inputs", _digest(inputs))
        if key not in self._uploaded:
            self._pending.append((inputs, f"inputs-{key[1][:12]}.npz"))
            self._uploaded[key] = f"inputs-{key[1][:12]}.npz"
        return self._uploaded[key]

    def _run(self, model: Path, flags: list[str], inputs: Path | None,
             outputs: Path | None) -> dict[str, Any]:
        model_arg = self._stage_model(model)
        args = [self.python, "runner.py", model_arg, *flags]
        if inputs is not None:
            args += ["--inputs", self._stage_inputs(inputs)]
        if outputs is not None:
            args += ["--outputs", "outputs.npz"]
        upload = io.BytesIO()
        with tarfile.open(fileobj=upload, mode="w") as tar:
            for local, remote in self._pending:
                tar.add(str(local), arcname=remote, recursive=False)
        back = "result.json outputs.npz" if outputs is not None else "result.json"
        command = (f"cd {shlex.quote(self.folder)} && {{ tar -xf - || exit {_COPY_FAILED}; }} "
                   "&& rm -f outputs.npz && "
                   f"{{ {shlex.join(args)} > result.json; rc=$?; "
                   f"if [ $rc -eq 0 ]; then tar -cf - {back}; fi; exit $rc; }}")
        try:
            done = subprocess.run(self.ssh.ssh_command(command), input=upload.getvalue(),
                                  capture_output=True, timeout=RUNNER_TIMEOUT_S, check=False)
        except subprocess.TimeoutExpired as exc:
            raise TargetError(f"{self.ssh.spec}: the runner timed out", model) from exc
        stderr = done.stderr.decode(errors="replace")
        if done.returncode in (255, _COPY_FAILED):  # ssh's or tar's failure, not the runner's
            what = "ssh" if done.returncode == 255 else "copying files"
            tail = " | ".join(stderr.strip().splitlines()[-3:])
            raise TargetError(f"{self.ssh.spec}: {what} failed: {tail}", model)
        self._pending = []  # the files are there now
        files: dict[str, bytes] = {}
        if done.returncode == 0:
            try:
                with tarfile.open(fileobj=io.BytesIO(done.stdout), mode="r") as tar:
                    for member in tar.getmembers():
                        handle = tar.extractfile(member)
                        if handle is not None:
                            files[member.name] = handle.read()
            except tarfile.TarError as exc:
                raise TargetError(f"{self.ssh.spec}: unreadable answer ({exc})", model) from exc
        answer = subprocess.CompletedProcess(done.args, done.returncode,
                                             files.get("result.json", b"").decode(), stderr)
        doc = _parse_answer(answer, self.ssh.spec, model, model_arg)
        if outputs is not None:
            from onnxopt.model_io import write_bytes_atomic

            write_bytes_atomic(files["outputs.npz"], outputs)
            remote = (doc.get("outputs_file") or {}).get("path")
            doc["outputs_file"] = {**(doc.get("outputs_file") or {}),
                                   "path": str(outputs.resolve()), "remote_path": remote}
        return doc


def _digest(path: Path) -> str:
    digest = hashlib.sha256(str(path.resolve()).encode())
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def model_files(model: Path) -> list[str]:
    """The model file and the files it needs, relative to its folder: external-data files of
    an .onnx, and for a cascade.json each stage with its own external data."""
    if model.suffix.lower() == ".json":
        try:
            stages = json.loads(model.read_text())["stages"]
            files = [model.name]
            for stage in stages:
                stage_path = model.parent / stage["file"]
                files += [str(Path(stage["file"]).parent / rel) if Path(stage["file"]).parent
                          != Path(".") else rel for rel in model_files(stage_path)]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise InputError(f"not a readable cascade manifest ({exc})", model) from exc
        return list(dict.fromkeys(files))
    try:
        proto = onnx.load(str(model), load_external_data=False)
    except (OSError, ValueError, DecodeError) as exc:
        raise InputError(f"not an ONNX model ({exc})", model) from exc
    locations = {entry.value for tensor in _all_tensors(proto)
                 if tensor.data_location == onnx.TensorProto.EXTERNAL
                 for entry in tensor.external_data if entry.key == "location"}
    return [model.name, *sorted(locations)]


def _all_tensors(proto: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Initializers and tensor attributes of every graph and subgraph."""
    graphs = [proto.graph]
    while graphs:
        graph = graphs.pop()
        yield from graph.initializer
        for node in graph.node:
            for attr in node.attribute:
                if attr.HasField("t"):
                    yield attr.t
                yield from attr.tensors
                if attr.HasField("g"):
                    graphs.append(attr.g)
                graphs.extend(attr.graphs)


# ---------------------------------------------------------------------------------------------
# bench --target
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class TargetBenchResult:
    """Rows of runner measurements on a target, one per model and thread count.

    Unlike the local :func:`onnxopt.benchmarking.benchmark`, each row comes from its own runner
    process (a board cannot host the interleaved comparison), so speed-ups between rows carry
    the process-to-process drift; on an emulated target they mean nothing at all.
    """

    target: dict[str, Any]
    models: list[dict[str, Any]]
    rows: list[dict[str, Any]]
    machine: dict[str, Any]
    settings: dict[str, Any]
    notes: list[str]
    schema_version: int = 1

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self), allow_nan=False, default=str))

    def to_markdown(self) -> str:
        emulated = self.target.get("emulated")
        lines = []
        if emulated:
            lines.append(f"**EMULATED ({self.target['spec']})**: {EMULATED_NOTE}.\n")
        lines += [
            "| model | threads | p50 ms | p90 ms | mean ± std ms | speed-up | CPU s/inf (proxy) "
            "| load s | peak RSS MB | outputs vs host |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for r in self.rows:
            rss = "" if r["peak_rss_mb"] is None else f"{r['peak_rss_mb']:.0f}"
            lines.append(
                f"| {r['model']} | {r['threads'] or 'ORT default'} | {r['p50_ms']:.3f} "
                f"| {r['p90_ms']:.3f} | {r['mean_ms']:.3f} ± {r['std_ms']:.3f} "
                f"| {r['speedup']:.2f}x | {r['cpu_seconds_per_inference']:.3g} "
                f"| {r['load_s']:.3f} | {rss} | {_agreement(r['outputs_vs_host'])} |")
        m = self.machine
        lines.append(
            f"\n{self.target['spec']}: {m.get('cpu_model')} ({m.get('arch')}, "
            f"{m.get('usable_cores') or m.get('logical_cores')} cores), onnxruntime "
            f"{m.get('versions', {}).get('onnxruntime')}; one runner process per row "
            "(not interleaved); timings "
            + ("EMULATED, not ARM performance." if emulated else "native."))
        lines += [f"\nnote: {n}" for n in self.notes]
        return "\n".join(lines) + "\n"


def _agreement(check: Mapping[str, Any] | None) -> str:
    if not check:
        return ""
    if check["identical"]:
        return "identical"
    return f"max abs {check['max_abs']:.2e}, max rel {check['max_rel']:.2e}"


def benchmark_on_target(
    target: Target,
    models: Sequence[str | Path],
    *,
    threads: Sequence[int | None] | None = None,
    feeds: str | Path | None = None,
    shapes: Mapping[str, Any] | None = None,
    session_config: Mapping[str, Any] | None = None,
    options: RunOptions | None = None,
    names: Sequence[str] | None = None,
    compare_outputs: bool = True,
    progress: Callable[[float, str], None] | None = None,
) -> TargetBenchResult:
    """Each model at each thread count through the runner on ``target``.

    Inputs are the same for every model and target: ``feeds`` (.npz) or seeded ones synthesized
    here from the first model. With ``compare_outputs``, every target's outputs are compared with
    this machine's (ORT at the same optimization level, one thread).
    """
    from onnxopt.feeds import load_feeds, load_npz, synthesize_feeds
    from onnxopt.model_io import load_model

    paths = [Path(m) for m in models]
    if not paths:
        raise InputError("bench needs at least one model")
    labels = _unique(list(names) if names is not None else [str(p) for p in paths])
    report = progress or (lambda fraction, description: None)
    base = options or target.default_options()
    base = dataclasses.replace(base, session_config=session_config or base.session_config)
    counts: list[int | None] = list(threads) if threads else [base.threads]
    with tempfile.TemporaryDirectory(prefix="onnxopt-target-") as tmp:
        first = load_model(paths[0], upgrade=False) if paths[0].suffix != ".json" else None
        if feeds is not None:
            the_feeds = load_feeds(feeds, first) if first is not None else load_npz(feeds)
        elif first is not None:
            the_feeds = synthesize_feeds(first, shapes=dict(shapes or {}), seed=base.seed)
        else:
            raise InputError("a cascade as first model needs --inputs", paths[0])
        feeds_path = Path(tmp) / "feeds.npz"
        np.savez(feeds_path, **the_feeds)
        rows, docs, notes = [], [], []
        host_outputs: dict[Path, dict[str, np.ndarray]] = {}
        total = len(counts) * len(paths)
        with target.open() as workspace:
            for i, t in enumerate(counts):
                order = list(range(len(paths)))
                if i % 2:
                    order.reverse()  # alternate the order between thread counts
                for k, m in enumerate(order):
                    report((i * len(paths) + k) / total, f"{labels[m]} at {t or 'default'} "
                           f"thread(s) on {target.spec}")
                    out_path = Path(tmp) / f"out-{i}-{m}.npz"
                    run_options = dataclasses.replace(base, threads=t)
                    doc = workspace.run(paths[m], run_options, inputs=feeds_path,
                                        outputs=out_path if compare_outputs else None)
                    check = None
                    if compare_outputs:
                        if paths[m] not in host_outputs:
                            host_outputs[paths[m]] = _host_outputs(paths[m], the_feeds,
                                                                   base.opt_level)
                        with np.load(out_path) as saved:
                            check = agreement(host_outputs[paths[m]], dict(saved))
                    docs.append((m, t, doc))
                    rows.append(_row(labels[m], t, doc, check))
            notes = list(workspace.notes)
        rows.sort(key=lambda r: (counts.index(r["threads_requested"]), labels.index(r["model"])))
        _add_speedups(rows)
        report(1.0, "done")
    machine = docs[0][2]["machine"] if docs else {}
    settings = {"threads": counts, "opt_level": base.opt_level, "warmup": base.warmup,
                "iterations": base.iterations, "time_budget_s": base.time_budget_s,
                "session_config": dict(base.session_config or {}), "seed": base.seed,
                "order": "one runner process per model and thread count; model order reversed "
                         "every other thread count",
                "energy": runner.ENERGY_PROXY_NOTE}
    return TargetBenchResult(
        target=docs[0][2]["target"] if docs else target.describe({}),
        models=[{"name": labels[i], "source": str(p), "sha256": runner.file_sha256(p),
                 "bytes": p.stat().st_size} for i, p in enumerate(paths)],
        rows=rows, machine=machine, settings=settings, notes=notes)


def _unique(labels: list[str]) -> list[str]:
    """Labels made unique as the local benchmark does (``name#2`` for a repeat)."""
    seen: set[str] = set()
    result = []
    for label in labels:
        name, k = label, 2
        while name in seen:
            name, k = f"{label}#{k}", k + 1
        seen.add(name)
        result.append(name)
    return result


def _row(label: str, threads: int | None, doc: Mapping[str, Any],
         check: dict[str, Any] | None) -> dict[str, Any]:
    latency = doc["latency"]
    rapl = doc.get("energy_rapl")
    return {
        "model": label,
        "threads": doc["session"].get("threads"),
        "threads_requested": threads,
        **{k: latency[k] for k in ("p50_ms", "p90_ms", "p99_ms", "mean_ms", "std_ms", "min_ms",
                                   "max_ms", "throughput", "iterations")},
        "load_s": doc["load_s"],
        "cpu_seconds_per_inference": doc["energy_proxy"]["cpu_seconds_per_inference"],
        "rapl_joules_per_inference": None if rapl is None else rapl["joules_per_inference"],
        "peak_rss_mb": doc.get("peak_rss_mb"),
        "timing": doc["target"]["timing"],
        "outputs_vs_host": check,
        "speedup": math.nan,
    }


def _add_speedups(rows: list[dict[str, Any]]) -> None:
    """p50 of the first model / p50 of each, at the same thread count (separate processes)."""
    first = rows[0]["model"] if rows else None
    reference = {r["threads_requested"]: r["p50_ms"] for r in rows if r["model"] == first}
    for r in rows:
        r["speedup"] = reference[r["threads_requested"]] / r["p50_ms"]


def _host_outputs(model: Path, feeds: Mapping[str, np.ndarray], opt_level: str
                  ) -> dict[str, np.ndarray]:
    """This machine's outputs for the same inputs (one thread)."""
    try:
        if model.suffix.lower() == ".json":
            session: Any = runner.CascadeSession(model, threads=1, opt_level=opt_level)
        else:
            session = runner.create_session(str(model), threads=1, opt_level=opt_level)
        return runner.run(session, feeds)
    except (runner.RunnerError, *runner.ORT_ERRORS) as exc:
        raise InputError(f"ONNX Runtime cannot run it here ({runner._first_line(exc)})",
                         model) from exc


def agreement(reference: Mapping[str, np.ndarray], other: Mapping[str, np.ndarray]
              ) -> dict[str, Any]:
    """How ``other`` outputs agree with ``reference`` ones: ``identical`` (bit for bit), and the
    largest ``max_abs`` / ``max_rel`` of :func:`onnxopt.metrics.compare` over the outputs."""
    from onnxopt.metrics import compare

    if set(reference) != set(other):
        return {"identical": False, "max_abs": math.inf, "max_rel": math.inf,
                "detail": f"outputs {sorted(other)} != {sorted(reference)}"}
    worst = {"max_abs": 0.0, "max_rel": 0.0}
    for name, ref in reference.items():
        out = other[name]
        if ref.shape != out.shape or ref.dtype != out.dtype:
            return {"identical": False, "max_abs": math.inf, "max_rel": math.inf,
                    "detail": f"{name}: {out.dtype}{list(out.shape)} != "
                              f"{ref.dtype}{list(ref.shape)}"}
        metrics = compare(ref, out)
        for key in worst:
            worst[key] = max(worst[key], metrics[key])
    identical = all(np.array_equal(reference[n], other[n], equal_nan=True) for n in reference)
    return {"identical": identical, **worst}
