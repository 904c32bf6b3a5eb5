"""Survive what a malformed model can do to the process: native crashes, hangs and signals.

Four tools, each for one threat:

* :func:`run_in_child`: run a function in a child process forked from a clean server. ONNX Runtime
  and onnx's C++ code can segfault or abort on a hostile model; in a child that becomes a
  :class:`ChildOutcome` naming the signal (the CLI's ``--isolate`` turns it into a one-line error
  with exit code 2) instead of the death of the caller. A hang becomes a timeout.
* :func:`interrupts_as_exceptions`: SIGINT *and* SIGTERM raise :class:`Interrupted` once (SIGTERM
  would otherwise kill the process without running any cleanup), later ones are ignored, so the
  ``finally`` blocks that remove temporary files and half-written outputs run to the end. Python
  runs signal handlers only between bytecodes, so a process stuck in native code (an endless
  ``Loop`` in ONNX Runtime) would never get there: a watchdog thread, woken through
  ``signal.set_wakeup_fd``, removes the registered temporary folders and exits the process
  itself if it has not stopped ``FORCED_EXIT_GRACE_S`` after the signal.
* :func:`bounded_run`: one ONNX Runtime inference with a time limit (``RunOptions.terminate``),
  so an endless ``Loop`` in a hostile model is an error, not a hang.
* :func:`deferred_signals`: a section (a pair of renames, a cleanup) that a signal must not cut in
  half holds SIGINT/SIGTERM until it ends; :func:`private_tempdir` gives a whole run one temporary
  folder that is removed at the end whatever happened, so even a crashed child leaves nothing.

Why by hand: ``multiprocessing`` gives the child process but not a crash-to-error mapping; the
standard library has no "defer signals" primitive.
"""

from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing
import multiprocessing.util
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from typing import Any

SIGNALS = tuple(s for s in (getattr(signal, "SIGINT", None), getattr(signal, "SIGTERM", None)) if s)
# After a signal, the main thread gets this long to stop through its own cleanup before the
# watchdog removes the temporary folders and exits the process.
FORCED_EXIT_GRACE_S = 10.0
# One inference of a model under verification or benchmark may take this long; longer is taken
# for an endless loop. (Generous: a first inference of a 2 GB model takes seconds.)
RUN_TIME_LIMIT_S = 600.0
# Folders removed if the process has to be forced out (see interrupts_as_exceptions).
_FORCED_EXIT_CLEANUPS: set[str] = set()
# Modules the child server imports once before forking (it must be set before the first child
# starts). A caller running many children (the fuzz tests) adds the heavy ones, e.g.
# "onnxopt.passes", so each child starts warm instead of importing them again.
PRELOAD = ["onnxopt.cli"]


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived; ``signum`` says which (exit code ``128 + signum``)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@dataclasses.dataclass
class ChildOutcome:
    """How a child ended: its return value, or the signal that killed it, or a timeout."""

    value: Any = None
    exitcode: int | None = None
    signal_name: str | None = None
    timed_out: bool = False

    @property
    def crashed(self) -> bool:
        return self.signal_name is not None or self.timed_out


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _context() -> multiprocessing.context.BaseContext:
    """forkserver where it exists: children fork from a single-threaded server, never from a
    caller whose ONNX Runtime thread pools are running (fork with live threads can deadlock)."""
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(PRELOAD)
        return ctx
    return multiprocessing.get_context("spawn")


def _child_main(conn: Connection, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
    conn.send(fn(*args))
    conn.close()


def run_in_child(fn: Callable[..., Any], *args: Any, timeout: float | None = None) -> ChildOutcome:
    """``fn(*args)`` in a child process; its (picklable) return value, or how it died.

    ``fn`` must be importable by name (a module-level function). An exception in ``fn`` is
    printed by the child and ends it with exit code 1 (no value). On timeout the child is killed.
    SIGINT/SIGTERM received while waiting are passed on to the child, which is then waited for,
    so its own cleanup runs before the caller's.
    """
    ctx = _context()
    receiver, sender = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_child_main, args=(sender, fn, args), daemon=True)
    child.start()
    sender.close()
    outcome = ChildOutcome()
    try:
        try:
            if receiver.poll(timeout):
                with contextlib.suppress(EOFError):  # EOF: the child died before answering
                    outcome.value = receiver.recv()
            else:
                outcome.timed_out = True
                child.kill()
        except KeyboardInterrupt as exc:
            signum = getattr(exc, "signum", signal.SIGINT)
            if child.pid is not None and child.is_alive():
                os.kill(child.pid, signum)  # let the child clean up, then re-raise
            with deferred_signals():
                child.join()
            raise
        child.join()
    finally:
        receiver.close()
    outcome.exitcode = child.exitcode
    if child.exitcode is not None and child.exitcode < 0 and not outcome.timed_out:
        outcome.signal_name = signal_name(-child.exitcode)
    return outcome


