"""Fidelity of a ``prune-channels`` output on held-out data, for the suite's random-weight models.

Usage (after ``benchmarks/models.py NAME 0 quick DIR`` and ``onnxopt optimize DIR/fp32.onnx -o
PRUNED --recipe prune-channels --calib DIR/calibration.npz``)::

    .venv/bin/python benchmarks/bench_prune_zoo.py DIR PRUNED

Prints params and MACs before/after and, over 8 held-out inputs (seeded standard normal, one
sample each: the light models' batch is fixed at 1), three cosines against the FP32 model: of
the outputs (what the pass's budget checks); of the outputs centered over the samples; and,
when the output is a Softmax, of its logits. Why the extra two: a random-weight
network's output is nearly the same for every input (a constant plus a small input-dependent
part), so the plain cosine stays near 1 even when the input-dependent part is lost, and a
softmax over 1000 near-equal logits is near uniform whatever happens upstream.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx

from onnxopt import runner
from onnxopt.feeds import synthesize_feeds
from onnxopt.metrics import cosine_similarity
from onnxopt.model_io import load_model, to_proto
from onnxopt.stats import model_stats


def with_logits(proto: onnx.ModelProto) -> tuple[bytes, str | None]:
    """The model with the input of its output Softmax (if any) added as an extra output."""
    outputs = {o.name for o in proto.graph.output}
    softmax = [n for n in proto.graph.node if n.op_type == "Softmax" and n.output[0] in outputs]
    if not softmax:
        return proto.SerializeToString(), None
    logits = softmax[0].input[0]
    proto.graph.output.append(onnx.helper.make_tensor_value_info(logits, onnx.TensorProto.FLOAT,
                                                                 None))
    return proto.SerializeToString(), logits


SAMPLES = 8


def outputs(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """The first output (and the logits, if any) stacked over the held-out samples."""
    model = load_model(path)
    data, logits = with_logits(to_proto(model))
    session = runner.create_session(data, opt_level="basic")
    first = session.get_outputs()[0].name
    runs = [runner.run(session, synthesize_feeds(model, batch=1, seed=1000 + i))
            for i in range(SAMPLES)]
    return (np.concatenate([r[first] for r in runs]),
            np.concatenate([r[logits] for r in runs]) if logits else None)


def centered(a: np.ndarray) -> np.ndarray:
    return a - a.mean(axis=0)


def main(folder: Path, pruned: Path) -> None:
    for label, path in (("fp32", folder / "fp32.onnx"), ("pruned", pruned)):
        stats = model_stats(load_model(path))
        print(f"{label}: params {stats.params:,}  MACs {stats.total_macs:,}")
    (ref, ref_logits), (out, out_logits) = outputs(folder / "fp32.onnx"), outputs(pruned)
    print(f"cosine over {SAMPLES} held-out samples: {cosine_similarity(ref, out):.6f}")
    print(f"centered cosine: {cosine_similarity(centered(ref), centered(out)):.6f}")
    if ref_logits is not None and out_logits is not None:
        print(f"logits cosine: {cosine_similarity(ref_logits, out_logits):.6f}  centered: "
              f"{cosine_similarity(centered(ref_logits), centered(out_logits)):.6f}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
