"""The chained recipes (``speed``, ``size``, ``arm``): each later pass keeps what the earlier one
bought, on a trained digits CNN (docs/chains.md)."""

from __future__ import annotations

import collections
from typing import Any

import numpy as np
import onnx_ir as ir
import pytest
from compression_models import trained_digits_cnn

import onnxopt
from onnxopt.evaluation import top1_accuracy
from onnxopt.recipes import builtin_recipes

# Tests never time things: quantize takes its preferred (static) candidate without timing it.
NO_TIMING = {"quantize.measure_latency": False}
# A coarser deep-compress grid than the defaults keeps the search to seconds.
FAST_COMPRESS = {"deep-compress.keep_fractions": [0.3, 0.12, 0.06],
                 "deep-compress.bits": [5, 3], "deep-compress.candidates": 2}


def _run(recipe: str, overrides: dict[str, Any]) -> tuple[ir.Model, Any, Any, Any]:
    model, data = trained_digits_cnn()
    name = model.graph.inputs[0].name
    calibration = [{name: data.train_images[i:i + 64]} for i in range(0, 256, 64)]
    evaluation = ({name: data.val_images}, data.y_val)
    out, report = onnxopt.optimize(model, recipe, calibration=calibration, evaluation=evaluation,
                                   overrides=overrides, threads=[1])
    return model, out, report, data


def _record(report: Any, name: str) -> Any:
    return next(r for r in report.passes if r.name == name)


def _ops(model: ir.Model) -> collections.Counter[str]:
    return collections.Counter(n.op_type for n in model.graph)


def test_chains_are_built_in():
    recipes = builtin_recipes()
    assert recipes["speed"] == ["cleanup", "fuse", "prune-channels", "quantize"]
    assert recipes["size"][-2:] == [{"pass": "deep-compress"}, "quantize"]
    assert recipes["arm"] == ["cleanup", "fuse", "fp16"]


@pytest.mark.slow
def test_speed_chain_quantizes_the_pruned_model():
    model, out, report, data = _run("speed", {**NO_TIMING, "max_drop": 1.5})
    pruned = _record(report, "prune-channels")
    assert pruned.modified and _record(report, "quantize").modified
    macs = report.before["total_macs"]
    # INT8 keeps every channel prune-channels removed, and every Conv/Gemm runs in INT8.
    assert report.after["total_macs"] == pruned.stats["total_macs"] < 0.6 * macs
    ops = _ops(out)
    assert ops["QuantizeLinear"] and ops["DequantizeLinear"]
    assert report.after["zipped_bytes"] < pruned.stats["zipped_bytes"] / 2
    drop = (top1_accuracy(model, data.test_images, data.y_test)
            - top1_accuracy(out, data.test_images, data.y_test))
    assert drop <= 3.0


@pytest.mark.slow
def test_size_chain_keeps_the_codebook_storage():
    model, out, report, data = _run("size", {**NO_TIMING, **FAST_COMPRESS, "max_drop": 1.5})
    compressed = _record(report, "deep-compress")
    quantize = _record(report, "quantize")
    assert compressed.modified
    ops = _ops(out)
    # The codebook Gathers survive quantize and no decoded weight got a Quantize/Dequantize pair.
    assert ops["Gather"] and not ops["DequantizeLinear"]
    coded = quantize.notes["coded_weights"]["kept_float"]
    assert len(coded) <= ops["Gather"]
    assert report.after["zipped_bytes"] <= compressed.stats["zipped_bytes"]
    assert report.after["zipped_bytes"] < report.before["zipped_bytes"] / 10


@pytest.mark.slow
def test_arm_chain_keeps_fusion_in_fp16():
    model, out, report, data = _run("arm", {})
    fused = _record(report, "fuse")
    assert _record(report, "fp16").modified
    assert _ops(out)["BatchNormalization"] == 0
    assert report.after["nodes"] - fused.stats["nodes"] <= 2  # the input/output Casts only
    halves = [v for v in out.graph.initializers.values()
              if v.const_value is not None and v.const_value.dtype == ir.DataType.FLOAT16]
    assert halves
    assert report.after["size_bytes"] < 0.6 * report.before["size_bytes"]
    assert np.isclose(top1_accuracy(out, data.test_images, data.y_test),
                      top1_accuracy(model, data.test_images, data.y_test), atol=1.0)