@contextlib.contextmanager
def interrupts_as_exceptions(grace_s: float | None = None) -> Iterator[list[int]]:
    """SIGINT/SIGTERM raise :class:`Interrupted` the first time; repeats are ignored.

    Yields the list of signals received. If the main thread has not left the block ``grace_s``
    (default ``FORCED_EXIT_GRACE_S``) after the first signal, it is stuck in native code: the
    watchdog removes every folder registered with :func:`removed_on_forced_exit` and exits with
    ``128 + signal``. Outside the main thread (where Python cannot install handlers) it does
    nothing.
    """
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def handler(signum: int, frame: Any) -> None:
        first = not received
        received.append(signum)
        if first:
            raise Interrupted(signum)

    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    done = threading.Event()
    previous = {s: signal.signal(s, handler) for s in SIGNALS}
    previous_fd = signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
    watchdog = threading.Thread(
        target=_watchdog, args=(wake_r, done, FORCED_EXIT_GRACE_S if grace_s is None else grace_s),
        name="onnxopt-signal-watchdog", daemon=True)
    watchdog.start()
    try:
        yield received
    finally:
        done.set()
        signal.set_wakeup_fd(previous_fd)
        for s, h in previous.items():
            signal.signal(s, h)
        os.close(wake_w)  # the watchdog reads end-of-file and returns
        watchdog.join()
        os.close(wake_r)


def _watchdog(wake_r: int, done: threading.Event, grace_s: float) -> None:
    """Wait for SIGINT/SIGTERM (woken by the wakeup fd even while the main thread is in C code);
    then give the main thread ``grace_s`` to stop before forcing the exit."""
    while True:
        data = os.read(wake_r, 64)
        if not data:
            return  # the block ended
        signums = [b for b in data if b in SIGNALS]
        if signums:
            break
    if done.wait(grace_s):
        return
    for folder in list(_FORCED_EXIT_CLEANUPS):
        shutil.rmtree(folder, ignore_errors=True)
    os.write(2, (f"error: interrupted by {signal_name(signums[0])}; stuck in native code for "
                 f"{grace_s:.0f} s, so stopped forcibly; temporary files were removed\n").encode())
    os._exit(128 + signums[0])


@contextlib.contextmanager
def removed_on_forced_exit(folder: str | os.PathLike[str]) -> Iterator[None]:
    """Register ``folder`` for removal should the watchdog have to force the process out."""
    key = os.fspath(folder)
    _FORCED_EXIT_CLEANUPS.add(key)
    try:
        yield
    finally:
        _FORCED_EXIT_CLEANUPS.discard(key)


def bounded_run(session: Any, feeds: dict[str, Any], limit_s: float | None = None,
                outputs: list[str] | None = None) -> list[Any]:
    """``session.run`` that gives up after ``limit_s`` (default ``RUN_TIME_LIMIT_S``).

    Raises :class:`RunTimeLimit` when the limit is reached (ONNX Runtime checks the terminate
    flag between nodes and loop iterations).
    """
    import onnxruntime as ort

    limit = RUN_TIME_LIMIT_S if limit_s is None else limit_s
    options = ort.RunOptions()
    options.log_severity_level = 4  # the terminate flag is logged as an error otherwise
    timer = threading.Timer(limit, setattr, (options, "terminate", True))
    timer.daemon = True
    timer.start()
    try:
        return session.run(outputs, feeds, options)
    except Exception as exc:  # ORT's own error types; re-raised unless the limit caused it
        if options.terminate:
            raise RunTimeLimit(limit) from exc
        raise
    finally:
        timer.cancel()


class RunTimeLimit(RuntimeError):
    """One inference ran past its time limit (an endless Loop, most likely)."""

    def __init__(self, limit_s: float) -> None:
        super().__init__(f"one inference took longer than {limit_s:.0f} s (an endless Loop?)")
        self.limit_s = limit_s


@contextlib.contextmanager
def deferred_signals() -> Iterator[None]:
    """Hold SIGINT/SIGTERM until the block ends, then deliver the first one held.

    For steps that must happen together or not at all (a model and its external data renamed
    into place) and for cleanups a signal must not cut short.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    previous = {s: signal.signal(s, lambda signum, frame: held.append(signum)) for s in SIGNALS}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        if held:
            signal.raise_signal(held[0])


@contextlib.contextmanager
def private_tempdir(prefix: str = "onnxopt-run-") -> Iterator[str]:
    """Point ``tempfile`` (and child processes, via ``TMPDIR``) at a fresh folder; remove it last.

    Every temporary file any library makes during the block (ONNX Runtime's quantizer, the
    benchmark's copies, a crashed child's leftovers) lands there, so one removal at the end
    catches them all, even after an interrupt.
    """
    # multiprocessing keeps its own folder (the forkserver's socket) until interpreter exit,
    # after this block: create it first, where temporary files went before (and remove it too
    # if the watchdog has to exit without running interpreter finalizers).
    _FORCED_EXIT_CLEANUPS.add(multiprocessing.util.get_temp_dir())
    folder = tempfile.mkdtemp(prefix=prefix)
    saved_tempdir, saved_env = tempfile.tempdir, os.environ.get("TMPDIR")
    tempfile.tempdir = folder
    os.environ["TMPDIR"] = folder
    try:
        with removed_on_forced_exit(folder):
            yield folder
    finally:
        with deferred_signals():
            tempfile.tempdir = saved_tempdir
            if saved_env is None:
                os.environ.pop("TMPDIR", None)
            else:
                os.environ["TMPDIR"] = saved_env
            shutil.rmtree(folder, ignore_errors=True)
