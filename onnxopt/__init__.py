"""onnxopt: export, optimize and measure neural networks as ONNX, every pass verified."""

# The package onnxopt.export is imported before the function of the same name is bound: Python
# sets the parent's attribute only when a submodule is first loaded, so ``onnxopt.export`` stays
# the function afterwards (``from onnxopt.export import ...`` still reaches the package).
import onnxopt.export  # noqa: F401  isort: skip
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
