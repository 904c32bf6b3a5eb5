"""PyTorch to ONNX: the dynamo exporter, with the TorchScript exporter as a logged fallback.

``torch.onnx.export(..., dynamo=True)`` hands back an ``onnx_ir.Model`` directly and handles
modern models best; the TorchScript tracer still converts some models the dynamo path rejects
(data-dependent Python control flow, for one), so ``exporter="auto"`` tries dynamo first.
The caller's module is put in eval mode for the export and restored afterwards.
"""

from __future__ import annotations

import contextlib
import logging
import re
import tempfile
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from onnxopt.errors import InputError
from onnxopt.export._exported import Exported
from onnxopt.export._frameworks import require
from onnxopt.export._naming import BATCH_DIM, default_names

logger = logging.getLogger("onnxopt.export")

DYNAMO = "torch.onnx (dynamo)"
TORCHSCRIPT = "torch.onnx (torchscript)"


def export_module(
    module: Any,
    example_inputs: Any,
    *,
    dynamic_batch: bool,
    opset: int,
    exporter: str,
) -> Exported:
    """Export an ``nn.Module``; ``exporter`` is ``auto``, ``dynamo`` or ``torchscript``."""
    torch = require("torch", "exporting a PyTorch model")
    if example_inputs is None:
        raise InputError(
            "exporting a PyTorch module needs example_inputs (a tensor or a tuple of tensors)"
        )
    args = _as_tensors(torch, example_inputs)
    fallback_reason = None
    with _eval_mode(module):
        if exporter in ("auto", "dynamo"):
            try:
                model = _export_dynamo(torch, module, args, dynamic_batch, opset)
                name = DYNAMO
            except torch.onnx.OnnxExporterError as exc:
                if exporter == "dynamo":
                    raise InputError(f"the dynamo exporter failed: {_first_line(exc)}") from exc
                fallback_reason = _first_line(exc)
                logger.warning(
                    "dynamo export failed (%s); falling back to the TorchScript exporter",
                    fallback_reason,
                )
        if exporter == "torchscript" or fallback_reason is not None:
            try:
                model = _export_torchscript(torch, module, args, dynamic_batch, opset)
                name = TORCHSCRIPT
            except (torch.onnx.OnnxExporterError, RuntimeError) as exc:
                before = f"dynamo: {fallback_reason}; " if fallback_reason else ""
                raise InputError(
                    f"the model could not be exported ({before}torchscript: {_first_line(exc)})"
                ) from exc
    _detach_weights(torch, model)
    return Exported(
        model=model,
        exporter=name,
        reference=_reference(torch, module, args),
        reference_name=f"torch {torch.__version__}",
        example_batch=_batch_of(args),
        examples=[a.detach().cpu().numpy() for a in args],
        fallback_reason=fallback_reason,
    )


def export_program(program: Any, example_inputs: Any, *, opset: int) -> Exported:
    """Export a ``torch.export.ExportedProgram``; its dynamic dims are already decided."""
    torch = require("torch", "exporting a torch.export program")
    if example_inputs is not None:
        args = _as_tensors(torch, example_inputs)
    elif getattr(program, "example_inputs", None):
        args = _as_tensors(torch, tuple(program.example_inputs[0]))
    else:
        args = None
    try:
        model = torch.onnx.export(program, dynamo=True, opset_version=opset, verbose=False).model
    except torch.onnx.OnnxExporterError as exc:
        raise InputError(
            f"the exported program could not be converted: {_first_line(exc)}"
        ) from exc
    _detach_weights(torch, model)
    if args is None:
        return Exported(model=model, exporter=DYNAMO, reference=None, reference_name="none")
    return Exported(
        model=model,
        exporter=DYNAMO,
        # A program's train/eval behaviour was fixed when it was traced: call it as it is.
        reference=_reference(torch, program.module(), args, set_eval=False),
        reference_name=f"torch {torch.__version__}",
        example_batch=_batch_of(args),
        examples=[a.detach().cpu().numpy() for a in args],
    )


def load_program(path: Path) -> Any:
    """Read a ``.pt2`` archive written by ``torch.export.save``."""
    torch = require("torch", f"reading {path.name}")
    try:
        return torch.export.load(str(path))
    except (zipfile.BadZipFile, RuntimeError, ValueError, KeyError, OSError) as exc:
        raise InputError(f"not a readable torch.export archive ({_first_line(exc)})", path) from exc


def _export_dynamo(
    torch: Any, module: Any, args: tuple, dynamic_batch: bool, opset: int
) -> ir.Model:
    dynamic_shapes = None
    if dynamic_batch:
        batch = torch.export.Dim(BATCH_DIM)
        dynamic_shapes = tuple({0: batch} if a.ndim else None for a in args)
    program = torch.onnx.export(
        module,
        args,
        dynamo=True,
        dynamic_shapes=dynamic_shapes,
        opset_version=opset,
        verbose=False,
    )
    return program.model


