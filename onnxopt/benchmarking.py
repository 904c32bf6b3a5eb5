"""Interleaved latency comparison of ONNX models in one process, with speed-ups and their spread.

Why interleaved: on a shared, 2-core machine latency drifts by tens of percent between processes
and over seconds, while ratios measured side by side in one process hold to a few percent. So for
each thread count all sessions are created in this process and the models take turns in *rounds*:
each round runs one short *block* of timed runs per model (about ``BLOCK_S``, at least
``MIN_BLOCK_RUNS``), and every switch to a model is followed by untimed *settle* runs (about
``SETTLE_S``, at least ``MIN_SETTLE_RUNS``). The order is
reversed every other round (A B, B A, A B ...) so no model always runs after the same neighbour.
Short blocks give many rounds, so drift hits every model alike.

Why blocks and settle runs rather than single-run alternation (A B A B): a model run right after
another finds the other's weights in the cache and, with several threads, the other session's
worker threads still spinning on the cores. Single-run alternation inflated latency 2-3x here
(``benchmarks/RESULTS.md``, "Interleaving"). Spinning is left on (ORT's default, what deployments
run, and faster at 2 threads): the settle runs absorb it. With more than one thread they must
last longer than the spinning: about 70 ms here, during which MiniLM's INT8 runs took up to 2.5x
their steady time. So at several threads (spinning on) a switch settles for
``THREADED_SETTLE_S`` and blocks last at least ``THREADED_BLOCK_S``; at 1 thread ``SETTLE_S``
and ``BLOCK_S`` (and at least ``MIN_SETTLE_RUNS`` / ``MIN_BLOCK_RUNS`` runs) are enough. Pass
``session_config={"session.intra_op.allow_spinning": "0"}`` to measure without spinning.

Speed-up is ``p50(first model) / p50(model)`` at the same thread count. Its 95% interval comes from
a paired bootstrap over rounds: rounds are resampled with replacement, the same resample for every
model, and the p50 of each model's samples in those rounds is recomputed. Resampling rounds (not
single runs) keeps the slow drift of a shared machine inside the interval.

Peak memory is measured per model in a child process running :mod:`onnxopt.runner` (in one process
the resident set mixes every model).
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from onnxopt import runner
from onnxopt.errors import InputError, OnnxoptError
from onnxopt.feeds import (
    Feeds,
    check_feeds,
    input_specs,
    load_npz,
    parse_shape_overrides,
    synthesize_feeds,
)
from onnxopt.model_io import load_model, one_line, save_model

ModelLike = ir.Model | onnx.ModelProto | str | Path
Progress = Callable[[float, str], None]

SCHEMA_VERSION = 1
DEFAULT_TIME_BUDGET_S = 1.0  # wall seconds of rounds per thread count, shared by all models
BLOCK_S = 0.005  # target duration of one block of timed runs (benchmarks/interleaving.py)
WARMUP_S = 0.1  # warm-up per model and thread count (at least MIN_WARMUP runs)
MIN_WARMUP = 2
MIN_ROUNDS = 5
MAX_ROUNDS = 1000
MAX_BLOCK = 100_000
MIN_BLOCK_RUNS = 5  # timed runs per block, however long a run is (see the module docstring)
MIN_SETTLE_RUNS = 3  # untimed runs after each switch, however long a run is
SETTLE_S = 0.002  # untimed runs after each switch last this long (at least MIN_SETTLE_RUNS):
# at 1 thread, the model's weights are back in cache
THREADED_SETTLE_S = 0.2  # the same with several threads and spinning on: the previous session's
# idle workers spin on the cores for about 70 ms after its last run (benchmarks/RESULTS.md,
# "Interleaving", Table 4)
THREADED_BLOCK_S = 0.1  # blocks then last at least this long, so settling is not most of the time
BOOTSTRAP_REPS = 1000
MEMORY_ITERATIONS = 2


@dataclasses.dataclass
class BenchmarkResult:
    """Per model and thread count latency rows, plus the machine and settings they came from.

    ``rows`` hold, for each model (``model``) and thread count (``threads``): ``p50_ms``,
    ``p90_ms``, ``p99_ms``, ``mean_ms``, ``std_ms``, ``min_ms``, ``max_ms``, ``throughput``
    (inferences/s), ``iterations``, ``rounds``, ``block``, ``settle``, ``load_s``,
    ``cpu_seconds_per_inference``, ``peak_rss_mb``, ``session_rss_mb``, ``speedup`` and
    ``speedup_ci95``.
    """

    models: list[dict[str, Any]]
    rows: list[dict[str, Any]]
    machine: dict[str, Any]
    settings: dict[str, Any]
    feeds: dict[str, dict[str, Any]]
    schema_version: int = SCHEMA_VERSION

    def row(self, model: str, threads: int) -> dict[str, Any]:
        """The row of one model at one thread count."""
        for r in self.rows:
            if r["model"] == model and r["threads"] == threads:
                return r
        raise KeyError((model, threads))

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self), allow_nan=False))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, allow_nan=False)

    def to_markdown(self) -> str:
        """One table row per model and thread count; speed-ups are against the first model."""
        lines = [
            "| model | threads | p50 ms | p90 ms | p99 ms | mean ± std ms | inferences/s "
            "| speed-up (95% CI) | load s | peak RSS MB |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in self.rows:
            lo, hi = r["speedup_ci95"]
            rss = "" if r["peak_rss_mb"] is None else f"{r['peak_rss_mb']:.0f}"
            lines.append(
                f"| {r['model']} | {r['threads']} | {_ms(r['p50_ms'])} | {_ms(r['p90_ms'])} "
                f"| {_ms(r['p99_ms'])} | {_ms(r['mean_ms'])} ± {_ms(r['std_ms'])} "
                f"| {r['throughput']:,.0f} | {r['speedup']:.2f}x ({lo:.2f}-{hi:.2f}) "
                f"| {r['load_s']:.3f} | {rss} |"
            )
        m = self.machine
        cores = m.get("usable_cores") or m.get("logical_cores")
        footer = (
            f"\n{m.get('cpu_model')} ({m.get('arch')}, {cores} cores), onnxruntime "
            f"{m.get('versions', {}).get('onnxruntime')}; models interleaved in blocks with "
            f"untimed runs after each switch, ORT thread spinning {self.settings['spinning']}.\n"
        )
        return "\n".join(lines) + "\n" + footer


def _ms(x: float) -> str:
    return f"{x:.4f}" if x < 1 else f"{x:.2f}"


@dataclasses.dataclass
class _Entry:
    """One model under test: its display name, the file its sessions load, and its IR."""

    name: str
    path: Path
    source: str | None  # the user's path, None for an in-memory model
    ir_model: ir.Model


def benchmark(
    models: Sequence[ModelLike],
    *,
    threads: Sequence[int] | int | None = None,
    feeds: Mapping[str, np.ndarray] | str | Path | None = None,
    shapes: Mapping[str, Sequence[int]] | Sequence[str] | None = None,
    names: Sequence[str] | None = None,
    warmup: int | None = None,
    rounds: int | None = None,
    block: int | None = None,
    settle: int | None = None,
    time_budget_s: float = DEFAULT_TIME_BUDGET_S,
    block_s: float = BLOCK_S,
    opt_level: str = "all",
    session_config: Mapping[str, Any] | str | Path | None = None,
    measure_memory: bool = True,
    seed: int = 0,
    bootstrap: int = BOOTSTRAP_REPS,
    progress: Progress | None = None,
) -> BenchmarkResult:
    """Compare the latency of ``models`` (the first is the reference) with ONNX Runtime on CPU.

    Args:
        models: ``onnx_ir.Model``, ``onnx.ModelProto`` or paths; all must take the same inputs.
        threads: intra-op thread counts; each gets its own sessions and rounds (default: the
            session configuration's ``intra_op_num_threads`` if it sets one, else 1 and 2).
        feeds: inputs (a dict or an ``.npz`` path); default: seeded ones synthesized from the
            first model (``shapes`` as in ``onnxopt.feeds.synthesize_feeds``, or ``--shape``
            strings).
        names: display names (default: file stems, else graph names).
        warmup: untimed runs per model and thread count (default: ``WARMUP_S`` worth, >= 2).
        rounds: rounds per thread count (default: rounds until ``time_budget_s`` has passed,
            and at least 5).
        block: timed runs per model per round (default: per model, ``block_s`` worth).
        settle: untimed runs after each switch (default: ``SETTLE_S`` worth, at several
            threads with spinning ``THREADED_SETTLE_S`` worth; at least ``MIN_SETTLE_RUNS``).
        time_budget_s: wall seconds of rounds per thread count (all models together), when
            ``rounds`` is not given.
        block_s: target seconds of one block when ``block`` is not given.
        opt_level: ORT graph optimization level.
        session_config: ORT session config entries (``{"session.intra_op.allow_spinning":
            "0"}``), or a session configuration as ``onnxopt tune`` writes it (the document or
            its JSON path: threads, execution mode, memory arena and pattern, config entries).
        measure_memory: run each model in a child process to read its peak resident memory.
        bootstrap: bootstrap resamples for ``speedup_ci95``.
        progress: called with (fraction done in [0, 1], description).

    Raises:
        InputError: unreadable models, models with different inputs, feeds that do not fit,
            bad arguments.
    """
    options = _session_options(session_config)
    if threads is None:
        threads = options.pop("threads", None) or (1, 2)
    options.pop("threads", None)
    thread_counts = _check_args(models, threads, names, warmup, rounds, block, settle,
                                time_budget_s, opt_level)
    if bootstrap < 1 or not block_s > 0:
        raise InputError(f"bootstrap must be >= 1 and block_s > 0, got {bootstrap}, {block_s}")
    report = progress or (lambda fraction, description: None)
    config = options.pop("config", {})
    with tempfile.TemporaryDirectory(prefix="onnxopt-bench-") as tmp:
        entries = _entries(models, names, Path(tmp))
        feed_source = "synthesized" if feeds is None else "given"
        the_feeds = _feeds(entries, feeds, shapes, seed)
        memory_share = 0.15 if measure_memory else 0.0
        share = (1.0 - memory_share) / len(thread_counts)
        rows: list[dict[str, Any]] = []
        settings_per_threads: dict[int, dict[str, Any]] = {}
        rng = np.random.default_rng(seed)
        for i, t in enumerate(thread_counts):
            new_rows, used = _measure_thread_count(
                entries, the_feeds, t, warmup=warmup, rounds=rounds, block=block, settle=settle,
                time_budget_s=time_budget_s, block_s=block_s, opt_level=opt_level, config=config,
                options=options, bootstrap=bootstrap, rng=rng,
                progress=lambda f, d, base=i * share: report(base + f * share, d),
            )
            rows.extend(new_rows)
            settings_per_threads[t] = used
        memory = {}
        if measure_memory:
            memory = _measure_memory(entries, the_feeds, max(thread_counts), opt_level, config,
                                     Path(tmp), report, 1.0 - memory_share, options)
        for r in rows:
            peak, before = memory.get(r["model"], (None, None))
            r["peak_rss_mb"] = peak
            r["session_rss_mb"] = None if peak is None or before is None else peak - before
        report(1.0, "done")
        model_records = [
            {"name": e.name, "source": e.source, "sha256": runner.file_sha256(e.path),
             "bytes": e.path.stat().st_size}
            for e in entries
        ]
    settings = _settings(thread_counts, warmup, rounds, block, settle, time_budget_s, block_s,
                         opt_level, config, bootstrap, seed, measure_memory, settings_per_threads)
    if options:
        settings["session_options"] = options
    return BenchmarkResult(
        models=model_records,
        rows=rows,
        machine=runner.machine_info(),
        settings=settings,
        feeds={k: {"shape": list(v.shape), "dtype": str(v.dtype), "source": feed_source}
               for k, v in the_feeds.items()},
    )


def _session_options(session_config: Mapping[str, Any] | str | Path | None) -> dict[str, Any]:
    """``runner.session_options`` keywords other than ``opt_level``, from either form of
    ``session_config`` (plain config entries, or a session configuration document or file)."""
    try:
        if isinstance(session_config, (str, Path)):
            return runner.load_session_config(session_config)
        if runner.is_session_config(session_config):
            return runner.session_config_options(session_config)
    except runner.RunnerError as exc:
        raise InputError(str(exc)) from exc
    return {"config": {str(k): str(v) for k, v in (session_config or {}).items()}}


def _settings(thread_counts: list[int], warmup: int | None, rounds: int | None,
              block: int | None, settle: int | None, time_budget_s: float, block_s: float,
              opt_level: str, config: dict[str, str], bootstrap: int, seed: int,
              measure_memory: bool,
              used: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """What was asked for, and (``per_thread_count``) the rounds and block sizes it came to."""
    return {
        "threads": thread_counts,
        "warmup": warmup,
        "rounds": rounds,
        "block": block,
        "settle": settle if settle is not None
        else (f"{SETTLE_S} s worth at 1 thread, {THREADED_SETTLE_S} s at more (spinning on), "
              f"at least {MIN_SETTLE_RUNS} runs"),
        "time_budget_s": time_budget_s,
        "block_s": block_s,
        "opt_level": opt_level,
        "session_config": config,
        "spinning": "off" if config.get("session.intra_op.allow_spinning") == "0" else "on",
        "energy_proxy": f"cpu_seconds_per_inference: {runner.ENERGY_PROXY_NOTE}",
        "order": "blocks per model, order reversed every other round",
        "bootstrap": bootstrap,
        "seed": seed,
        "memory": (f"peak RSS (VmHWM) of a child process running onnxopt.runner at "
                   f"{max(thread_counts)} threads" if measure_memory else None),
        "per_thread_count": {str(t): v for t, v in used.items()},
    }


def _check_args(models: Sequence[ModelLike], threads: Sequence[int] | int,
                names: Sequence[str] | None, warmup: int | None, rounds: int | None,
                block: int | None, settle: int | None, time_budget_s: float,
                opt_level: str) -> list[int]:
    """The thread counts, de-duplicated; raises InputError for any argument out of range."""
    if isinstance(models, (str, Path, ir.Model, onnx.ModelProto)) or not len(models):
        raise InputError("benchmark needs a non-empty list of models")
    if names is not None and len(names) != len(models):
        raise InputError(f"{len(names)} name(s) for {len(models)} model(s)")
    if isinstance(threads, int):
        threads = [threads]
    counts: list[int] = []
    for t in threads:
        if not isinstance(t, (int, np.integer)) or t < 1:
            raise InputError(f"thread counts must be positive integers, got {t!r}")
        if int(t) not in counts:
            counts.append(int(t))
    if not counts:
        raise InputError("no thread counts given")
    for label, value, low in (("warmup", warmup, 0), ("rounds", rounds, 1), ("block", block, 1),
                              ("settle", settle, 0)):
        if value is not None and value < low:
            raise InputError(f"{label} must be >= {low}, got {value}")
    if not time_budget_s > 0:
        raise InputError(f"time_budget_s must be > 0, got {time_budget_s}")
    if opt_level not in runner.OPT_LEVELS:
        raise InputError(f"opt_level must be one of {sorted(runner.OPT_LEVELS)}, got {opt_level!r}")
    return counts


def _entries(models: Sequence[ModelLike], names: Sequence[str] | None, tmp: Path) -> list[_Entry]:
    """Every model as a file ORT can load (in-memory ones are saved to ``tmp``) plus its IR."""
    entries: list[_Entry] = []
    used: set[str] = set()
    for i, model in enumerate(models):
        if isinstance(model, (str, Path)):
            path = Path(model)
            ir_model = load_model(path, upgrade=False)
            default, source = path.stem, str(path)
        elif isinstance(model, (ir.Model, onnx.ModelProto)):
            ir_model = model if isinstance(model, ir.Model) else ir.serde.deserialize_model(model)
            path = save_model(model, tmp / f"model{i}.onnx")
            default, source = ir_model.graph.name or f"model{i}", None
        else:
            raise InputError(f"model {i} is a {type(model).__name__}; expected a path, "
                             "onnx_ir.Model or onnx.ModelProto")
        name = names[i] if names is not None else default
        if names is None:
            base, k = name, 2
            while name in used:
                name, k = f"{base}#{k}", k + 1
        elif name in used:
            raise InputError(f"duplicate model name '{name}'")
        used.add(name)
        entries.append(_Entry(name, path, source, ir_model))
    return entries


def _feeds(entries: list[_Entry], feeds: Mapping[str, np.ndarray] | str | Path | None,
           shapes: Mapping[str, Sequence[int]] | Sequence[str] | None, seed: int) -> Feeds:
    """One set of feeds every model accepts (same names, dtypes and static dims)."""
    first = {name for name, _, _ in input_specs(entries[0].ir_model)}
    for e in entries[1:]:
        other = {name for name, _, _ in input_specs(e.ir_model)}
        if other != first:
            raise InputError(
                f"models take different inputs: '{entries[0].name}' {sorted(first)}, "
                f"'{e.name}' {sorted(other)}"
            )
    if isinstance(shapes, Sequence) and not isinstance(shapes, str):
        shapes = parse_shape_overrides(list(shapes))
    path = None
    if feeds is None:
        arrays: Mapping[str, np.ndarray] = synthesize_feeds(
            entries[0].ir_model, shapes=dict(shapes or {}), seed=seed)
    elif isinstance(feeds, (str, Path)):
        path, arrays = feeds, load_npz(feeds)
    else:
        arrays = feeds
    checked: Feeds = {}
    for e in entries:
        checked = check_feeds(arrays, e.ir_model, path)
    return checked


def _measure_thread_count(
    entries: list[_Entry], feeds: Feeds, threads: int, *, warmup: int | None, rounds: int | None,
    block: int | None, settle: int | None, time_budget_s: float, block_s: float, opt_level: str,
    config: dict[str, str], options: dict[str, Any], bootstrap: int, rng: np.random.Generator,
    progress: Progress,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Rows for one thread count: create every session, warm up, then timed rounds of blocks."""
    progress(0.0, f"{threads} thread(s): loading")
    sessions, load_s = [], []
    for e in entries:
        start = time.perf_counter()
        try:
            sessions.append(runner.create_session(str(e.path), threads=threads,
                                                  opt_level=opt_level, config=config, **options))
        except runner.ORT_ERRORS as exc:
            raise InputError(f"ONNX Runtime cannot load it ({one_line(exc)})", e.source) from exc
        load_s.append(time.perf_counter() - start)
    runs = [_runner_of(s, feeds, e) for s, e in zip(sessions, entries, strict=True)]
    spinning = config.get("session.intra_op.allow_spinning") != "0"
    settle_s = THREADED_SETTLE_S if threads > 1 and spinning else SETTLE_S
    if settle_s > SETTLE_S:
        block_s = max(block_s, THREADED_BLOCK_S)
    stats, used = measure_interleaved(
        runs, [e.name for e in entries], warmup=warmup, rounds=rounds, block=block,
        settle=settle, time_budget_s=time_budget_s, block_s=block_s, settle_s=settle_s,
        bootstrap=bootstrap, rng=rng,
        progress=lambda f, d: progress(f, f"{threads} thread(s): {d}"))
    del runs, sessions  # release the thread pools before the next thread count
    rows = [{"model": e.name, "threads": threads, **{k: v for k, v in st.items()
                                                      if k not in _LATE_KEYS},
             "load_s": load_s[m], **{k: st[k] for k in _LATE_KEYS}}
            for m, (e, st) in enumerate(zip(entries, stats, strict=True))]
    return rows, used


_LATE_KEYS = ("cpu_seconds_per_inference", "speedup", "speedup_ci95")


def measure_interleaved(
    runs: Sequence[Callable[[], Any]], names: Sequence[str], *, warmup: int | None = None,
    rounds: int | None = None, block: int | None = None, settle: int | None = None,
    time_budget_s: float = DEFAULT_TIME_BUDGET_S, block_s: float = BLOCK_S,
    settle_s: float = SETTLE_S,
    bootstrap: int = BOOTSTRAP_REPS, rng: np.random.Generator | None = None,
    progress: Progress | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The core of :func:`benchmark` for any callables (e.g. one model in differently
    configured sessions, as ``onnxopt tune`` compares): warm-up, then interleaved rounds of
    blocks with settle runs after each switch, then bootstrap intervals of the speed-ups.

    ``block_s`` and ``settle_s`` size blocks and settling when ``block``/``settle`` are not
    given; callables with several intra-op threads need ``THREADED_BLOCK_S`` and
    ``THREADED_SETTLE_S`` (see the module docstring).

    Returns one dict per callable (:func:`runner.latency_stats` keys plus ``rounds``, ``block``,
    ``settle``, ``cpu_seconds_per_inference``, ``speedup`` against the first callable and
    ``speedup_ci95``) and the rounds, block sizes and settle runs used.
    """
    rng = rng if rng is not None else np.random.default_rng(0)
    report = progress or (lambda fraction, description: None)
    estimates = [_warm_up(run, warmup) for run in runs]
    blocks = [block or int(min(MAX_BLOCK, max(MIN_BLOCK_RUNS, round(block_s / est))))
              for est in estimates]
    settles = [settle if settle is not None else _default_settle(est, settle_s)
               for est in estimates]
    samples, cpu, r = _timed_rounds(list(runs), blocks, settles, rounds, time_budget_s, report)
    medians = _bootstrap_medians(samples, bootstrap, rng)
    results = []
    ref_p50 = float(np.percentile(np.concatenate(samples[0]), 50))
    for m in range(len(runs)):
        stats = runner.latency_stats(np.concatenate(samples[m]))
        ratios = medians[0] / medians[m]
        lo, hi = np.percentile(ratios, [2.5, 97.5])
        results.append({
            **stats,
            "rounds": r,
            "block": blocks[m],
            "settle": settles[m],
            "cpu_seconds_per_inference": cpu[m] / stats["iterations"],
            "speedup": ref_p50 / stats["p50_ms"],
            "speedup_ci95": [float(lo), float(hi)],
        })
    used = {"rounds": r,
            "block": dict(zip(names, blocks, strict=True)),
            "settle": dict(zip(names, settles, strict=True)),
            "warmup_estimate_ms": {n: est * 1000 for n, est in zip(names, estimates, strict=True)}}
    return results, used


def _timed_rounds(
    runs: list[Callable[[], Any]], blocks: list[int], settles: list[int], rounds: int | None,
    time_budget_s: float, progress: Progress,
) -> tuple[list[list[np.ndarray]], list[float], int]:
    """Samples (ms) per model and round, process CPU seconds per model, and the rounds run.

    Each round: for each model (order reversed every other round), ``settles[m]`` untimed runs,
    then ``blocks[m]`` timed ones. ``rounds=None``: until ``time_budget_s`` has passed and at
    least ``MIN_ROUNDS`` rounds ran.
    """
    samples: list[list[np.ndarray]] = [[] for _ in runs]
    cpu = [0.0] * len(runs)
    clock = time.perf_counter
    gc_was_enabled = gc.isenabled()
    gc.disable()  # as timeit does: a collection inside a timed run is noise, not the model
    start = clock()
    r = 0
    try:
        while r < (rounds or MAX_ROUNDS):
            order = range(len(runs)) if r % 2 == 0 else reversed(range(len(runs)))
            for m in order:
                run = runs[m]
                for _ in range(settles[m]):
                    run()
                times = np.empty(blocks[m])
                cpu_start = time.process_time()
                for k in range(blocks[m]):
                    t0 = clock()
                    run()
                    times[k] = clock() - t0
                cpu[m] += time.process_time() - cpu_start
                samples[m].append(times * 1000.0)
            r += 1
            elapsed = clock() - start
            if rounds:
                progress(r / rounds, f"round {r}/{rounds}")
            else:
                progress(min(1.0, elapsed / time_budget_s, r / MIN_ROUNDS), f"round {r}")
                if elapsed >= time_budget_s and r >= MIN_ROUNDS:
                    break
    finally:
        if gc_was_enabled:
            gc.enable()
    return samples, cpu, r


def _default_settle(seconds_per_run: float, settle_s: float = SETTLE_S) -> int:
    """Untimed runs after a switch: ``settle_s`` worth, at least ``MIN_SETTLE_RUNS``."""
    return int(min(MAX_BLOCK, max(MIN_SETTLE_RUNS, math.ceil(settle_s / seconds_per_run))))


def _runner_of(session: Any, feeds: Feeds, entry: _Entry) -> Callable[[], Any]:
    """A callable running the session once; a first run turns ORT errors into InputError."""
    names = [o.name for o in session.get_outputs()]
    feeds = dict(feeds)
    try:
        session.run(names, feeds)
    except runner.ORT_ERRORS as exc:
        raise InputError(f"ONNX Runtime cannot run it on these feeds ({one_line(exc)})",
                         entry.source or entry.name) from exc
    return lambda: session.run(names, feeds)


def _warm_up(run: Callable[[], Any], warmup: int | None) -> float:
    """Warm-up runs (not in the result); returns the median seconds per run of their later half."""
    times = []
    start = time.perf_counter()
    while True:
        t0 = time.perf_counter()
        run()
        t1 = time.perf_counter()
        times.append(t1 - t0)
        if warmup is not None:
            if len(times) >= max(warmup, 1):
                break
        elif len(times) >= MIN_WARMUP and t1 - start >= WARMUP_S:
            break
    return float(np.median(times[len(times) // 2:]))


def _bootstrap_medians(samples: list[list[np.ndarray]], reps: int,
                       rng: np.random.Generator) -> list[np.ndarray]:
    """p50 of each model's samples over ``reps`` resamples of the rounds (paired across models).

    A resample gives each round a multiplicity; the p50 of the resulting multiset is found by a
    binary search over each model's sorted samples, so no resample is ever materialised.
    Interpolates between the two middle values exactly like ``np.percentile(x, 50)``.
    """
    n_rounds = len(samples[0])
    counts = rng.multinomial(n_rounds, np.full(n_rounds, 1.0 / n_rounds), size=reps)  # (reps, R)
    return [_weighted_p50([np.sort(x) for x in rounds], counts) for rounds in samples]


def _weighted_p50(sorted_rounds: list[np.ndarray], counts: np.ndarray) -> np.ndarray:
    values = np.sort(np.concatenate(sorted_rounds))
    sizes = np.array([len(x) for x in sorted_rounds])
    total = counts @ sizes  # (reps,)

    def order_statistic(k: np.ndarray) -> np.ndarray:
        """The k-th (0-based) smallest value of each resample's multiset."""
        lo = np.zeros(len(k), dtype=np.int64)
        hi = np.full(len(k), len(values) - 1, dtype=np.int64)
        while np.any(lo < hi):
            mid = (lo + hi) // 2
            below = np.zeros(len(k), dtype=np.int64)  # values <= values[mid], with multiplicity
            for r, x in enumerate(sorted_rounds):
                below += counts[:, r] * np.searchsorted(x, values[mid], side="right")
            enough = below >= k + 1
            hi = np.where(enough, mid, hi)
            lo = np.where(enough, lo, mid + 1)
        return values[lo]

    return 0.5 * (order_statistic((total - 1) // 2) + order_statistic(total // 2))


def _measure_memory(entries: list[_Entry], feeds: Feeds, threads: int, opt_level: str,
                    config: dict[str, str], tmp: Path, report: Progress,
                    start: float, options: Mapping[str, Any] | None = None,
                    ) -> dict[str, tuple[float | None, float | None]]:
    """(peak RSS, RSS before loading) in MiB per model, each from a fresh runner process.

    The runner file is run by path through ``runpy`` (not ``-m onnxopt.runner``): the child then
    imports only numpy and onnxruntime, as on a board, and not the whole onnxopt package.
    """
    feeds_path = tmp / "feeds.npz"
    np.savez(feeds_path, **feeds)
    script = ("import runpy, sys; sys.argv = sys.argv[1:]; "
              "runpy.run_path(sys.argv[0], run_name='__main__')")
    memory = {}
    for i, e in enumerate(entries):
        report(start + (1.0 - start) * i / len(entries), f"peak memory of {e.name}")
        cmd = [sys.executable, "-c", script, runner.__file__, str(e.path.resolve()),
               "--threads", str(threads), "--opt-level", opt_level, "--inputs", str(feeds_path),
               "--warmup", "1", "--iterations", str(MEMORY_ITERATIONS)]
        for key, value in config.items():
            cmd += ["--config", f"{key}={value}"]
        cmd += runner.option_flags(options or {})
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp, timeout=600)
        except subprocess.TimeoutExpired as exc:
            raise OnnxoptError(f"memory measurement of '{e.name}' timed out") from exc
        if done.returncode != 0:
            detail = (done.stderr.strip().splitlines() or ["no message"])[-1]
            raise OnnxoptError(f"memory measurement of '{e.name}' failed: {detail}")
        doc = json.loads(done.stdout)
        memory[e.name] = (doc["peak_rss_mb"], doc["rss_before_load_mb"])
    return memory


def check_benchmark_document(doc: Any, label: str = "baseline",
                             path: str | Path | None = None) -> None:
    """Refuse, naming ``path``, what is not a :meth:`BenchmarkResult.to_dict` document (a JSON
    list, another schema, rows without model and threads) before anything reads it."""
    if not isinstance(doc, Mapping):
        raise InputError(f"{label} results are not an onnxopt benchmark document (a JSON "
                         f"{type(doc).__name__}, expected an object)", path)
    rows = doc.get("rows")
    if doc.get("schema_version") != SCHEMA_VERSION or "rows" not in doc:
        raise InputError(f"{label} results are not an onnxopt benchmark document "
                         f"(schema_version {doc.get('schema_version')!r}, "
                         f"expected {SCHEMA_VERSION})", path)
    if not isinstance(rows, list):
        raise InputError(f"{label} results are not an onnxopt benchmark document ('rows' is "
                         f"a {type(rows).__name__}, expected a list)", path)
    models = doc.get("models") or [{}]
    if (not isinstance(models, list) or not all(isinstance(m, Mapping) for m in models)
            or not all(isinstance(r, Mapping) and {"model", "threads"} <= set(r) for r in rows)):
        raise InputError(f"{label} results have malformed models or rows (each row needs "
                         "'model' and 'threads')", path)


def compare_to_baseline(new: Mapping[str, Any], old: Mapping[str, Any],
                        max_regression: float) -> list[str]:
    """Regressions of ``new`` against ``old`` (both :meth:`BenchmarkResult.to_dict` documents).

    Compares speed-ups against the first model, not absolute times, so a baseline recorded on
    another day or machine still means something. A row regresses when its speed-up falls below
    ``(1 - max_regression)`` times the baseline's; a row of the baseline missing from ``new`` is
    reported too. An empty list means no regression.
    """
    if not 0 <= max_regression < 1:
        raise InputError(f"max_regression must be in [0, 1), got {max_regression}")
    for label, doc in (("new", new), ("baseline", old)):
        check_benchmark_document(doc, label)
    problems = []
    ref_new = (new.get("models") or [{}])[0].get("name")
    ref_old = (old.get("models") or [{}])[0].get("name")
    if ref_new != ref_old:
        problems.append(f"reference model differs: '{ref_new}' now, '{ref_old}' in the baseline; "
                        "speed-ups are not comparable")
        return problems
    current = {(r["model"], r["threads"]): r for r in new["rows"]}
    for base in old["rows"]:
        key = (base["model"], base["threads"])
        where = f"{base['model']} at {base['threads']} thread(s)"
        row = current.get(key)
        if row is None:
            problems.append(f"{where}: in the baseline but not in the new results")
            continue
        floor = base["speedup"] * (1.0 - max_regression)
        if row["speedup"] < floor:
            lo, hi = row.get("speedup_ci95", [math.nan, math.nan])
            problems.append(
                f"{where}: speed-up {row['speedup']:.3f}x (95% CI {lo:.3f}-{hi:.3f}) is below "
                f"the baseline's {base['speedup']:.3f}x minus {max_regression:.0%} ({floor:.3f}x)"
            )
    return problems
