"""onnxopt: export, optimize and measure neural networks as ONNX, every pass verified."""

from onnxopt.api import benchmark, export, inspect, load, optimize
from onnxopt.errors import InputError, OnnxoptError, QualityGateError, VerificationError
from onnxopt.model_io import save_model as save

__version__ = "0.1.0"

__all__ = [
    "InputError",
    "OnnxoptError",
    "QualityGateError",
    "VerificationError",
    "benchmark",
    "export",
    "inspect",
    "load",
    "optimize",
    "save",
]
