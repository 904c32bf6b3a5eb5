"""The ONNX Runtime session settings that run one model fastest (or smallest) on this machine.

ORT's defaults are a guess made without the model: one intra-op thread per physical core,
sequential execution, worker threads that spin while idle, a growing memory arena, and memory
patterns planned after the first run. Which of these pays off depends on the model and the
machine (a small model loses to thread hand-offs; spinning burns a core the rest of the
application wanted; the arena keeps peak memory high), so ``tune`` measures instead of guessing.

The search is coordinate descent, one setting at a time, in the order they tend to matter:
intra-op threads, then sequential vs parallel execution (with inter-op threads), then thread
spinning, then the memory arena and memory pattern. Each stage measures its candidates and the
current best *interleaved in one process* (:func:`onnxopt.benchmarking.measure_interleaved`), and a
candidate replaces the best only when it is faster with 95% confidence (the lower end of its
speed-up interval above 1) by at least ``min_gain``: noise never changes the answer, so a
machine where nothing helps gets ORT's defaults back. With ``objective="memory"``, every
candidate's peak resident memory is read from fresh runner processes instead, and the smallest
wins if it saves at least 2 MB and 2% and is at most 10% slower (latency breaks ties). At the
end the chosen settings and ORT's defaults are measured side by side once more for the reported
gain; if that run does not confirm the choice as surely faster, ORT's defaults are kept.

The result is a session configuration document (:data:`onnxopt.runner.SESSION_CONFIG_SCHEMA`)
that ``onnxopt bench --session-config``, ``runner.py --session-config`` and
``onnxopt.benchmarking.benchmark(session_config=...)`` accept; it also records what was tried.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
import onnx_ir as ir

from onnxopt import runner
from onnxopt.benchmarking import THREADED_BLOCK_S, THREADED_SETTLE_S, measure_interleaved
from onnxopt.errors import InputError
from onnxopt.feeds import load_feeds, synthesize_feeds
from onnxopt.model_io import load_model, one_line, save_model

Objective = Literal["latency", "memory"]
Progress = Callable[[float, str], None]
SPINNING_KEYS = ("session.intra_op.allow_spinning", "session.inter_op.allow_spinning")
MIN_GAIN = 0.02  # a candidate must be at least 2% faster (and surely faster) to be chosen
MIN_MEMORY_SAVING_MB = 2.0  # ... or, for memory, at least 2 MB and 2% smaller
MIN_MEMORY_SAVING = 0.02
MAX_MEMORY_SLOWDOWN = 0.10  # objective memory: at most 10% slower (p50) than the best so far
MEMORY_REPEATS = 3  # peak RSS of one setting varied by ~3% between runs here (ResNet50: 330/339)


@dataclasses.dataclass(frozen=True)
class SessionSettings:
    """The ORT session settings tune varies; the defaults are ORT's own."""

    threads: int | None = None  # intra-op; None: ORT's choice (one per physical core)
    parallel: bool = False
    inter_op_threads: int | None = None
    spinning: bool = True
    cpu_mem_arena: bool = True
    mem_pattern: bool = True

    def label(self) -> str:
        threads = "ORT default threads" if self.threads is None else f"{self.threads} thread(s)"
        mode = f"parallel x{self.inter_op_threads}" if self.parallel else "sequential"
        return ", ".join([
            threads, mode, "spinning" if self.spinning else "no spinning",
            "arena" if self.cpu_mem_arena else "no arena",
            "mem pattern" if self.mem_pattern else "no mem pattern",
        ])

    def session_kwargs(self) -> dict[str, Any]:
        """Keywords for :func:`onnxopt.runner.create_session`."""
        return {"threads": self.threads, "inter_op_threads": self.inter_op_threads,
                "parallel": self.parallel, "cpu_mem_arena": self.cpu_mem_arena,
                "mem_pattern": self.mem_pattern,
                "config": {key: "1" if self.spinning else "0" for key in SPINNING_KEYS}}

    def document(self) -> dict[str, Any]:
        """A session configuration document (what ``onnxopt tune -o`` writes)."""
        return {
            "schema": runner.SESSION_CONFIG_SCHEMA,
            "schema_version": runner.SESSION_CONFIG_VERSION,
            "intra_op_num_threads": self.threads,
            "inter_op_num_threads": self.inter_op_threads,
            "execution_mode": "parallel" if self.parallel else "sequential",
            "enable_cpu_mem_arena": self.cpu_mem_arena,
            "enable_mem_pattern": self.mem_pattern,
            "config_entries": {key: "1" if self.spinning else "0" for key in SPINNING_KEYS},
        }


