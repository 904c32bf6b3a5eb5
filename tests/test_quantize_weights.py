"""``quantize-weights``: MatMulNBits on a small GPT-2 and an MLP, ORT loads and agrees with FP32."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
import transformers

import onnxopt
from onnxopt.errors import InputError
from onnxopt.metrics import cosine_similarity
from onnxopt.recipes import load_recipe
from onnxopt.stats import model_stats


@pytest.fixture(scope="module")
def gpt2() -> ir.Model:
    torch.manual_seed(0)
    module = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=128, n_embd=64, n_layer=2, n_head=2, n_positions=32, use_cache=False))
    ids = torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(0))
    return onnxopt.export(module.eval(), (ids,))


def _mlp(widths: tuple[int, ...] = (64, 256, 256, 10)) -> ir.Model:
    """An MLP written as MatMul + Add (the exporter's form), so ``fuse`` makes Gemms of it."""
    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "x"
    for i, (k, n) in enumerate(zip(widths, widths[1:])):
        inits += [onnx.numpy_helper.from_array((rng.standard_normal((k, n))
                                                / np.sqrt(k)).astype(np.float32), f"w{i}"),
                  onnx.numpy_helper.from_array(rng.standard_normal(n).astype(np.float32), f"b{i}")]
        nodes += [onnx.helper.make_node("MatMul", [x, f"w{i}"], [f"m{i}"]),
                  onnx.helper.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}"])]
        x = f"a{i}"
        if i < len(widths) - 2:
            nodes.append(onnx.helper.make_node("Relu", [x], [f"r{i}"]))
            x = f"r{i}"
    nodes[-1].output[0] = "logits"
    graph = onnx.helper.make_graph(
        nodes, "mlp", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", widths[0]])],
        [onnx.helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["N", widths[-1]])],
        inits)
    return ir.serde.deserialize_model(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]))


