"""Dependency groups on small hand-built graphs: who is coupled with whom, and what blocks."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.passes.common as common
import pytest

from onnxopt.passes.prune_channels._groups import ChannelGroup, analyze_channels, connected_components

OPSET = '<ir_version: 8, opset_import: ["" : 17]>'


def build(text: str, shapes: dict[str, tuple[int, ...]],
          consts: dict[str, np.ndarray] | None = None, seed: int = 0) -> ir.Model:
    """An onnx_ir model from ONNX text; initializers are seeded random arrays of ``shapes``
    plus the given ``consts``."""
    proto = onnx.parser.parse_model(OPSET + text)
    rng = np.random.default_rng(seed)
    arrays = {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}
    arrays.update(consts or {})
    for name, array in arrays.items():
        proto.graph.initializer.append(onnx.numpy_helper.from_array(array, name))
    onnx.checker.check_model(proto)
    model = ir.serde.deserialize_model(proto)
    common.ShapeInferencePass()(model)
    return model


def group_of(model: ir.Model, node_name: str, role: str) -> ChannelGroup:
    for group in analyze_channels(model.graph).groups:
        if any(n.name == node_name and r == role for n, r in group.members):
            return group
    raise AssertionError(f"no group with {node_name} {role}")


def weight(model: ir.Model, name: str) -> ir.Value:
    return model.graph.initializers[name]


CONV_BN_CONV = """
net (float[N, 3, 8, 8] x) => (float[N, 4, 8, 8] y) {
  [conv1] c1 = Conv <pads=[1,1,1,1], kernel_shape=[3,3]> (x, w1, b1)
  [bn1] n1 = BatchNormalization (c1, s1, t1, m1, v1)
  [relu1] r1 = Relu (n1)
  [conv2] y = Conv <kernel_shape=[1,1]> (r1, w2, b2)
}
"""
CONV_BN_CONV_SHAPES = dict(w1=(8, 3, 3, 3), b1=(8,), s1=(8,), t1=(8,), m1=(8,), v1=(8,),
                           w2=(4, 8, 1, 1), b2=(4,))


def test_conv_bn_relu_conv_is_one_group_with_every_slice() -> None:
    model = build(CONV_BN_CONV, CONV_BN_CONV_SHAPES)
    groups = analyze_channels(model.graph).groups
    assert [g.describe() for g in groups] == ["conv1 out -> bn1 -> conv2 in", "conv2 out"]
    first = groups[0]
    assert first.kind == "channels" and len(first.units) == 8 and len(first.prunable_units) == 8
    unit = first.units[3]
    slices = {(k[0].name, k[1]): idx.tolist() for k, idx in unit.atoms.items()}
    for name in ("w1", "b1", "s1", "t1", "m1", "v1"):
        assert slices[(name, 0)] == [3]
    assert slices[("w2", 1)] == [3]
    assert slices[("c1", 1)] == slices[("r1", 1)] == [3]
    # The last conv feeds the model output: its channels are blocked, with the reason.
    assert not groups[1].prunable_units
    assert groups[1].blocked_reasons == ["model output 'y' keeps its shape"]


def test_residual_add_removes_the_same_channel_on_both_branches() -> None:
    model = build("""
    net (float[N, 3, 6, 6] x) => (float[N, 2, 6, 6] y) {
      [conv_a] a = Conv <kernel_shape=[1,1]> (x, wa, ba)
      [relu_a] ra = Relu (a)
      [conv_b] b = Conv <pads=[1,1,1,1], kernel_shape=[3,3]> (ra, wb, bb)
      [add] s = Add (ra, b)
      [relu_s] rs = Relu (s)
      [conv_c] y = Conv <kernel_shape=[1,1]> (rs, wc)
    }""", dict(wa=(6, 3, 1, 1), ba=(6,), wb=(6, 6, 3, 3), bb=(6,), wc=(2, 6, 1, 1)))
    group = group_of(model, "conv_a", "out")
    assert group.describe() == "conv_a out -> conv_b in -> conv_b out -> add join -> conv_c in"
    assert len(group.units) == 6
    for unit in group.units:
        index = {k[0].name + f"/{k[1]}": idx.tolist() for k, idx in unit.atoms.items()}
        k = index["wa/0"]
        assert index["wb/0"] == index["wb/1"] == index["bb/0"] == index["wc/1"] == k


def test_concat_offsets_are_remapped_to_the_consumer() -> None:
    model = build("""
    net (float[N, 3, 4, 4] x) => (float[N, 2, 4, 4] y) {
      [conv_a] a = Conv <kernel_shape=[1,1]> (x, wa)
      [conv_b] b = Conv <kernel_shape=[1,1]> (x, wb)
      [cat] c = Concat <axis=1> (a, b)
      [conv_c] y = Conv <kernel_shape=[1,1]> (c, wc)
    }""", dict(wa=(4, 3, 1, 1), wb=(6, 3, 1, 1), wc=(2, 10, 1, 1)))
    group = group_of(model, "cat", "concat")
    assert group.describe() == "conv_a out -> conv_b out -> cat concat -> conv_c in"
    assert len(group.units) == 10
    wc = weight(model, "wc")
    for unit in group.units:
        (src, idx), = [(k[0].name, i) for k, i in unit.atoms.items() if k[0].name in ("wa", "wb")]
        consumer = unit.atoms[(wc, 1)].tolist()
        assert consumer == (idx + (4 if src == "wb" else 0)).tolist()


def test_depthwise_conv_passes_channels_through_as_whole_groups() -> None:
    model = build("""
    net (float[N, 3, 6, 6] x) => (float[N, 2, 6, 6] y) {
      [pw1] a = Conv <kernel_shape=[1,1]> (x, w1)
      [dw] d = Conv <group=8, pads=[1,1,1,1], kernel_shape=[3,3]> (a, wd, bd)
      [relu] r = Relu (d)
      [pw2] y = Conv <kernel_shape=[1,1]> (r, w2)
    }""", dict(w1=(8, 3, 1, 1), wd=(8, 1, 3, 3), bd=(8,), w2=(2, 8, 1, 1)))
    group = group_of(model, "dw", "dw")
    assert group.describe() == "pw1 out -> dw dw -> pw2 in"
    assert len(group.prunable_units) == 8
    wd = weight(model, "wd")
    assert [u.atoms[(wd, 0)].tolist() for u in group.units] == [[i] for i in range(8)]
    assert all((wd, 1) not in u.atoms for u in group.units)  # one input per group: never cut


def test_grouped_conv_units_are_whole_conv_groups() -> None:
    model = build("""
    net (float[N, 3, 6, 6] x) => (float[N, 2, 6, 6] y) {
      [pw1] a = Conv <kernel_shape=[1,1]> (x, w1)
      [gc] g = Conv <group=2, kernel_shape=[1,1]> (a, wg)
      [pw2] y = Conv <kernel_shape=[1,1]> (g, w2)
    }""", dict(w1=(8, 3, 1, 1), wg=(12, 4, 1, 1), w2=(2, 12, 1, 1)))
    group = group_of(model, "gc", "grouped")
    w1, wg = weight(model, "w1"), weight(model, "wg")
    assert len(group.units) == 2
    assert sorted(u.atoms[(w1, 0)].tolist() for u in group.units) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert sorted(u.atoms[(wg, 0)].tolist() for u in group.units) == [
        list(range(6)), list(range(6, 12))]


def test_flatten_to_gemm_ties_each_channel_to_its_feature_block() -> None:
    model = build("""
    net (float[N, 3, 3, 3] x) => (float[N, 5] y) {
      [conv] c = Conv <kernel_shape=[1,1]> (x, wc, bc)
      [relu] r = Relu (c)
      [flat] f = Flatten (r)
      [fc] y = Gemm <transB=1> (f, wf, bf)
    }""", dict(wc=(4, 3, 1, 1), bc=(4,), wf=(5, 36), bf=(5,)))
    group = group_of(model, "conv", "out")
    assert group.describe() == "conv out -> flat flatten -> fc in"
    wc, wf = weight(model, "wc"), weight(model, "wf")
    for unit in group.units:
        (c,) = unit.atoms[(wc, 0)].tolist()
        assert unit.atoms[(wf, 1)].tolist() == list(range(9 * c, 9 * c + 9))


def test_channels_last_reshape_gives_strided_feature_blocks() -> None:
    # Keras exports flatten NHWC tensors: channel c becomes features c, c+C, c+2C...
    model = build("""
    net (float[N, 3, 2, 2] x) => (float[N, 5] y) {
      [conv] c = Conv <kernel_shape=[1,1]> (x, wc)
      [nhwc] t = Transpose <perm=[0,2,3,1]> (c)
      [flat] f = Reshape (t, shape)
      [fc] y = MatMul (f, wf)
    }""", dict(wc=(4, 3, 1, 1), wf=(16, 5)), dict(shape=np.array([-1, 16], np.int64)))
    group = group_of(model, "conv", "out")
    wc, wf = weight(model, "wc"), weight(model, "wf")
    for unit in group.units:
        (c,) = unit.atoms[(wc, 0)].tolist()
        assert unit.atoms[(wf, 0)].tolist() == [c, c + 4, c + 8, c + 12]


MLP = """
mlp (float[N, 6] x) => (float[N, 3] y) {
  [fc1] h = MatMul (x, w1)
  [bias1] hb = Add (h, b1)
  [relu] r = Relu (hb)
  [fc2] y = MatMul (r, w2)
}
"""
MLP_SHAPES = dict(w1=(6, 10), b1=(10,), w2=(10, 3))


def test_mlp_hidden_neurons_group() -> None:
    model = build(MLP, MLP_SHAPES)
    group = group_of(model, "fc1", "out")
    assert group.describe() == "fc1 out -> fc2 in" and group.kind == "neurons"
    w1, b1, w2 = weight(model, "w1"), weight(model, "b1"), weight(model, "w2")
    for j, unit in enumerate(sorted(group.units, key=lambda u: int(u.atoms[(w1, 1)][0]))):
        assert unit.atoms[(w1, 1)].tolist() == unit.atoms[(b1, 0)].tolist() == [j]
        assert unit.atoms[(w2, 0)].tolist() == [j]


FFN = """
ffn (float[B, S, 8] x) => (float[B, S, 8] y) {
  [ln1] n = LayerNormalization <axis=-1> (x, g1, e1)
  [ffn_in] h = MatMul (n, w1)
  [ffn_in_bias] hb = Add (h, b1)
  [gelu_div] d = Div (hb, sqrt2)
  [gelu_erf] e = Erf (d)
  [gelu_add] e1p = Add (e, one)
  [gelu_mul] m = Mul (hb, e1p)
  [gelu_half] g = Mul (m, half)
  [ffn_out] o = MatMul (g, w2)
  [ffn_out_bias] ob = Add (o, b2)
  [residual] s = Add (x, ob)
  [ln2] y = LayerNormalization <axis=-1> (s, g2, e2)
}
"""
FFN_SHAPES = dict(g1=(8,), e1=(8,), w1=(8, 16), b1=(16,), w2=(16, 8), b2=(8,), g2=(8,), e2=(8,))
FFN_CONSTS = dict(sqrt2=np.array(1.4142135, np.float32), one=np.array(1.0, np.float32),
                  half=np.array(0.5, np.float32))


def test_transformer_ffn_neurons_are_prunable_and_hidden_size_is_not() -> None:
    model = build(FFN, FFN_SHAPES, FFN_CONSTS)
    ffn = group_of(model, "ffn_in", "out")
    assert ffn.describe() == "ffn_in out -> gelu_mul join -> ffn_out in"
    assert ffn.kind == "neurons" and len(ffn.prunable_units) == 16
    w1, b1 = weight(model, "w1"), weight(model, "b1")
    assert all((b1, 0) in u.atoms and (w1, 1) in u.atoms for u in ffn.units)
    hidden = group_of(model, "ffn_out", "out")
    assert not hidden.prunable_units
    assert any("LayerNormalization" in r or "model" in r for r in hidden.blocked_reasons)


ATTENTION = """
mha (float[B, 5, 8] x) => (float[B, 5, 8] y) {
  [q_proj] q0 = MatMul (x, wq)
  [q_bias] q1 = Add (q0, bq)
  [q_heads] q2 = Reshape (q1, split_heads)
  [q_t] q = Transpose <perm=[0,2,1,3]> (q2)
  [k_proj] k0 = MatMul (x, wk)
  [k_heads] k2 = Reshape (k0, split_heads_k)
  [k_t] kt = Transpose <perm=[0,2,3,1]> (k2)
  [v_proj] v0 = MatMul (x, wv)
  [v_heads] v2 = Reshape (v0, split_heads_v)
  [v_t] v = Transpose <perm=[0,2,1,3]> (v2)
  [scores] s = MatMul (q, kt)
  [scale] ss = Div (s, temperature)
  [softmax] p = Softmax <axis=-1> (ss)
  [context] c = MatMul (p, v)
  [c_t] ct = Transpose <perm=[0,2,1,3]> (c)
  [merge_heads] cm = Reshape (ct, merge)
  [o_proj] o = MatMul (cm, wo)
  [o_bias] y = Add (o, bo)
}
"""
ATTENTION_SHAPES = dict(wq=(8, 8), bq=(8,), wk=(8, 8), wv=(8, 8), wo=(8, 8), bo=(8,))


def attention_model(seed: int = 0) -> ir.Model:
    """Two heads of size 4 over a hidden size of 8; head-count constants in the Reshapes."""
    split = np.array([0, 0, 2, 4], np.int64)
    return build(ATTENTION, ATTENTION_SHAPES, dict(
        temperature=np.array(2.0, np.float32), split_heads=split, split_heads_k=split.copy(),
        split_heads_v=split.copy(), merge=np.array([0, 0, 8], np.int64)), seed=seed)


def test_attention_heads_group_couples_qkv_columns_and_output_rows() -> None:
    model = attention_model()
    group = group_of(model, "q_heads", "heads")
    assert group.kind == "heads" and group.unit_width == 4
    assert len(group.prunable_units) == 2
    wq, wk, wv, wo = (weight(model, n) for n in ("wq", "wk", "wv", "wo"))
    for unit in group.units:
        cols = unit.atoms[(wq, 1)].tolist()
        assert cols in ([0, 1, 2, 3], [4, 5, 6, 7])
        assert unit.atoms[(wk, 1)].tolist() == unit.atoms[(wv, 1)].tolist() == cols
        assert unit.atoms[(wo, 0)].tolist() == cols


def test_unknown_op_blocks_its_group_with_a_reason() -> None:
    model = build("""
    net (float[N, 3, 4, 4] x) => (float[N, 2, 4, 4] y) {
      [conv1] a = Conv <kernel_shape=[1,1]> (x, w1)
      [lrn] l = LRN <size=3> (a)
      [conv2] y = Conv <kernel_shape=[1,1]> (l, w2)
    }""", dict(w1=(6, 3, 1, 1), w2=(2, 6, 1, 1)))
    group = group_of(model, "conv1", "out")
    assert not group.prunable_units
    assert group.blocked_reasons == ["LRN 'lrn' has no channel rule"]


def test_split_ties_each_output_to_its_slice() -> None:
    model = build("""
    net (float[N, 3, 4, 4] x) => (float[N, 2, 4, 4] y) {
      [conv1] a = Conv <kernel_shape=[1,1]> (x, w1)
      [split] s1, s2 = Split <axis=1> (a, sizes)
      [conv_a] p = Conv <kernel_shape=[1,1]> (s1, wa)
      [conv_b] q = Conv <kernel_shape=[1,1]> (s2, wb)
      [add] y = Add (p, q)
    }""", dict(w1=(6, 3, 1, 1), wa=(2, 2, 1, 1), wb=(2, 4, 1, 1)),
        dict(sizes=np.array([2, 4], np.int64)))
    group = group_of(model, "split", "split")
    w1, wa, wb = weight(model, "w1"), weight(model, "wa"), weight(model, "wb")
    for unit in group.units:
        (c,) = unit.atoms[(w1, 0)].tolist()
        if c < 2:
            assert unit.atoms[(wa, 1)].tolist() == [c]
        else:
            assert unit.atoms[(wb, 1)].tolist() == [c - 2]


@pytest.mark.parametrize("edges,expected", [
    ([], [0, 1, 2, 3]),
    ([np.array([[3], [0]])], [0, 1, 2, 0]),
    ([np.array([[1, 2], [2, 3]])], [0, 1, 1, 1]),
    ([np.array([[3, 2, 1], [2, 1, 0]])], [0, 0, 0, 0]),
])
def test_connected_components(edges: list[np.ndarray], expected: list[int]) -> None:
    assert connected_components(4, edges).tolist() == expected
