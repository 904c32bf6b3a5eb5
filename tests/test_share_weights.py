"""``share-weights``: exact cases, zeros kept, packed UINT4, ORT equivalence and folding, sizes,
near-duplicate merging, per-layer bits, the centroid refit."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from compression_models import (
    batches,
    conv_proto,
    mlp_proto,
    optimized_ops,
    run,
    trained_digits_mlp,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from onnxopt.passes.compress import _storage as weight_storage
from onnxopt.passes.compress._layers import find_layers
from onnxopt.passes.compress.share_weights import ShareWeightsConfig, ShareWeightsPass, cluster

import onnxopt
from onnxopt.evaluation import top1_accuracy
from onnxopt.registry import PassContext
from onnxopt.stats import model_stats


def share(model, context: PassContext | None = None, **options):
    out = ir.serde.deserialize_model(model) if not isinstance(model, ir.Model) else model.clone()
    opt_pass = ShareWeightsPass(ShareWeightsConfig(**options), context or PassContext())
    return opt_pass(out), opt_pass.notes


def layer_weights(model: ir.Model) -> dict[str, np.ndarray]:
    return {layer.name: layer.weight_array() for layer in find_layers(model)}


@settings(max_examples=30, deadline=None)
@given(k=st.integers(1, 256), with_zero=st.booleans(), seed=st.integers(0, 10_000))
def test_k_distinct_values_are_reproduced_exactly(k, with_zero, seed):
    """A tensor with k distinct values clusters exactly when 2**bits >= k."""
    rng = np.random.default_rng(seed)
    values = rng.standard_normal(k).astype(np.float32)
    if with_zero:
        values[0] = 0.0
    tensor = rng.choice(values, size=(17, 13))
    bits = max(2, int(np.ceil(np.log2(np.unique(tensor).size))))
    clustered = cluster(tensor, bits)
    np.testing.assert_array_equal(clustered.values(), tensor)
    assert clustered.codebook.size <= 2**bits


@pytest.mark.parametrize("bits", [2, 3, 5, 8])
def test_zero_stays_zero_and_codebook_fits(bits):
    rng = np.random.default_rng(bits)
    w = rng.standard_normal((64, 48)).astype(np.float32)
    w[rng.random(w.shape) < 0.7] = 0.0
    clustered = cluster(w, bits)
    out = clustered.values()
    assert np.array_equal(out == 0, w == 0)  # pruned stay pruned, kept stay kept
    assert clustered.codebook[0] == 0 and clustered.codebook.size <= 2**bits
    # Lloyd's iterations never do worse than the linear grid they start from.
    nonzero = w[w != 0]
    grid = np.linspace(nonzero.min(), nonzero.max(), 2**bits - 1)
    grid_error = np.mean((grid[np.abs(nonzero[:, None] - grid).argmin(1)] - nonzero) ** 2)
    assert np.mean((out[w != 0] - nonzero) ** 2) <= grid_error


@pytest.mark.parametrize("dtype", ["uint2", "uint4"])
def test_packed_codes_round_trip(dtype):
    per_byte, onnx_type = {"uint2": (4, onnx.TensorProto.UINT2),
                           "uint4": (2, onnx.TensorProto.UINT4)}[dtype]
    graph = ir.Graph([], [], nodes=[], opset_imports={"": 25})
    codes = np.random.default_rng(0).integers(0, 1 << (8 // per_byte), size=(7, 5)).astype(np.uint8)
    codebook = np.linspace(-1, 1, 1 << (8 // per_byte)).astype(np.float32)
    old = ir.Value(name="w", const_value=ir.tensor(codebook[codes]))
    graph.register_initializer(old)
    y = ir.node("Identity", [old])
    graph.append(y)
    stored = weight_storage.store_codebook(graph, old, codes, codebook, index_dtype=dtype,
                                           sparse=False)
    proto = ir.serde.serialize_graph(graph)
    packed = next(t for t in proto.initializer if t.name == "w.codes")
    assert packed.data_type == onnx_type and len(packed.raw_data) == -(-35 // per_byte)
    back = ir.serde.deserialize_graph(proto)
    value = next(n for n in back if n.op_type == "Identity").inputs[0]
    np.testing.assert_array_equal(weight_storage.read_weight(value), codebook[codes])
    assert weight_storage.stored_format(stored) == "codebook"


@pytest.mark.parametrize("bits, dtype, opset", [(2, "uint2", 25), (3, "uint4", 21),
                                                (6, "uint8", 18)])
def test_onnxruntime_matches_unpacked_weights_and_folds_them(bits, dtype, opset, tmp_path):
    proto = conv_proto()
    result, notes = share(proto, conv_bits=bits, refit=False, min_elements=0, min_cosine=0)
    assert result.modified
    assert {r["index_dtype"] for r in notes["layers"]} == {dtype}
    assert result.model.opset_imports[""] == max(opset, proto.opset_import[0].version)
    # The same clustered values as plain initializers: the reference for the packed graph.
    unpacked = ir.serde.deserialize_model(proto)
    for layer, values in zip(find_layers(unpacked), layer_weights(result.model).values()):
        assert np.unique(values).size <= 2**bits
        layer.weight.const_value = ir.tensor(values, name=layer.weight.name)
    x = batches((4, 9, 9), n=1)[0]
    np.testing.assert_allclose(run(result.model, x), run(unpacked, x), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(run(result.model, x, "all"), run(unpacked, x, "all"),
                               rtol=1e-5, atol=1e-5)
    ops = optimized_ops(result.model, str(tmp_path / "opt.onnx"))
    assert "Gather" not in ops and "Cast" not in ops  # the codebook was folded at load


def test_uint4_option_keeps_2_bit_codes_at_opset_21():
    result, notes = share(conv_proto(), conv_bits=2, index_dtype="uint4", refit=False,
                          min_elements=0, min_cosine=0)
    assert {r["index_dtype"] for r in notes["layers"]} == {"uint4"}
    assert result.model.opset_imports[""] == 21


@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_error_feedback_codes_beat_nearest_centroids(kind):
    """With refit data, codes are assigned GPTQ-style (each input's rounding error spread over
    the inputs not coded yet): lower layer error and closer outputs than nearest-centroid codes
    at the same bits, pruned weights still zero, codes still within the codebook."""
    if kind == "mlp":
        proto, shape = mlp_proto(sizes=(64, 64, 32, 10), zero_fraction=0.5), (64,)
    else:  # a plain and a grouped convolution
        proto, shape = conv_proto(), (4, 9, 9)
    *calibration, held_out = batches(shape, n=5, batch=64)  # held out: the same distribution
    context = PassContext(calibration=calibration)
    options = dict(fc_bits=3, conv_bits=3, min_elements=0, min_cosine=0)
    gptq, notes = share(proto, context, **options)
    nearest, nearest_notes = share(proto, context, assign="nearest", **options)
    assert all("error_gptq" not in r for r in nearest_notes["layers"])
    gptq_errors = [r["error_gptq"] for r in notes["layers"]]
    refit_errors = [r["error_refit"] for r in notes["layers"]]
    assert all(g <= r for g, r in zip(gptq_errors, refit_errors))
    # measured: 0.67x (mlp), 0.87x (conv)
    assert sum(gptq_errors) < 0.92 * sum(refit_errors), (gptq_errors, refit_errors)
    original = layer_weights(ir.serde.deserialize_model(proto))
    for name, values in layer_weights(gptq.model).items():
        assert np.array_equal(values == 0, original[name] == 0)
        assert np.unique(values).size <= 2**3
    ref = run(ir.serde.deserialize_model(proto), held_out)
    assert (np.linalg.norm(run(gptq.model, held_out) - ref)
            < np.linalg.norm(run(nearest.model, held_out) - ref))


def test_clustering_a_sparse_stored_weight_replaces_its_decode_nodes():
    """prune (sparse storage) then share-weights with a refit: re-encoding a stored weight used
    to leave the old decode nodes beside new ones of the same names until the pass ended, and
    the refit's ONNX Runtime session refused the model (two nodes named 'fc1.weight/...')."""
    proto = mlp_proto(sizes=(64, 64, 32, 10))
    calibration = batches((64,), n=2, batch=64)
    result, report = onnxopt.optimize(
        ir.serde.deserialize_model(proto),
        [{"pass": "prune", "sparsity": 0.8, "min_cosine": 0},
         {"pass": "share-weights", "fc_bits": 4, "min_elements": 0, "min_cosine": 0}],
        calibration=calibration)
    names = [node.name for node in result.graph]
    assert len(names) == len(set(names))
    assert "sparse-codebook" in {r["storage"] for r in report.passes[-1].notes["layers"]}
    assert all("error_refit" in r for r in report.passes[-1].notes["layers"])
    assert not any(v.name.endswith(".1") for v in result.graph.initializers.values())


