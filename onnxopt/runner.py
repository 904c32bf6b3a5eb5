"""ONNX Runtime sessions and latency measurement; standard library + numpy + onnxruntime only.

This module must stay self-contained (no other onnxopt import) so it can be copied to a bare ARM
board and run as a script next to a model::

    python runner.py model.onnx --threads 4 --time-budget 5 > result.json

The script prints one JSON document (machine, model hash, load time, latency percentiles, peak
memory, CPU time per inference, output checksums); see :func:`main`. It also reads the session
configuration that ``onnxopt tune`` writes (``--session-config``) and runs the cascades that
``onnxopt split`` writes (a ``cascade.json`` in place of the model), so both work on a board.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import math
import os
import platform
import sys
import tempfile
import time
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import onnxruntime as ort

OPT_LEVELS = {
    "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def session_options(
    *,
    threads: int | None = None,
    inter_op_threads: int | None = None,
    parallel: bool = False,
    opt_level: str = "all",
    config: Mapping[str, str] | None = None,
    cpu_mem_arena: bool = True,
    mem_pattern: bool = True,
) -> ort.SessionOptions:
    """ORT session options from plain values (``threads=None`` lets ORT choose).

    ``cpu_mem_arena`` and ``mem_pattern`` are ORT's ``enable_cpu_mem_arena`` and
    ``enable_mem_pattern`` (both on by default, as in ORT).
    """
    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = int(threads)
    if inter_op_threads:
        so.inter_op_num_threads = int(inter_op_threads)
    so.execution_mode = (
        ort.ExecutionMode.ORT_PARALLEL if parallel else ort.ExecutionMode.ORT_SEQUENTIAL
    )
    so.enable_cpu_mem_arena = bool(cpu_mem_arena)
    so.enable_mem_pattern = bool(mem_pattern)
    so.graph_optimization_level = OPT_LEVELS[opt_level]
    so.log_severity_level = 3
    for key, value in (config or {}).items():
        so.add_session_config_entry(str(key), str(value))
    return so


def create_session(
    model: str | bytes, *, providers: list[str] | None = None, **options: Any
) -> ort.InferenceSession:
    """A CPU session for a model path or serialized bytes; ``options``: :func:`session_options`."""
    return ort.InferenceSession(
        model,
        sess_options=session_options(**options),
        providers=providers or ["CPUExecutionProvider"],
    )


def reference_session(model: str | bytes) -> ort.InferenceSession:
    """The verification oracle: graph optimizations off, one thread (deterministic, no fusions).

    Nodes run in priority order: ORT's default order started every constant-only node first, so
    share-weights' decoders (Gather of codebook and codes) all held their float32 weights at
    once, as much as the whole FP32 model (8 layers of 4096x4096: 799 MB peak, 327 MB in
    priority order). The order changes no node's arithmetic.
    """
    options = session_options(threads=1, opt_level="disabled")
    if hasattr(ort, "ExecutionOrder"):  # a board's older onnxruntime may not have it
        options.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    return ort.InferenceSession(model, sess_options=options, providers=["CPUExecutionProvider"])


def run(session: ort.InferenceSession, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Outputs by name."""
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, dict(feeds))))


# ---------------------------------------------------------------------------------------------
# Session configuration documents (written by ``onnxopt tune``, read by the runner and bench)
# ---------------------------------------------------------------------------------------------

SESSION_CONFIG_SCHEMA = "onnxopt.session-config"
SESSION_CONFIG_VERSION = 1
# document key -> (session_options keyword, accepted types); keys are ORT's SessionOptions names
_SESSION_CONFIG_KEYS: dict[str, tuple[str, tuple[type, ...]]] = {
    "intra_op_num_threads": ("threads", (int, type(None))),
    "inter_op_num_threads": ("inter_op_threads", (int, type(None))),
    "execution_mode": ("parallel", (str,)),
    "enable_cpu_mem_arena": ("cpu_mem_arena", (bool,)),
    "enable_mem_pattern": ("mem_pattern", (bool,)),
    "config_entries": ("config", (dict,)),
}


def is_session_config(doc: object) -> bool:
    """Whether ``doc`` is a session configuration document (not plain config entries)."""
    return isinstance(doc, Mapping) and doc.get("schema") == SESSION_CONFIG_SCHEMA


