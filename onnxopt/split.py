"""Split a model into a cascade of sub-models that run one after another, each loaded on demand.

Why: a board with little memory may not hold a model's weights, ORT's copy of them and the
activations at once. Run as a cascade, a stage is loaded just before it runs and released
after, so the peak is about the largest stage plus the tensors passed between stages (the price
is the stages' load time on every inference). :class:`onnxopt.runner.CascadeSession` runs a
cascade, on a board too (``runner.py cascade.json``).

Where to cut: the nodes in topological order; a cut between two of them passes every tensor
produced before it and read after it (or a graph output). Cutting where those tensors are
smallest is not enough on its own (the smallest cut is usually right after the input, which
saves nothing), so the cuts first minimise the largest stage cost, ``weights of the stage +
bytes of tensors entering + bytes leaving``, an estimate of a stage's peak; then, among cut sets
whose largest stage cost is within ``slack`` of that optimum, they minimise the total bytes
crossing the cuts. Both are small dynamic programmes over cut positions (written here: no
library plans graph cuts by memory). Tensor sizes come from ONNX shape inference at the feeds'
shapes. Constants (initializers and what is computed from them alone) never cross a cut: a
stage that needs one gets its own copy.

Each stage is built with onnx_ir: a shallow clone of the model (weights shared, not copied)
whose inputs and outputs are set to the stage's boundary tensors, after which
``RemoveUnusedNodesPass`` drops every node the stage does not need. The cascade is verified
against the whole model with ORT's reference settings: outputs must be identical, bit for bit.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.passes.common as common

from onnxopt import runner
from onnxopt.errors import InputError, QualityGateError
from onnxopt.feeds import Feeds, check_feeds, load_feeds, synthesize_feeds
from onnxopt.model_io import load_model, one_line, save_model, write_bytes_atomic

Progress = Callable[[float, str], None]
DEFAULT_SLACK = 0.05
MANIFEST = "cascade.json"


@dataclasses.dataclass
class SplitPlan:
    """Cut positions in the topological order of the non-constant nodes, and what they cost."""

    nodes: list[ir.Node]  # non-constant nodes, topologically sorted
    cuts: list[int]  # 0 < c1 < c2 < ... < len(nodes): stage k holds nodes[cuts[k-1]:cuts[k]]
    crossing: list[list[str]]  # tensor names crossing each cut
    crossing_bytes: list[int]
    stage_weight_bytes: list[int]
    stage_cost_bytes: list[int]  # weights + tensors in + tensors out

    @property
    def bounds(self) -> list[tuple[int, int]]:
        edges = [0, *self.cuts, len(self.nodes)]
        return list(zip(edges[:-1], edges[1:], strict=True))


@dataclasses.dataclass
class SplitResult:
    """The written cascade, its verification and (when measured) its memory against the whole."""

    manifest: Path
    stages: list[dict[str, Any]]
    cuts: list[dict[str, Any]]
    verification: dict[str, Any]
    memory: dict[str, Any] | None

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self), default=str))

    def to_markdown(self) -> str:
        lines = ["| stage | file | nodes | weights MB | inputs | outputs |",
                 "|---:|---|---:|---:|---|---|"]
        for k, s in enumerate(self.stages):
            lines.append(f"| {k} | {s['file']} | {s['nodes']} | {s['weight_bytes'] / 2**20:.1f} "
                         f"| {_names(s['inputs'])} | {_names(s['outputs'])} |")
        lines.append("")
        for c in self.cuts:
            lines.append(f"cut after node '{c['after_node']}': {len(c['tensors'])} tensor(s), "
                         f"{c['bytes'] / 2**20:.2f} MB cross")
        v = self.verification
        lines.append(f"\noutputs vs the whole model ({v['settings']}): "
                     + ("identical" if v["identical"] else "DIFFERENT"))
        m = self.memory
        if m:
            lines.append(
                f"peak RSS (fresh runner process each, {m['settings']}): whole model "
                f"{m['whole_peak_rss_mb']:.0f} MB, cascade {m['cascade_peak_rss_mb']:.0f} MB "
                f"({m['reduction']:+.0%}); p50 latency {m['whole_p50_ms']:.2f} ms -> "
                f"{m['cascade_p50_ms']:.2f} ms (every inference loads each stage)")
        return "\n".join(lines) + "\n"


def _names(names: list[str], limit: int = 3) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" (+{len(names) - limit})" if len(names) > limit else "")


def plan_split(model: ir.Model, parts: int, *, feeds: Mapping[str, np.ndarray] | None = None,
               slack: float = DEFAULT_SLACK) -> SplitPlan:
    """Where to cut ``model`` (already topologically sorted, no dead nodes) into ``parts``."""
    if parts < 1:
        raise InputError(f"--parts must be >= 1, got {parts}")
    constant = _constant_values(model)
    nodes = [n for n in model.graph if not all(o in constant for o in n.outputs)]
    if parts > len(nodes):
        raise InputError(f"cannot split {len(nodes)} computing node(s) into {parts} parts")
    sizes = _value_bytes(model, feeds)
    n = len(nodes)
    index = {node: i for i, node in enumerate(nodes)}
    # Difference array: a tensor produced at a and last read at b crosses cuts a < p <= b.
    diff = np.zeros(n + 2, dtype=np.int64)
    spans: dict[ir.Value, tuple[int, int]] = {}
    outputs = set(model.graph.outputs)
    for value in _non_constant_values(model, constant):
        producer = value.producer()
        a = index[producer] if producer is not None else -1
        readers = [index[u.node] for u in value.uses() if u.node in index]
        b = n if value in outputs else max(readers, default=a)
        if b > a:
            spans[value] = (a, b)
            diff[a + 1] += sizes.get(value, 0)
            diff[b + 1] -= sizes.get(value, 0)
    cross = np.cumsum(diff)[: n + 1]  # cross[p]: bytes crossing between nodes[p-1] and nodes[p]
    weights = np.zeros(n + 1, dtype=np.int64)
    seen: set[ir.Value] = set()
    for i, node in enumerate(nodes):
        own = [v for v in node.inputs if v is not None and v in constant and v not in seen]
        seen.update(own)
        weights[i + 1] = weights[i] + sum(sizes.get(v, 0) for v in own)
    cuts = _best_cuts(weights, cross, parts, slack)
    crossing = [[v.name or "" for v, (a, b) in spans.items() if a < p <= b] for p in cuts]
    edges = [0, *cuts, n]
    bounds = list(zip(edges[:-1], edges[1:], strict=True))
    stage_weights = [int(weights[j] - weights[i]) for i, j in bounds]
    costs = [int(weights[j] - weights[i] + cross[i] + cross[j]) for i, j in bounds]
    return SplitPlan(nodes=nodes, cuts=cuts, crossing=crossing,
                     crossing_bytes=[int(cross[p]) for p in cuts],
                     stage_weight_bytes=stage_weights, stage_cost_bytes=costs)


def _best_cuts(weights: np.ndarray, cross: np.ndarray, parts: int, slack: float) -> list[int]:
    """Cut positions: least largest stage cost, then least total crossing within ``slack``."""
    n = len(weights) - 1
    inf = np.iinfo(np.int64).max // 4

    def cost(j: int) -> np.ndarray:  # cost of stages [i, j) for every i < j
        i = np.arange(j)
        return weights[j] - weights[i] + cross[i] + cross[j]

    # 1. least possible largest stage cost (minimax)
    best = np.full((parts + 1, n + 1), inf, dtype=np.int64)
    best[0, 0] = 0
    for k in range(1, parts + 1):
        for j in range(k, n + 1):
            best[k, j] = np.min(np.maximum(best[k - 1, :j], cost(j)))
    limit = best[parts, n] * (1.0 + slack)
    # 2. least total crossing among cut sets whose stages all cost at most `limit`
    total = np.full((parts + 1, n + 1), inf, dtype=np.int64)
    back = np.zeros((parts + 1, n + 1), dtype=np.int64)
    total[0, 0] = 0
    for k in range(1, parts + 1):
        for j in range(k, n + 1):
            options = np.where(cost(j) <= limit, total[k - 1, :j], inf)
            i = int(np.argmin(options))
            if options[i] < inf:
                total[k, j] = options[i] + (cross[j] if j < n else 0)
                back[k, j] = i
    cuts, j = [], n
    for k in range(parts, 0, -1):
        j = int(back[k, j])
        cuts.append(j)
    return sorted(cuts[:-1])  # the last one found is position 0


def _constant_values(model: ir.Model) -> set[ir.Value]:
    """Initializers and everything computed from them alone (copied into each stage needing
    them, never passed between stages)."""
    constant = set(model.graph.initializers.values())
    for node in model.graph:
        if all(v is None or v in constant for v in node.inputs):
            constant.update(node.outputs)
    return constant


def _non_constant_values(model: ir.Model, constant: set[ir.Value]) -> list[ir.Value]:
    values = [v for v in model.graph.inputs if v not in constant]
    for node in model.graph:
        values += [v for v in node.outputs if v not in constant and v.name]
    return values


def _value_bytes(model: ir.Model, feeds: Mapping[str, np.ndarray] | None) -> dict[ir.Value, int]:
    """Bytes of every value at the feeds' shapes (ONNX shape inference on a sized clone);
    dims that stay unknown count as 1."""
    sized = model.clone()
    for value in sized.graph.inputs:
        if feeds is not None and value.name in feeds:
            value.shape = ir.Shape(list(feeds[value.name].shape))
    try:
        common.ShapeInferencePass(strict_mode=False)(sized)
    except (ir.passes.PassError, onnx.shape_inference.InferenceError) as exc:
        raise InputError(f"shape inference failed ({one_line(exc)})") from exc
    original = _all_values(model)
    result = {}
    for clone_value, value in zip(_all_values(sized), original, strict=True):
        source = clone_value if clone_value.shape is not None else value
        result[value] = _bytes(source)
    return result


def _all_values(model: ir.Model) -> list[ir.Value]:
    values = list(model.graph.inputs) + list(model.graph.initializers.values())
    for node in model.graph:
        values += list(node.outputs)
    return values


def _bytes(value: ir.Value) -> int:
    if value.const_value is not None:
        return int(value.const_value.nbytes)
    dtype = value.dtype
    if dtype is None or value.shape is None:
        return 0
    count = 1
    for dim in value.shape:
        count *= dim if isinstance(dim, int) and dim > 0 else 1
    return count * dtype.itemsize


def split_model(
    model: ir.Model | onnx.ModelProto | str | Path,
    parts: int,
    out_dir: str | Path,
    *,
    feeds: Mapping[str, np.ndarray] | str | Path | None = None,
    shapes: Mapping[str, Any] | None = None,
    slack: float = DEFAULT_SLACK,
    measure_memory: bool = True,
    opt_level: str = "all",
    seed: int = 0,
    progress: Progress | None = None,
) -> SplitResult:
    """Split ``model`` into ``parts`` stages written to ``out_dir`` with a ``cascade.json``.

    The cascade's outputs are checked to be identical to the whole model's (ORT reference
    settings: optimizations off, one thread); ``QualityGateError`` otherwise. With
    ``measure_memory``, the whole model and the cascade each run in a fresh runner process to
    compare peak resident memory (and latency, which includes loading every stage).
    """
    report = progress or (lambda fraction, description: None)
    source = Path(model) if isinstance(model, (str, Path)) else None
    original = load_model(model, upgrade=False) if source is not None else _as_ir(model)
    work = original.clone()
    if any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
           for node in work.graph for a in node.attributes.values()):
        raise InputError("split does not handle control flow (If, Loop, Scan) yet", source)
    common.RemoveUnusedNodesPass()(work)
    common.TopologicalSortPass()(work)
    try:  # types (and symbolic shapes) of the tensors that will cross cuts
        common.ShapeInferencePass(strict_mode=False)(work)
    except (ir.passes.PassError, onnx.shape_inference.InferenceError) as exc:
        raise InputError(f"shape inference failed ({one_line(exc)})", source) from exc
    if isinstance(feeds, (str, Path)):
        the_feeds = load_feeds(feeds, work)
    elif feeds is not None:
        the_feeds = check_feeds(feeds, work)
    else:
        the_feeds = synthesize_feeds(work, shapes=dict(shapes or {}), seed=seed)
    report(0.05, "planning cuts")
    plan = plan_split(work, parts, feeds=the_feeds, slack=slack)
    out = Path(out_dir)
    stages, stage_models = [], []
    constant = _constant_values(work)
    graph_outputs = [v.name for v in work.graph.outputs]
    for k, (i, j) in enumerate(plan.bounds):
        report(0.1 + 0.3 * k / parts, f"building stage {k}")
        members = set(plan.nodes[i:j])
        later = set(plan.nodes[j:])
        inputs = _stage_inputs(plan.nodes[i:j], members, constant)
        outputs = [v for node in plan.nodes[i:j] for v in node.outputs
                   if v.name and v not in constant
                   and (v.name in graph_outputs or any(u.node in later for u in v.uses()))]
        if k == parts - 1:  # graph outputs that are constants come out of the last stage
            outputs += [v for v in work.graph.outputs if v in constant]
        stage = _extract(work, [v.name for v in inputs], [v.name for v in outputs])
        file = f"stage_{k}.onnx"
        save_model(stage, out / file, protect=source)
        stage_models.append(out / file)
        stages.append({"file": file, "inputs": [v.name for v in inputs],
                       "outputs": [v.name for v in outputs], "nodes": j - i,
                       "weight_bytes": plan.stage_weight_bytes[k],
                       "cost_bytes": plan.stage_cost_bytes[k]})
    manifest = {
        "schema": runner.CASCADE_SCHEMA, "schema_version": runner.CASCADE_VERSION,
        "source": {"path": None if source is None else str(source),
                   "graph": original.graph.name},
        "inputs": [{"name": v.name, "type": _ort_type(v),
                    "shape": [d if isinstance(d, int) else str(d) for d in (v.shape or [])]}
                   for v in work.graph.inputs],
        "outputs": graph_outputs,
        "stages": stages,
        "cuts": [{"after_node": plan.nodes[p - 1].name, "tensors": names, "bytes": size}
                 for p, names, size in zip(plan.cuts, plan.crossing, plan.crossing_bytes,
                                                 strict=True)],
    }
    manifest_path = write_bytes_atomic(json.dumps(manifest, indent=2).encode(), out / MANIFEST)
    report(0.45, "verifying the cascade")
    verification = verify_cascade(work, manifest_path, the_feeds)
    memory = None
    if measure_memory:
        report(0.6, "peak memory: whole model vs cascade")
        memory = measure_cascade_memory(source, work, manifest_path, the_feeds, opt_level)
    report(1.0, "done")
    return SplitResult(manifest=manifest_path, stages=stages, cuts=manifest["cuts"],
                       verification=verification, memory=memory)


def _as_ir(model: ir.Model | onnx.ModelProto) -> ir.Model:
    if isinstance(model, ir.Model):
        return model
    if isinstance(model, onnx.ModelProto):
        return ir.serde.deserialize_model(model)
    raise InputError(f"model is a {type(model).__name__}; expected a path, onnx_ir.Model or "
                     "onnx.ModelProto")


def _stage_inputs(nodes: list[ir.Node], members: set[ir.Node], constant: set[ir.Value]
                  ) -> list[ir.Value]:
    """Non-constant tensors the stage reads that come from outside it, in first-use order."""
    found: dict[ir.Value, None] = {}
    for node in nodes:
        for value in node.inputs:
            if value is None or value in constant or value in found:
                continue
            if value.producer() not in members:
                found[value] = None
    return list(found)


def _extract(model: ir.Model, inputs: list[str], outputs: list[str]) -> ir.Model:
    """A shallow clone of ``model`` computing ``outputs`` from ``inputs`` (names)."""
    stage = model.clone()
    graph = stage.graph
    by_name = {v.name: v for v in _all_values(stage) if v.name}
    new_inputs = []
    for name in inputs:
        value = by_name[name]
        if value.producer() is None:  # already a graph input
            new_inputs.append(value)
            continue
        fresh = ir.Value(name=name, type=value.type, shape=value.shape)
        value.name = f"{name}__before_cut"  # the producer is dropped with the other stages
        value.replace_all_uses_with(fresh)
        new_inputs.append(fresh)
    graph.outputs.clear()
    graph.outputs.extend(by_name[name] for name in outputs)
    graph.inputs.clear()
    graph.inputs.extend(new_inputs)
    common.RemoveUnusedNodesPass()(stage)
    for value in new_inputs:
        if value.type is None:
            raise InputError(f"the type of tensor '{value.name}' is unknown, so it cannot cross "
                             "a cut; run shape inference on the model first")
    stage.graph.name = f"{model.graph.name or 'model'}_stage"
    return stage


def _ort_type(value: ir.Value) -> str:
    """ORT's type string (``tensor(float)``) of a tensor value."""
    dtype = value.dtype
    if dtype is None:
        raise InputError(f"input '{value.name}' has no tensor type")
    wanted = np.dtype(dtype.numpy())
    for text, np_type in runner._ORT_DTYPES.items():
        if np.dtype(np_type) == wanted:
            return text
    raise InputError(f"input '{value.name}' has type {dtype}, which the cascade cannot feed")


