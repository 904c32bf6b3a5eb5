"""``quantize-weights``: INT4/INT8 weight-only quantization of MatMuls (ONNX Runtime's MatMulNBits).

Weights become packed 4- or 8-bit blocks of ``block_size`` values along K with one float scale
(and a zero point) per block; activations stay float. ORT's ``MatMulNBits`` CPU kernel
dequantizes on the fly or, with ``accuracy_level=4``, quantizes the activations to int8 per block
and runs an int8 dot product (ORT documents up to ~2.3x faster than level 0 on CPU). The
rewriting is ONNX Runtime's ``MatMulNBitsQuantizer`` (:mod:`._convert`); this pass picks which
nodes go and at which precision:

* only MatMuls with a constant 2-D float weight (Gemm from ``fuse`` is split back first, a
  tied head's ``Transpose`` of the embedding table becomes its own constant, :mod:`._eligible`);
  embeddings (``Gather``) stay float;
* the MatMul nearest the logits output (the LM head) gets ``lm_head_bits`` (8 by default, 0 =
  float): 4-bit LM heads make small language models repeat themselves, so peers keep it at 8.

A model without an eligible MatMul is kept, and ``notes["warning"]`` says why. The pipeline
verifies the result against the model the pass received within a cosine floor (``min_cosine``).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common
import onnxruntime as ort

from onnxopt import runner
from onnxopt.errors import InternalError
from onnxopt.feeds import synthesize_feeds
from onnxopt.metrics import Budget
from onnxopt.passes._shared.surgery import replace_contents
from onnxopt.passes.quantize_weights._convert import ALGORITHMS, finish, quantize
from onnxopt.passes.quantize_weights._eligible import (eligible_matmuls, fold_weight_transposes,
                                                       lm_head, split_gemms)
from onnxopt.registry import OptPass, option, register

# 4-bit blocks of 32 keep each weight within ~8% RMS (cosine ~0.997 per MatMul); the errors of
# a few dozen MatMuls in sequence add up. Measured on random-weight GPT-2 logits: 2 layers 0.999,
# 1 layer n_embd 256 0.992, 6 layers n_embd 512 0.979 (quantize's 0.98 floor undid that one).
# 0.95 passes those and still catches a wrong block layout, a lost bias or a swapped K/N.
COSINE_FLOOR = 0.95


@dataclasses.dataclass
class QuantizeWeightsConfig:
    bits: int = option(4, "Bits per weight: 4 or 8.", min=4, max=8)
    block_size: int = option(32, "Weights per scale along K: a power of 2, at least 16.", min=16)
    accuracy_level: int = option(4, "MatMulNBits compute: 0 unset, 1 fp32, 2 fp16, 3 bf16, "
                                    "4 int8 (fastest on CPU).", max=4)
    algorithm: str = option("rtn", "rtn (ORT's default round-to-nearest), hqq (half-quadratic, "
                                   "no data), k-quant, gptq (needs calibration data).")
    symmetric: bool = option(False, "Symmetric blocks (no zero point); rtn only.")
    lm_head_bits: int = option(8, "Bits of the MatMul nearest the logits output: 8, 4, or 0 "
                                  "(float).", max=8)
    min_cosine: float = option(COSINE_FLOOR, "Verification floor: cosine of every output "
                                             "against the model the pass received.", max=1)

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise ValueError(f"option 'bits' must be 4 or 8, got {self.bits}")
        if self.lm_head_bits not in (0, 4, 8):
            raise ValueError(f"option 'lm_head_bits' must be 0, 4 or 8, got {self.lm_head_bits}")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise ValueError(f"option 'block_size' must be a power of 2 >= 16, got {self.block_size}")
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"option 'algorithm' must be one of {', '.join(ALGORITHMS)}, "
                             f"got {self.algorithm!r}")
        if self.algorithm == "gptq" and self.bits != 4:
            raise ValueError("algorithm 'gptq' writes 4-bit weights only (ORT's GPTQ)")
        if self.symmetric and self.algorithm != "rtn":
            raise ValueError("option 'symmetric' applies to algorithm 'rtn' only")


@register
class QuantizeWeightsPass(OptPass):
    name = "quantize-weights"
    summary = "INT4/INT8 weight-only MatMuls (ORT MatMulNBits); LM head at 8 bits, embeddings float."
    Config = QuantizeWeightsConfig
    needs_onnxruntime = True

    def budget(self) -> Budget:
        return Budget.cosine_floor(self.config.min_cosine)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        cfg: QuantizeWeightsConfig = self.config
        work = model.clone()
        split = split_gemms(work)
        untied = fold_weight_transposes(work)
        eligible = eligible_matmuls(work)
        self.notes = {"algorithm": cfg.algorithm, "bits": cfg.bits, "block_size": cfg.block_size,
                      "accuracy_level": cfg.accuracy_level, "onnxruntime": ort.__version__}
        if not eligible:
            self.notes["skipped"] = "no MatMul or Gemm with a constant 2-D float weight"
            self.notes["warning"] = "nothing quantized: " + self.notes["skipped"]
            return ir.passes.PassResult(model, False)
        for i, node in enumerate(eligible):  # the quantizer selects nodes by name
            node.name = node.name or f"quantize_weights_matmul_{i}"
        head = lm_head(work, eligible)
        body = {n.name for n in eligible if n is not head}
        proto = ir.serde.serialize_model(work)
        calibration = self._calibration(model) if cfg.algorithm == "gptq" else None
        if body:
            proto = quantize(proto, algorithm=cfg.algorithm, bits=cfg.bits,
                             block_size=cfg.block_size, symmetric=cfg.symmetric, include=body,
                             calibration=calibration)
        if head is not None and cfg.lm_head_bits:
            proto = quantize(proto, algorithm="rtn", bits=cfg.lm_head_bits,
                             block_size=cfg.block_size, symmetric=False, include={head.name},
                             calibration=None)
        result = ir.serde.deserialize_model(proto)
        bias_moved = finish(result, cfg.accuracy_level)
        common.RemoveUnusedNodesPass()(result)
        common.TopologicalSortPass()(result)
        _load_check(result)
        nbits = [n for n in result.graph if n.op_type == "MatMulNBits"]
        if not nbits:
            raise InternalError(f"ONNX Runtime's quantizer ({cfg.algorithm}) quantized none of "
                                f"{len(eligible)} eligible MatMuls")
        replace_contents(model, result)
        model.opset_imports.update(result.opset_imports)
        self.notes.update({
            "quantized": len(nbits), "eligible": len(eligible), "gemms_split": split,
            "transposed_weights_folded": untied,
            "bias_moved_into_matmulnbits": bias_moved,
            "bits_by_node": {n.name: n.attributes["bits"].as_int() for n in nbits},
            "lm_head": None if head is None else {
                "node": head.name, "bits": cfg.lm_head_bits or "float"},
        })
        return ir.passes.PassResult(model, True)

    def _calibration(self, model: ir.Model) -> list[dict[str, np.ndarray]]:
        """GPTQ's inputs: calibration batches, else the verification ones, else seeded feeds."""
        batches = list(self.context.calibration or self.context.verify_feeds or [])
        return batches or [synthesize_feeds(model, batch=1, seed=self.context.seed)]


def _load_check(model: ir.Model) -> None:
    """ONNX Runtime must load the result (the MatMulNBits kernel checks K, N and block sizes)."""
    try:
        runner.create_session(ir.serde.serialize_model(model).SerializeToString(), threads=1)
    except Exception as exc:  # ORT raises its own exception types on load
        raise InternalError("the weight-quantized model does not load in ONNX Runtime: "
                            f"{str(exc).splitlines()[0][:200]}") from exc
