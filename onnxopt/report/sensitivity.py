"""Find per-layer sensitivity data in a recipe's pass notes, whatever shape the pass gave it.

The quantize pass puts its sensitivity ranking in its ``notes`` (plain data). Reports should not
break, nor need an edit, when a pass changes that shape, so this reads it generically: the first
value under a key containing ``sensitiv`` that is a list of records with a node name and numbers,
or a mapping from node name to a number or to such a record.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

NAME_KEYS = ("node", "name", "layer", "tensor", "op")
# Preferred metrics, most telling first; otherwise the first numeric field of the records.
METRIC_PREFERENCE = ("sqnr_db", "sqnr", "accuracy_drop", "drop", "delta", "cosine", "mse")
MAX_ROWS = 40
# Non-numeric fields kept with each row when present: what the node is and what became of it.
DESCRIPTIVE = ("op_type", "int8", "reason")
# Numbers that describe a node's size, not how sensitive it is: never chosen as the metric.
NOT_SENSITIVITY = ("macs", "mac_share", "params", "index", "count")


def find_sensitivity(steps: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """``{"pass", "metric", "rows": [{"node", "value", ...}]}`` from the first step that has one."""
    for step in steps:
        found = _search(step.get("notes") or {}, depth=0)
        if found is not None:
            metric, rows = found
            return {"pass": step.get("name"), "metric": metric,
                    "rows": _most_sensitive(metric, rows)}
    return None


def _search(notes: Any, depth: int) -> tuple[str, list[dict[str, Any]]] | None:
    if depth > 4 or not isinstance(notes, Mapping):
        return None
    for key, value in notes.items():
        if "sensitiv" in str(key).lower():
            rows = _rows(value)
            metric = _metric(rows) if rows else None
            if metric is not None:
                return metric, rows
    for value in notes.values():
        found = _search(value, depth + 1)
        if found is not None:
            return found
    return None


def _rows(value: Any) -> list[dict[str, Any]]:
    """Records ``{"node": str, <numbers>...}`` from a list of records or a name-keyed mapping."""
    rows: list[dict[str, Any]] = []
    if isinstance(value, Mapping):
        inner = [v for k, v in value.items() if k in ("rows", "nodes", "layers", "ranking")]
        if inner:
            return _rows(inner[0])
        for name, v in value.items():
            if _is_number(v):
                rows.append({"node": str(name), "value": float(v)})
            elif isinstance(v, Mapping):
                rows.append({"node": str(name), **_numbers(v)})
    elif isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        for v in value:
            if not isinstance(v, Mapping):
                continue
            name = next((str(v[k]) for k in NAME_KEYS if isinstance(v.get(k), str)), None)
            if name is not None:
                rows.append({"node": name, **_numbers(v)})
    return [r for r in rows if any(_is_number(v) for v in r.values())]


def _numbers(record: Mapping[str, Any]) -> dict[str, Any]:
    """The record's numbers, plus the short descriptive fields a reader wants next to them."""
    kept: dict[str, Any] = {str(k): float(v) for k, v in record.items() if _is_number(v)}
    for key in DESCRIPTIVE:
        value = record.get(key)
        if isinstance(value, bool) or (isinstance(value, str) and len(value) <= 200):
            kept[key] = value
    return kept


def _metric(rows: list[dict[str, Any]]) -> str | None:
    """The preferred metric some row has a value for; else the first other number that is not a
    size (MACs, parameters); None when no row measured anything."""
    keys: list[str] = []
    for r in rows:
        keys += [k for k, v in r.items() if _is_number(v) and k not in keys]
    for preferred in METRIC_PREFERENCE:
        if preferred in keys:
            return preferred
    others = [k for k in keys if k not in NOT_SENSITIVITY]
    return others[0] if others else None


def _most_sensitive(metric: str, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows with the metric as ``value``, most sensitive first (low SQNR/cosine, high drop)."""
    usable = [{**r, "value": r[metric]} for r in rows if _is_number(r.get(metric))]
    ascending = "sqnr" in metric or "cosine" in metric
    usable.sort(key=lambda r: r["value"] if ascending else -r["value"])
    return usable[:MAX_ROWS]


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
