"""The ``deep-compression`` recipe: its search keeps the budget, and the report has the tables."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from compression_models import mlp_proto, trained_digits_mlp
from onnxopt.passes.compress.deep_compress import compression_table

import onnxopt
from onnxopt.cli import main
from onnxopt.errors import InputError
from onnxopt.evaluation import predict, top1_accuracy
from onnxopt.recipes import builtin_recipes
from onnxopt.stats import model_stats

# A coarser grid than the defaults keeps the search to seconds.
FAST = {"keep_fractions": [0.3, 0.12, 0.06, 0.03], "bits": [8, 5, 3], "candidates": 2}


def test_recipe_is_registered():
    steps = builtin_recipes()["deep-compression"]
    assert steps[-1] == {"pass": "deep-compress"}


def test_without_any_data_is_an_input_error():
    with pytest.raises(InputError, match="evaluation data"):
        onnxopt.optimize(mlp_proto(), "deep-compression")


@pytest.mark.slow
@pytest.mark.parametrize("assign", ["nearest", "gptq"])
def test_search_keeps_top1_within_budget_on_trained_digits_mlp(assign: str):
    model, data = trained_digits_mlp()
    x_val, y_val = data.val_flat, data.y_val
    calibration = [{"input": data.train_flat[i:i + 100]} for i in range(0, 400, 100)]
    out, report = onnxopt.optimize(model, "deep-compression", calibration=calibration,
                                   evaluation=({"input": x_val}, y_val),
                                   overrides={**FAST, "max_drop": 1.0, "assign": assign})
    record = report.passes[-1]
    assert record.name == "deep-compress" and record.modified
    notes = record.notes
    assert notes["assign"] == assign
    base, final = top1_accuracy(model, x_val, y_val), top1_accuracy(out, x_val, y_val)
    assert base - final <= 1.0, (base, final)
    changed = predict(out, x_val).argmax(1) != predict(model, x_val).argmax(1)
    assert 100 * changed.mean() <= 1.0 + 1e-9  # the default max_flips guard
    # The model written is the candidate the search measured (the search ran on copies).
    assert final == pytest.approx(notes["final"]["top1"], abs=1e-3)
    assert notes["final"]["cosine"] >= 0.99
    assert report.after["zipped_bytes"] < report.before["size_bytes"] / 15
    stages = [s["stage"] for s in notes["stages"]]
    assert stages == ["fp32", "fp32, node metadata dropped", "pruned", "pruned+shared"]
    sizes = [s["zipped_bytes"] for s in notes["stages"]]
    assert sizes[2] < sizes[1] / 3 and sizes[3] < sizes[2]
    table = notes["layers"]
    assert table[-1]["layer"] == "total" and len(table) == 4
    assert table[-1]["weights"] == sum(r["weights"] for r in table[:-1])
    assert 0 < table[-1]["kept_pct"] < 100 and all(2 <= r["bits"] <= 8 for r in table[:-1])
    assert "| total |" in compression_table(notes)
    assert any(s["stage"] == "share" and not s["ok"] for s in notes["search"]) or \
        all(r["bits"] == 3 for r in table[:-1])  # the bit search hit the budget or the floor


@pytest.mark.slow
def test_a_size_target_keeps_the_most_faithful_candidate_that_meets_it():
    """``min_ratio``: of the candidates within budget at least that much smaller, the one with
    the highest output cosine; out of reach, the smallest within budget and a warning."""
    model, data = trained_digits_mlp()
    calibration = [{"input": data.train_flat[i:i + 100]} for i in range(0, 400, 100)]
    evaluation = ({"input": data.val_flat}, data.y_val)

    def run(**overrides: float) -> tuple[dict, dict]:
        out, report = onnxopt.optimize(model, "deep-compression", calibration=calibration,
                                       evaluation=evaluation,
                                       overrides={**FAST, "max_drop": 1.0, **overrides})
        notes = report.passes[-1].notes
        # Sizes are measured with the provenance the pipeline stamps: those of the file written
        # (give or take a byte: the output keeps the lowest opset its codes need, the search's
        # copies the highest the bit choices might need).
        assert abs(model_stats(out).zipped_bytes - notes["stages"][-1]["zipped_bytes"]) <= 4
        return notes, notes["stages"][-1]

    default, smallest = run()
    notes = default
    assert "size_target" not in notes and notes["selection"].startswith("the smallest")
    # The zipped ratio of the smallest candidate, against the file the pass received.
    smallest_ratio = smallest["zipped_ratio_vs_fp32_file"]

    notes, chosen = run(min_ratio=smallest_ratio / 3)
    target = notes["size_target"]
    assert target["met"] and "cosine" in notes["selection"]
    assert chosen["zipped_bytes"] <= target["max_zipped_bytes"]
    assert chosen["zipped_bytes"] > smallest["zipped_bytes"]  # it spent size on fidelity...
    assert notes["final"]["cosine"] > smallest["cosine"]  # ...and got it
    tried = [s for s in notes["search"] if s["stage"] == "share" and s["ok"]
             and 0 < s["zipped_bytes"] <= target["max_zipped_bytes"]]
    assert notes["final"]["cosine"] == max(s["cosine"] for s in tried)

    notes, kept = run(min_ratio=smallest_ratio * 10)
    assert not notes["size_target"]["met"] and "none met" in notes["selection"]
    # the same candidate as without a target (the file differs by the recipe in its provenance)
    assert (notes["kept_pct"], notes["bits"]) == (default["kept_pct"], default["bits"])
    assert kept["cosine"] == smallest["cosine"]
    assert "warning" in notes


@pytest.mark.slow
def test_without_labels_the_cosine_budget_holds():
    model, data = trained_digits_mlp()
    x_val = data.val_flat
    calibration = [{"input": data.train_flat[i:i + 100]} for i in range(0, 400, 100)]
    out, report = onnxopt.optimize(model, "deep-compression", calibration=calibration,
                                   evaluation=({"input": x_val}, None),
                                   overrides={**FAST, "min_cosine": 0.995})
    ref, got = predict(model, x_val), predict(out, x_val)
    cosine = np.sum(ref * got, 1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1))
    assert cosine.mean() >= 0.995
    assert report.after["zipped_bytes"] < report.before["zipped_bytes"] / 5


def test_cli_runs_the_recipe(tmp_path: Path):
    """``--recipe deep-compression --calib --eval --max-drop`` end to end, on a tiny model.

    A random network has no redundancy (10% fewer weights flip a sixth of its predictions), so
    the budget here is wide: the test is about the options reaching the pass and being kept.
    """
    proto = mlp_proto(sizes=(64, 64, 32, 10))
    src = tmp_path / "mlp.onnx"
    onnx.save(proto, src)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((256, 64)).astype(np.float32)
    labels = predict(proto, x).argmax(1)  # the model's own predictions: baseline 100%
    np.savez(tmp_path / "calib.npz", x=x[:128])
    np.savez(tmp_path / "eval.npz", x=x[128:], labels=labels[128:])
    out = tmp_path / "small.onnx"
    code = main(["optimize", str(src), "-o", str(out), "--recipe", "deep-compression",
                 "--calib", str(tmp_path / "calib.npz"), "--eval", str(tmp_path / "eval.npz"),
                 "--max-drop", "25", "--set", "deep-compress.bits=[8,4]",
                 "--set", "deep-compress.keep_fractions=[0.9,0.8]",
                 "--set", "deep-compress.min_cosine=0.9", "--set", "deep-compress.max_flips=30",
                 "--report", str(tmp_path / "report")])
    assert code == 0
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    notes = report["passes"][-1]["notes"]
    assert report["passes"][-1]["options"]["max_drop"] == 25
    assert 100 - top1_accuracy(out, x[128:], labels[128:]) <= 25 + 1e-9
    assert notes["layers"][-1]["layer"] == "total"


def test_cli_says_when_the_search_kept_the_model_unchanged(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A budget nothing meets leaves the model as it was: the CLI says so, not just the report."""
    proto = mlp_proto(sizes=(64, 64, 32, 10))
    src = tmp_path / "mlp.onnx"
    onnx.save(proto, src)
    x = np.random.default_rng(0).standard_normal((256, 64)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x[:128])
    np.savez(tmp_path / "eval.npz", x=x[128:], labels=predict(proto, x[128:]).argmax(1))
    code = main(["optimize", str(src), "-o", str(tmp_path / "small.onnx"),
                 "--recipe", "deep-compression", "--calib", str(tmp_path / "calib.npz"),
                 "--eval", str(tmp_path / "eval.npz"), "--max-drop", "0",
                 "--set", "deep-compress.keep_fractions=[0.5]", "--set", "min_ratio=3"])
    assert code == 0
    err = capsys.readouterr().err
    assert "warning: deep-compress: no compressed model met the budget" in err


