"""TensorFlow and Keras to ONNX through tf2onnx.

Every source (Keras model, ``.keras`` file, SavedModel, ``tf.function``) is first wrapped in one
``tf.function`` with a flat input signature and a flat list of outputs, then converted with
``tf2onnx.convert.from_function``: ``from_keras`` does not work with Keras 3. The same
``tf.function`` is the reference the export is verified against, so both run the same graph.
"""

from __future__ import annotations

import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxopt.errors import InputError
from onnxopt.export._exported import Exported
from onnxopt.export._frameworks import require

TF2ONNX = "tf2onnx"
# Names Keras makes up for unnamed inputs; they say nothing, so the graph gets input/input_N.
_KERAS_AUTO_NAMES = ("keras_tensor", "input_layer")


def load_keras_file(path: Path) -> Any:
    """Load a ``.keras`` (or legacy ``.h5``) model file."""
    keras = require("keras", f"reading {path.name}")
    try:
        return keras.models.load_model(str(path), compile=False)
    except (ValueError, KeyError, OSError, TypeError, zipfile.BadZipFile) as exc:
        raise InputError(f"not a loadable Keras model file ({_first_line(exc)})", path) from exc


def export_keras(model: Any, example_inputs: Any, *, dynamic_batch: bool, opset: int) -> Exported:
    """Export a Keras 3 model (TensorFlow backend)."""
    tf = require("tensorflow", "exporting a Keras model")
    keras = require("keras", "exporting a Keras model")
    if keras.backend.backend() != "tensorflow":
        raise InputError(
            f"the Keras backend is '{keras.backend.backend()}'; exporting through tf2onnx needs "
            "KERAS_BACKEND=tensorflow"
        )
    examples = _as_arrays(example_inputs)
    symbolic = _keras_inputs(model)
    if symbolic:
        shapes = [tuple(t.shape) for t in symbolic]
        dtypes = [str(t.dtype) for t in symbolic]
        names = [t.name for t in symbolic]
    elif examples:
        shapes = [a.shape for a in examples]
        dtypes = [a.dtype.name for a in examples]
        names = []
    else:
        raise InputError(
            "the Keras model has no defined inputs (a subclassed model never called); "
            "pass example_inputs"
        )
    batch = _batch_of(examples)
    specs = [
        tf.TensorSpec(_with_batch(shape, dynamic_batch, batch), dtype, name=f"in_{i}")
        for i, (shape, dtype) in enumerate(zip(shapes, dtypes))
    ]
    single = len(specs) == 1

    def call(*xs: Any) -> list:
        return tf.nest.flatten(model(xs[0] if single else list(xs), training=False))

    serve = tf.function(call, input_signature=specs)
    meaningful = [n for n in names if not n.startswith(_KERAS_AUTO_NAMES)]
    return _convert(
        serve,
        specs,
        opset,
        batch,
        examples,
        input_names=names if names and len(meaningful) == len(names) else None,
    )


def export_tf_function(
    function: Any, example_inputs: Any, *, dynamic_batch: bool, opset: int
) -> Exported:
    """Export a ``tf.function`` (with an input_signature, or example_inputs to make one)."""
    tf = require("tensorflow", "exporting a tf.function")
    examples = _as_arrays(example_inputs)
    batch = _batch_of(examples)
    signature = getattr(function, "input_signature", None)
    if signature is None and hasattr(function, "structured_input_signature"):
        signature = function.structured_input_signature[0]  # a ConcreteFunction's positional args
    if signature:
        if not all(isinstance(s, tf.TensorSpec) for s in signature):
            raise InputError("only flat input signatures of tf.TensorSpec are supported")
        given = list(signature)
    elif examples:
        given = [
            tf.TensorSpec(_with_batch(a.shape, dynamic_batch, batch), a.dtype.name)
            for a in examples
        ]
    else:
        raise InputError("the tf.function has no input_signature; pass example_inputs")
    specs = [
        tf.TensorSpec(_own_batch(s.shape, dynamic_batch, batch), s.dtype, name=f"in_{i}")
        for i, s in enumerate(given)
    ]

    def call(*xs: Any) -> list:
        return tf.nest.flatten(function(*xs))

    serve = tf.function(call, input_signature=specs)
    names = [s.name for s in given]
    return _convert(
        serve,
        specs,
        opset,
        batch,
        examples,
        input_names=names if all(names) and len(set(names)) == len(names) else None,
    )


