"""``share-weights``: k-means weight clustering stored as packed codes + codebook, and merging of
near-identical tensors.

Clustering (Deep Compression, Han et al. 2016): each weight tensor's values are replaced by the
nearest of ``2**bits`` centroids found by 1-D k-means, initialised linearly between the smallest
and largest value (linear initialisation keeps the rare large weights, which matter most, as
centroids). Exact zeros keep a code of their own, so pruned weights stay pruned. A tensor with no
more distinct values than centroids is reproduced exactly. With calibration data the centroids
(and the layer's bias) are then refit by least squares, the assignment fixed, so each layer
reproduces the outputs of the model the pass received (in place of the paper's fine-tuning).
Then the codes themselves are reassigned with GPTQ's error feedback
(:func:`onnxopt.passes.compress._refit.assign_codes`: one input at a time, its rounding error spread
over the inputs not coded yet through the inverse input Hessian) and the centroids refit again;
whichever assignment reconstructs the layer better is kept. On a pruned digits LeNet-5 at 2-3
bits this took the layers' relative output errors down by 30-50% and test top-1 up at every
configuration tried (``benchmarks/RESULTS.md``, "Deep Compression").

Storage (:mod:`onnxopt.passes.compress._storage`): codes as UINT2 (bits <= 2, opset 25), UINT4
(bits <= 4, opset 21; the model is moved to the opset by onnxscript's version converter) or UINT8,
densely or only for nonzeros
(whichever is smaller), feeding ``Gather(codebook, Cast(codes))``. All inputs are constants, so
ONNX Runtime folds the decoding into a dense weight at session load: run time is unchanged.

Merging: tensors of equal shape whose relative L2 distance is within ``merge_tolerance`` are
replaced by their mean and stored once (the "w_i = w_(i-1)" sharing), on top of onnx_ir's exact
de-duplication, which this pass runs first for tensors of any size.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes
from onnxopt.passes.compress import _refit as layer_refit
from onnxopt.passes.compress import _storage as weight_storage
from onnxopt.passes.compress._layers import WEIGHT_OPS, Layer, check_patterns, find_layers, first_match
from onnxopt.passes.compress.prune import unique_layers

from onnxopt.metrics import Budget
from onnxopt.model_io import release_mapping, release_mappings
from onnxopt.registry import OptPass, option, register
from onnxopt.stats import model_stats

UINT4_OPSET = 21  # Cast from UINT4 exists from opset 21
UINT2_OPSET = 25  # ... and from UINT2 from opset 25
IndexChoice = Literal["auto", "uint4", "uint8"]


@dataclasses.dataclass
class ShareWeightsConfig:
    conv_bits: int = option(8, "Bits per Conv weight (2**bits centroids, zero included).")
    fc_bits: int = option(5, "Bits per Gemm/MatMul weight (fully connected layers tolerate fewer).")
    layer_bits: dict[str, int] = option(
        {}, "Bits per layer pattern (fnmatch on node name, op type or weight name; 're:' prefix "
        "for a regex), first match wins.")
    exclude: list[str] = option([], "Layers left as they are (same patterns).")
    ops: list[str] = option(list(WEIGHT_OPS), "Op types whose constant weight is clustered.")
    min_elements: int = option(256, "Weights with fewer elements are left alone (the codebook "
                               "would not pay for itself).")
    iterations: int = option(50, "Most k-means (Lloyd) iterations per tensor.", min=1)
    refit: bool = option(True, "Refit centroids and biases by least squares on the calibration "
                         "data (the assignment fixed).")
    damp: float = option(1e-3, "Ridge term of the centroid refit, relative to its mean diagonal.")
    assign: Literal["gptq", "nearest"] = option(
        "gptq", "With refit data, 'gptq': code each layer's inputs one at a time, the rounding "
        "error of each spread over the inputs not coded yet (GPTQ's error feedback), then refit "
        "the centroids, and keep whichever of this and 'nearest' reconstructs the layer better; "
        "'nearest': every weight to its nearest centroid (Deep Compression's k-means).")
    calibration_rows: int = option(200_000, "Most activation rows per layer the refit reads.")
    merge_tolerance: float = option(
        1e-3, "Merge weight tensors of equal shape whose relative L2 distance is at most this "
        "(0: byte-identical ones only).")
    index_dtype: IndexChoice = option(
        "auto", "'auto': the narrowest codes a layer's bits fit, UINT2 (at most 2 bits; moves "
        "the model to opset 25), UINT4 (at most 4 bits; opset 21) or UINT8; 'uint4': at most "
        "opset 21, for older ONNX Runtimes; 'uint8': always UINT8 and the opset is left as it is.")
    min_cosine: float = option(
        0.98, "Verification budget: cosine similarity of every output against the model "
        "received, on the verification inputs (0 disables it).", max=1)

    def __post_init__(self) -> None:
        for name, bits in [("conv_bits", self.conv_bits), ("fc_bits", self.fc_bits),
                           *[(f"layer_bits[{k}]", v) for k, v in self.layer_bits.items()]]:
            if not 2 <= int(bits) <= 8:
                raise ValueError(f"{name} must be between 2 and 8, got {bits}")
        if self.merge_tolerance < 0:
            raise ValueError("merge_tolerance must be >= 0")
        check_patterns([*self.exclude, *self.layer_bits])


@dataclasses.dataclass
class Clustered:
    """A clustered tensor: ``codebook[codes]`` has the weight's shape."""

    codes: np.ndarray  # uint8, the weight's shape
    codebook: np.ndarray  # float32; codebook[0] == 0 when ``zero_code``
    zero_code: bool

    def values(self) -> np.ndarray:
        return self.codebook[self.codes]


