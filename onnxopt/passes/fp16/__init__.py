"""FP16 conversion (``fp16``): float16 weights and compute where a kernel exists and the values fit.

Private modules: ``_kernels`` (which ops have FP16 kernels on this machine or on aarch64),
``_ranges`` (activations whose values do not survive a float16 cast). ``deep-compress`` uses the
cast-error measure through this facade.
"""

from onnxopt.passes.fp16._ranges import MAX_CAST_ERROR, float16_cast_error
from onnxopt.passes.fp16.fp16 import FP16_BUDGET, Fp16Config, Fp16Pass

__all__ = ["FP16_BUDGET", "MAX_CAST_ERROR", "Fp16Config", "Fp16Pass", "float16_cast_error"]
