"""Where an optimized model came from, written into the model and the report.

Every output of :class:`onnxopt.pipeline.Pipeline` carries ``metadata_props`` with the onnxopt and
ONNX Runtime versions, the recipe (name and steps with their options), the seed, the SHA-256 of the
source and the target ISA it was optimized for. The same dict is the report's ``provenance``. Only
facts that decide the output go in (no time stamps, host names or paths), so the same input,
recipe and seed still give byte-identical files.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir

PREFIX = "onnxopt."
# Set by :func:`onnxopt.model_io.load_model` on the models it returns (in ``Model.meta``, which is
# never serialized): the file the model came from, hashed only when an optimization needs it.
SOURCE_PATH_KEY = "onnxopt.source_path"
_CHUNK = 1 << 20


def versions() -> dict[str, str]:
    import onnxruntime

    import onnxopt

    return {"version": onnxopt.__version__, "onnxruntime_version": onnxruntime.__version__,
            "onnx_version": onnx.__version__, "onnx_ir_version": ir.__version__}


def target_isa(isa: str | None) -> str:
    """The CPU (ISA) the passes optimized for: the ``--target`` given, else this machine's."""
    from onnxopt.isa import resolve_target

    return resolve_target(isa).name


def record(source: ir.Model, recipe: str, steps: Iterable[Any], seed: int,
           isa: str | None) -> dict[str, str]:
    """The provenance of optimizing ``source`` (all values strings, as ONNX metadata needs)."""
    return {
        **versions(),
        "recipe": recipe,
        "recipe_steps": json.dumps([{"pass": s.name, **s.options} for s in steps],
                                   sort_keys=True, separators=(",", ":"), default=str),
        "seed": str(seed),
        "source_sha256": source_sha256(source),
        "target_isa": target_isa(isa),
    }


def stamp(model: ir.Model, provenance: dict[str, str]) -> None:
    """Write ``provenance`` into ``model.metadata_props`` under the ``onnxopt.`` prefix."""
    for key, value in provenance.items():
        model.metadata_props[PREFIX + key] = str(value)


def read(model: ir.Model | onnx.ModelProto) -> dict[str, str]:
    """The provenance stamped into a model (empty when there is none)."""
    props = (model.metadata_props if isinstance(model, ir.Model)
             else {p.key: p.value for p in model.metadata_props})
    return {k[len(PREFIX):]: v for k, v in props.items() if k.startswith(PREFIX)}


def source_sha256(model: ir.Model) -> str:
    """SHA-256 of the file ``model`` was loaded from (then its external data files, in order of
    first use); for a model built in memory, of its serialized graph and tensor bytes."""
    path = model.meta.get(SOURCE_PATH_KEY)
    if path is not None and Path(path).is_file():
        return files_sha256(Path(path))
    return content_sha256(model)


def files_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    _update_from_file(digest, path)
    proto = onnx.load(str(path), load_external_data=False)
    seen: list[str] = []
    for tensor in onnx.external_data_helper._get_all_tensors(proto):  # noqa: SLF001
        for entry in tensor.external_data:
            if entry.key == "location" and entry.value not in seen:
                seen.append(entry.value)
    for location in seen:  # already checked to lie inside the folder by model_io.load_model
        _update_from_file(digest, path.parent / location)
    return digest.hexdigest()


def content_sha256(model: ir.Model) -> str:
    """A fingerprint of a model built in memory: opsets, inputs and outputs, nodes (subgraphs
    included), then every initializer's name, type, shape and bytes, one tensor at a time so a
    2 GB model is never serialized whole."""
    digest = hashlib.sha256()
    digest.update(json.dumps(sorted(model.opset_imports.items())).encode())
    graph = model.graph
    for value in [*graph.inputs, *graph.outputs]:
        digest.update(f"{value.name}|{value.type}|{value.shape}".encode())
    for node in graph:
        digest.update(ir.serde.serialize_node(node).SerializeToString(deterministic=True))
    for value in graph.initializers.values():
        digest.update(f"{value.name}|{value.dtype}|{value.shape}".encode())
        if value.const_value is not None:
            digest.update(value.const_value.tobytes())
    return digest.hexdigest()


def _update_from_file(digest: Any, path: Path) -> None:
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
