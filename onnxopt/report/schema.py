"""The suite's results document (``results.json``): its schema, checks and accessors.

JSON is the source of truth: the HTML and Markdown reports and ``benchmarks/RESULTS.md`` are all
rendered from it, so a results file from any run can be re-rendered later (``onnxopt report``).

Schema (``schema_version`` 1)::

    {
      "schema_version": 1,
      "kind": "onnxopt.suite",
      "source": "suite" | "demo" | "optimize" | "bench",   # optional (default "suite"): what
                                                   # document it came from; renderers word by it
      "created": "2026-01-01T12:00:00+00:00",     # UTC, ISO 8601
      "command": "make bench",                     # the exact command that produced it
      "duration_s": 1234.5,
      "machine": {...},                            # onnxopt.runner.machine_info()
      "versions": {"onnx": "1.17.0", ...},         # every library that shapes the figures
      "settings": {"threads": [1, 2], "quick": false, "full": true, ...},
      "updates": [{"created", "command", "models": [...]}],   # optional: models re-run later
      "recipes": {"int8": ["fuse", "quantize"], ...},   # step names of every recipe run
      "models": [
        {
          "name": "torch-mlp",
          "description": "PyTorch MLP 784-128-64-10 trained on digits",
          "metric": "top1" | "cosine",             # the quality shown: top-1 % or cosine vs FP32
          "inputs": {"x": {"shape": [1, 784], "dtype": "float32"}},   # the latency feeds
          "data": {"calibration": 256, "tuning": 270, "evaluation": 450},  # samples of each
          "status": "ok" | "failed",
          "error": null | "one line",
          "build_s": 3.2,
          "load_average": [6.1, 5.8, 4.0],          # os.getloadavg() after the model
          "candidates": [                          # the first one is the FP32 reference
            {
              "name": "fp32" | "ort-dynamic" | "ort-static" | RECIPE,
              "kind": "reference" | "baseline" | "recipe",
              "status": "ok" | "budget-missed" | "not-applicable" | "failed" | "timeout",
              "error": null | "one line",
              "stats": {"params", "size_bytes", "zipped_bytes", "total_macs", "nodes"},
              "latency": {"1": {"p50_ms", "p90_ms", "speedup", "speedup_ci95": [lo, hi]},
                          "2": {...}},               # speed-up = p50(FP32) / p50, same run
              "peak_rss_mb": 123.0 | null,
              "quality": {"top1": 96.9 | null, "cosine": 0.9999, "sqnr_db": 41.0,
                          "max_abs": 0.01},          # worst output, against FP32
              "optimize_s": 1.5 | null,            # time in the passes (or the ORT quantizer)
              "wall_s": 4.0 | null,                # the whole optimization, verification included
              "steps": [                           # recipes only: the per-pass waterfall
                {"name": "fuse", "modified": true, "seconds": 0.2, "options": {...},
                 "budget": "...", "stats": {...}, "latency": {...}, "quality": {...},
                 "error": null, "notes": {...}}   # notes: the pass's own plain data
              ],
              "sensitivity": null | {"pass": "quantize", "metric": "sqnr_db",
                                     "rows": [{"node": "conv1", "value": 31.2, ...}]}
            }
          ],
          "benchmark": [...]                       # raw BenchmarkResult documents, per chunk
        }
      ]
    }

``stats`` values are those of :func:`onnxopt.stats.model_stats` (MACs at the benchmark's input
shapes). Every candidate has every key above; a figure that was not measured (a failed recipe,
a step ONNX Runtime cannot run) is ``null`` or missing inside ``stats``/``latency``/``quality``,
and renderers read figures through the accessors below, which return None for both.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from onnxopt.errors import InputError

SCHEMA_VERSION = 1
KIND = "onnxopt.suite"
STATUSES = ("ok", "budget-missed", "not-applicable", "failed", "timeout")
# Candidates whose model exists and was measured.
MEASURED = ("ok", "budget-missed")


# What ``onnxopt report`` takes, for the one-line refusal of anything else.
ACCEPTED = ("the suite's results.json, an 'onnxopt optimize --report' report.json, "
            "'onnxopt bench --json' output or the demo's report.json")


def load_results(path: str | Path) -> dict[str, Any]:
    """A results document from ``path``; other onnxopt JSON documents are converted.

    Accepted: the suite's ``results.json``, ``onnxopt optimize --report``'s ``report.json`` (a
    one-candidate waterfall), ``onnxopt bench --json`` output (a latency table) and ``onnxopt
    demo``'s ``report.json`` (two digit classifiers and their recipes).
    """
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise InputError("no such results file", path) from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"not a JSON results file ({exc})", path) from exc
    return as_suite_document(doc, path)


def as_suite_document(doc: Any, where: str | Path | None = None) -> dict[str, Any]:
    """``doc`` as a suite document, checked; see :func:`load_results` for what is accepted."""
    if not isinstance(doc, Mapping):
        raise InputError("results must be a JSON object", where)
    if doc.get("kind") == KIND:
        check(doc, where)
        return dict(doc)
    if "passes" in doc and "before" in doc:
        return _from_optimization_report(doc)
    if "rows" in doc and "models" in doc:
        return _from_benchmark(doc)
    if isinstance(doc.get("models"), Mapping) and "data" in doc:
        from onnxopt.report.from_demo import from_demo_report

        return from_demo_report(doc)
    raise InputError(f"not a document onnxopt writes; 'onnxopt report' takes {ACCEPTED}", where)


def check(doc: Mapping[str, Any], where: str | Path | None = None) -> None:
    """Raise :class:`InputError` naming the first thing a renderer could not handle."""
    if doc.get("schema_version") != SCHEMA_VERSION:
        raise InputError(f"results schema_version {doc.get('schema_version')!r} is not "
                         f"{SCHEMA_VERSION}", where)
    models = doc.get("models")
    if not isinstance(models, list):
        raise InputError("results have no 'models' list", where)
    for m in models:
        if not isinstance(m, Mapping) or not isinstance(m.get("name"), str):
            raise InputError("every model needs a 'name'", where)
        for c in m.get("candidates") or []:
            if not isinstance(c, Mapping) or not isinstance(c.get("name"), str):
                raise InputError(f"model '{m['name']}': every candidate needs a 'name'", where)
            if c.get("status") not in STATUSES:
                raise InputError(f"model '{m['name']}', candidate '{c['name']}': status "
                                 f"{c.get('status')!r} is not one of {', '.join(STATUSES)}", where)


# ----------------------------------------------------------------------------------------------
# Accessors: every renderer reads figures through these, so a missing figure is always None.


def speedup(entry: Mapping[str, Any], threads: int | str) -> float | None:
    """p50 speed-up over FP32 at ``threads`` of a candidate or a step, or None."""
    row = (entry.get("latency") or {}).get(str(threads)) or {}
    return _number(row.get("speedup"))


def p50_ms(entry: Mapping[str, Any], threads: int | str) -> float | None:
    row = (entry.get("latency") or {}).get(str(threads)) or {}
    return _number(row.get("p50_ms"))


def stat(entry: Mapping[str, Any], key: str) -> float | None:
    return _number((entry.get("stats") or {}).get(key))


def quality(entry: Mapping[str, Any], metric: str) -> float | None:
    """The model's quality metric (``top1`` in %, else ``cosine``) of a candidate or a step."""
    return _number((entry.get("quality") or {}).get(metric))