def test_sizes_drop_on_disk_and_zipped():
    proto = mlp_proto(sizes=(256, 256, 64, 10))
    before = model_stats(proto)
    result, notes = share(proto, fc_bits=4, refit=False, min_cosine=0)
    after = model_stats(result.model)
    assert after.size_bytes < before.size_bytes / 5
    assert after.zipped_bytes < before.zipped_bytes / 5
    assert notes["bytes_after"] == after.size_bytes


def test_per_layer_bits_and_exclusions():
    result, notes = share(mlp_proto(sizes=(64, 64, 32, 10)), fc_bits=5, refit=False,
                          layer_bits={"fc2.*": 3}, exclude=["fc3"], min_elements=0,
                          min_cosine=0)
    bits = {r["layer"]: r["bits"] for r in notes["layers"]}
    assert bits == {"fc1.weight": 5, "fc2.weight": 3}
    ws = layer_weights(result.model)
    assert np.unique(ws["fc1.weight"]).size <= 32 and np.unique(ws["fc2.weight"]).size <= 8
    assert weight_storage.stored_format(find_layers(result.model)[2].weight) == "dense"


def test_near_identical_tensors_are_merged():
    """Two weights of equal shape 1e-6 apart (relative) are stored once, as their mean."""
    proto = mlp_proto(sizes=(32, 32, 32, 32))
    tensors = {t.name: t for t in proto.graph.initializer}
    w = onnx.numpy_helper.to_array(tensors["fc1.weight"])
    noise = 1e-6 * np.random.default_rng(3).standard_normal(w.shape).astype(np.float32)
    tensors["fc2.weight"].CopyFrom(onnx.numpy_helper.from_array(w + noise, "fc2.weight"))
    result, notes = share(proto, merge_tolerance=1e-3, refit=False, min_elements=0,
                          min_cosine=0, exclude=["fc3"])
    assert [m["layer"] for m in notes["merged"]] == ["fc2.weight"]
    layers = find_layers(result.model)
    assert layers[0].weight is layers[1].weight
    assert sum(1 for name in result.model.graph.initializers if name.endswith(".codes")) == 1
    _, notes = share(proto, merge_tolerance=0.0, refit=False, min_elements=0, min_cosine=0)
    assert notes["merged"] == []