@dataclasses.dataclass
class TuneResult:
    """The chosen settings, ORT's defaults, every trial, and the measured gain."""

    objective: Objective
    model: dict[str, Any]
    best: SessionSettings
    defaults: SessionSettings
    trials: list[dict[str, Any]]
    gain: dict[str, Any]
    machine: dict[str, Any]

    def document(self) -> dict[str, Any]:
        """The session configuration, plus a ``tuned`` record of how it was chosen."""
        return {**self.best.document(), "tuned": {
            "objective": self.objective, "model": self.model, "gain": self.gain,
            "machine": {k: self.machine.get(k) for k in ("arch", "cpu_model", "usable_cores")}
            | {"onnxruntime": self.machine.get("versions", {}).get("onnxruntime")},
            "trials": self.trials,
        }}

    def to_markdown(self) -> str:
        lines = [
            f"Objective: {self.objective}. Each stage measured its candidates interleaved with the "
            "stage's starting point (first row); speed-up = its p50 / the candidate's p50.",
            "",
            "| stage | settings | p50 ms | speed-up (95% CI) | CPU s/inf (proxy) "
            "| peak RSS MB | chosen |",
            "|---|---|---:|---:|---:|---:|---|",
        ]
        for t in self.trials:
            lo, hi = t["speedup_ci95"]
            rss = "" if t["peak_rss_mb"] is None else f"{t['peak_rss_mb']:.0f}"
            lines.append(
                f"| {t['stage']} | {t['settings']} | {t['p50_ms']:.3f} | {t['speedup']:.2f}x "
                f"({lo:.2f}-{hi:.2f}) | {t['cpu_seconds_per_inference']:.3g} | {rss} "
                f"| {'yes' if t['chosen'] else ''} |")
        g = self.gain
        lo, hi = g["speedup_ci95"]
        rss = g.get("peak_rss_mb") or {}
        memory = ""
        if rss.get("defaults") is not None and rss.get("tuned") is not None:
            memory = f"; peak RSS {rss['defaults']:.0f} MB -> {rss['tuned']:.0f} MB"
        chosen = f"Chosen: {self.best.label()}."
        if g.get("unconfirmed"):
            chosen = (f"Chosen: ORT defaults; the stages picked {g['unconfirmed']}, which the "
                      "final side-by-side run did not confirm as faster (figures below).")
        lines += ["", chosen,
                  f"Against ORT defaults ({self.defaults.label()}): p50 {g['p50_ms_defaults']:.3f}"
                  f" ms -> {g['p50_ms_tuned']:.3f} ms, speed-up {g['speedup']:.2f}x "
                  f"(95% CI {lo:.2f}-{hi:.2f}){memory}."]
        return "\n".join(lines) + "\n"


def tune(
    model: ir.Model | onnx.ModelProto | str | Path,
    *,
    objective: Objective = "latency",
    threads: Sequence[int] | None = None,
    feeds: Mapping[str, np.ndarray] | str | Path | None = None,
    shapes: Mapping[str, Any] | None = None,
    time_budget_s: float = 1.0,
    opt_level: str = "all",
    min_gain: float = MIN_GAIN,
    measure_memory: bool = True,
    memory_repeats: int = MEMORY_REPEATS,
    seed: int = 0,
    progress: Progress | None = None,
) -> TuneResult:
    """Measure ORT session settings for ``model`` on this machine and pick the best.

    Args:
        objective: ``latency`` (lowest p50) or ``memory`` (lowest peak resident memory).
        threads: intra-op thread counts to try (default: 1, 2, 4, ... up to the usable cores).
        feeds: inputs (dict or .npz); default: seeded ones synthesized from the model.
        time_budget_s: seconds of interleaved rounds per stage.
        min_gain: how much faster (fraction) a candidate must be, beyond its 95% interval
            excluding no change, to replace the current best.
        measure_memory: with the latency objective, also read the peak memory of ORT's
            defaults and of the chosen settings.
        memory_repeats: runner processes per peak-memory reading (the smallest peak counts).

    Raises:
        InputError: an unreadable model, feeds that do not fit, bad arguments.
    """
    if objective not in ("latency", "memory"):
        raise InputError(f"objective must be latency or memory, got {objective!r}")
    if not time_budget_s > 0 or min_gain < 0 or memory_repeats < 1:
        raise InputError("time_budget_s must be > 0, min_gain >= 0 and memory_repeats >= 1")
    if opt_level not in runner.OPT_LEVELS:
        raise InputError(f"opt_level must be one of {sorted(runner.OPT_LEVELS)}")
    cores = _usable_cores()
    counts = sorted(set(threads)) if threads else _thread_counts(cores)
    if not counts or min(counts) < 1:
        raise InputError(f"thread counts must be positive integers, got {threads}")
    report = progress or (lambda fraction, description: None)
    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory(prefix="onnxopt-tune-") as tmp:
        path, ir_model, source = _model_file(model, Path(tmp))
        if isinstance(feeds, (str, Path)):
            the_feeds = load_feeds(feeds, ir_model)
        elif feeds is not None:
            from onnxopt.feeds import check_feeds

            the_feeds = check_feeds(feeds, ir_model)
        else:
            the_feeds = synthesize_feeds(ir_model, shapes=dict(shapes or {}), seed=seed)
        feeds_path = Path(tmp) / "feeds.npz"
        np.savez(feeds_path, **the_feeds)
        search = _Search(path, the_feeds, feeds_path, objective, opt_level, time_budget_s,
                         min_gain, rng, source, measure_memory or objective == "memory",
                         memory_repeats)
        defaults = SessionSettings()
        best = defaults
        stages = _stage_builders(counts, cores)
        for i, (stage, candidates_of) in enumerate(stages):
            report(i / (len(stages) + 1), f"stage {stage}")
            candidates = list(dict.fromkeys([best, *candidates_of(best)]))
            if len(candidates) > 1:
                best = search.stage(stage, candidates)
        report(len(stages) / (len(stages) + 1), "ORT defaults vs tuned")
        gain = search.final(defaults, best)
        if objective == "latency" and best != defaults and not gain["speedup_ci95"][0] > 1.0:
            # The stages' pick lost its edge side by side (a busy machine can fool one stage):
            # keep ORT's defaults rather than ship settings not surely faster.
            gain["unconfirmed"] = best.label()
            best = defaults
        report(1.0, "done")
        record = {"path": source, "sha256": runner.file_sha256(path),
                  "feeds": {k: list(v.shape) for k, v in the_feeds.items()},
                  "opt_level": opt_level}
    return TuneResult(objective=objective, model=record, best=best, defaults=defaults,
                      trials=search.trials, gain=gain, machine=runner.machine_info())


