"""Hugging Face architectures (random weights from tiny configs, no downloads) through onnxopt's
exporter and the ``int8`` and ``cleanup`` recipes (issue 19).

BERT and ViT have a graph output that nodes inside the graph also read (the pooler reads the last
hidden state): INT8 used to fail dropping that output's Quantize/Dequantize pair. GPT-2's Conv1D
is a Gemm on a 2-D view that onnxscript's attention fusion replaced by a 3-D value: the INT8
model did not load. MACs must not change under ``cleanup``.
"""

from __future__ import annotations

import collections

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

import onnxopt
from onnxopt.stats import model_stats

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

pytestmark = pytest.mark.slow  # each exports a model with torch's dynamo exporter (~10 s)

SEQ = 16


def _ids() -> torch.Tensor:
    return torch.randint(0, 100, (1, SEQ), generator=torch.Generator().manual_seed(0))


def _bert():
    return transformers.BertModel(transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64)), (_ids(),)


def _distilbert():
    return transformers.DistilBertModel(transformers.DistilBertConfig(
        vocab_size=100, dim=32, n_layers=2, n_heads=2, hidden_dim=64,
        max_position_embeddings=64)), (_ids(),)


def _gpt2():
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=100, n_embd=32, n_layer=2, n_head=2, n_positions=64, use_cache=False)), (_ids(),)


def _vit():
    return transformers.ViTModel(transformers.ViTConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64)), (torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)),)


def _t5_encoder():
    # The relative position bias is computed from values at run time: after cleanup's folding,
    # neither ONNX's nor ORT's symbolic inference follows the attention shapes (the zoo's
    # hf-t5-encoder printed 26.2 M -> 23.6 M MACs); the count then comes from one ORT run.
    return transformers.T5EncoderModel(transformers.T5Config(
        vocab_size=100, d_model=32, d_kv=16, d_ff=64, num_layers=1, num_heads=2,
        relative_attention_num_buckets=8)), (_ids(), torch.ones(1, SEQ, dtype=torch.int64))


def _swin():
    # Two blocks in a stage: the second's shifted window made fuse-transformer's rewrites leave a
    # node ahead of its input's producer, and onnx_ir's clone then failed (zoo hf-swin, int8).
    return transformers.SwinModel(transformers.SwinConfig(
        image_size=32, patch_size=4, embed_dim=16, depths=[1, 2], num_heads=[1, 2],
        window_size=2)), (torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)),)


FACTORIES = {"bert": _bert, "distilbert": _distilbert, "gpt2": _gpt2, "vit": _vit,
             "t5-encoder": _t5_encoder, "swin": _swin}


@pytest.fixture(scope="module")
def exported() -> dict[str, ir.Model]:
    cache: dict[str, ir.Model] = {}

    def get(name: str) -> ir.Model:
        if name not in cache:
            torch.manual_seed(0)
            module, example = FACTORIES[name]()
            cache[name] = onnxopt.export(module.eval(), example)
        return cache[name]
    return get  # type: ignore[return-value]


def _calibration(model: ir.Model, n: int = 4) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    feeds = []
    for _ in range(n):
        batch = {}
        for value in model.graph.inputs:
            dims = [d if isinstance(d, int) else 1 for d in value.shape]
            if value.dtype == ir.DataType.INT64:
                batch[value.name] = rng.integers(0, 100, dims, dtype=np.int64)
            else:
                batch[value.name] = rng.standard_normal(dims).astype(np.float32)
        feeds.append(batch)
    return feeds


@pytest.mark.parametrize("name", ["bert", "vit", "gpt2", "distilbert", "swin"])
def test_int8_gives_a_loadable_int8_model(name: str, exported) -> None:
    model = exported(name)
    calibration = _calibration(model)
    out, report = onnxopt.optimize(model, "int8", calibration=calibration,
                                   overrides={"quantize.measure_latency": False})
    proto = ir.serde.serialize_model(out)
    ops = collections.Counter(n.op_type for n in proto.graph.node)
    int8_ops = sum(ops[op] for op in ("QuantizeLinear", "DynamicQuantizeLinear",
                                      "MatMulInteger", "DynamicQuantizeMatMul", "QAttention"))
    assert int8_ops > 0, ops
    session = ort.InferenceSession(proto.SerializeToString())
    fp32 = ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString())
    assert [o.name for o in session.get_outputs()] == [o.name for o in fp32.get_outputs()]
    for got, want in zip(session.run(None, calibration[0]), fp32.run(None, calibration[0])):
        assert got.shape == want.shape


@pytest.mark.parametrize("name", ["bert", "gpt2", "distilbert", "t5-encoder"])
def test_cleanup_keeps_the_mac_count(name: str, exported) -> None:
    model = exported(name)
    before = model_stats(model)
    out, _ = onnxopt.optimize(model, "cleanup", calibration=_calibration(model, 1))
    after = model_stats(out)
    assert before.macs_unknown_nodes == after.macs_unknown_nodes == 0
    assert after.total_macs == before.total_macs > 0

