"""onnxopt split: cut choice, stage files, identical outputs, and less peak memory."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import onnx
import onnx.parser
import pytest
from onnx import numpy_helper

from onnxopt import runner
from onnxopt.cli import main
from onnxopt.errors import InputError
from onnxopt.model_io import load_model
from onnxopt.split import _best_cuts, plan_split, split_model
from onnxopt.targets import LocalTarget, RunOptions


def _weights(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]], seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for name, shape in shapes.items():
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        values = rng.standard_normal(shape) / np.sqrt(max(fan_in, 1))
        model.graph.initializer.append(numpy_helper.from_array(values.astype(np.float32), name))
    onnx.checker.check_model(model)


def cnn() -> onnx.ModelProto:
    """Conv-Relu-Pool twice with a residual Add, GlobalAveragePool, Gemm."""
    model = onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["" : 17]>
        cnn (float[N, 3, 16, 16] x) => (float[N, 10] y) {
          c1 = Conv<pads=[1,1,1,1]>(x, W1, B1)
          r1 = Relu(c1)
          c2 = Conv<pads=[1,1,1,1]>(r1, W2, B2)
          r2 = Relu(c2)
          s = Add(r1, r2)
          p = MaxPool<kernel_shape=[2,2], strides=[2,2]>(s)
          c3 = Conv<pads=[1,1,1,1]>(p, W3, B3)
          r3 = Relu(c3)
          g = GlobalAveragePool(r3)
          f = Flatten(g)
          y = Gemm<transB=1>(f, W4, B4)
        }""")
    _weights(model, {"W1": (8, 3, 3, 3), "B1": (8,), "W2": (8, 8, 3, 3), "B2": (8,),
                     "W3": (16, 8, 3, 3), "B3": (16,), "W4": (10, 16), "B4": (10,)})
    return model