@register
class ShareWeightsPass(OptPass):
    name = "share-weights"
    summary = ("Cluster Conv/Gemm/MatMul weights by k-means (2-8 bits, zeros kept) into packed "
               "codes + codebook; merge near-identical tensors.")
    Config = ShareWeightsConfig

    def budget(self) -> Budget:
        # Lossy: a cosine floor on the outputs; deep-compress checks top-1 accuracy instead.
        cfg: ShareWeightsConfig = self.config
        return Budget.cosine_floor(cfg.min_cosine)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        cfg: ShareWeightsConfig = self.config
        before = model_stats(model)
        # Hashed: the plain pass keys a dict by every tensor's bytes, a copy of all weights.
        exact = common_passes.DeduplicateHashedInitializersPass(size_limit=1 << 62)(model).modified
        release_mappings(model)  # hashing read every weight; each is mapped again when used
        layers = select_layers(model, cfg)
        bits = [layer_bits(layer, cfg) for layer in layers]
        if upgrade_for_codes(model, bits, cfg.index_dtype):
            layers = select_layers(model, cfg)
        index = index_dtype_for(model, cfg.index_dtype)
        batches = self.context.calibration if cfg.refit else None
        references = [(layer.to_rows(layer.weight_array()), layer.bias_array()) if batches else None
                      for layer in layers]  # what the refit reconstructs; no refit, no copies
        ref_inputs = (layer_refit.capture(model, [layer.input for layer in layers], batches)
                      if batches and layers else None)
        merged = merge_near_duplicates(model.graph, layers, cfg.merge_tolerance)
        layers = select_layers(model, cfg) if merged else layers
        with layer_refit.single_threaded_blas():
            records = cluster_layers(model, layers, bits, references, ref_inputs, batches, cfg,
                                     index)
        weight_storage.remove_unused(model)
        after = model_stats(model)
        self.notes = {
            "layers": records,
            "merged": merged,
            "exact_duplicates_removed": exact,
            "refit": bool(batches),
            "opset": model.opset_imports.get("", None),
            "bytes_before": before.size_bytes, "bytes_after": after.size_bytes,
            "zipped_before": before.zipped_bytes, "zipped_after": after.zipped_bytes,
        }
        modified = exact or bool(merged) or any(r["storage"] != "unchanged" for r in records)
        if not modified:  # said on the console (the CLI prints notes["warning"])
            self.notes["warning"] = "nothing shared: " + (
                "every selected layer kept its storage (see 'layers')" if records else
                f"no layer selected: no {'/'.join(cfg.ops)} constant weight of at least "
                f"{cfg.min_elements} elements outside 'exclude'")
        return ir.passes.PassResult(model, modified)


def select_layers(model: ir.Model, cfg: ShareWeightsConfig) -> list[Layer]:
    return unique_layers(find_layers(model, ops=cfg.ops, exclude=cfg.exclude,
                                     min_elements=cfg.min_elements))


