"""Weight-only INT4/INT8 quantization (``quantize-weights``): MatMuls to ONNX Runtime's MatMulNBits.

Private modules: ``_eligible`` (which MatMul/Gemm nodes have a constant 2-D weight, which one is
the LM head), ``_convert`` (ONNX Runtime's ``MatMulNBitsQuantizer`` per algorithm).
"""

from onnxopt.passes.quantize_weights.quantize_weights import (QuantizeWeightsConfig,
                                                              QuantizeWeightsPass)

__all__ = ["QuantizeWeightsConfig", "QuantizeWeightsPass"]