def _usable_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _thread_counts(cores: int) -> list[int]:
    """1, 2, 4, ... and the number of usable cores."""
    counts, t = [], 1
    while t < cores:
        counts.append(t)
        t *= 2
    return sorted({*counts, cores})


def _stage_builders(counts: list[int], cores: int
                    ) -> list[tuple[str, Callable[[SessionSettings], list[SessionSettings]]]]:
    """The stages of the search, each a function from the current best to its candidates."""
    def threads(best: SessionSettings) -> list[SessionSettings]:
        return [dataclasses.replace(best, threads=t) for t in counts]

    def execution(best: SessionSettings) -> list[SessionSettings]:
        if cores < 2:
            return []
        return [dataclasses.replace(best, parallel=True, inter_op_threads=k)
                for k in sorted({2, cores})]

    def spinning(best: SessionSettings) -> list[SessionSettings]:
        return [dataclasses.replace(best, spinning=not best.spinning)]

    def memory(best: SessionSettings) -> list[SessionSettings]:
        return [dataclasses.replace(best, cpu_mem_arena=a, mem_pattern=p)
                for a in (True, False) for p in (True, False)]

    return [("threads", threads), ("execution", execution), ("spinning", spinning),
            ("memory", memory)]


def _model_file(model: ir.Model | onnx.ModelProto | str | Path, tmp: Path
                ) -> tuple[Path, ir.Model, str | None]:
    if isinstance(model, (str, Path)):
        path = Path(model)
        return path, load_model(path, upgrade=False), str(path)
    if isinstance(model, (ir.Model, onnx.ModelProto)):
        ir_model = model if isinstance(model, ir.Model) else ir.serde.deserialize_model(model)
        return save_model(model, tmp / "model.onnx"), ir_model, None
    raise InputError(f"model is a {type(model).__name__}; expected a path, onnx_ir.Model or "
                     "onnx.ModelProto")