def layer_bits(layer: Layer, cfg: ShareWeightsConfig) -> int:
    own = first_match(layer, dict(cfg.layer_bits))
    if own is not None:
        return int(own)  # type: ignore[arg-type]
    return cfg.conv_bits if layer.kind == "conv" else cfg.fc_bits


def upgrade_for_codes(model: ir.Model, bits: Sequence[int], requested: str) -> bool:
    """Move the model to the opset whose Cast reads the narrowest codes ``bits`` and
    ``requested`` allow (25 for UINT2, else 21 for UINT4), with onnxscript's converter; if that
    fails, to 21. Whether the model was converted."""
    smallest = min(bits, default=8)
    targets = [UINT2_OPSET] if requested == "auto" and smallest <= 2 else []
    targets += [UINT4_OPSET] if requested in ("auto", "uint4") and smallest <= 4 else []
    from onnxscript import version_converter

    for target in targets:
        if model.opset_imports.get("", 0) >= target:
            return False
        try:
            version_converter.convert_version(model, target)
        except (ValueError, NotImplementedError, RuntimeError):
            continue
        if model.opset_imports.get("", 0) >= target:
            return True
    return False


def index_dtype_for(model: ir.Model, requested: str) -> weight_storage.IndexDtype:
    """The narrowest code type the request and the model's opset allow."""
    opset = model.opset_imports.get("", 0)
    if requested == "auto" and opset >= UINT2_OPSET:
        return "uint2"
    return "uint4" if requested in ("auto", "uint4") and opset >= UINT4_OPSET else "uint8"


def code_dtype(index: weight_storage.IndexDtype, centroids: int) -> weight_storage.IndexDtype:
    """The narrowest code type, no wider than ``index``, that holds ``centroids`` codes."""
    if index == "uint2" and centroids <= 4:
        return "uint2"
    return "uint4" if index in ("uint2", "uint4") and centroids <= 16 else "uint8"


# ---------------------------------------------------------------------------------------- k-means
def kmeans_1d(values: np.ndarray, k: int, iterations: int = 50, chunk: int = 1 << 20
              ) -> tuple[np.ndarray, np.ndarray]:
    """Lloyd's algorithm on scalars with linear initialisation: ``(centroids, assignment)``.

    In 1-D the nearest centroid is found by bisection on the midpoints, so one iteration costs
    O(n log k); no library offers 1-D k-means with this initialisation without the n x k distances.
    It works a chunk at a time and keeps the assignment in the smallest integer type, so a layer
    of 16 M weights needs tens of MB beside them, not the ~0.6 GB of whole-array float64 and
    int64 temporaries (big models: peak memory).
    """
    v = values.reshape(-1)
    centroids = np.linspace(float(v.min()), float(v.max()), k)
    assignment = np.empty(v.size, dtype=np.min_scalar_type(k - 1))
    spans = [(start, min(start + chunk, v.size)) for start in range(0, v.size, chunk)]

    def nearest(lo: int, hi: int) -> np.ndarray:
        return np.searchsorted((centroids[:-1] + centroids[1:]) / 2,
                               v[lo:hi].astype(np.float64)).astype(assignment.dtype)

    for lo, hi in spans:
        assignment[lo:hi] = nearest(lo, hi)
    for _ in range(iterations):
        sums = np.zeros(k)
        counts = np.zeros(k, dtype=np.int64)
        for lo, hi in spans:
            sums += np.bincount(assignment[lo:hi], weights=v[lo:hi].astype(np.float64),
                                minlength=k)
            counts += np.bincount(assignment[lo:hi], minlength=k)
        filled = counts > 0
        centroids[filled] = sums[filled] / counts[filled]
        centroids.sort()
        moved = False
        for lo, hi in spans:
            new = nearest(lo, hi)
            moved = moved or not np.array_equal(new, assignment[lo:hi])
            assignment[lo:hi] = new
        if not moved:
            break
    return centroids, assignment