def tied_mlp() -> onnx.ModelProto:
    """MLP whose first and last layers share the weight T; a Shape-derived constant too."""
    model = onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["" : 17]>
        mlp (float[N, 32] x) => (float[N, 32] y, float[N, 32] h2) {
          h0 = MatMul(x, T)
          r0 = Relu(h0)
          h1 = MatMul(r0, U)
          r1 = Tanh(h1)
          h2 = MatMul(r1, V)
          r2 = Relu(h2)
          y = MatMul(r2, T)
        }""")
    _weights(model, {"T": (32, 32), "U": (32, 32), "V": (32, 32)})
    return model


def outputs_of(model: str | Path | bytes, feeds: dict, cascade: bool = False,
               opt_level: str = "disabled") -> dict[str, np.ndarray]:
    if cascade:
        session = runner.CascadeSession(model, threads=1, opt_level=opt_level)
    else:
        session = runner.create_session(model, threads=1, opt_level=opt_level)
    return runner.run(session, feeds)


@pytest.mark.parametrize("make", [cnn, tied_mlp])
@pytest.mark.parametrize("parts", [2, 3])
def test_cascade_outputs_are_identical(tmp_path: Path, make, parts: int) -> None:
    model = make()
    onnx.save(model, tmp_path / "m.onnx")
    result = split_model(tmp_path / "m.onnx", parts, tmp_path / "out", measure_memory=False)
    assert result.verification["identical"]
    manifest = json.loads(result.manifest.read_text())
    assert len(manifest["stages"]) == parts
    rng = np.random.default_rng(5)
    (inp,) = model.graph.input
    shape = [3] + [d.dim_value for d in inp.type.tensor_type.shape.dim[1:]]
    feeds = {inp.name: rng.standard_normal(shape).astype(np.float32)}
    for level in ("disabled", "all"):
        whole = outputs_of(str(tmp_path / "m.onnx"), feeds, opt_level=level)
        cascade = outputs_of(result.manifest, feeds, cascade=True, opt_level=level)
        assert list(cascade) == list(whole)
        for name in whole:
            np.testing.assert_array_equal(cascade[name], whole[name])
    # every stage file is a standalone model computing exactly its declared outputs
    produced: set[str] = {inp.name}
    for stage in manifest["stages"]:
        proto = onnx.load(str(tmp_path / "out" / stage["file"]))
        onnx.checker.check_model(proto)
        assert [i.name for i in proto.graph.input] == stage["inputs"]
        assert [o.name for o in proto.graph.output] == stage["outputs"]
        assert set(stage["inputs"]) <= produced  # only tensors earlier stages made
        produced |= set(stage["outputs"])
    assert set(manifest["outputs"]) <= produced


def test_shared_weight_is_copied_into_each_stage_that_reads_it(tmp_path: Path) -> None:
    result = split_model(tied_mlp(), 2, tmp_path, measure_memory=False)
    files = [tmp_path / s["file"] for s in result.stages]
    holders = [f for f in files if "T" in {i.name for i in onnx.load(str(f)).graph.initializer}]
    assert holders == files  # layer 0 and layer 3 are in different stages
    # weights never cross a cut: only activations do
    for cut in result.cuts:
        assert not set(cut["tensors"]) & {"T", "U", "V"}


def test_cuts_balance_weights_then_minimise_crossing() -> None:
    model = load_model_proto(tied_mlp())
    plan = plan_split(model, 3)
    assert len(plan.cuts) == 2 and plan.cuts == sorted(plan.cuts)
    # each of the 4 MatMuls holds 4 KiB of weights (T counted once): no stage holds all
    assert max(plan.stage_weight_bytes) < sum(plan.stage_weight_bytes)
    assert sum(plan.stage_weight_bytes) == 3 * 32 * 32 * 4
    # the crossing bytes are those of the named tensors at batch 1 (32 floats each)
    for names, size in zip(plan.crossing, plan.crossing_bytes, strict=True):
        assert size == 32 * 4 * len(names)


def load_model_proto(proto: onnx.ModelProto):  # noqa: ANN201
    import onnx_ir as ir

    return ir.serde.deserialize_model(proto)


def test_best_cuts_match_brute_force() -> None:
    rng = np.random.default_rng(0)
    for _ in range(30):
        n = int(rng.integers(3, 9))
        parts = int(rng.integers(1, min(n, 4) + 1))
        weights = np.concatenate([[0], np.cumsum(rng.integers(0, 100, n))]).astype(np.int64)
        cross = rng.integers(1, 60, n + 1).astype(np.int64)

        def stage_costs(cuts: tuple[int, ...], n: int = n, weights: np.ndarray = weights,
                        cross: np.ndarray = cross) -> list[int]:
            edges = [0, *cuts, n]
            return [int(weights[j] - weights[i] + cross[i] + cross[j])
                    for i, j in zip(edges[:-1], edges[1:], strict=True)]

        candidates = list(itertools.combinations(range(1, n), parts - 1))
        optimum = min(max(stage_costs(c)) for c in candidates)
        feasible = [c for c in candidates if max(stage_costs(c)) <= optimum * 1.05]
        least = min(sum(int(cross[p]) for p in c) for c in feasible)
        cuts = tuple(_best_cuts(weights, cross, parts, 0.05))
        assert cuts in feasible and sum(int(cross[p]) for p in cuts) == least


@pytest.mark.slow
def test_cascade_lowers_peak_memory_in_a_fresh_process(tmp_path: Path) -> None:
    """Four 1536x1536 layers (9 MiB each): the cascade holds one at a time."""
    body = "".join(f"  h{i} = MatMul({'x' if i == 0 else f'r{i - 1}'}, W{i})\n"
                   f"  r{i} = Relu(h{i})\n" for i in range(4))
    model = onnx.parser.parse_model(
        "<ir_version: 8, opset_import: [\"\" : 17]>\n"
        "wide (float[1, 1536] x) => (float[1, 1536] r3) {\n" + body + "}")
    _weights(model, {f"W{i}": (1536, 1536) for i in range(4)})
    onnx.save(model, tmp_path / "wide.onnx")
    result = split_model(tmp_path / "wide.onnx", 4, tmp_path / "cascade")
    memory = result.memory
    assert memory is not None and memory["outputs_at_settings"]["identical"]
    assert memory["cascade_peak_rss_mb"] < memory["whole_peak_rss_mb"] - 18  # 2+ layers less
    # the bare runner (as on a board) runs the cascade too
    doc = LocalTarget().run(result.manifest, RunOptions(warmup=0, iterations=1))
    assert doc["session"]["cascade_stages"] == 4
    assert "peak RSS" in result.to_markdown()


def test_cli_split_and_its_mistakes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    onnx.save(cnn(), tmp_path / "cnn.onnx")
    assert main(["split", str(tmp_path / "cnn.onnx"), "--parts", "2", "-o",
                 str(tmp_path / "out"), "--no-memory"]) == 0
    assert "identical" in capsys.readouterr().out
    assert (tmp_path / "out" / "cascade.json").is_file()
    assert main(["split", str(tmp_path / "cnn.onnx"), "--parts", "50", "-o",
                 str(tmp_path / "x")]) == 2
    assert "into 50 parts" in capsys.readouterr().err
    with pytest.raises(InputError, match="must be >= 1"):
        plan_split(load_model(tmp_path / "cnn.onnx"), 0)
