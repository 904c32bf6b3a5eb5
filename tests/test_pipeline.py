"""The pipeline verifies every pass, names the culprit on a breach, and reports honestly."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest

import onnxopt
from onnxopt.errors import InputError, QualityGateError, VerificationError
from onnxopt.metrics import Budget
from onnxopt.model_io import to_ir
from onnxopt.pipeline import Pipeline
from onnxopt.recipes import apply_overrides, builtin_recipes, load_recipe
from onnxopt.registry import PASSES, OptPass, make_config, option, register
from onnxopt.runner import reference_session, run


@dataclasses.dataclass
class ScaleConfig:
    factor: float = option(1.5, "Multiply every float initializer by this.")
    tolerance: float = option(0.0, "Cosine floor; 0 means the exact fp32 budget.")


class ScaleWeightsPass(OptPass):
    """A deliberately lossy test pass: it scales the weights, which changes the outputs."""

    name = "test-scale-weights"
    summary = "test only"
    Config = ScaleConfig

    def budget(self) -> Budget:
        return Budget("cosine", min_value=self.config.tolerance) if self.config.tolerance else super().budget()

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        for value in model.graph.initializers.values():
            array = value.const_value.numpy()
            value.const_value = ir.tensor(array * np.float32(self.config.factor), name=value.name)
        self.notes["scaled"] = len(model.graph.initializers)
        return ir.passes.PassResult(model, True)


class GateFailingPass(OptPass):
    """A pass whose own search misses its budget after producing a best candidate."""

    name = "test-gate"
    summary = "test only"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        raise QualityGateError("accuracy drop 2.0 points > budget 0.5")


@pytest.fixture
def test_passes() -> Iterator[None]:
    register(ScaleWeightsPass)
    register(GateFailingPass)
    yield
    PASSES.pop(ScaleWeightsPass.name)
    PASSES.pop(GateFailingPass.name)


def test_cleanup_exact_and_input_untouched(mlp_model: onnx.ModelProto) -> None:
    model = to_ir(mlp_model)
    nodes_before = len(model.graph)
    out, report = onnxopt.optimize(model, "default")
    assert len(model.graph) == nodes_before  # the caller's model is not mutated
    assert "Identity" not in [n.op_type for n in out.graph]
    rec = report.passes[0]
    assert rec.name == "cleanup" and rec.modified
    assert rec.fidelity["y"]["max_abs"] <= 1e-6
    assert rec.stats["nodes"] == report.before["nodes"] - 1  # cleanup alone dropped the Identity
    json.loads(report.to_json())  # the report is valid JSON
    assert "| cleanup |" in report.to_markdown()


def test_cleanup_is_idempotent(mlp_model: onnx.ModelProto) -> None:
    once, _ = onnxopt.optimize(mlp_model, ["cleanup"])
    _, report = onnxopt.optimize(once, ["cleanup"])
    assert report.passes[0].modified is False
    assert report.passes[0].fidelity == {}  # nothing changed, nothing to verify


def test_breach_names_pass_output_and_node(test_passes: None, mlp_model: onnx.ModelProto) -> None:
    with pytest.raises(VerificationError) as info:
        onnxopt.optimize(mlp_model, ["cleanup", "test-scale-weights"], on_breach="raise")
    err = info.value
    assert err.pass_name == "test-scale-weights" and err.output == "y"
    # The first weight touched is the first MatMul's: that is where the outputs diverge.
    assert err.node is not None and "(MatMul)" in err.node and "'h'" in err.node
    assert "max abs error" in str(err) and err.exit_code == 1
    # it carries the report up to the last verified pass, the breach among its warnings
    assert err.report is not None and [r.name for r in err.report.passes] == ["cleanup"]
    assert err.report.warnings == [err.to_dict()]


def test_a_breaching_pass_is_undone_and_reported(test_passes: None, mlp_model: onnx.ModelProto,
                                                 tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """The default: the pass that breached is undone, the run goes on, the report says so."""
    recipe = ["cleanup", "test-scale-weights", {"pass": "test-scale-weights", "factor": 2.0,
                                                "tolerance": 0.999}]
    out, report = onnxopt.optimize(mlp_model, recipe)
    undone, kept = report.passes[1], report.passes[2]
    assert undone.modified is False and undone.fidelity == {}
    assert "undone" in undone.notes["warning"] and undone.notes["verification"]["output"] == "y"
    assert kept.modified and kept.fidelity  # the next pass ran on the model before the breach
    [warning] = report.warnings
    assert warning["pass"] == "test-scale-weights" and warning["output"] == "y"
    assert "(MatMul)" in warning["node"] and "undone" in report.to_markdown()
    # the output is the cleaned model scaled once by 2 (outputs x4), not by 1.5 as well
    x = {"x": np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)}
    ref = run(reference_session(mlp_model.SerializeToString()), x)["y"]
    got = run(reference_session(ir.serde.serialize_model(out).SerializeToString()), x)["y"]
    np.testing.assert_allclose(got, 4.0 * ref, rtol=1e-5, atol=1e-5)
    # the CLI writes the model and the report, exits 0 and prints the warning
    from onnxopt.cli import main

    source, recipe_file = tmp_path / "in.onnx", tmp_path / "r.json"
    onnx.save(mlp_model, source)
    recipe_file.write_text(json.dumps({"steps": recipe[:2]}))
    assert main(["optimize", str(source), "-o", str(tmp_path / "out.onnx"), "--recipe",
                 str(recipe_file), "--report", str(tmp_path / "rep")]) == 0
    written = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert written["warnings"][0]["pass"] == "test-scale-weights"
    assert (tmp_path / "out.onnx").is_file()
    assert "warning: test-scale-weights: undone" in capsys.readouterr().err


def test_lossy_pass_within_declared_budget(test_passes: None, mlp_model: onnx.ModelProto) -> None:
    # Scaling all weights by s scales a ReLU MLP's output by s^2: cosine stays exactly 1.
    out, report = onnxopt.optimize(
        mlp_model, [{"pass": "test-scale-weights", "factor": 2.0, "tolerance": 0.999}])
    rec = report.passes[0]
    assert rec.budget == "cosine >= 0.999" and rec.notes == {"scaled": 3}
    assert rec.drift["y"]["cosine"] == pytest.approx(1.0, abs=1e-9)
    x = {"x": np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)}
    ref = run(reference_session(mlp_model.SerializeToString()), x)["y"]
    got = run(reference_session(ir.serde.serialize_model(out).SerializeToString()), x)["y"]
    np.testing.assert_allclose(got, 4.0 * ref, rtol=1e-5, atol=1e-5)


def test_gate_error_keeps_best_candidate(test_passes: None, mlp_model: onnx.ModelProto) -> None:
    with pytest.raises(QualityGateError) as info:
        onnxopt.optimize(mlp_model, ["cleanup", "test-gate"])
    model, report = info.value.partial
    assert isinstance(model, ir.Model)
    assert [r.name for r in report.passes] == ["cleanup", "test-gate"]


def test_checkpoints_written(tmp_path: Path, mlp_model: onnx.ModelProto) -> None:
    onnxopt.optimize(mlp_model, ["cleanup"], checkpoint_dir=tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["01-cleanup.onnx"]


def test_recipe_forms(tmp_path: Path) -> None:
    toml_file = tmp_path / "r.toml"
    toml_file.write_text('[[steps]]\npass = "cleanup"\ncse = false\n')
    json_file = tmp_path / "r.json"
    json_file.write_text(json.dumps({"steps": ["cleanup", {"pass": "cleanup", "deduplicate": False}]}))
    assert load_recipe(toml_file)[1][0].options == {"cse": False}
    assert [s.options for s in load_recipe(json_file)[1]] == [{}, {"deduplicate": False}]
    assert load_recipe({"name": "mine", "steps": ["cleanup"]})[0] == "mine"
    assert load_recipe(["cleanup"])[1][0].name == "cleanup"


@pytest.mark.parametrize(
    "recipe, message",
    [
        (["no-such-pass"], "unknown pass 'no-such-pass'"),
        ([{"pass": "cleanup", "bogus": 1}], "has no option 'bogus'"),
        ([{"pass": "cleanup", "cse": "yes"}], "expects bool"),
        ([], "non-empty list"),
        ("no-such-recipe", "unknown recipe"),
        ([42], "bad recipe step"),
    ],
)
def test_bad_recipes(recipe: object, message: str) -> None:
    with pytest.raises(InputError, match=message):
        load_recipe(recipe)  # type: ignore[arg-type]


def test_bad_recipe_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[[steps]\n")
    with pytest.raises(InputError, match="not a valid recipe file") as info:
        load_recipe(bad)
    assert str(bad) in str(info.value)


def test_overrides() -> None:
    _, steps = load_recipe(["cleanup"])
    assert apply_overrides(steps, {"cleanup.cse": False})[0].options == {"cse": False}
    assert apply_overrides(steps, {"fold-size-limit": 10})[0].options == {"fold_size_limit": 10}
    with pytest.raises(InputError, match="takes option 'max_drop'"):
        apply_overrides(steps, {"max_drop": 0.5})
    with pytest.raises(InputError, match="expects int"):
        apply_overrides(steps, {"cleanup.fold_size_limit": "big"})


def test_make_config_coerces_ints_to_floats(test_passes: None) -> None:
    cfg = make_config(ScaleWeightsPass, {"factor": 2})
    assert cfg.factor == 2.0 and isinstance(cfg.factor, float)


def test_model_that_does_not_run_is_input_error() -> None:
    # Valid for the checker, but the shapes cannot multiply: ORT refuses at run time.
    model = onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[2, 4] x) => (float[2, 3] y) <float[5, 3] w = {1.,2.,3.,4.,5.,6.,7.,8.,9.,10.,11.,12.,13.,14.,15.}> {
        y = MatMul(x, w)
    }""")
    with pytest.raises(InputError, match="does not run in ONNX Runtime"):
        Pipeline.from_recipe("default").run(to_ir(model))


