"""INT8 quantization (``quantize``): prepare, calibrate, convert, then verify and time.

The flow, one private module per phase: ``_prepare`` (decide what to quantize), ``_calibrate``
(activation ranges), ``_safety`` (tensors that stay float), ``_convert`` (Q/DQ or dynamic INT8
through ``onnxruntime.quantization``; ``_streamed`` for models over 2 GB), ``_sensitivity`` and
``_search`` (which nodes fall back to FP32), ``_report`` (the pass's notes).
"""

from onnxopt.passes.quantize.quantize import AccuracyBudgetError, QuantizeConfig, QuantizePass

__all__ = ["AccuracyBudgetError", "QuantizeConfig", "QuantizePass"]