def reference(model: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The FP32 reference candidate of a model (the first, ``kind == "reference"``)."""
    for c in model.get("candidates") or []:
        if c.get("kind") == "reference":
            return c
    return None


def waterfall_steps(candidate: Mapping[str, Any]) -> list[dict[str, Any]]:
    """A recipe's steps, those whose model is the recipe's output carrying the candidate's figures.

    The output is the model after the last pass that changed it (later passes changed nothing):
    one file, so one set of figures. A checkpoint of it measured separately (it differs from the
    output only by the provenance stamp) would put a second, different speed-up for the same
    model on the page; the candidate's figures are those measured with the other candidates.
    """
    steps = [dict(s) for s in candidate.get("steps") or []]
    if candidate.get("status") not in MEASURED or not steps:
        return steps
    changed = [i for i, s in enumerate(steps) if s.get("modified", True)]
    for s in steps[changed[-1] if changed else 0:]:
        s["stats"] = {**(s.get("stats") or {}), **(candidate.get("stats") or {})}
        s["latency"] = dict(candidate.get("latency") or {})
        s["quality"] = {**(s.get("quality") or {}),
                        **{k: v for k, v in (candidate.get("quality") or {}).items()
                           if v is not None}}
    return steps


def thread_counts(doc: Mapping[str, Any]) -> list[str]:
    """Thread counts present in any candidate's latency, as strings, in ascending order."""
    found = {t for m in doc.get("models") or [] for c in m.get("candidates") or []
             for t in (c.get("latency") or {})}
    return sorted(found, key=int)


def candidate_names(doc: Mapping[str, Any], include_reference: bool = True) -> list[str]:
    """Candidate names over all models, in first-seen order (the reference first)."""
    names: list[str] = []
    for m in doc.get("models") or []:
        for c in m.get("candidates") or []:
            if c["name"] not in names and (include_reference or c.get("kind") != "reference"):
                names.append(c["name"])
    return names


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


# ----------------------------------------------------------------------------------------------
# Pareto front


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats: lower ``x`` (latency) and higher ``y`` (quality).

    A point is dominated when another is at least as good on both axes and better on one. Equal
    points are all kept. The indices come back sorted by ``x``, ready to draw the front as a line.
    """
    front = []
    for i, (x, y) in enumerate(points):
        dominated = any(
            (x2 <= x and y2 >= y) and (x2 < x or y2 > y)
            for j, (x2, y2) in enumerate(points) if j != i
        )
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: (points[i][0], -points[i][1]))


# ----------------------------------------------------------------------------------------------
# Other onnxopt documents as suite documents


def steps_from_passes(passes: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """An optimization report's pass records as waterfall steps; quality is the worst output
    cosine against the original model (the pipeline's drift), carried over unchanged passes."""
    def drift_quality(drift: Mapping[str, Any]) -> dict[str, Any]:
        cosines = [v.get("cosine") for v in drift.values() if isinstance(v, Mapping)]
        cosines = [c for c in cosines if _number(c) is not None]
        return {"top1": None, "cosine": min(cosines) if cosines else None}

    steps, last_quality = [], {"top1": None, "cosine": 1.0}
    for p in passes:
        if p.get("drift"):
            last_quality = drift_quality(p["drift"])
        steps.append({"name": p.get("name"), "modified": p.get("modified"),
                      "seconds": p.get("seconds"), "options": p.get("options") or {},
                      "budget": p.get("budget"), "stats": p.get("stats") or {}, "latency": {},
                      "quality": dict(last_quality), "notes": p.get("notes") or {}})
    return steps


def _from_optimization_report(rep: Mapping[str, Any]) -> dict[str, Any]:
    """``onnxopt optimize --report`` output: one model, the reference and one recipe's waterfall."""
    steps = steps_from_passes(rep.get("passes") or [])
    last_quality = dict(steps[-1]["quality"]) if steps else {"top1": None, "cosine": 1.0}
    recipe = str(rep.get("recipe", "recipe"))
    candidates = [
        _candidate("fp32", "reference", stats=rep.get("before"), quality={"cosine": 1.0}),
        _candidate(recipe, "recipe", stats=rep.get("after"), quality=dict(last_quality),
                   steps=steps, optimize_s=sum(s.get("seconds") or 0.0 for s in steps)),
    ]
    from onnxopt.report.sensitivity import find_sensitivity

    candidates[1]["sensitivity"] = find_sensitivity(steps)
    model = {"name": "model", "description": "from an onnxopt optimize report; fidelity is the "
             "worst output cosine against the original model on the verification inputs",
             "metric": "cosine", "inputs": {}, "status": "ok", "error": None, "build_s": None,
             "candidates": candidates, "benchmark": []}
    prov = rep.get("provenance") or {}
    versions = {"onnxopt": prov.get("version"), "onnxruntime": prov.get("onnxruntime_version")}
    return new_document([model], recipes={recipe: [s["name"] for s in steps]},
                     command="onnxopt optimize --report", machine={}, source="optimize",
                     versions={k: v for k, v in versions.items() if v})


def _from_benchmark(bench: Mapping[str, Any]) -> dict[str, Any]:
    """``onnxopt bench --json`` output: one model entry, one candidate per benchmarked file."""
    candidates = []
    keys = ("p50_ms", "p90_ms", "speedup", "speedup_ci95")
    for i, m in enumerate(bench.get("models") or []):
        rows = [r for r in bench.get("rows") or [] if r.get("model") == m.get("name")]
        latency = {str(r["threads"]): {k: r.get(k) for k in keys} for r in rows}
        rss = [r.get("peak_rss_mb") for r in rows]
        candidates.append(_candidate(
            str(m.get("name")), "reference" if i == 0 else "baseline", latency=latency,
            stats={"size_bytes": m.get("bytes")}, peak_rss_mb=rss[0] if rss else None))
    model = {"name": "bench",
             "description": "from onnxopt bench --json (speed-ups against the first)",
             "metric": "cosine", "inputs": bench.get("feeds") or {}, "status": "ok", "error": None,
             "build_s": None, "candidates": candidates, "benchmark": [dict(bench)]}
    return new_document([model], recipes={}, command="onnxopt bench",
                     machine=bench.get("machine") or {}, source="bench")


def _candidate(name: str, kind: str, **fields: Any) -> dict[str, Any]:
    """A candidate with every field present (``None`` where unknown)."""
    base: dict[str, Any] = {
        "name": name, "kind": kind, "status": "ok", "error": None, "stats": {}, "latency": {},
        "peak_rss_mb": None, "quality": {}, "optimize_s": None, "wall_s": None, "steps": [],
        "sensitivity": None,
    }
    base.update({k: v for k, v in fields.items() if v is not None})
    return base


def new_candidate(name: str, kind: str, **fields: Any) -> dict[str, Any]:
    """A candidate record with every schema field present; for producers of results."""
    return _candidate(name, kind, **fields)


def new_document(models: list[dict[str, Any]], *, recipes: dict[str, Any], command: str,
                 machine: Mapping[str, Any], source: str, versions: Mapping[str, Any] | None = None,
                 created: str | None = None, duration_s: float | None = None) -> dict[str, Any]:
    """A results document with every top-level field; for converters of other documents."""
    return {"schema_version": SCHEMA_VERSION, "kind": KIND, "source": source, "created": created,
            "command": command, "duration_s": duration_s, "machine": dict(machine),
            "versions": dict(versions or {}), "settings": {}, "recipes": recipes,
            "models": models}

