"""Export models from PyTorch, TensorFlow/Keras or ONNX files, verified numerically.

``export`` turns any supported source into an ``onnx_ir.Model`` with a dynamic batch axis and
readable input/output names, then runs the source framework and ONNX Runtime on the same seeded
inputs (at two batch sizes when the batch is dynamic). The result, an :class:`ExportCheck`, is
stored in the model's ``metadata_props`` under ``onnxopt.export.*``; a miss raises
:class:`~onnxopt.errors.QualityGateError`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx_ir as ir

from onnxopt.errors import InputError
from onnxopt.export import _tensorflow, _torch
from onnxopt.export._exported import Exported
from onnxopt.export._naming import apply_names, name_batch_axis
from onnxopt.export._onnx import load_onnx_source
from onnxopt.export._sources import Source, resolve
from onnxopt.export._verify import ExportCheck, verification_batches, verify_export
from onnxopt.feeds import input_specs
from onnxopt.model_io import save_model

__all__ = ["ExportCheck", "export", "export_to_file"]

logger = logging.getLogger("onnxopt.export")

Exporter = Literal["auto", "dynamo", "torchscript"]
_EXPORTERS = ("auto", "dynamo", "torchscript")


def export(
    src: Any,
    example_inputs: Any = None,
    *,
    dynamic_batch: bool = True,
    opset: int = 18,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    verify: bool = True,
    rtol: float = 1e-4,
    atol: float = 1e-5,
    exporter: Exporter = "auto",
) -> ir.Model:
    """Export ``src`` to ONNX and check it against the source framework.

    ``src``: a torch ``nn.Module`` (with ``example_inputs``: a tensor or tuple of tensors), a
    ``torch.export.ExportedProgram`` or ``.pt2`` file, a Keras 3 model or ``.keras`` file, a
    SavedModel directory, a ``tf.function`` with an input_signature, an ONNX file / ``ModelProto``
    / ``onnx_ir.Model``, or ``"pkg.module:factory"`` naming a zero-argument callable that returns a
    model or ``(model, example_inputs)``.

    All tensor inputs share the batch axis 0; ``dynamic_batch`` makes it symbolic (``batch``).
    ``exporter`` picks the PyTorch exporter: ``auto`` tries dynamo, then TorchScript. ``opset``
    applies to framework exports; ONNX inputs older than opset 13 are upgraded.
    """
    if exporter not in _EXPORTERS:
        raise InputError(f"unknown exporter '{exporter}'; choose one of {list(_EXPORTERS)}")
    source = resolve(src, example_inputs)
    _check_exporter_applies(exporter, source)
    if source.kind == "onnx":
        return _export_onnx(source, input_names, output_names)
    exported = _export_framework(
        source, dynamic_batch=dynamic_batch, opset=opset, exporter=exporter
    )
    model = exported.model
    apply_names(model, input_names or exported.input_names, output_names or exported.output_names)
    dynamic = name_batch_axis(model)
    if dynamic_batch and not dynamic:
        logger.warning("%s: the exported batch axis is fixed, not dynamic", source.label)
    if verify and exported.reference is not None:
        check, follows_batch = verify_export(
            model,
            exported.reference,
            exporter=exported.exporter,
            reference_name=exported.reference_name,
            batch_sizes=verification_batches(exported.example_batch, dynamic),
            rtol=rtol,
            atol=atol,
            examples=_examples_by_name(model, exported.examples),
            fallback_reason=exported.fallback_reason,
        )
        name_batch_axis(model, outputs=follows_batch)
    else:
        if verify:
            logger.warning("%s: no example inputs to verify the export with", source.label)
        check = ExportCheck(
            exporter=exported.exporter,
            reference=exported.reference_name,
            status="skipped",
            fallback_reason=exported.fallback_reason,
        )
    check.stamp(model)
    return model


def export_to_file(
    src: Any,
    out_path: str | os.PathLike,
    example_inputs: Any = None,
    force: bool = False,
    **kwargs: Any,
) -> Path:
    """:func:`export`, then write atomically; never overwrites an input file unless ``force``."""
    model = export(src, example_inputs, **kwargs)
    protect = src if isinstance(src, (str, os.PathLike)) and not force else None
    return save_model(model, out_path, protect=protect)


def _export_framework(
    source: Source, *, dynamic_batch: bool, opset: int, exporter: str
) -> Exported:
    examples = source.example_inputs
    if source.kind == "torch-module":
        return _torch.export_module(
            source.obj, examples, dynamic_batch=dynamic_batch, opset=opset, exporter=exporter
        )
    if source.kind == "torch-program":
        program = source.obj if source.obj is not None else _torch.load_program(source.path)
        return _torch.export_program(program, examples, opset=opset)
    if source.kind == "keras":
        model = source.obj if source.obj is not None else _tensorflow.load_keras_file(source.path)
        return _tensorflow.export_keras(model, examples, dynamic_batch=dynamic_batch, opset=opset)
    if source.kind == "tf-function":
        return _tensorflow.export_tf_function(
            source.obj, examples, dynamic_batch=dynamic_batch, opset=opset
        )
    return _tensorflow.export_saved_model(source.path, dynamic_batch=dynamic_batch, opset=opset)


def _export_onnx(
    source: Source, input_names: Sequence[str] | None, output_names: Sequence[str] | None
) -> ir.Model:
    model = load_onnx_source(source.obj, source.path)
    if input_names or output_names:
        apply_names(model, input_names, output_names, defaults=False)
    check = ExportCheck(exporter="onnx", reference="none", status="loaded")
    check.stamp(model)
    logger.info(
        "%s: checked and loaded by ONNX Runtime (no framework to compare with)", source.label
    )
    return model


def _check_exporter_applies(exporter: str, source: Source) -> None:
    allowed = {"torch-module": _EXPORTERS, "torch-program": ("auto", "dynamo")}
    if exporter not in allowed.get(source.kind, ("auto",)):
        raise InputError(f"exporter='{exporter}' cannot export this source ({source.kind})")


def _examples_by_name(model: ir.Model, examples: list[np.ndarray] | None) -> dict[str, np.ndarray]:
    if not examples:
        return {}
    names = [name for name, _, _ in input_specs(model)]
    return dict(zip(names, examples))