def test_many_layers_refit_independently_with_one_capture(monkeypatch: pytest.MonkeyPatch):
    """Past ``sequential_layers`` the search captures activations once, not once per layer and
    candidate (regression: MobileNetV2, 53 layers, ran over 20 minutes), and past
    ``search_layers`` the smaller layers share one bit width."""
    from onnxopt.passes.compress import _refit as layer_refit

    captures = []
    real_capture = layer_refit.capture

    def counting_capture(*args, **kwargs):
        captures.append(len(args[1]))
        return real_capture(*args, **kwargs)

    monkeypatch.setattr(layer_refit, "capture", counting_capture)
    proto = mlp_proto(sizes=(64, 64, 32, 10))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((192, 64)).astype(np.float32)
    out, report = onnxopt.optimize(
        proto, "deep-compression", calibration=[{"x": x[:64]}, {"x": x[64:128]}],
        evaluation=({"x": x[128:]}, None),
        overrides={"keep_fractions": [0.9, 0.7], "bits": [8, 6, 4], "min_cosine": 0.95,
                   "sequential_layers": 1, "search_layers": 1, "refine_steps": 1})
    notes = report.passes[-1].notes
    assert notes["refit"] == "independent"
    assert captures == [3]  # all three layer inputs, once
    bits = notes["bits"]
    assert bits["fc2.weight"] == bits["fc3.weight"]  # the two smaller layers, bisected together
    ref, got = predict(proto, x[128:]), predict(out, x[128:])
    cosine = np.sum(ref * got, 1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1))
    assert cosine.mean() >= 0.95 and notes["final"]["cosine"] >= 0.95
    assert notes["kept_pct"] < 100