def _run(model: ir.Model, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _nbits(model: ir.Model) -> dict[str, int]:
    return {n.name: n.attributes["bits"].as_int() for n in model.graph if n.op_type == "MatMulNBits"}


def test_int4_gpt2_keeps_macs_shrinks_and_agrees(gpt2: ir.Model) -> None:
    out, report = onnxopt.optimize(gpt2, "int4")
    record = report.passes[-1]
    assert record.name == "quantize-weights" and record.modified, record.notes
    bits = _nbits(out)
    assert len(bits) >= 8, bits  # 2 layers x (qkv, proj, fc, proj) and the head
    head = record.notes["lm_head"]
    assert head is not None and bits[head["node"] + "_Q8"] == 8
    assert sorted(bits.values()).count(8) == 1
    assert not any(n.op_type == "MatMul" and n.inputs[1].is_initializer() for n in out.graph)
    assert any(n.op_type == "Gather" for n in out.graph)  # embeddings stay float
    ids = np.random.default_rng(1).integers(0, 128, (1, 16), dtype=np.int64)
    feeds = {gpt2.graph.inputs[0].name: ids}
    assert cosine_similarity(_run(gpt2, feeds)[0], _run(out, feeds)[0]) > 0.99
    before, after = report.before, report.after
    assert after["macs_unknown_nodes"] == 0
    assert after["total_macs"] == before["total_macs"]
    assert after["params"] == before["params"]
    assert after["size_bytes"] < before["size_bytes"] / 2  # embeddings (float) are a large share


def test_mlp_int4_is_4x_smaller_with_the_bias_inside() -> None:
    model = _mlp((256, 512, 512, 10))
    out, report = onnxopt.optimize(model, "int4", overrides={"lm_head_bits": 4})
    notes = report.passes[-1].notes
    assert set(_nbits(out).values()) == {4} and len(_nbits(out)) == 3, notes
    assert notes["gemms_split"] == 3 and notes["bias_moved_into_matmulnbits"] == 3
    assert not any(n.op_type in ("Add", "Gemm") for n in out.graph)
    assert all(n.attributes["accuracy_level"].as_int() == 4
               for n in out.graph if n.op_type == "MatMulNBits")
    x = {"x": np.random.default_rng(2).standard_normal((8, 256)).astype(np.float32)}
    assert cosine_similarity(_run(model, x)[0], _run(out, x)[0]) > 0.99
    before, after = model_stats(model), model_stats(out)
    assert after.total_macs == before.total_macs == (256 * 512 + 512 * 512 + 512 * 10)
    assert 4 < before.size_bytes / after.size_bytes < 7


@pytest.mark.parametrize("algorithm", ["hqq", "k-quant"])
def test_other_algorithms_give_matmulnbits(algorithm: str) -> None:
    model = _mlp()
    out, report = onnxopt.optimize(model, "int4", overrides={"algorithm": algorithm})
    assert report.passes[-1].modified, report.passes[-1].notes
    assert len(_nbits(out)) == 3
    x = {"x": np.random.default_rng(3).standard_normal((4, 64)).astype(np.float32)}
    assert cosine_similarity(_run(model, x)[0], _run(out, x)[0]) > 0.98


def test_gptq_on_calibration_data_keeps_the_head_at_8_bits() -> None:
    model = _mlp()
    rng = np.random.default_rng(4)
    calibration = [{"x": rng.standard_normal((8, 64)).astype(np.float32)} for _ in range(4)]
    out, report = onnxopt.optimize(model, "int4", calibration=calibration,
                                   overrides={"algorithm": "gptq"})
    assert sorted(_nbits(out).values()) == [4, 4, 8], report.passes[-1].notes
    x = {"x": rng.standard_normal((4, 64)).astype(np.float32)}
    assert cosine_similarity(_run(model, x)[0], _run(out, x)[0]) > 0.98


def test_int8_bits_and_float_head() -> None:
    out, report = onnxopt.optimize(_mlp(), "int4", overrides={"bits": 8, "lm_head_bits": 0})
    assert sorted(_nbits(out).values()) == [8, 8]
    ops = collections.Counter(n.op_type for n in out.graph)
    assert ops["Gemm"] + ops["MatMul"] == 1  # the head stays float
    assert report.passes[-1].notes["lm_head"]["bits"] == "float"


def test_no_matmul_is_kept_with_a_warning() -> None:
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Relu", ["x"], ["y"])], "relu",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 4])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 4])])
    model = ir.serde.deserialize_model(onnx.helper.make_model(graph))
    _, report = onnxopt.optimize(model, [{"pass": "quantize-weights"}])
    record = report.passes[-1]
    assert not record.modified
    assert "no MatMul" in record.notes["warning"]


@pytest.mark.parametrize("options", [{"block_size": 7}, {"block_size": 8}, {"bits": 3},
                                     {"algorithm": "awq"}, {"lm_head_bits": 2},
                                     {"algorithm": "gptq", "bits": 8}])
def test_bad_options_are_input_errors(options: dict) -> None:
    with pytest.raises(InputError):
        load_recipe([{"pass": "quantize-weights", **options}])


def test_a_weight_shared_by_two_transposed_gemms() -> None:
    """The zoo's control-flow model applies one Linear twice: split_gemms registered its
    transposed copy twice under one name, an internal error in onnx_ir."""
    rng = np.random.default_rng(3)
    w = onnx.numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32) / 8, "w")
    b = onnx.numpy_helper.from_array(rng.standard_normal(64).astype(np.float32), "b")
    nodes = [onnx.helper.make_node("Gemm", ["x", "w", "b"], ["h"], transB=1),
             onnx.helper.make_node("Relu", ["h"], ["r"]),
             onnx.helper.make_node("Gemm", ["r", "w", "b"], ["y"], transB=1)]
    graph = onnx.helper.make_graph(
        nodes, "shared", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 64])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 64])], [w, b])
    model = ir.serde.deserialize_model(
        onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]))
    out, report = onnxopt.optimize(model, ["quantize-weights"])
    assert len(_nbits(out)) == 2, report.passes[-1].notes
    x = {"x": rng.standard_normal((4, 64)).astype(np.float32)}
    assert cosine_similarity(_run(model, x)[0], _run(out, x)[0]) > 0.99