def _conv_bn_mlp() -> onnx.ModelProto:
    """Conv + BatchNorm + ReLU, then two MatMul + Add layers: something for every recipe to change
    (BN folding, Gemm fusion, pruning, clustering, INT8, float16)."""
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(0)

    def init(name: str, shape: tuple[int, ...], offset: float = 0.0) -> onnx.TensorProto:
        values = rng.standard_normal(shape).astype(np.float32) * np.float32(0.3)
        return numpy_helper.from_array(np.abs(values) + offset if offset else values, name)

    inits = [init("cw", (8, 1, 3, 3)), init("cb", (8,)), init("s", (8,)), init("b", (8,)),
             init("m", (8,)), init("v", (8,), offset=0.5), init("fw", (512, 16)), init("fb", (16,)),
             init("gw", (16, 10)), init("gb", (10,)),
             numpy_helper.from_array(np.array([1, -1], np.int64), "shape")]
    nodes = [helper.make_node("Conv", ["x", "cw", "cb"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c", "s", "b", "m", "v"], ["bn"]),
             helper.make_node("Relu", ["bn"], ["r"]),
             helper.make_node("Reshape", ["r", "shape"], ["f"]),
             helper.make_node("MatMul", ["f", "fw"], ["h0"]),
             helper.make_node("Add", ["h0", "fb"], ["h"]),
             helper.make_node("Relu", ["h"], ["hr"]),
             helper.make_node("MatMul", ["hr", "gw"], ["o0"]),
             helper.make_node("Add", ["o0", "gb"], ["y"])]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 1, 8, 8])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 10])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("recipe", sorted(builtin_recipes()))
