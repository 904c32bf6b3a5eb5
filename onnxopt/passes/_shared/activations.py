"""Intermediate tensors of one run: every float activation of a model, for one small batch.

Every float node output becomes a graph output of a copy of the model (ORT's ``qdq_loss_debug``
helpers do the same but flatten each tensor to 1-D, and per-node SQNR needs the shapes). The batch
stays small (a few samples): every activation of the run is in memory at once.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx
import onnx_ir as ir

from onnxopt import runner
from onnxopt.activations import session_with_outputs
from onnxopt.feeds import Feeds

# Samples used for activation statistics: enough for percentiles and SQNR, small in memory.
SAMPLE_LIMIT = 4
_FLOATS = (ir.DataType.FLOAT, ir.DataType.FLOAT16)


def small_batch(batch: Feeds, limit: int = SAMPLE_LIMIT, fixed_batch: bool = False) -> Feeds:
    """The first ``limit`` samples of ``batch`` (all of it when the model's batch is fixed)."""
    if fixed_batch:
        return batch
    return {k: v[:limit] for k, v in batch.items()}


def capture(proto: onnx.ModelProto, feeds: Feeds,
            config: Mapping[str, str] | None = None) -> dict[str, np.ndarray]:
    """Tensor name -> value for the float graph inputs and float node outputs, and every input of
    an ORT Attention node (``config``: ORT session config entries, e.g. where the external data
    of a model over 2 GB is)."""
    model = ir.serde.deserialize_model(proto)
    graph = model.graph
    outputs = {v.name for v in graph.outputs}
    # An ORT Attention also needs its integer mask to run alone (per-node SQNR).
    attention_inputs = {v.name for n in graph if n.op_type == "Attention" for v in n.inputs
                        if v is not None}
    names = [value.name for node in graph for value in node.outputs
             if value.name not in outputs and (value.dtype in _FLOATS
                                               or value.name in attention_inputs)]
    session = session_with_outputs(model, names, opt_level="disabled", threads=None,
                                   config=config)
    values = runner.run(session, feeds)
    values.update({k: v for k, v in feeds.items()
                   if v.dtype.kind == "f" or k in attention_inputs})
    return values
