"""onnxopt's graph passes, one module per pass family; installed as ``onnxopt.passes``.

Importing this package registers every pass with :mod:`onnxopt.registry`.
"""

if __name__ != "onnxopt.passes":  # pragma: no cover - guard against a second copy of the registry
    raise ImportError(
        "the 'passes' folder is installed as 'onnxopt.passes'; import it that way "
        "(importing it as a top-level 'passes' would create a second pass registry)"
    )

from onnxopt.passes import cleanup  # noqa: E402,F401  (registers the pass)