def test_every_builtin_recipe_leaves_the_callers_protobuf_untouched(recipe: str) -> None:
    """``optimize(proto)`` works on onnx_ir views of the caller's tensors: a pass that renamed or
    rewrote one in place would change the caller's model. Byte for byte, it must not."""
    proto = _conv_bn_mlp()
    given = proto.SerializeToString()
    rng = np.random.default_rng(1)
    calibration = [{"x": rng.standard_normal((1, 1, 8, 8)).astype(np.float32)} for _ in range(8)]
    out, report = onnxopt.optimize(proto, recipe, calibration=calibration,
                                   overrides={"quantize.measure_latency": False}
                                   if "quantize" in builtin_recipes()[recipe] else {})
    assert proto.SerializeToString() == given
    assert report.passes  # the recipe ran


def test_budget_is_declared_before_the_pass_runs(mlp_model: onnx.ModelProto) -> None:
    """The pass contract: ``budget()`` reads only the config and the context, so a fresh pass
    declares the budget the pipeline then verifies with (the record shows the one it used)."""
    from onnxopt.registry import PassContext, catalogue

    for name, cls in catalogue().items():  # no pass needs call() to have run
        assert cls().budget().describe(), name
    quantize = catalogue()["quantize"]
    config = make_config(quantize, {"max_drop": 0.05, "measure_latency": False})
    declared = quantize(config).budget().describe()
    assert declared == "cosine >= 0.94"
    assert quantize(config, PassContext(evaluation=({}, None))).budget().kind == "none"
    _, report = onnxopt.optimize(
        mlp_model, [{"pass": "quantize", "max_drop": 0.05, "measure_latency": False}])
    assert report.passes[0].modified and report.passes[0].budget == declared
