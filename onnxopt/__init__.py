"""onnxopt: export, optimize and measure neural networks as ONNX, every pass verified."""

# Python binds a submodule to its parent's attribute when the submodule is first loaded, so a
# submodule named like an API function would replace that function on first import. No module
# may share a name in ``__all__`` (tests/test_readme.py checks it); the one exception, the package
# onnxopt.export, is imported before the function is bound, so ``onnxopt.export`` stays the
# function afterwards (``from onnxopt.export import ...`` still reaches the package). The
# benchmark code lives in ``onnxopt.benchmarking`` for this reason.
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