def verify_cascade(model: ir.Model, manifest: Path, feeds: Feeds) -> dict[str, Any]:
    """Run the whole model and the cascade with ORT's reference settings; outputs must be
    identical (``QualityGateError`` otherwise)."""
    from onnxopt.model_io import to_proto

    whole = runner.reference_session(to_proto(model).SerializeToString())
    expected = runner.run(whole, feeds)
    del whole
    try:
        cascade = runner.CascadeSession(manifest, threads=1, opt_level="disabled",
                                        release_memory=False)
        got = runner.run(cascade, feeds)
    except runner.RunnerError as exc:
        raise InputError(str(exc), manifest) from exc
    different = [name for name in expected
                 if not np.array_equal(expected[name], got[name], equal_nan=True)]
    if different:
        raise QualityGateError(f"the cascade's outputs {different} differ from the whole "
                               "model's", manifest)
    return {"identical": True, "outputs": sorted(expected),
            "settings": "ORT reference: optimizations off, 1 thread"}


def measure_cascade_memory(source: Path | None, model: ir.Model, manifest: Path, feeds: Feeds,
                           opt_level: str = "all") -> dict[str, Any]:
    """Peak RSS and latency of the whole model and of the cascade, each in a fresh runner."""
    from onnxopt.targets import LocalTarget, RunOptions, agreement

    folder = manifest.parent
    whole = source if source is not None else save_model(model, folder / "whole.onnx")
    feeds_path = folder / "feeds.npz"
    np.savez(feeds_path, **feeds)
    options = RunOptions(opt_level=opt_level, warmup=1, iterations=3)
    target = LocalTarget()
    try:
        whole_doc = target.run(whole, options, inputs=feeds_path, outputs=folder / "whole.npz")
        cascade_doc = target.run(manifest, options, inputs=feeds_path,
                                 outputs=folder / "cascade.npz")
        with np.load(folder / "whole.npz") as a, np.load(folder / "cascade.npz") as b:
            agree = agreement(dict(a), dict(b))
    finally:
        for leftover in ("feeds.npz", "whole.npz", "cascade.npz"):
            (folder / leftover).unlink(missing_ok=True)
        if source is None:
            (folder / "whole.onnx").unlink(missing_ok=True)
    w, c = whole_doc["peak_rss_mb"], cascade_doc["peak_rss_mb"]
    return {
        "whole_peak_rss_mb": w, "cascade_peak_rss_mb": c,
        "reduction": (c - w) / w if w else None,
        "whole_p50_ms": whole_doc["latency"]["p50_ms"],
        "cascade_p50_ms": cascade_doc["latency"]["p50_ms"],
        "cpu_seconds_per_inference": {  # the energy proxy (every stage's load included)
            "whole": whole_doc["energy_proxy"]["cpu_seconds_per_inference"],
            "cascade": cascade_doc["energy_proxy"]["cpu_seconds_per_inference"],
            "note": runner.ENERGY_PROXY_NOTE},
        "rss_before_load_mb": whole_doc["rss_before_load_mb"],
        "outputs_at_settings": agree,
        "settings": f"ORT opt level {opt_level}, default threads, 1 warm-up + 3 runs",
    }