def _export_torchscript(
    torch: Any, module: Any, args: tuple, dynamic_batch: bool, opset: int
) -> ir.Model:
    """The legacy tracer writes a file; read it back fully (external data too) before cleanup."""
    with torch.no_grad():
        outputs = _flatten(module(*args))
    in_names = default_names("input", len(args))
    out_names = default_names("output", len(outputs))
    dynamic_axes = None
    if dynamic_batch:
        dynamic_axes = {n: {0: BATCH_DIM} for n, a in zip(in_names, args) if a.ndim}
        dynamic_axes.update({n: {0: BATCH_DIM} for n, o in zip(out_names, outputs) if o.ndim})
    with (
        tempfile.TemporaryDirectory(prefix="onnxopt-torchscript-") as tmp,
        warnings.catch_warnings(),
    ):
        # We chose this exporter on purpose (and logged why); its deprecation notice is noise here.
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        path = Path(tmp) / "model.onnx"
        torch.onnx.export(
            module,
            args,
            str(path),
            dynamo=False,
            input_names=in_names,
            output_names=out_names,
            dynamic_axes=dynamic_axes,
            opset_version=opset,
            do_constant_folding=True,
        )
        proto = onnx.load(str(path))
    return ir.serde.deserialize_model(proto)


def _reference(torch: Any, module: Any, args: tuple, *, set_eval: bool = True):  # noqa: ANN202
    """A :data:`~onnxopt.export._verify.Reference` that runs ``module`` under no_grad."""
    devices = [a.device for a in args]

    def run(arrays: list[np.ndarray]) -> list[np.ndarray]:
        tensors = [torch.from_numpy(np.ascontiguousarray(a)).to(d) for a, d in zip(arrays, devices)]
        with torch.no_grad(), _eval_mode(module) if set_eval else contextlib.nullcontext():
            try:
                out = module(*tensors)
            except RuntimeError as exc:
                raise InputError(
                    f"the PyTorch model fails at batch {len(arrays[0])} ({_first_line(exc)}); "
                    "export with dynamic_batch=False"
                ) from exc
        return [t.detach().cpu().numpy() for t in _flatten(out)]

    return run


@contextlib.contextmanager
def _eval_mode(module: Any) -> Iterator[None]:
    """Eval mode for the duration; each submodule's own training flag is restored after."""
    modes = [(m, m.training) for m in module.modules()] if hasattr(module, "modules") else []
    if hasattr(module, "eval"):
        module.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


def _detach_weights(torch: Any, model: ir.Model) -> None:
    """Copy initializers out of torch's memory.

    The dynamo exporter's initializers alias the module's parameters, so training the module after
    export would silently change the ONNX model's weights.
    """
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if tensor is not None and isinstance(getattr(tensor, "raw", None), torch.Tensor):
            value.const_value = ir.Tensor(
                np.array(tensor.numpy(), copy=True), dtype=tensor.dtype, name=value.name
            )


def _as_tensors(torch: Any, example_inputs: Any) -> tuple:
    items = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    if not items:
        raise InputError("example_inputs is empty; give a tensor or a tuple of tensors")
    tensors = []
    for i, item in enumerate(items):
        if isinstance(item, np.ndarray):
            item = torch.from_numpy(item)
        if not isinstance(item, torch.Tensor):
            raise InputError(
                f"example input {i} is a {type(item).__name__}; expected a torch.Tensor "
                "(keyword and nested inputs are not supported)"
            )
        tensors.append(item)
    return tuple(tensors)


def _flatten(out: Any) -> list:
    """Tensors of a nested output, in torch.export order: sequences in order, dicts by insertion."""
    if isinstance(out, dict):
        return [t for v in out.values() for t in _flatten(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in _flatten(v)]
    return [out] if hasattr(out, "detach") else []


def _batch_of(args: tuple) -> int | None:
    return int(args[0].shape[0]) if args and args[0].ndim else None


def _first_line(exc: BaseException) -> str:
    """The line that says what went wrong.

    torch's exporter errors open with a generic banner; the cause follows "## Exception summary"
    as ``<class 'pkg.SomeError'>: message``.
    """
    lines = [_plain(ln) for ln in str(exc).splitlines() if ln.strip()] or [type(exc).__name__]
    if "## Exception summary" in lines:
        lines = lines[lines.index("## Exception summary") + 1 :] or lines
    return re.sub(r"^<class '(?:[\w.]+\.)?(\w+)'>", r"\1", lines[0])[:300]


def _plain(line: str) -> str:
    """Drop the ANSI colour codes torch puts in its messages."""
    return re.sub(r"\x1b\[[0-9;]*m", "", line).strip()