def test_share_weights_is_idempotent():
    first, _ = share(mlp_proto(sizes=(64, 64, 32, 10)), refit=False, min_cosine=0)
    second, notes = share(first.model, refit=False, min_cosine=0)
    assert not second.modified
    assert all(r["storage"] == "unchanged" for r in notes["layers"])


@pytest.mark.slow
def test_centroid_refit_on_trained_digits_mlp():
    """Pruned then clustered at 3 bits: the least-squares centroids beat k-means's."""
    model, data = trained_digits_mlp()
    x, y = data.test_flat, data.y_test
    calibration = [{"input": data.train_flat[i:i + 100]} for i in range(0, 400, 100)]
    prune_step = {"pass": "prune", "sparsity": 0.9, "storage": "dense", "min_cosine": 0}
    share_step = {"pass": "share-weights", "fc_bits": 3, "min_cosine": 0}
    refit, report = onnxopt.optimize(model, [prune_step, share_step], calibration=calibration)
    plain, _ = onnxopt.optimize(model, [prune_step, {**share_step, "refit": False}],
                                calibration=calibration)
    notes = report.passes[-1].notes
    for record in notes["layers"]:
        assert record["error_refit"] < record["error_cluster"], record
        assert record["index_dtype"] == "uint4"
    # The big first layer is stored as sparse entries; the small last one may be denser.
    assert notes["layers"][0]["storage"] == "sparse-codebook"
    assert top1_accuracy(refit, x, y) >= top1_accuracy(plain, x, y)
    assert report.after["zipped_bytes"] < report.before["size_bytes"] / 20
