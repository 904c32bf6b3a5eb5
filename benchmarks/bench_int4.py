"""INT4 weight-only: onnxopt's ``int4`` recipe against FP32 on a random-weight GPT-2 (prefill).

A GPT-2 from ``transformers.GPT2Config`` (random weights, no KV cache: one prefill of
``--seq`` tokens at batch 1) is exported with onnxopt, then optimized with the ``int4`` recipe
(cleanup, fuse, quantize-weights: 4-bit MatMuls, LM head 8-bit, ``accuracy_level=4``) and with
the same recipe at ``accuracy_level=0``. File sizes, MACs and the logits' cosine against FP32
are printed, and latency runs interleaved in one process (:func:`onnxopt.benchmarking.benchmark`:
blocks of runs, untimed settle runs after each switch, bootstrap intervals of the ratio).

    .venv/bin/python benchmarks/bench_int4.py [--layers 6 --embd 512 --vocab 16384 --seq 128]
        [--threads 1] [--budget 60]
"""

from __future__ import annotations

import argparse

import onnx_ir as ir
import torch
import transformers

import onnxopt
from onnxopt.benchmarking import benchmark
from onnxopt.metrics import cosine_similarity
from onnxopt.runner import create_session
from onnxopt.stats import macs_text, model_stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--embd", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=16384)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--threads", default="1")
    parser.add_argument("--budget", type=float, default=60.0)
    args = parser.parse_args()

    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=args.vocab, n_embd=args.embd, n_layer=args.layers,
                                     n_head=args.embd // 64, n_positions=args.seq,
                                     use_cache=False)
    module = transformers.GPT2LMHeadModel(config).eval()
    ids = torch.randint(0, args.vocab, (1, args.seq), generator=torch.Generator().manual_seed(0))
    fp32 = onnxopt.export(module, (ids,))
    int4, report = onnxopt.optimize(fp32, "int4")
    int4_acc0, _ = onnxopt.optimize(fp32, "int4", overrides={"accuracy_level": 0})
    print("quantize-weights:", {k: v for k, v in report.passes[-1].notes.items()
                                if k != "bits_by_node"})
    models = {"fp32": fp32, "int4 (accuracy_level 4)": int4, "int4 (accuracy_level 0)": int4_acc0}

    feeds = {fp32.graph.inputs[0].name: ids.numpy()}
    ref = None
    print(f"GPT-2 {args.layers} layers, n_embd {args.embd}, vocab {args.vocab}, seq {args.seq}")
    print("| model | params | file (MiB) | vs FP32 | MACs | logits cosine vs FP32 |")
    print("|---|---:|---:|---:|---:|---:|")
    size0 = None
    for name, model in models.items():
        stats = model_stats(model, shapes={"input_ids": [1, args.seq]})
        proto = ir.serde.serialize_model(model).SerializeToString()
        logits = create_session(proto, threads=1).run(None, feeds)[0]
        ref = logits if ref is None else ref
        size0 = size0 or stats.size_bytes
        print(f"| {name} | {stats.params:,} | {stats.size_bytes / 2**20:.1f} | "
              f"{size0 / stats.size_bytes:.2f}x | {macs_text(stats)} | "
              f"{cosine_similarity(ref, logits):.5f} |")
    threads = [int(t) for t in args.threads.split(",")]
    result = benchmark(list(models.values()), names=list(models), threads=threads, feeds=feeds,
                       time_budget_s=args.budget, measure_memory=False)
    print(result.to_markdown())


if __name__ == "__main__":
    main()