def session_config_options(doc: Mapping[str, Any],
                           source: str = "session config") -> dict[str, Any]:
    """:func:`session_options` keywords from a session configuration document.

    The document names ORT's own ``SessionOptions`` fields (``intra_op_num_threads``,
    ``inter_op_num_threads``, ``execution_mode`` "sequential"|"parallel",
    ``enable_cpu_mem_arena``, ``enable_mem_pattern``) plus ``config_entries`` (session config
    entries such as ``session.intra_op.allow_spinning``). Missing fields keep ORT's defaults;
    other keys (what was tuned, the trials) are ignored. Raises :class:`RunnerError`.
    """
    if not is_session_config(doc):
        raise RunnerError(f"{source}: not a session configuration (expected \"schema\": "
                          f"\"{SESSION_CONFIG_SCHEMA}\")")
    if doc.get("schema_version") != SESSION_CONFIG_VERSION:
        raise RunnerError(f"{source}: schema_version {doc.get('schema_version')!r}, this runner "
                          f"reads version {SESSION_CONFIG_VERSION}")
    options: dict[str, Any] = {}
    for key, (keyword, types) in _SESSION_CONFIG_KEYS.items():
        if key not in doc:
            continue
        value = doc[key]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise RunnerError(f"{source}: {key} has the wrong type ({type(value).__name__})")
        if key == "execution_mode":
            if value not in ("sequential", "parallel"):
                raise RunnerError(f"{source}: execution_mode must be sequential or parallel")
            value = value == "parallel"
        elif key == "config_entries":
            value = {str(k): str(v) for k, v in value.items()}
        elif key.endswith("_threads") and value is not None and value < 1:
            raise RunnerError(f"{source}: {key} must be >= 1 or null, got {value}")
        options[keyword] = value
    return options


def option_flags(options: Mapping[str, Any]) -> list[str]:
    """The runner's command-line flags for :func:`session_options` keywords (those given)."""
    flags: list[str] = []
    if options.get("threads"):
        flags += ["--threads", str(options["threads"])]
    if options.get("inter_op_threads"):
        flags += ["--inter-op", str(options["inter_op_threads"])]
    if options.get("parallel"):
        flags.append("--parallel")
    if options.get("cpu_mem_arena") is False:
        flags.append("--no-cpu-mem-arena")
    if options.get("mem_pattern") is False:
        flags.append("--no-mem-pattern")
    if options.get("opt_level"):
        flags += ["--opt-level", str(options["opt_level"])]
    for key, value in (options.get("config") or {}).items():
        flags += ["--config", f"{key}={value}"]
    return flags


def load_session_config(path: str | Path) -> dict[str, Any]:
    """A session configuration JSON file as :func:`session_options` keywords."""
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except FileNotFoundError as exc:
        raise RunnerError(f"{path}: no such file") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RunnerError(f"{path}: not a JSON file ({_first_line(exc)})") from exc
    return session_config_options(doc, str(path))


# ---------------------------------------------------------------------------------------------
# Cascades: sub-models loaded on demand, one at a time (written by ``onnxopt split``)
# ---------------------------------------------------------------------------------------------

CASCADE_SCHEMA = "onnxopt.cascade"
CASCADE_VERSION = 1


_M_MMAP_THRESHOLD = -3  # glibc's malloc.h


def _glibc() -> Any:
    """glibc through ctypes when this process uses it (not musl, macOS or Windows), else None."""
    if not platform.libc_ver()[0] == "glibc":
        return None
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


class _Arg:
    """What :class:`CascadeSession` says about an input or output (as ORT's ``NodeArg``)."""

    def __init__(self, name: str, type_name: str = "", shape: Sequence[int | str | None] = ()):
        self.name, self.type, self.shape = name, type_name, list(shape)


