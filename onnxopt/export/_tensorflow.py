"""TensorFlow and Keras to ONNX through tf2onnx.

Every source (Keras model, ``.keras`` file, SavedModel, ``tf.function``) is first wrapped in one
``tf.function`` with a flat input signature and a flat list of outputs, then converted with
``tf2onnx.convert.from_function``: ``from_keras`` does not work with Keras 3. The same
``tf.function`` is the reference the export is verified against, so both run the same graph.

Keras models with large weights (VGG16: 553 MB) take another route, because tf2onnx holds every
frozen weight in the NodeProto of a Const node and rewrites that proto after each graph optimizer:
upb's arena-backed protobuf never frees the replaced copy, so each optimizer run adds one copy of
the weights (VGG16 was killed past 19 GB). So the big tensors are fed to tf2onnx as graph inputs
(``Model.stateless_call``), the ONNX graph gets them back as initializers, and onnxscript's
constant folding applies the layout Transposes tf2onnx put on them (see ``_attach_weights``).
"""

from __future__ import annotations

import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common

from onnxopt.errors import InputError
from onnxopt.export._exported import Exported
from onnxopt.export._frameworks import require

TF2ONNX = "tf2onnx"
# Names Keras makes up for unnamed inputs; they say nothing, so the graph gets input/input_N.
_KERAS_AUTO_NAMES = ("keras_tensor", "input_layer")
# Above this many bytes of Keras weights, big tensors become graph inputs during the conversion.
# Smaller models keep the plain route: with every weight constant, tf2onnx folds BatchNorm scales
# into convolutions, which a Conv whose kernel is an input misses.
LARGE_WEIGHTS_BYTES = 128 * 2**20
# In the large route, tensors from this size on are inputs; the small ones (biases, BatchNorm
# statistics) stay constants so tf2onnx can still fold them and move its layout Transposes.
WEIGHT_INPUT_MIN_BYTES = 2**20
_WEIGHT_PREFIX = "onnxopt_weight_"


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
        convertible=_weights_as_inputs(model, specs),
    )


def _weights_as_inputs(model: Any, specs: list) -> tuple[Any, list, dict[str, Any]] | None:
    """For a Keras model with large weights: a tf.function taking its big tensors as inputs.

    Returns the function, its full input signature and the Keras variable behind each extra input
    (by input name), or None when the model is small or cannot be called statelessly (tf_keras).
    """
    tf = require("tensorflow", "exporting a Keras model")
    variables = [*model.trainable_variables, *model.non_trainable_variables]
    sizes = [int(np.prod(v.shape, dtype=np.int64)) * np.dtype(v.dtype).itemsize for v in variables]
    if sum(sizes) <= LARGE_WEIGHTS_BYTES or not hasattr(model, "stateless_call"):
        return None
    fed = [i for i, size in enumerate(sizes) if size >= WEIGHT_INPUT_MIN_BYTES]
    weight_specs = [
        tf.TensorSpec(variables[i].shape, variables[i].dtype, name=f"{_WEIGHT_PREFIX}{i}")
        for i in fed
    ]
    n_inputs, n_trainable, single = len(specs), len(model.trainable_variables), len(specs) == 1

    def call(*args: Any) -> list:
        xs, given = args[:n_inputs], dict(zip(fed, args[n_inputs:]))
        values = [given[i] if i in given else v.value for i, v in enumerate(variables)]
        outputs, _ = model.stateless_call(
            values[:n_trainable], values[n_trainable:], xs[0] if single else list(xs),
            training=False,
        )
        return tf.nest.flatten(outputs)

    signature = [*specs, *weight_specs]
    by_input = {spec.name: variables[i] for spec, i in zip(weight_specs, fed)}
    return tf.function(call, input_signature=signature), signature, by_input


def _attach_weights(model: ir.Model, by_input: dict[str, Any]) -> None:
    """Turn the weight inputs back into initializers named after their Keras variables.

    tf2onnx put Transposes (NHWC kernels to OIHW) on the kernels it could not transpose itself;
    folding them gives the Conv constant weights, as in the plain route.
    """
    # Imported here: only this route needs it, and ``onnxopt.export`` is imported by ONNX-only runs.
    from onnxscript.optimizer._constant_folding import FoldConstantsPass

    graph = model.graph
    largest = 0
    for value in list(graph.inputs):
        variable = by_input.get(value.name)
        if variable is None:
            continue
        graph.inputs.remove(value)
        array = np.asarray(variable.numpy())
        largest = max(largest, array.size)
        if variable.path not in graph.initializers:
            value.name = variable.path
        value.const_value = ir.Tensor(array, name=value.name)
        graph.register_initializer(value)
    fold = FoldConstantsPass(
        shape_inference=False, input_size_limit=largest, output_size_limit=largest
    )
    ir.passes.PassManager([fold, common.RemoveUnusedNodesPass()])(model)


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
    convertible: tuple[Any, list, dict[str, Any]] | None = None,
) -> Exported:
    """Convert ``serve`` (or ``convertible``, the same model with weights as inputs) with tf2onnx.

    ``serve`` stays the reference either way, so the weight-input route is verified against the
    model itself.
    """
    tf = require("tensorflow", "exporting a TensorFlow model")
    tf2onnx = require("tf2onnx", "exporting a TensorFlow model")
    function, signature, by_input = convertible or (serve, specs, {})
    proto, _ = tf2onnx.convert.from_function(function, input_signature=signature, opset=opset)
    model = ir.serde.deserialize_model(proto)
    del proto
    if by_input:
        _attach_weights(model, by_input)

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