def cluster(array: np.ndarray, bits: int, iterations: int = 50) -> Clustered:
    """``2**bits`` shared values for ``array``; exact zeros keep code 0 = 0.0.

    Only centroids that some weight uses are kept, so the codebook may be shorter than 2**bits.
    """
    flat = array.reshape(-1)
    zero = flat == 0
    zero_code = bool(zero.any())
    k = 2**bits - (1 if zero_code else 0)
    nonzero = flat[~zero]
    codes = np.zeros(flat.size, dtype=np.uint8)
    if nonzero.size == 0:
        return Clustered(codes.reshape(array.shape), np.zeros(1, np.float32), True)
    distinct = _distinct_if_at_most(nonzero, k)
    if distinct is not None:  # nothing to approximate: the values are the codebook
        centroids = distinct.astype(np.float64)
        assignment = np.searchsorted(distinct, nonzero).astype(np.uint8)
    else:
        centroids, assignment = kmeans_1d(nonzero, k, iterations)
        used = np.unique(assignment)
        remap = np.zeros(k, dtype=assignment.dtype)
        remap[used] = np.arange(used.size)
        centroids, assignment = centroids[used], remap[assignment]
    codes[~zero] = assignment + (1 if zero_code else 0)  # k <= 255 when a zero code is taken
    codebook = np.concatenate([[0.0] if zero_code else [], centroids]).astype(np.float32)
    return Clustered(codes.reshape(array.shape), codebook, zero_code)