class CascadeSession:
    """Runs a split model's stages in order, each loaded just before it runs and released after.

    Peak memory is then about the largest stage plus the tensors passed between stages, not the
    whole model (the price: every inference pays the stages' load time). It offers the part of
    ``ort.InferenceSession`` the runner uses (``get_inputs``, ``get_outputs``, ``run``,
    ``get_providers``), so latency and memory are measured the same way as a single model.
    The manifest (``cascade.json``) lists each stage's file, inputs and outputs, and the graph's
    inputs with their types; a tensor is dropped as soon as no later stage needs it.

    ``release_memory`` (on by default) makes freed stage memory really leave the process on
    glibc: after the first large free, glibc raises its mmap threshold, so later stages' weights
    land on the heap, where freed memory stays resident and the next stage's load adds to it
    (measured here: 4 stages of 16 MiB peaked at 159 MB instead of 96 MB). So the threshold is
    pinned at 128 KiB (``mallopt``, process-wide) and the heap trimmed after each stage.
    """

    def __init__(self, manifest: str | Path, *, release_memory: bool = True, **options: Any):
        path = Path(manifest)
        try:
            with open(path, encoding="utf-8") as f:
                doc = json.load(f)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise RunnerError(f"{path}: not a readable cascade manifest ({_first_line(exc)})"
                              ) from exc
        if not isinstance(doc, dict) or doc.get("schema") != CASCADE_SCHEMA:
            raise RunnerError(f"{path}: not a cascade manifest (expected \"schema\": "
                              f"\"{CASCADE_SCHEMA}\")")
        if doc.get("schema_version") != CASCADE_VERSION:
            raise RunnerError(f"{path}: cascade schema_version {doc.get('schema_version')!r}, "
                              f"this runner reads version {CASCADE_VERSION}")
        self.path = path
        self.options = options
        self._libc = _glibc() if release_memory else None
        if self._libc is not None:
            self._libc.mallopt(_M_MMAP_THRESHOLD, 128 * 1024)
        self.stages = [(path.parent / s["file"], list(s["inputs"]), list(s["outputs"]))
                       for s in doc["stages"]]
        for file, _, _ in self.stages:
            if not file.is_file():
                raise RunnerError(f"{file}: stage file listed in {path.name} is missing")
        self._inputs = [_Arg(i["name"], i["type"], i["shape"]) for i in doc["inputs"]]
        self._outputs = [_Arg(name) for name in doc["outputs"]]
        # the last stage that reads each tensor (graph outputs are kept to the end)
        self._last_use: dict[str, int] = {name: len(self.stages) for name in doc["outputs"]}
        for k, (_, inputs, _) in enumerate(self.stages):
            for name in inputs:
                self._last_use[name] = max(self._last_use.get(name, -1), k)

    def get_inputs(self) -> list[_Arg]:
        return list(self._inputs)

    def get_outputs(self) -> list[_Arg]:
        return list(self._outputs)

    def get_providers(self) -> list[str]:
        return ["CPUExecutionProvider"]

    def run(self, output_names: Sequence[str] | None,
            feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        live = dict(feeds)
        for k, (file, inputs, outputs) in enumerate(self.stages):
            session = create_session(str(file), **self.options)
            values = session.run(outputs, {name: live[name] for name in inputs})
            del session  # release the stage (weights, arena, threads) before the next one
            if self._libc is not None:
                self._libc.malloc_trim(0)
            live.update(zip(outputs, values, strict=True))
            for name in [n for n in live if self._last_use.get(n, -1) <= k]:
                del live[name]
        return [live[name] for name in (output_names or [o.name for o in self._outputs])]


# ---------------------------------------------------------------------------------------------
# Latency, memory and machine facts
# ---------------------------------------------------------------------------------------------

SCHEMA_VERSION = 1
DEFAULT_TIME_BUDGET_S = 1.0
ENERGY_PROXY_NOTE = (
    "user+sys CPU time of the whole process per timed inference (every thread, spinning included):"
    " a proxy for energy, not a measurement of it"
)


def latency_stats(samples_ms: Sequence[float] | np.ndarray) -> dict[str, float]:
    """Percentiles, mean, spread and throughput of latency samples in milliseconds."""
    s = np.asarray(samples_ms, dtype=np.float64)
    if s.size == 0:
        raise ValueError("no latency samples")
    p50, p90, p99 = np.percentile(s, [50, 90, 99])
    total_s = float(s.sum()) / 1000.0
    return {
        "p50_ms": float(p50),
        "p90_ms": float(p90),
        "p99_ms": float(p99),
        "mean_ms": float(s.mean()),
        "std_ms": float(s.std(ddof=1)) if s.size > 1 else 0.0,
        "min_ms": float(s.min()),
        "max_ms": float(s.max()),
        "throughput": s.size / max(total_s, 1e-12),  # inferences per second, one at a time
        "iterations": int(s.size),
    }


def measure(
    session: ort.InferenceSession,
    feeds: Mapping[str, np.ndarray],
    *,
    warmup: int = 10,
    iterations: int | None = None,
    time_budget_s: float | None = None,
    min_iterations: int = 3,
    keep_samples: bool = False,
) -> dict[str, Any]:
    """Time ``session.run`` on ``feeds``, one call per sample.

    ``iterations`` fixes the number of timed runs; ``time_budget_s`` runs until that much time has
    passed (and at least ``min_iterations`` runs); with both, whichever ends first; with neither,
    :data:`DEFAULT_TIME_BUDGET_S`. Returns :func:`latency_stats` keys plus ``warmup``, ``total_s``,
    ``cpu_seconds_per_inference`` and ``cpu_utilization`` (average busy cores),
    ``rapl_joules_per_inference`` (None unless the kernel exposes RAPL, see
    :func:`rapl_energy_uj`), and ``samples_ms`` when ``keep_samples``.
    """
    if warmup < 0 or (iterations is not None and iterations < 1):
        raise ValueError("warmup must be >= 0 and iterations >= 1")
    if time_budget_s is not None and time_budget_s <= 0:
        raise ValueError("time_budget_s must be > 0")
    if iterations is None and time_budget_s is None:
        time_budget_s = DEFAULT_TIME_BUDGET_S
    names = [o.name for o in session.get_outputs()]
    feeds = dict(feeds)
    for _ in range(warmup):
        session.run(names, feeds)
    cap = iterations if iterations is not None else sys.maxsize
    clock = time.perf_counter
    samples: list[float] = []
    energy_start = rapl_energy_uj()
    cpu_start = time.process_time()
    start = clock()
    while len(samples) < cap:
        t0 = clock()
        session.run(names, feeds)
        t1 = clock()
        samples.append(t1 - t0)
        spent = time_budget_s is not None and t1 - start >= time_budget_s
        if spent and len(samples) >= min_iterations:
            break
    wall = clock() - start
    cpu = time.process_time() - cpu_start
    joules = rapl_joules(energy_start, rapl_energy_uj())
    samples_ms = np.asarray(samples) * 1000.0
    result: dict[str, Any] = latency_stats(samples_ms)
    result.update(
        warmup=warmup,
        total_s=wall,
        cpu_seconds_per_inference=cpu / len(samples),
        cpu_utilization=cpu / wall if wall > 0 else 0.0,
        rapl_joules_per_inference=None if joules is None else joules / len(samples),
    )
    if keep_samples:
        result["samples_ms"] = samples_ms.tolist()
    return result


RAPL_DIR = "/sys/class/powercap"
RAPL_NOTE = (
    "RAPL package energy counters of the CPU socket(s) over the timed runs, per inference: "
    "measured by the CPU, but for the whole package (other processes and idle power included)"
)


def rapl_energy_uj(base: str = RAPL_DIR) -> dict[str, tuple[int, int]] | None:
    """Package energy counters: {domain: (energy_uj, max_energy_range_uj)}, None if not exposed.

    Intel's and (on newer kernels) AMD's RAPL appear as ``intel-rapl:N`` powercap zones; only the
    top-level package zones are read (their sub-zones, core and dram, are parts of them). Newer
    kernels let only root read ``energy_uj``; unreadable counters count as not exposed.
    """
    try:
        zones = sorted(n for n in os.listdir(base)
                       if n.startswith("intel-rapl:") and n.count(":") == 1)
    except OSError:
        return None
    counters = {}
    for zone in zones:
        try:
            energy = int(_read_text(f"{base}/{zone}/energy_uj").strip())
            limit = int(_read_text(f"{base}/{zone}/max_energy_range_uj").strip())
        except ValueError:  # missing or unreadable (permission) files read as ""
            return None
        name = _read_text(f"{base}/{zone}/name").strip() or zone
        counters[f"{zone} {name}"] = (energy, limit)
    return counters or None


def rapl_joules(before: dict[str, tuple[int, int]] | None,
                after: dict[str, tuple[int, int]] | None) -> float | None:
    """Joules spent between two :func:`rapl_energy_uj` readings (a counter may wrap once)."""
    if not before or not after or set(before) != set(after):
        return None
    total_uj = 0
    for zone, (start, limit) in before.items():
        end = after[zone][0]
        total_uj += end - start if end >= start else end + limit - start
    return total_uj / 1e6


def peak_rss_mb() -> float | None:
    """Peak resident memory of this process in MiB (None when the OS does not say).

    Linux: ``VmHWM`` from ``/proc/self/status``. Not ``ru_maxrss`` first: Linux carries the
    parent's peak across fork+exec into it, so a small child of a big parent reports the parent's
    size. Elsewhere ``ru_maxrss`` (bytes on macOS, KiB on the BSDs).
    """
    hwm_kib = _proc_status_kib("VmHWM")
    if hwm_kib is not None:
        return hwm_kib / 1024.0
    try:
        import resource
    except ImportError:  # Windows
        return None
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss / (1024.0 * 1024.0) if sys.platform == "darwin" else maxrss / 1024.0


def _proc_status_kib(field: str) -> int | None:
    for line in _read_text("/proc/self/status").splitlines():
        key, _, value = line.partition(":")
        if key == field:
            try:
                return int(value.split()[0])
            except (ValueError, IndexError):
                return None
    return None


def _read_text(path: str) -> str:
    """A small text file from /proc or /sys, or "" when it is missing or unreadable."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return ""


# ISA flags that decide which ORT kernels run (VNNI / AMX for INT8 on x86; dot-product, i8mm,
# SVE and SME on ARM).
_X86_FLAGS = (
    "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16",
    "avx512_fp16", "amx_tile", "amx_int8", "amx_bf16",
)
_ARM_FLAGS = (
    "asimd", "asimdhp", "asimddp", "i8mm", "bf16", "sve", "sve2", "svei8mm", "sme", "sme2",
)
# /proc/cpuinfo on ARM names cores only by number; these are Arm Ltd's (implementer 0x41) part
# numbers from Linux's arch/arm64/include/asm/cputype.h, for the cores found on boards and servers.
_ARM_LTD_PARTS = {
    0xD03: "Cortex-A53", 0xD04: "Cortex-A35", 0xD05: "Cortex-A55", 0xD07: "Cortex-A57",
    0xD08: "Cortex-A72", 0xD09: "Cortex-A73", 0xD0A: "Cortex-A75", 0xD0B: "Cortex-A76",
    0xD0C: "Neoverse-N1", 0xD0D: "Cortex-A77", 0xD40: "Neoverse-V1", 0xD41: "Cortex-A78",
    0xD44: "Cortex-X1", 0xD46: "Cortex-A510", 0xD47: "Cortex-A710", 0xD48: "Cortex-X2",
    0xD49: "Neoverse-N2", 0xD4B: "Cortex-A78C", 0xD4D: "Cortex-A715", 0xD4E: "Cortex-X3",
    0xD4F: "Neoverse-V2", 0xD80: "Cortex-A520", 0xD81: "Cortex-A720", 0xD82: "Cortex-X4",
    0xD84: "Neoverse-V3", 0xD8E: "Neoverse-N3",
}


def machine_info() -> dict[str, Any]:
    """Where a measurement was taken: CPU, ISA flags, cores, memory, OS and library versions.

    Reads /proc and /sys when they exist; every field is None (or empty) when it cannot be read.
    """
    arch = platform.machine()
    processors = _cpuinfo_blocks()
    first = processors[0] if processors else {}
    flags = set((first.get("flags") or first.get("Features") or "").split())
    is_arm = arch.lower() in ("aarch64", "arm64") or arch.lower().startswith("arm")
    wanted = _ARM_FLAGS if is_arm else _X86_FLAGS
    parts = sorted({p["CPU part"] for p in processors if "CPU part" in p})
    implementers = {p.get("CPU part"): p.get("CPU implementer") for p in processors}
    midr = sorted(
        {
            text.strip()
            for cpu in _cpu_dirs()
            if (text := _read_text(f"{cpu}/regs/identification/midr_el1")).strip()
        }
    )
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = None
    libc, libc_version = platform.libc_ver()
    return {
        "arch": arch,
        "cpu_model": _cpu_model(first, processors, parts, implementers),
        "isa": {flag: flag in flags for flag in wanted},
        "cpu_parts": parts,
        "midr_el1": midr,
        "board": _read_text("/sys/firmware/devicetree/base/model").strip("\x00\n ") or None,
        "logical_cores": os.cpu_count(),
        "usable_cores": usable,
        "mem_total_mb": _meminfo_mb("MemTotal"),
        "os": platform.platform(),
        "kernel": platform.release(),
        "libc": f"{libc} {libc_version}".strip() or None,
        "versions": {
            "python": platform.python_version(),
            "numpy": np.__version__,
            "onnxruntime": ort.__version__,
        },
        "providers": ort.get_available_providers(),
    }


def _cpuinfo_blocks() -> list[dict[str, str]]:
    """/proc/cpuinfo as one dict per processor block (first occurrence of a key wins)."""
    blocks: list[dict[str, str]] = []
    current: dict[str, str] = {}
    for line in _read_text("/proc/cpuinfo").splitlines():
        if not line.strip():
            if current:
                blocks.append(current)
                current = {}
            continue
        key, sep, value = line.partition(":")
        if sep:
            current.setdefault(key.strip(), value.strip())
    if current:
        blocks.append(current)
    return [b for b in blocks if "processor" in b] or blocks


def _cpu_dirs() -> list[str]:
    base = "/sys/devices/system/cpu"
    try:
        names = os.listdir(base)
    except OSError:
        return []
    return [f"{base}/{n}" for n in sorted(names) if n.startswith("cpu") and n[3:].isdigit()]


def _cpu_model(
    first: dict[str, str],
    processors: list[dict[str, str]],
    parts: list[str],
    implementers: dict[str | None, str | None],
) -> str | None:
    if first.get("model name"):
        return first["model name"]
    if parts:  # ARM: e.g. "Cortex-A76 x4 + Cortex-A55 x4"
        names = []
        for part in parts:
            count = sum(1 for p in processors if p.get("CPU part") == part)
            names.append(f"{_arm_part_name(part, implementers.get(part))} x{count}")
        return " + ".join(names)
    for block in processors:
        if block.get("Hardware"):
            return block["Hardware"]
    return platform.processor() or None


def _arm_part_name(part: str, implementer: str | None) -> str:
    try:
        if implementer is not None and int(implementer, 16) == 0x41:
            return _ARM_LTD_PARTS.get(int(part, 16), f"Arm part {part}")
    except ValueError:
        pass
    return f"implementer {implementer} part {part}"


def _meminfo_mb(field: str) -> float | None:
    for line in _read_text("/proc/meminfo").splitlines():
        key, _, value = line.partition(":")
        if key == field:
            try:
                return int(value.split()[0]) / 1024.0
            except (ValueError, IndexError):
                return None
    return None


# ---------------------------------------------------------------------------------------------
# Inputs and outputs (the conventions of onnxopt.feeds, repeated here so the file stands alone)
# ---------------------------------------------------------------------------------------------


class RunnerError(Exception):
    """A mistake in the runner's arguments or files; the script prints it as one line, exit 2."""


# Reliability: a synthesized input above this many elements is refused before numpy is asked
# for it (a declared 10**6 x 10**6 input would be 7.28 TiB); onnxopt.safety uses the same bound.
MAX_SYNTHESIZED_ELEMENTS = 1 << 28
_INT_HIGH = 100  # integer inputs (token ids, indices) get values in [0, 100) unless named *mask*
_ORT_DTYPES: dict[str, type] = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int8)": np.int8,
    "tensor(int16)": np.int16,
    "tensor(int32)": np.int32,
    "tensor(int64)": np.int64,
    "tensor(uint8)": np.uint8,
    "tensor(uint16)": np.uint16,
    "tensor(uint32)": np.uint32,
    "tensor(uint64)": np.uint64,
    "tensor(bool)": np.bool_,
}


