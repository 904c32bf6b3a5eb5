"""Measuring the suite's model files: statistics, quality and interleaved latency.

Every distinct file (by content hash) is measured once, so a pass that changed nothing costs
nothing and shares its figures with the step before it.

Latency: :func:`onnxopt.benchmarking.benchmark` runs the FP32 file and the candidates interleaved in
one process; every group starts with the FP32 file, so every speed-up is against FP32 measured in
the same run. Big models are split into groups whose files fit a memory budget (all sessions of a
group are alive at once).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxopt import metrics
from onnxopt.benchmarking import benchmark
from onnxopt.evaluation import run_batched, session_for
from onnxopt.stats import model_stats

GROUP_BYTES = 1_500_000_000  # file bytes of one benchmark group (sessions take about 2-3x)
STAT_KEYS = ("params", "size_bytes", "zipped_bytes", "total_macs", "nodes", "macs")


@dataclasses.dataclass
class Measured:
    """Figures of one file; ``error`` set when ONNX Runtime could not run it."""

    path: Path
    name: str
    stats: dict[str, Any] = dataclasses.field(default_factory=dict)
    quality: dict[str, Any] = dataclasses.field(default_factory=dict)
    latency: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    peak_rss_mb: float | None = None
    error: str | None = None


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def stats_of(path: Path, shapes: dict[str, list[int]]) -> dict[str, Any]:
    """Params, stored and zipped bytes, MACs (at the benchmark's input shapes), nodes."""
    d = model_stats(onnx.load(str(path)), shapes, file=path).to_dict()
    return {k: d[k] for k in STAT_KEYS if k in d}


def quality_of(path: Path, evaluation: dict[str, np.ndarray], reference: dict[str, np.ndarray],
               labels: np.ndarray | None) -> dict[str, Any]:
    """Top-1 (when there are labels) and the worst cosine / SQNR over outputs against FP32."""
    outputs = run_batched(session_for(path, threads=2), evaluation, batch_size=64)
    worst: dict[str, float] = {}
    for ref, out in zip(reference.values(), outputs.values()):
        m = (metrics.compare(ref, out) if ref.shape == out.shape
             else {"cosine": 0.0, "sqnr_db": 0.0, "max_abs": float("inf")})
        for key, pick in (("cosine", min), ("sqnr_db", min), ("max_abs", max)):
            worst[key] = pick(worst.get(key, m[key]), m[key])
    top1 = None
    if labels is not None:
        logits = next(iter(outputs.values()))
        top1 = float(100.0 * np.mean(logits.argmax(axis=-1) == labels))
    return {"top1": top1, **worst}


def reference_outputs(path: Path, evaluation: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return run_batched(session_for(path, threads=2), evaluation, batch_size=64)


def latency_groups(fp32: Measured, others: Sequence[Measured]) -> list[list[Measured]]:
    """Groups of files, each led by the FP32 file, whose bytes fit :data:`GROUP_BYTES`."""
    base = fp32.path.stat().st_size
    groups: list[list[Measured]] = []
    current: list[Measured] = []
    used = base
    for m in others:
        size = m.path.stat().st_size
        if current and used + size > GROUP_BYTES:
            groups.append([fp32, *current])
            current, used = [], base
        current.append(m)
        used += size
    if current or not groups:
        groups.append([fp32, *current])
    return groups


def measure_latency(group: list[Measured], feeds: dict[str, np.ndarray], *, threads: Sequence[int],
                    seconds_per_model: float, memory: bool, keep_first: bool,
                    progress: Callable[[str], None]) -> dict[str, Any]:
    """Interleaved latency of a group (FP32 first); fills each member's ``latency`` and memory.

    ``keep_first``: leave the FP32 member's figures as they are (set by an earlier group).

    Returns the raw :class:`onnxopt.benchmarking.BenchmarkResult` document, machine record dropped
    (the results document has it once).
    """
    result = benchmark(
        [m.path for m in group], threads=tuple(threads), feeds=feeds,
        names=[m.name for m in group], time_budget_s=seconds_per_model * len(group),
        measure_memory=memory,
        progress=lambda fraction, what: progress(f"{what} ({fraction:.0%})"),
    )
    for m in group[1:] if keep_first else group:
        for t in threads:
            row = result.row(m.name, t)
            m.latency[str(t)] = {k: row[k] for k in ("p50_ms", "p90_ms", "speedup", "speedup_ci95")}
            if memory and row.get("peak_rss_mb") is not None:
                m.peak_rss_mb = row["peak_rss_mb"]
    doc = result.to_dict()
    doc.pop("machine", None)
    return doc

