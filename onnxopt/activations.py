"""Values inside a model, read with ONNX Runtime: a copy whose graph outputs include them.

Refits read layer inputs, ``fp16`` the range of every activation, ``quantize`` per-node SQNR,
channel pruning per-channel statistics, and the pipeline's verification the first node that
diverges. ORT returns graph outputs only, so each of them runs a copy of the model with the
wanted values added as outputs; this module is that copy and its session, once. The model
given is left as it was.

Session settings are arguments, not defaults: the graph optimization level decides which
kernels compute a value (``basic`` folds a BatchNormalization into the Conv before it) and the
thread count may change the order of a reduction, so each caller names the settings its
figures were measured with.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from onnxopt import runner
from onnxopt.evaluation import ort_source
from onnxopt.feeds import Feeds

# A model: in memory, serialized, or a file whose external data stays where it is.
ModelSource = ir.Model | onnx.ModelProto | bytes | str | Path


@contextlib.contextmanager
def outputs_added(model: ModelSource, names: Iterable[str]) -> Iterator[str | bytes]:
    """What ``InferenceSession`` takes (a path or bytes) for ``model`` with ``names`` added to its
    graph outputs. Names that are already outputs, graph inputs or unknown are not added.

    A file is read without its tensors and the copy written next to it, so the copy's external
    data references resolve to the original's (no tensor is copied); the copy goes on exit. An
    in-memory model over 2 GB goes through :func:`onnxopt.evaluation.ort_source`.
    """
    names = list(dict.fromkeys(names))
    if isinstance(model, (str, Path)):
        proto = onnx.load(str(model), load_external_data=False)
        _add_outputs(proto, names)
        fd, probe = tempfile.mkstemp(suffix=".probe.onnx", dir=Path(model).parent)
        os.close(fd)
        try:
            onnx.save(proto, probe)
            yield probe
        finally:
            os.unlink(probe)
        return
    if isinstance(model, bytes):
        proto = onnx.load_from_string(model)
        _add_outputs(proto, names)
        yield proto.SerializeToString()
        return
    if isinstance(model, onnx.ModelProto):
        model = ir.serde.deserialize_model(model)  # wraps the tensors, copies none
    graph = model.graph
    values = {v.name: v for node in graph for v in node.outputs if v.name}
    values.update(graph.initializers)
    extra = [values[n] for n in names if n in values and not values[n].is_graph_output()]
    graph.outputs.extend(extra)
    try:
        with ort_source(model) as source:
            yield source
    finally:
        for _ in extra:
            graph.outputs.pop()


def _add_outputs(proto: onnx.ModelProto, names: Sequence[str]) -> None:
    graph = proto.graph
    known = {o for node in graph.node for o in node.output} | {t.name for t in graph.initializer}
    skip = {o.name for o in graph.output} | {i.name for i in graph.input}
    graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in names
                        if n in known and n not in skip)


def session_with_outputs(model: ModelSource, names: Iterable[str], *, opt_level: str,
                         threads: int | None, config: Mapping[str, str] | None = None
                         ) -> ort.InferenceSession:
    """A CPU session over ``model`` with ``names`` among its outputs (see :func:`outputs_added`).

    ``opt_level``: :data:`onnxopt.runner.OPT_LEVELS` key; ``threads``: intra-op threads (None:
    ORT's choice, one per core); ``config``: session config entries (e.g. where the external
    data of a model over 2 GB is).
    """
    with outputs_added(model, names) as source:
        return runner.create_session(source, opt_level=opt_level, threads=threads, config=config)


def capture(model: ModelSource, names: Iterable[str], batches: Iterable[Feeds], *,
            opt_level: str, threads: int | None, config: Mapping[str, str] | None = None
            ) -> Iterator[dict[str, np.ndarray]]:
    """Per batch, the value of each of ``names``: node outputs and initializers from one session
    (settings as in :func:`session_with_outputs`), graph inputs from the batch itself."""
    names = list(dict.fromkeys(names))
    session = session_with_outputs(model, names, opt_level=opt_level, threads=threads,
                                   config=config)
    produced = {o.name for o in session.get_outputs()}
    fetch = [n for n in names if n in produced]
    for feeds in batches:
        values = dict(zip(fetch, session.run(fetch, dict(feeds))))
        yield {n: values[n] if n in values else np.asarray(feeds[n]) for n in names}
