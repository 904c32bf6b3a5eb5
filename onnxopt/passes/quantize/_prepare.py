"""Prepare: the model in a form ONNX Runtime's quantizer handles, and the nodes INT8 could run.

Each step avoids a failure seen with ``onnxruntime.quantization`` (``INT8-NOTES``):
opset >= 13 (per-channel ``DequantizeLinear`` needs the ``axis`` attribute), every Constant node
lifted to an initializer (``quantize_dynamic``: "Expected ... to be an initializer"), a name on
every node (exclusion lists and reports go by name), a two-input ``Sum`` written as ``Add`` (the
quantizer has a QLinearAdd for ``Add`` only, so residual ``Sum`` nodes would stay float between
Dequantize/Quantize pairs), then ORT's ``quant_pre_process`` for shape inference (symbolic
inference finds the shapes of transformer graphs that ONNX inference leaves unknown).

A model too big for one protobuf (``model_io.is_big``: over 2 GB for real) is written with its
tensors in ``prepared.onnx.data`` beside ``prepared.onnx``, streamed from their memory maps, and
gets ONNX's file-based shape inference only (ORT's symbolic inference loads the whole model into
one protobuf). ``PreparedModel.proto`` then holds references to that file, not the tensors;
sessions built from it need :attr:`PreparedModel.session_config`, which names the folder.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from collections.abc import Mapping
from pathlib import Path

import onnx
import onnx_ir as ir
import onnx_ir.passes.common as common
from onnxruntime.quantization import quant_pre_process

from onnxopt.model_io import (EXTERNAL_DATA_ALIGNMENT, MIN_OPSET, is_big, release_mappings,
                              upgrade_opset)
from onnxopt.stats import node_and_attention_macs

# Node types whose arithmetic INT8 speeds up; everything else is only carried along in QDQ form.
COMPUTE_OPS = ("Conv", "MatMul", "Gemm")
# ORT's session option for where external data of a model given as bytes lives (a model loaded
# from bytes otherwise resolves it against the working directory; absolute locations are refused).
_EXTERNAL_FOLDER_KEY = "session.model_external_initializers_file_folder_path"


@dataclasses.dataclass(frozen=True)
class ComputeNode:
    """A node whose multiply-accumulates INT8 can run.

    ``depth`` is the reduction length per output value (Conv: Cin/group * kernel; MatMul/Gemm: K):
    the MACs gained per activation value that must be quantized. ``weight`` names the constant
    operand (None for activation x activation MatMuls, which dynamic quantization cannot take).
    """

    name: str
    op_type: str
    macs: int
    depth: int
    weight: str | None
    output: str


@dataclasses.dataclass
class PreparedModel:
    """The model the quantizer reads (also saved at ``path``), with its compute nodes."""

    proto: onnx.ModelProto
    path: Path
    nodes: list[ComputeNode]
    notes: list[str]
    # ORT Attention nodes (from fuse-transformer): (Q/K/V projection MACs, S x S products' MACs),
    # for the report's INT8 share of MACs; and as nodes, for dynamic mode's search, which can
    # keep one float (ORT's dynamic quantizer makes the others QAttention).
    attention: dict[str, tuple[int, int]] = dataclasses.field(default_factory=dict)
    attention_nodes: list[ComputeNode] = dataclasses.field(default_factory=list)

    @property
    def total_macs(self) -> int:
        """Compute nodes' MACs and the fused Attentions' (projections and S x S products)."""
        return sum(n.macs for n in self.nodes) + sum(p + s for p, s in self.attention.values())

    def node(self, name: str) -> ComputeNode | None:
        return next((n for n in self.nodes if n.name == name), None)

    def ir_model(self) -> ir.Model:
        """``proto`` in onnx_ir form; external tensors (if any) resolved against its folder."""
        model = ir.serde.deserialize_model(self.proto)
        if has_external_data(self.path):
            ir.external_data.set_base_dir(model.graph, self.path.parent)
        return model

    @property
    def session_config(self) -> dict[str, str]:
        """ORT session config entries for a session of ``proto`` (or a copy with more outputs)
        given as bytes: where its external data is, when it has any."""
        return {_EXTERNAL_FOLDER_KEY: str(self.path.parent)} if has_external_data(self.path) else {}


def external_data_path(prepared_path: Path) -> Path:
    """Where :func:`prepare` puts the tensors of a model too big for one protobuf."""
    return prepared_path.with_name(prepared_path.name + ".data")


def has_external_data(prepared_path: Path) -> bool:
    """Whether the prepared model keeps its tensors in external data (the quantizer must then
    read and write external data too)."""
    return external_data_path(prepared_path).exists()


def prepare(model: ir.Model, workdir: Path,
            shapes: Mapping[str, list[int]] | None = None) -> PreparedModel:
    """A quantizer-ready copy of ``model`` saved in ``workdir``; ``model`` is not modified.

    ``shapes`` (input name -> dims, e.g. of a real batch) make MAC counts exact for models with
    symbolic dimensions; otherwise symbolic dimensions count as 1.
    """
    notes: list[str] = []
    work = model.clone()
    if work.opset_imports.get("", MIN_OPSET) < MIN_OPSET:
        notes.append(f"opset {work.opset_imports['']} upgraded (per-channel needs >= {MIN_OPSET})")
        work = upgrade_opset(work)
    _name_nodes(work)
    _sum_to_add(work)
    common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(work)
    path = workdir / "prepared.onnx"
    if is_big(work):
        _save_big(work, path, notes)
        release_mappings(work)  # every tensor was read for the copy: give the pages back
        release_mappings(model)
        proto = onnx.load(str(path), load_external_data=False)
    else:
        _pre_process(ir.serde.serialize_model(work), path, notes)
        proto = onnx.load(str(path))
    macs, attention = node_and_attention_macs(proto, shapes)
    return PreparedModel(proto, path, compute_nodes(proto, macs), notes, attention,
                         _attention_nodes(proto, attention))


def compute_nodes(proto: onnx.ModelProto, macs: Mapping[str, int | None]) -> list[ComputeNode]:
    """Every Conv / MatMul / Gemm with float inputs, with its MACs (``macs``: by node name, as
    :func:`onnxopt.stats.node_macs` counts them) and reduction depth."""
    inits = {t.name: list(t.dims) for t in proto.graph.initializer}
    value_shapes = _value_shapes(proto)
    nodes = []
    for node in proto.graph.node:
        if node.op_type not in COMPUTE_OPS or node.domain not in ("", "ai.onnx"):
            continue
        weight = node.input[1] if len(node.input) > 1 and node.input[1] in inits else None
        w_shape = inits.get(weight) if weight else value_shapes.get(node.input[1])
        a_shape = value_shapes.get(node.input[0])
        depth = _depth(node, w_shape, a_shape)
        nodes.append(ComputeNode(node.name, node.op_type, int(macs.get(node.name) or 0), depth,
                                 weight, node.output[0]))
    return nodes


def _attention_nodes(proto: onnx.ModelProto,
                     attention: dict[str, tuple[int, int]]) -> list[ComputeNode]:
    """The ORT Attention nodes with a constant Q/K/V weight [hidden, 3 * hidden], as nodes the
    dynamic search may keep float (depth: the hidden size each projection output reduces)."""
    inits = {t.name: list(t.dims) for t in proto.graph.initializer}
    nodes = []
    for node in proto.graph.node:
        w_shape = inits.get(node.input[1]) if len(node.input) > 1 else None
        if node.op_type == "Attention" and node.name in attention and w_shape:
            nodes.append(ComputeNode(node.name, "Attention", sum(attention[node.name]),
                                     w_shape[0], node.input[1], node.output[0]))
    return nodes


def _depth(node: onnx.NodeProto, w_shape: list[int] | None, a_shape: list[int] | None) -> int:
    if node.op_type == "Conv" and w_shape and len(w_shape) > 2:
        return math.prod(w_shape[1:])
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        if w_shape and len(w_shape) == 2:
            return w_shape[1] if trans_b else w_shape[0]
    if node.op_type == "MatMul":
        if w_shape and len(w_shape) >= 2:
            return w_shape[-2]
        if a_shape:
            return a_shape[-1]
    return 0


def _value_shapes(proto: onnx.ModelProto) -> dict[str, list[int]]:
    shapes = {}
    for vi in [*proto.graph.input, *proto.graph.value_info, *proto.graph.output]:
        t = vi.type.tensor_type
        if t.HasField("shape"):
            shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else 1 for d in t.shape.dim]
    return shapes


def _name_nodes(model: ir.Model) -> None:
    taken = {n.name for n in model.graph if n.name}
    for index, node in enumerate(model.graph):
        if not node.name:
            name = f"{node.op_type}_{index}"
            while name in taken:
                name += "_"
            node.name = name
            taken.add(name)


def _sum_to_add(model: ir.Model) -> None:
    """Sum(a, b) -> Add(a, b): the same broadcasting semantics for two inputs, and quantizable.

    The node keeps its name and outputs (an op-type change in place: nothing to pattern-match).
    A Sum feeding a LayerNormalization stays: it is ``fuse-transformer``'s residual sum, a Sum so
    that ONNX Runtime does not fuse it into its slow SkipLayerNormalization (``onnxopt.passes.fusion._layer_norms``).
    """
    for node in model.graph:
        if (node.op_type == "Sum" and node.domain in ("", "ai.onnx") and len(node.inputs) == 2
                and not any(user.op_type == "LayerNormalization"
                            for user, _ in node.outputs[0].uses())):
            node.op_type = "Add"


def _pre_process(proto: onnx.ModelProto, path: Path, notes: list[str]) -> None:
    """ORT's shape inference (symbolic, then ONNX); ONNX's alone when the symbolic one fails.

    ORT's graph optimization step is skipped: the ``cleanup`` and ``fuse`` passes did that work,
    and this keeps node names stable for the report.
    """
    logging.getLogger().disabled, was = True, logging.getLogger().disabled
    try:
        # ORT's symbolic inference may leave `sym_shape_infer_temp.onnx` and its external data
        # in the working directory: run it inside the pass's own temporary folder.
        with contextlib.chdir(path.parent):
            quant_pre_process(proto, str(path), skip_optimization=True)
    except Exception as exc:  # symbolic shape inference raises many types on unusual graphs
        notes.append(f"symbolic shape inference failed ({type(exc).__name__}: "
                     f"{str(exc)[:120]}); used ONNX shape inference only")
        onnx.save(onnx.shape_inference.infer_shapes(proto), str(path))
    finally:
        logging.getLogger().disabled = was


def _save_big(model: ir.Model, path: Path, notes: list[str]) -> None:
    """Tensors streamed to ``prepared.onnx.data`` (aligned, so ORT maps them); then ONNX shape
    inference from file to file, which never loads the tensors."""
    lifted = path.with_name("lifted.onnx")
    ir.save(model, lifted, external_data=external_data_path(path).name,
            alignment=EXTERNAL_DATA_ALIGNMENT)
    onnx.shape_inference.infer_shapes_path(str(lifted), str(path))
    lifted.unlink()
    notes.append("over the external-data threshold: tensors kept in external data, ONNX shape "
                 "inference only (ORT's symbolic inference needs the model in one protobuf)")