def export_saved_model(path: Path, *, dynamic_batch: bool, opset: int) -> Exported:
    """Export the ``serving_default`` signature (or the only one) of a SavedModel directory."""
    tf = require("tensorflow", "exporting a SavedModel")
    try:
        loaded = tf.saved_model.load(str(path))
    except (OSError, ValueError, tf.errors.OpError) as exc:
        raise InputError(f"not a loadable SavedModel ({_first_line(exc)})", path) from exc
    signatures = dict(loaded.signatures)
    if "serving_default" in signatures:
        signature = signatures["serving_default"]
    elif len(signatures) == 1:
        signature = next(iter(signatures.values()))
    else:
        raise InputError(
            f"the SavedModel has {len(signatures)} signatures and no 'serving_default' "
            f"({sorted(signatures)}); export the one you want as serving_default",
            path,
        )
    _, keyword_specs = signature.structured_input_signature
    arg_names = sorted(keyword_specs)
    out_keys = sorted(signature.structured_outputs)
    specs = [
        tf.TensorSpec(
            _own_batch(keyword_specs[n].shape, dynamic_batch, None),
            keyword_specs[n].dtype,
            name=f"in_{i}",
        )
        for i, n in enumerate(arg_names)
    ]

    def call(*xs: Any) -> list:
        outputs = signature(**dict(zip(arg_names, xs)))
        return [outputs[k] for k in out_keys]

    serve = tf.function(call, input_signature=specs)
    exported = _convert(
        serve,
        specs,
        opset,
        None,
        None,
        input_names=None if any(n.startswith(_KERAS_AUTO_NAMES) for n in arg_names) else arg_names,
        output_names=out_keys,
    )
    exported.keepalive = loaded  # the signature the reference calls belongs to it
    return exported


def _convert(
    serve: Any,
    specs: list,
    opset: int,
    batch: int | None,
    examples: list[np.ndarray] | None,
    *,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
) -> Exported:
    tf = require("tensorflow", "exporting a TensorFlow model")
    tf2onnx = require("tf2onnx", "exporting a TensorFlow model")
    proto, _ = tf2onnx.convert.from_function(serve, input_signature=specs, opset=opset)
    model = ir.serde.deserialize_model(proto)

    def reference(arrays: list[np.ndarray]) -> list[np.ndarray]:
        return [np.asarray(t) for t in serve(*arrays)]

    return Exported(
        model=model,
        exporter=TF2ONNX,
        reference=reference,
        reference_name=f"tensorflow {tf.__version__}",
        example_batch=batch,
        examples=examples,
        input_names=list(input_names) if input_names else None,
        output_names=list(output_names) if output_names else None,
    )


def _keras_inputs(model: Any) -> list:
    try:
        return list(model.inputs or [])
    except (AttributeError, ValueError):  # subclassed models have no symbolic inputs until called
        return []


def _with_batch(shape: Sequence[int | None], dynamic: bool, batch: int | None) -> list:
    """Axis 0 becomes None (dynamic) or the example's batch size (1 without an example)."""
    if not shape:
        return []
    return [None if dynamic else (batch or 1), *shape[1:]]


def _own_batch(shape: Any, dynamic: bool, batch: int | None) -> list:
    """A signature's own shape; only fix an unknown batch axis when a static one was asked for.

    A signature with a fixed batch cannot be called with an unknown one, so it stays fixed.
    """
    dims = list(shape) if shape.rank is not None else None
    if dims is None:
        raise InputError("input signatures of unknown rank are not supported")
    if dims and dims[0] is None and not dynamic:
        dims[0] = batch or 1
    return dims


def _as_arrays(example_inputs: Any) -> list[np.ndarray] | None:
    if example_inputs is None:
        return None
    items = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    return [np.asarray(item) for item in items]


def _batch_of(examples: list[np.ndarray] | None) -> int | None:
    return int(examples[0].shape[0]) if examples and examples[0].ndim else None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]
