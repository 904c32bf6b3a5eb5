"""onnxopt's graph passes, one module per pass family; installed as ``onnxopt.passes``.

Importing this package registers every pass with :mod:`onnxopt.registry`.
"""

if __name__ != "onnxopt.passes":  # pragma: no cover - guard against a second copy of the registry
    raise ImportError(
        "the 'passes' folder is installed as 'onnxopt.passes'; import it that way "
        "(importing it as a top-level 'passes' would create a second pass registry)"
    )

from onnxopt.passes import cleanup  # noqa: E402,F401  (registers the pass)
from onnxopt.passes import fusion  # noqa: E402,F401  (after cleanup: its `default` recipe wins)
from onnxopt.passes import prune_channels  # noqa: E402,F401
from onnxopt.passes import transformer  # noqa: E402,F401
from onnxopt.passes import prune  # noqa: E402,F401
from onnxopt.passes import quantize  # noqa: E402,F401
from onnxopt.passes import share_weights  # noqa: E402,F401
from onnxopt.passes import fp16  # noqa: E402,F401
from onnxopt.passes import deep_compression  # noqa: E402,F401
