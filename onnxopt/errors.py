"""Error types, and the exit codes the CLI maps them to.

Every error the user can cause is an :class:`InputError` (exit 2) with a one-line message that names
the file and the problem; a file that cannot be written (read-only folder, disk full) is one too. A
quality gate that is not met (verification, accuracy budget) is a :class:`QualityGateError` (exit 1).
A pass that fails on a valid model is an :class:`InternalError` (exit 3): onnxopt's limitation or
bug, not the user's input; the CLI prints it (and any other unexpected exception) as one line, with
the traceback only under ``--debug``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # only for annotations: errors.py imports nothing of onnxopt at run time
    import onnx_ir as ir

    from onnxopt.pipeline import OptimizationReport


class OnnxoptError(Exception):
    """Base class of the errors onnxopt raises on purpose."""

    exit_code = 1

    def __init__(self, message: str, path: str | Path | None = None) -> None:
        self.path = None if path is None else str(path)
        self.message = message
        super().__init__(f"{self.path}: {message}" if self.path else message)


class InputError(OnnxoptError):
    """Bad input: a missing or malformed file, a wrong recipe, feeds that do not fit the model."""

    exit_code = 2


class InternalError(OnnxoptError):
    """onnxopt could not handle a valid input: a pass's limitation or a bug (exit 3)."""

    exit_code = 3


def write_error(exc: OSError, path: str | Path) -> InputError:
    """A failure to write ``path`` as one line naming it and the cause (``No space left on
    device``, ``Read-only file system``, ``Is a directory``)."""
    cause = exc.strerror or " ".join(str(exc).split()) or type(exc).__name__
    return InputError(f"cannot write: {cause}", path)


class QualityGateError(OnnxoptError):
    """The result was computed but misses a declared budget (fidelity, accuracy, regression).

    ``partial``: ``(model, report)`` when the pipeline had a result to keep (a pass's best
    candidate and the report up to it), so a caller can still save both; else ``None``.
    """

    exit_code = 1

    def __init__(self, message: str, path: str | Path | None = None) -> None:
        super().__init__(message, path)
        self.partial: tuple[ir.Model, OptimizationReport] | None = None


class VerificationError(QualityGateError):
    """A pass changed the model's outputs by more than its declared tolerance.

    ``report``: when the pipeline raises it (``on_breach="raise"``), the report up to the last
    pass that verified, with this breach among its ``warnings``; else ``None``.
    """

    def __init__(self, pass_name: str, output: str, node: str | None, detail: str) -> None:
        self.pass_name = pass_name
        self.output = output
        self.node = node
        self.detail = detail
        where = f"output '{output}'" + (f" (first diverging node: {node})" if node else "")
        super().__init__(f"pass '{pass_name}' breached its tolerance at {where}: {detail}")
        self.report: OptimizationReport | None = None

    def to_dict(self) -> dict[str, str | None]:
        """The breach as plain data, for a report's ``warnings``."""
        return {"pass": self.pass_name, "output": self.output, "node": self.node,
                "detail": self.detail, "message": self.message}