def _distinct_if_at_most(values: np.ndarray, k: int, sample: int = 4096) -> np.ndarray | None:
    """The sorted distinct values when there are at most ``k``, else None. A strided sample
    with more than ``k`` settles it without sorting a copy of every weight."""
    step = max(1, values.size // sample)
    if np.unique(values[::step]).size > k:
        return None
    distinct = np.unique(values)
    return distinct if distinct.size <= k else None


# ---------------------------------------------------------------------------------------- merging
def merge_near_duplicates(graph: ir.Graph, layers: Sequence[Layer], tolerance: float
                          ) -> list[dict[str, Any]]:
    """Store weights of equal shape within ``tolerance`` (relative L2) once, as their mean.

    Weights are read again for every pair instead of being held: keeping every weight of a shape
    in float64 at once cost twice the model's size (a 2.3 GB model peaked at 3.4x its size).
    """
    if tolerance <= 0:
        return []
    groups: dict[tuple[tuple[int, ...], str], list[Layer]] = {}
    for layer in layers:
        array = layer.weight_array()
        groups.setdefault((array.shape, str(array.dtype)), []).append(layer)
    merged: list[dict[str, Any]] = []
    for members in groups.values():
        if len(members) < 2:
            continue
        norms = [_distance(None, m) for m in members]
        taken = [False] * len(members)
        for i in range(len(members)):
            if taken[i]:
                continue
            base = members[i].weight_array()
            distance = {j: _distance(base, members[j])
                        for j in range(i + 1, len(members)) if not taken[j]}
            group = [i] + [j for j, d in distance.items()
                           if d <= tolerance * max(norms[i], norms[j])]
            total = base.astype(np.float64) if len(group) > 1 else None
            del base
            release_mapping(members[i].weight.const_value)
            if total is None:
                continue
            for j in group[1:]:
                total += members[j].weight_array()
            mean = (total / len(group)).astype(np.float32)
            keep = members[i]
            keep.weight = weight_storage.store_dense(graph, keep.weight, mean)
            for j in group[1:]:
                taken[j] = True
                members[j].weight.replace_all_uses_with(keep.weight)
                merged.append({"layer": members[j].name, "into": keep.name,
                               "relative_distance": round(distance[j] / max(norms[i], 1e-30), 8)})
    return merged


def _distance(base: np.ndarray | None, layer: Layer, chunk: int = 1 << 20) -> float:
    """L2 norm of ``layer``'s weight minus ``base`` (or of the weight alone) in float64, a chunk at
    a time so no float64 copy of a whole weight is made; then the weight is unmapped if it is a
    big model's, so comparing all pairs does not keep every page resident."""
    weight = layer.weight_array().reshape(-1)
    flat = None if base is None else base.reshape(-1)
    total = 0.0
    for start in range(0, weight.size, chunk):
        part = weight[start:start + chunk].astype(np.float64)
        if flat is not None:
            part -= flat[start:start + chunk]
        total += float(np.dot(part, part))
    del weight
    release_mapping(layer.weight.const_value)
    return math.sqrt(total)


# ---------------------------------------------------------------------------------------- layers
@dataclasses.dataclass
class LayerResult:
    """A layer's clustered weight, its (refit) bias, and the report fields so far."""

    clustered: Clustered
    bias: np.ndarray | None
    record: dict[str, Any]


def cluster_layers(model: ir.Model, layers: Sequence[Layer], bits: Sequence[int],
                   references: Sequence[tuple[np.ndarray, np.ndarray | None] | None],
                   ref_inputs: list[list[np.ndarray]] | None, batches: Any,
                   cfg: ShareWeightsConfig, index: weight_storage.IndexDtype
                   ) -> list[dict[str, Any]]:
    """Cluster, refit and store each layer in graph order; one report row per layer."""
    records = []
    changed = False
    for i, (layer, b) in enumerate(zip(layers, bits)):
        result = cluster_layer(model, layer, b, references[i],
                               None if ref_inputs is None else ref_inputs[i], batches,
                               changed, cfg)
        original = layer.weight.const_value
        record = write_result(model.graph, layer, result, index)
        release_mapping(original)
        records.append(record)
        changed = changed or record["storage"] != "unchanged"
    return records


def cluster_layer(model: ir.Model, layer: Layer, bits: int,
                  reference: tuple[np.ndarray, np.ndarray | None] | None,
                  ref_inputs: list[np.ndarray] | None, batches: Any, changed: bool,
                  cfg: ShareWeightsConfig, stats: layer_refit.LayerStats | None = None
                  ) -> LayerResult:
    """Cluster one layer (and refit it when reference inputs are given); nothing is written.

    ``changed``: whether an earlier layer was changed, so that this layer's inputs must be read
    from the model again rather than taken from ``ref_inputs``. ``stats``: the refit's
    statistics, when the caller has them already (then nothing is captured).
    """
    weight = layer.weight_array()
    record: dict[str, Any] = {"layer": layer.name, "op": layer.node.op_type,
                              "weights": int(weight.size), "bits": bits,
                              "kept": int(np.count_nonzero(weight)),
                              "bytes_fp32": int(weight.size * 4)}
    fmt = weight_storage.stored_format(layer.weight)
    distinct = (_distinct_if_at_most(weight.reshape(-1), 2**bits)
                if fmt in ("codebook", "sparse-codebook") else None)
    if distinct is not None:  # already a codebook this small
        record.update(storage="unchanged", codebook=int(distinct.size))
        return LayerResult(cluster(weight, bits, cfg.iterations), layer.bias_array(), record)
    clustered = cluster(weight, bits, cfg.iterations)
    bias = layer.bias_array()
    refittable = stats is not None or (ref_inputs is not None and batches)
    if refittable and len(layer.weight.uses()) == 1 and layer_refit.can_refit(layer):
        clustered, bias, errors = refit_codebook(model, layer, clustered, bias, reference,
                                                 ref_inputs, batches, changed, cfg, stats)
        record.update(errors)
    return LayerResult(clustered, bias, record)


def write_result(graph: ir.Graph, layer: Layer, result: LayerResult,
                 index: weight_storage.IndexDtype) -> dict[str, Any]:
    """Store a layer's clustered weight and bias; returns its report row."""
    record = dict(result.record)
    if record.get("storage") == "unchanged":
        return record
    record.update(store_clustered(graph, layer, result.clustered, index))
    if result.bias is not None and layer.bias is not None:
        stored = weight_storage.read_weight(layer.bias)
        assert stored is not None
        layer.bias = weight_storage.store_dense(graph, layer.bias,
                                                layer.bias_to_stored(result.bias, stored))
    return record


def refit_codebook(model: ir.Model, layer: Layer, clustered: Clustered, bias: np.ndarray | None,
                   reference: tuple[np.ndarray, np.ndarray | None],
                   ref_inputs: list[np.ndarray] | None, batches: Any, changed: bool,
                   cfg: ShareWeightsConfig, stats: layer_refit.LayerStats | None = None
                   ) -> tuple[Clustered, np.ndarray | None, dict[str, float]]:
    """Least-squares centroids (and bias) for ``layer``, then with ``assign: gptq`` error-feedback
    codes; keeps the k-means result when neither reconstructs the layer better."""
    if stats is None:
        assert ref_inputs is not None
        inputs = (layer_refit.capture(model, [layer.input], batches)[0] if changed
                  else ref_inputs)
        stats = layer_refit.accumulate(layer, inputs, ref_inputs, reference[0], reference[1],
                                       max_rows=cfg.calibration_rows)
    codes_rows = layer.layout(clustered.codes)
    before = layer_refit.reconstruction_error(
        stats, clustered.codebook[codes_rows] * layer.scale, bias)
    codebook, new_bias = layer_refit.solve_codebook(
        stats, codes_rows, clustered.codebook.astype(np.float64) * layer.scale, bias,
        fixed_zero=clustered.zero_code, damp=cfg.damp)
    after = layer_refit.reconstruction_error(stats, codebook[codes_rows], new_bias)
    errors = {"error_cluster": round(float(before), 6), "error_refit": round(float(after), 6)}
    best = (before, codes_rows, clustered.codebook.astype(np.float64) * layer.scale, bias)
    if after < before:
        best = (after, codes_rows, codebook, new_bias)
    if cfg.assign == "gptq":
        best = _error_feedback_codes(layer, stats, clustered.zero_code, bias, best, cfg)
        errors["error_gptq"] = round(float(best[0]), 6)
    if best[0] >= before:
        return clustered, bias, errors
    _, codes_rows, codebook, new_bias = best
    refit = Clustered(layer.unlayout(codes_rows.astype(np.uint8), clustered.codes),
                      (codebook / layer.scale).astype(np.float32), clustered.zero_code)
    return refit, None if new_bias is None else new_bias.astype(np.float32), errors


Coded = tuple[float, np.ndarray, np.ndarray, np.ndarray | None]  # error, code rows, book, bias


def _error_feedback_codes(layer: Layer, stats: layer_refit.LayerStats, zero_code: bool,
                          bias: np.ndarray | None, best: Coded, cfg: ShareWeightsConfig) -> Coded:
    """Recode the layer with GPTQ's error feedback, starting from its least-squares weights on
    these statistics, and refit the centroids; twice (the second pass on the refit centroids).
    Returns whichever of ``best`` and these has the least reconstruction error."""
    keep = best[1] != 0 if zero_code else np.ones(best[1].shape, dtype=bool)
    rows = layer.layout(layer.weight_array()).astype(np.float64) * layer.scale
    start, start_bias = layer_refit.solve_masked(stats, rows, bias, keep, damp=cfg.damp)
    codebook = best[2]
    for _ in range(2):
        codes, _ = layer_refit.assign_codes(stats, start, start_bias, keep, codebook,
                                            zero_code=zero_code, damp=cfg.damp)
        codebook, fitted_bias = layer_refit.solve_codebook(stats, codes, codebook, bias,
                                                           fixed_zero=zero_code, damp=cfg.damp)
        error = layer_refit.reconstruction_error(stats, codebook[codes], fitted_bias)
        if error < best[0]:
            best = (error, codes, codebook, fitted_bias)
    return best


def store_clustered(graph: ir.Graph, layer: Layer, clustered: Clustered,
                    index: weight_storage.IndexDtype) -> dict[str, Any]:
    """Encode as dense or sparse codes, whichever is smaller; report what was written."""
    dtype = code_dtype(index, clustered.codebook.size)
    dense = weight_storage.codebook_bytes(clustered.codes, clustered.codebook, dtype, sparse=False)
    # Sparse storage costs at least a gap byte and a code per nonzero; below that bound it is
    # not built just to be measured (on a big layer, ~0.8 GB of int64 temporaries).
    nonzero = int(np.count_nonzero(clustered.codes)) if clustered.zero_code else clustered.codes.size
    may_pay = nonzero + weight_storage.code_bytes(nonzero, dtype) + clustered.codebook.nbytes < dense
    sparse = (weight_storage.codebook_bytes(clustered.codes, clustered.codebook, dtype, sparse=True)
              if clustered.zero_code and may_pay else dense + 1)
    use_sparse = sparse < dense
    layer.weight = weight_storage.store_codebook(graph, layer.weight, clustered.codes,
                                                 clustered.codebook, index_dtype=dtype,
                                                 sparse=use_sparse)
    return {"storage": "sparse-codebook" if use_sparse else "codebook", "index_dtype": dtype,
            "codebook": int(clustered.codebook.size), "bytes": int(min(dense, sparse))}
