"""``onnxopt demo``'s ``report.json`` as a results document, so the demo gets the same HTML page
as the suite (``report.html``) and ``onnxopt report demo-report/report.json`` renders it.

The demo measured everything once: per variant its file, top-1 on the test split, fidelity to
FP32, and latency from one interleaved benchmark. Those figures are copied, never recomputed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from onnxopt.report import schema
from onnxopt.report.sensitivity import find_sensitivity


def from_demo_report(report: Mapping[str, Any]) -> dict[str, Any]:
    """The demo's report: one model per classifier, FP32 first, then one candidate per recipe."""
    models = [_model(key, m) for key, m in (report.get("models") or {}).items()
              if isinstance(m, Mapping)]
    data = report.get("data") or {}
    recipes = {name: [s if isinstance(s, str) else str(s.get("pass")) for s in steps]
               for name, steps in (report.get("recipes") or {}).items()}
    doc = schema.new_document(
        models, recipes=recipes, command="onnxopt demo" + (" (quick)" if report.get("quick") else ""),
        machine=report.get("machine") or {}, source="demo", versions=report.get("versions"),
        duration_s=report.get("seconds"))
    doc["settings"] = {"data": data.get("source"), "test_samples": data.get("test")}
    return doc


def _model(key: str, model: Mapping[str, Any]) -> dict[str, Any]:
    rows = (model.get("benchmark") or {}).get("rows") or []
    candidates = []
    for name, v in (model.get("variants") or {}).items():
        candidates.append(_candidate(name, v, [r for r in rows if r.get("model") == name]))
    return {"name": key, "description": f"{model.get('title')} ({model.get('framework')}), "
            f"trained {model.get('epochs')} epochs on digits; top-1 on the held-out test split",
            "metric": "top1", "inputs": {}, "status": "ok", "error": None,
            "build_s": model.get("train_seconds"), "candidates": candidates,
            "benchmark": [model["benchmark"]] if model.get("benchmark") else []}


def _candidate(name: str, v: Mapping[str, Any], rows: list[Mapping[str, Any]]) -> dict[str, Any]:
    by_threads = {str(r.get("threads")): r for r in rows}
    latency = {}
    for t, lat in (v.get("latency") or {}).items():
        p90 = (by_threads.get(t) or {}).get("p90_ms")
        latency[t] = {**lat, "p90_ms": lat.get("p90_ms", p90)}
    rss = [r.get("peak_rss_mb") for r in rows if r.get("peak_rss_mb") is not None]
    fidelity = v.get("fidelity_vs_fp32") or {}
    cosines = [f.get("cosine") for f in fidelity.values() if isinstance(f, Mapping)]
    cosines = [c for c in cosines if isinstance(c, (int, float))]
    opt = v.get("optimization") or {}
    steps = schema.steps_from_passes(opt.get("passes") or [])
    for step in steps:  # the demo measured top-1 only on the final files
        step["quality"] = {"top1": None, "cosine": step["quality"].get("cosine")}
    stats = {"params": v.get("params"), "size_bytes": v.get("file_bytes"),
             "zipped_bytes": v.get("zipped_bytes"), "total_macs": v.get("total_macs"),
             "nodes": v.get("nodes")}
    return schema.new_candidate(
        name, "reference" if name == "fp32" else "recipe", stats=stats, latency=latency,
        peak_rss_mb=max(rss) if rss else None,
        quality={"top1": v.get("top1"), "cosine": min(cosines) if cosines else
                 (1.0 if name == "fp32" else None)},
        steps=steps, sensitivity=find_sensitivity(steps) if steps else None,
        optimize_s=sum(s.get("seconds") or 0.0 for s in steps) if steps else None)