def parse_shapes(specs: Sequence[str] | None) -> dict[str, list[int]]:
    """``--shape`` options: ``name=1x3x224x224`` (a whole input) or ``seq=128`` (a symbolic dim)."""
    shapes: dict[str, list[int]] = {}
    for spec in specs or []:
        name, sep, value = spec.partition("=")
        try:
            dims = [int(d) for d in value.lower().split("x")] if sep else []
        except ValueError:
            dims = []
        if not name or not dims or any(d < 1 for d in dims):
            raise RunnerError(f"bad --shape '{spec}': expected NAME=1x3x224x224 or DIM=4")
        shapes[name] = dims
    return shapes


def input_dtype(node_arg: Any) -> np.dtype:
    """The numpy dtype of an ORT input (``tensor(float)`` -> float32)."""
    dtype = _ORT_DTYPES.get(node_arg.type)
    if dtype is None:
        raise RunnerError(
            f"input '{node_arg.name}' has type {node_arg.type}, which the runner cannot feed"
        )
    return np.dtype(dtype)


def synthesize_inputs(
    session: ort.InferenceSession,
    *,
    batch: int = 1,
    shapes: Mapping[str, Sequence[int]] | None = None,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Seeded random inputs from the session's signature (see :func:`synthesize_arrays`)."""
    signature = [(arg.name, input_dtype(arg), list(arg.shape or [])) for arg in session.get_inputs()]
    return synthesize_arrays(signature, batch=batch, shapes=shapes, seed=seed)


def synthesize_arrays(
    signature: Sequence[tuple[str, np.dtype, Sequence[int | str | None]]],
    *,
    batch: int = 1,
    shapes: Mapping[str, Sequence[int]] | None = None,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Seeded random arrays for ``(name, dtype, dims)`` inputs; ``onnxopt.feeds`` uses it too.

    Symbolic dims take ``shapes[dim_name][0]``, else ``batch`` on axis 0 and 1 elsewhere;
    ``shapes[input_name]`` replaces a whole shape. Floats are standard normal, integers in
    [0, 100) (token ids), integer inputs named ``*mask*`` ones and ``*token_type*`` zeros (BERT
    segment ids index a 2-row table), booleans random.
    """
    shapes = dict(shapes or {})
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    for name, dtype, dims in signature:
        if name in shapes:
            shape = [int(d) for d in shapes[name]]
        else:
            shape = []
            for axis, d in enumerate(dims):
                if isinstance(d, int):
                    shape.append(d)
                elif isinstance(d, str) and d in shapes:
                    shape.append(int(shapes[d][0]))
                else:
                    shape.append(batch if axis == 0 else 1)
        count = math.prod(shape)
        if count > MAX_SYNTHESIZED_ELEMENTS:
            raise RunnerError(
                f"input '{name}' has shape {shape}: {count:,} elements, more than the "
                f"{MAX_SYNTHESIZED_ELEMENTS:,} inputs are synthesized with; give smaller "
                "shapes (--shape) or real inputs")
        feeds[name] = _random_array(rng, name, np.dtype(dtype), shape)
    return feeds


def _random_array(
    rng: np.random.Generator, name: str, dtype: np.dtype, shape: list[int]
) -> np.ndarray:
    if dtype == np.bool_:
        return rng.integers(0, 2, size=shape).astype(np.bool_)
    if np.issubdtype(dtype, np.integer):
        if "mask" in name.lower():
            return np.ones(shape, dtype=dtype)
        if "token_type" in name.lower():
            return np.zeros(shape, dtype=dtype)
        return rng.integers(0, _INT_HIGH, size=shape).astype(dtype)
    return rng.standard_normal(shape).astype(dtype)


def load_inputs(path: str | Path, session: ort.InferenceSession) -> dict[str, np.ndarray]:
    """Feeds from an ``.npz``, checked against the session's input names, dtypes and ranks."""
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except FileNotFoundError as exc:
        raise RunnerError(f"{path}: no such file") from exc
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
        raise RunnerError(f"{path}: not a readable .npz file ({_first_line(exc)})") from exc
    inputs = session.get_inputs()
    expected = {arg.name for arg in inputs}
    if set(arrays) != expected:
        raise RunnerError(
            f"{path}: input names {sorted(arrays)} do not match the model's {sorted(expected)}"
        )
    for arg in inputs:
        array, dtype = arrays[arg.name], input_dtype(arg)
        if array.dtype != dtype:
            raise RunnerError(
                f"{path}: input '{arg.name}' is {array.dtype}, the model expects {dtype}"
            )
        if arg.shape and array.ndim != len(arg.shape):
            raise RunnerError(
                f"{path}: input '{arg.name}' has shape {list(array.shape)}, "
                f"the model expects {arg.shape}"
            )
    return arrays


def output_checksums(outputs: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Shape, dtype, sum and absolute sum (float64) of each numeric output: cheap to compare."""
    sums: dict[str, dict[str, Any]] = {}
    for name, value in outputs.items():
        if isinstance(value, np.ndarray) and value.dtype.kind in "biuf":
            wide = value.astype(np.float64)
            sums[name] = {
                "shape": list(value.shape),
                "dtype": str(value.dtype),
                "sum": _json_number(float(wide.sum())),
                "abs_sum": _json_number(float(np.abs(wide).sum())),
            }
        elif isinstance(value, np.ndarray):
            sums[name] = {"shape": list(value.shape), "dtype": str(value.dtype)}
        else:  # sequences and maps (e.g. ZipMap) have no checksum here
            sums[name] = {"type": type(value).__name__}
    return sums


def _json_number(x: float) -> float | str:
    """Strict JSON has no NaN/Infinity: those become the strings "nan", "inf", "-inf"."""
    return x if math.isfinite(x) else str(x)


def save_outputs(outputs: Mapping[str, Any], path: str | Path) -> list[str]:
    """Write the tensor outputs to ``.npz`` atomically; returns the names written."""
    path = Path(path)
    arrays = {k: v for k, v in outputs.items() if isinstance(v, np.ndarray)}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, **arrays)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
    except OSError as exc:
        raise RunnerError(f"{path}: cannot write outputs ({_first_line(exc)})") from exc
    return sorted(arrays)


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file (the .onnx file only; external data files are not included)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _first_line(exc: BaseException) -> str:
    """The message folded onto one line (ORT's C++ errors span several), at most 300 chars."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


# ORT's own error types (not subclasses of RuntimeError); a model or feed ORT rejects is reported
# as one line rather than a traceback.
ORT_ERRORS: tuple[type[BaseException], ...] = tuple(
    getattr(ort.capi.onnxruntime_pybind11_state, name)
    for name in (
        "Fail", "InvalidArgument", "InvalidGraph", "InvalidProtobuf", "NoSuchFile", "NoModel",
        "NotImplemented", "NotFound", "RuntimeException", "EPFail",
    )
    if hasattr(ort.capi.onnxruntime_pybind11_state, name)
)


# ---------------------------------------------------------------------------------------------
# The script
# ---------------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line on stderr and exit code 2."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"error: {message} (see --help)\n")
        raise SystemExit(2)


def _build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="runner.py",
        description="Run an ONNX model with ONNX Runtime and print one JSON document: machine, "
        "model hash, load time, latency percentiles, peak memory, CPU time per inference "
        "and output checksums. Needs only numpy and onnxruntime.",
    )
    p.add_argument("model", help="the .onnx file, or a cascade.json written by onnxopt split")
    p.add_argument("--inputs", help=".npz with one array per model input (default: synthesized)")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: ORT's)")
    p.add_argument("--inter-op", type=int, default=None, help="inter-op threads")
    p.add_argument("--parallel", action="store_true", help="parallel execution mode")
    p.add_argument("--opt-level", choices=list(OPT_LEVELS), default="all")
    p.add_argument("--config", action="append", default=[], metavar="KEY=VALUE",
                   help="ORT session config entry, e.g. session.intra_op.allow_spinning=0")
    p.add_argument("--session-config", metavar="FILE",
                   help="session configuration JSON (onnxopt tune -o); the options above "
                   "override its values")
    p.add_argument("--no-cpu-mem-arena", action="store_true",
                   help="disable ORT's CPU memory arena")
    p.add_argument("--no-mem-pattern", action="store_true",
                   help="disable ORT's memory pattern planning")
    p.add_argument("--warmup", type=int, default=10, help="untimed runs first (default 10)")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--iterations", type=int, default=None, help="timed runs")
    budget.add_argument("--time-budget", type=float, default=None, metavar="S",
                        help=f"time the model for S seconds (default {DEFAULT_TIME_BUDGET_S})")
    p.add_argument("--shape", action="append", default=[], metavar="NAME=DIMS",
                   help="input shape (input=1x3x224x224) or symbolic dim (seq=128)")
    p.add_argument("--batch", type=int, default=1, help="size of a symbolic first dim (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of synthesized inputs (default 0)")
    p.add_argument("--outputs", help="write the outputs to this .npz")
    p.add_argument("--samples", action="store_true", help="include every latency sample")
    return p


def _parse_config(entries: Sequence[str]) -> dict[str, str]:
    config = {}
    for entry in entries:
        key, sep, value = entry.partition("=")
        if not sep or not key:
            raise RunnerError(f"bad --config '{entry}': expected KEY=VALUE")
        config[key] = value
    return config


def _session_arguments(args: argparse.Namespace) -> dict[str, Any]:
    """:func:`session_options` keywords: the --session-config file, then the flags over it."""
    options: dict[str, Any] = {"threads": None, "inter_op_threads": None, "parallel": False,
                               "config": {}, "cpu_mem_arena": True, "mem_pattern": True}
    if args.session_config:
        options.update(load_session_config(args.session_config))
    for key, value in (("threads", args.threads), ("inter_op_threads", args.inter_op)):
        if value is not None:
            options[key] = value
    options["parallel"] = options["parallel"] or args.parallel
    options["cpu_mem_arena"] = options["cpu_mem_arena"] and not args.no_cpu_mem_arena
    options["mem_pattern"] = options["mem_pattern"] and not args.no_mem_pattern
    options["config"] = {**options["config"], **_parse_config(args.config)}
    options["opt_level"] = args.opt_level
    return options


def _is_cascade(path: Path) -> bool:
    return path.suffix.lower() == ".json"


def run_script(args: argparse.Namespace) -> dict[str, Any]:
    """Everything the script does, as a JSON-able document; raises :class:`RunnerError`."""
    path = Path(args.model)
    if not path.is_file():
        raise RunnerError(f"{path}: no such file")
    for flag, value, low in (("--threads", args.threads, 1), ("--inter-op", args.inter_op, 1),
                             ("--iterations", args.iterations, 1), ("--warmup", args.warmup, 0),
                             ("--batch", args.batch, 1)):
        if value is not None and value < low:
            raise RunnerError(f"{flag} must be >= {low}, got {value}")
    if args.time_budget is not None and args.time_budget <= 0:
        raise RunnerError(f"--time-budget must be > 0, got {args.time_budget}")
    options = _session_arguments(args)
    shapes = parse_shapes(args.shape)
    rss_before = peak_rss_mb()
    start = time.perf_counter()
    try:
        if _is_cascade(path):
            session: Any = CascadeSession(path, **options)
        else:
            session = create_session(str(path), **options)
    except ORT_ERRORS as exc:
        raise RunnerError(f"{path}: ONNX Runtime cannot load it ({_first_line(exc)})") from exc
    load_s = time.perf_counter() - start
    if args.inputs:
        feeds, source = load_inputs(args.inputs, session), "npz"
    else:
        feeds = synthesize_inputs(session, batch=args.batch, shapes=shapes, seed=args.seed)
        source = "synthesized"
    try:
        outputs = run(session, feeds)
        stats = measure(session, feeds, warmup=args.warmup, iterations=args.iterations,
                        time_budget_s=args.time_budget, keep_samples=args.samples)
    except ORT_ERRORS as exc:
        raise RunnerError(f"{path}: ONNX Runtime cannot run it on these inputs "
                          f"({_first_line(exc)})") from exc
    written = save_outputs(outputs, args.outputs) if args.outputs else None
    return {
        "schema_version": SCHEMA_VERSION,
        "tool": "onnxopt.runner",
        "machine": machine_info(),
        "model": {"path": str(path.resolve()), "sha256": file_sha256(path),
                  "bytes": path.stat().st_size},
        "session": {**options, "providers": session.get_providers(),
                    "cascade_stages": len(session.stages) if _is_cascade(path) else None},
        "inputs": {name: {"shape": list(a.shape), "dtype": str(a.dtype), "source": source}
                   for name, a in feeds.items()},
        "seed": args.seed,
        "load_s": load_s,
        "latency": {k: v for k, v in stats.items() if k not in (
            "cpu_seconds_per_inference", "cpu_utilization", "rapl_joules_per_inference")},
        "energy_proxy": {
            "cpu_seconds_per_inference": stats["cpu_seconds_per_inference"],
            "cpu_utilization": stats["cpu_utilization"],
            "note": ENERGY_PROXY_NOTE,
        },
        "energy_rapl": None if stats["rapl_joules_per_inference"] is None else {
            "joules_per_inference": stats["rapl_joules_per_inference"], "note": RAPL_NOTE},
        "rss_before_load_mb": rss_before,
        "peak_rss_mb": peak_rss_mb(),
        "outputs": output_checksums(outputs),
        "outputs_file": None if written is None else {"path": str(Path(args.outputs).resolve()),
                                                      "names": written},
    }


def main(argv: Sequence[str] | None = None) -> int:
    """The script: print one JSON document on stdout; a user mistake is one stderr line, exit 2."""
    args = _build_parser().parse_args(argv)
    try:
        document = run_script(args)
    except RunnerError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    sys.stdout.write(json.dumps(document, indent=2, allow_nan=False) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