class _Search:
    """Measures stages of candidates and keeps the table of trials."""

    def __init__(self, path: Path, feeds: Mapping[str, np.ndarray], feeds_path: Path,
                 objective: Objective, opt_level: str, time_budget_s: float, min_gain: float,
                 rng: np.random.Generator, source: str | None, measure_memory: bool,
                 memory_repeats: int):
        self.path, self.feeds, self.feeds_path = path, dict(feeds), feeds_path
        self.measure_memory, self.memory_repeats = measure_memory, memory_repeats
        self.objective, self.opt_level = objective, opt_level
        self.time_budget_s, self.min_gain, self.rng = time_budget_s, min_gain, rng
        self.source = source or path.name
        self.trials: list[dict[str, Any]] = []
        self._rss: dict[SessionSettings, float | None] = {}

    def latency(self, candidates: list[SessionSettings]) -> list[dict[str, Any]]:
        """Interleaved latency of one model in differently configured sessions."""
        sessions = []
        for settings in candidates:
            try:
                sessions.append(runner.create_session(str(self.path), opt_level=self.opt_level,
                                                      **settings.session_kwargs()))
            except runner.ORT_ERRORS as exc:
                raise InputError(f"ONNX Runtime cannot load it ({one_line(exc)})",
                                 self.source) from exc
        names = [o.name for o in sessions[0].get_outputs()]
        try:
            for session in sessions:
                session.run(names, self.feeds)
        except runner.ORT_ERRORS as exc:
            raise InputError(f"ONNX Runtime cannot run it on these feeds ({one_line(exc)})",
                             self.source) from exc
        runs = [lambda s=s: s.run(names, self.feeds) for s in sessions]
        # Candidates may differ in threads: settle as the harness does at several threads.
        threaded = any(c.threads != 1 and c.spinning for c in candidates)
        stats, _ = measure_interleaved(
            runs, [c.label() for c in candidates], time_budget_s=self.time_budget_s,
            rng=self.rng, **({"settle_s": THREADED_SETTLE_S, "block_s": THREADED_BLOCK_S}
                             if threaded else {}))
        del runs, sessions  # release thread pools before the next stage
        return stats

    def peak_rss(self, settings: SessionSettings) -> float | None:
        """Peak resident memory (MB) of fresh runner processes using these settings: the
        smallest of ``memory_repeats`` (thread timing moves a peak by a few MB between runs)."""
        if not self.measure_memory:
            return None
        if settings not in self._rss:
            from onnxopt.targets import LocalTarget, RunOptions

            options = RunOptions(session_config=settings.document(), opt_level=self.opt_level,
                                 warmup=1, iterations=2)
            peaks = [LocalTarget().run(self.path, options, inputs=self.feeds_path)["peak_rss_mb"]
                     for _ in range(self.memory_repeats)]
            self._rss[settings] = None if None in peaks else min(peaks)
        return self._rss[settings]

    def stage(self, stage: str, candidates: list[SessionSettings]) -> SessionSettings:
        """Measure one stage (``candidates[0]`` is the current best) and pick the winner."""
        stats = self.latency(candidates)
        memory = [self.peak_rss(c) if self.objective == "memory" else None for c in candidates]
        chosen = self._choose(stats, memory)
        for k, (settings, st) in enumerate(zip(candidates, stats, strict=True)):
            self.trials.append({
                "stage": stage, "settings": settings.label(),
                "session_config": settings.document(),
                **{key: st[key] for key in ("p50_ms", "p90_ms", "mean_ms", "std_ms",
                                            "iterations", "cpu_seconds_per_inference",
                                            "speedup", "speedup_ci95")},
                "peak_rss_mb": memory[k], "chosen": k == chosen,
            })
        return candidates[chosen]

    def _choose(self, stats: list[dict[str, Any]], memory: list[float | None]) -> int:
        if self.objective == "memory" and all(m is not None for m in memory):
            incumbent = memory[0]
            assert incumbent is not None
            # a few MB are not worth any latency: candidates much slower than the best so far
            # are out (parallel execution saved 3 MB on ShuffleNet at 8x the latency)
            allowed = [k for k in range(len(memory))
                       if k == 0 or stats[k]["speedup"] >= 1.0 / (1.0 + MAX_MEMORY_SLOWDOWN)]
            smallest = min(allowed, key=lambda k: (memory[k], -stats[k]["speedup"]))
            saving = incumbent - (memory[smallest] or incumbent)
            if saving >= max(MIN_MEMORY_SAVING_MB, MIN_MEMORY_SAVING * incumbent):
                return smallest
            return 0
        better = [k for k in range(1, len(stats))
                  if stats[k]["speedup_ci95"][0] > 1.0 and stats[k]["speedup"] >= 1 + self.min_gain]
        return max(better, key=lambda k: stats[k]["speedup"]) if better else 0

    def final(self, defaults: SessionSettings, best: SessionSettings) -> dict[str, Any]:
        """ORT defaults vs the chosen settings, interleaved (the reported gain)."""
        if best == defaults:
            stats = self.latency([defaults])
            stats.append(stats[0])
        else:
            stats = self.latency([defaults, best])
        return {
            "speedup": stats[1]["speedup"], "speedup_ci95": stats[1]["speedup_ci95"],
            "p50_ms_defaults": stats[0]["p50_ms"], "p50_ms_tuned": stats[1]["p50_ms"],
            "cpu_seconds_per_inference": {"defaults": stats[0]["cpu_seconds_per_inference"],
                                          "tuned": stats[1]["cpu_seconds_per_inference"],
                                          "note": runner.ENERGY_PROXY_NOTE},
            "peak_rss_mb": {"defaults": self.peak_rss(defaults), "tuned": self.peak_rss(best)},
        }