def test_an_output_that_became_zero_fails_the_cosine_budget() -> None:
    """Found by the suite: random-weight MobileNetV2 outputs ~1e-11; its compressed copy gave
    exact zeros and still scored cosine 1.0 (a zero norm counted as 'unchanged')."""
    import onnx_ir as ir

    from onnxopt.passes._shared.scoring import GuardedEvaluator as Evaluator

    model = ir.serde.deserialize_model(mlp_proto())
    (spec,) = model.graph.inputs
    width = spec.shape[-1]
    feeds = {spec.name: np.random.default_rng(0).random((4, width), dtype=np.float32)}
    evaluator = Evaluator(model, feeds, None, max_drop=0.5, min_cosine=0.99)
    reference = evaluator.reference
    zeros = {k: np.zeros_like(v) for k, v in reference.items()}
    tiny = {k: v * 1e-12 for k, v in reference.items()}
    assert evaluator.cosine(zeros) == 0.0
    assert evaluator.cosine(tiny) == pytest.approx(1.0)  # scale alone is not a change


def test_biases_float16_would_flush_stay_float32() -> None:
    from onnxopt.passes.compress.deep_compress import _holds_in_float16

    rng = np.random.default_rng(0)
    assert _holds_in_float16(rng.normal(0, 0.1, 64).astype(np.float32))
    assert not _holds_in_float16((rng.normal(0, 1, 64) * 1e-11).astype(np.float32))
    assert not _holds_in_float16(np.full(4, 1e6, np.float32))  # past float16's largest value
    assert _holds_in_float16(np.zeros(4, np.float32))
