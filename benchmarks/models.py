"""The benchmark suite's models, built by scripts (no model binary is ever committed).

Each builder returns a :class:`Built`: the FP32 ONNX model plus the data the suite needs around
it. Training, export and zoo loading are delegated to :mod:`onnxopt.digits`, :mod:`onnxopt.export`
and :mod:`onnxopt.zoo`; this module only chooses the models and splits their data:

* ``calibration``: inputs the passes may fit on (quantization ranges, pruning refits);
* ``tuning``: evaluation data handed to accuracy-aware passes (the validation split, with
  labels where a task has them), never the data the suite reports on;
* ``evaluation``: held-out inputs the suite reports quality on (top-1 against ``labels`` for
  the digits classifiers, cosine against FP32 for every model).

Heavy frameworks (torch, TensorFlow) are imported inside the builders that need them. The suite
runs this file as a script (``models.py NAME SEED quick|full FOLDER``) to build each model in a
child process, which writes ``fp32.onnx`` and the data as ``.npz`` files (:func:`save_built`).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxopt.errors import InputError
from onnxopt.feeds import synthesize_feeds

Arrays = dict[str, np.ndarray]


@dataclasses.dataclass
class Built:
    """A suite model and its data; arrays are stacked samples along axis 0."""

    model: ir.Model
    calibration: Arrays
    tuning: Arrays
    tuning_labels: np.ndarray | None
    evaluation: Arrays
    labels: np.ndarray | None


@dataclasses.dataclass
class Saved:
    """A built model as the suite uses it: the FP32 file and the data, read back from a folder."""

    path: Path
    calibration: Arrays
    tuning: Arrays
    tuning_labels: np.ndarray | None
    evaluation: Arrays
    labels: np.ndarray | None

    def bench_feeds(self) -> Arrays:
        """One sample (batch 1) of the evaluation inputs: what latency is measured on."""
        return {k: np.ascontiguousarray(v[:1]) for k, v in self.evaluation.items()}


PARTS = ("calibration", "tuning", "evaluation")


def save_built(built: Built, folder: Path) -> None:
    """``fp32.onnx`` plus ``calibration.npz``, ``tuning.npz`` and ``evaluation.npz`` in ``folder``
    (labels, when there are any, under the key ``labels``: what ``--eval`` files hold)."""
    from onnxopt.model_io import save_model

    save_model(built.model, folder / "fp32.onnx")
    labels = {"tuning": built.tuning_labels, "evaluation": built.labels}
    for part in PARTS:
        extra = {} if labels.get(part) is None else {"labels": labels[part]}
        np.savez(folder / f"{part}.npz", **getattr(built, part), **extra)


def load_saved(folder: Path) -> Saved:
    from onnxopt.feeds import load_npz

    arrays = {part: load_npz(folder / f"{part}.npz") for part in PARTS}
    labels = {part: arrays[part].pop("labels", None) for part in PARTS}
    return Saved(folder / "fp32.onnx", arrays["calibration"], arrays["tuning"], labels["tuning"],
                 arrays["evaluation"], labels["evaluation"])


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A named builder; ``quick`` models make up ``--quick``, ``heavy`` ones get fewer samples."""

    name: str
    description: str
    build: Callable[[int, bool], Built]  # (seed, quick) -> Built
    quick: bool = False
    heavy: bool = False


# ----------------------------------------------------------------------------------------------
# Digits classifiers (real data, top-1)


def _digits() -> Any:
    from onnxopt.digits import load_digits_28

    return load_digits_28(seed=0, test_size=0.25, val_size=0.15)


def _classifier(model: ir.Model, data: Any, flat: bool, quick: bool) -> Built:
    name = model.graph.inputs[0].name
    train = data.train_flat if flat else data.train_images
    val = data.val_flat if flat else data.val_images
    test = data.test_flat if flat else data.test_images
    n_calib = 128 if quick else 256
    return Built(model, calibration={name: train[:n_calib]}, tuning={name: val},
                 tuning_labels=data.y_val, evaluation={name: test}, labels=data.y_test)


def _export_torch(module: Any, example: np.ndarray) -> ir.Model:
    import torch

    from onnxopt.export import export

    return export(module, torch.from_numpy(example), input_names=["x"], output_names=["logits"])


def build_torch_mlp(seed: int, quick: bool) -> Built:
    from onnxopt.digits import train_torch_mlp

    data = _digits()
    module = train_torch_mlp(data, hidden=(128, 64), seed=seed)
    return _classifier(_export_torch(module, data.train_flat[:2]), data, flat=True, quick=quick)


def build_digits_cnn(seed: int, quick: bool) -> Built:
    from onnxopt.digits import train_torch_cnn

    data = _digits()
    module = train_torch_cnn(data, channels=(16, 32), seed=seed)
    return _classifier(_export_torch(module, data.train_images[:2]), data, flat=False, quick=quick)


def build_keras_mlp(seed: int, quick: bool) -> Built:
    from onnxopt.digits import train_keras_mlp
    from onnxopt.export import export

    data = _digits()
    model = train_keras_mlp(data, hidden=(256, 128), seed=seed)
    return _classifier(export(model, data.train_flat[:2]), data, flat=True, quick=quick)


# ----------------------------------------------------------------------------------------------
# The original design's small examples (fidelity against FP32)


def build_sigmoid_342(seed: int, quick: bool) -> Built:
    """3-4-2 with sigmoids, fitted to two seeded boolean functions of three inputs."""
    import torch

    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, size=(1024, 3)).astype(np.float32)
    y = np.stack([x[:, 0] * x[:, 1] > 0, x[:, 2] > 0.2 * x[:, 0]], axis=1).astype(np.float32)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 26-weight net: more threads only add overhead
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Sigmoid(),
                                      torch.nn.Linear(4, 2), torch.nn.Sigmoid())
            optimizer = torch.optim.Adam(net.parameters(), lr=0.05)
            xs, ys = torch.from_numpy(x), torch.from_numpy(y)
            for _ in range(300):
                optimizer.zero_grad()
                torch.nn.functional.binary_cross_entropy(net(xs), ys).backward()
                optimizer.step()
    finally:
        torch.set_num_threads(threads)
    model = _export_torch(net.eval(), x[:2])
    return Built(model, calibration={"x": x[:256]}, tuning={"x": x[256:512]}, tuning_labels=None,
                 evaluation={"x": x[512:]}, labels=None)


def build_keras_regression(seed: int, quick: bool) -> Built:
    """Dense(10)-Dense(1) regression on scikit-learn's diabetes data (10 standardized features)."""
    import keras
    from sklearn.datasets import load_diabetes

    from onnxopt.export import export

    x, y = load_diabetes(return_X_y=True)
    x = ((x - x.mean(axis=0)) / x.std(axis=0)).astype(np.float32)
    y = ((y - y.mean()) / y.std()).astype(np.float32)
    keras.utils.set_random_seed(seed)
    net = keras.Sequential([keras.Input(shape=(10,), name="x"),
                            keras.layers.Dense(10, activation="relu"), keras.layers.Dense(1)],
                           name="regression")
    net.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    net.fit(x[:300], y[:300], batch_size=32, epochs=30 if quick else 60, verbose=0)
    model = export(net, x[:2])
    name = model.graph.inputs[0].name
    return Built(model, calibration={name: x[:300]}, tuning={name: x[300:370]}, tuning_labels=None,
                 evaluation={name: x[370:]}, labels=None)


# ----------------------------------------------------------------------------------------------
# Architectures with random weights (fidelity against FP32)


def _random_data(model: ir.Model, n_calib: int, n_eval: int, seed: int) -> Built:
    """Seeded random inputs (standard normal) for calibration, tuning and evaluation."""
    return Built(
        model,
        calibration=synthesize_feeds(model, batch=n_calib, seed=seed + 1),
        tuning=synthesize_feeds(model, batch=max(2, n_eval // 2), seed=seed + 2),
        tuning_labels=None,
        evaluation=synthesize_feeds(model, batch=n_eval, seed=seed + 3),
        labels=None,
    )


def _keras_application(name: str, seed: int, quick: bool) -> Built:
    import keras

    from onnxopt.export import export

    keras.utils.set_random_seed(seed)
    # Logits, not softmax: the softmax of a random net is near uniform, so cosine would hide errors.
    net = getattr(keras.applications, name)(weights=None, classifier_activation=None)
    example = np.random.default_rng(seed).standard_normal((1, 224, 224, 3)).astype(np.float32)
    model = export(net, example)
    return _random_data(model, n_calib=4 if quick else 8, n_eval=4, seed=seed)


def build_keras_vgg16(seed: int, quick: bool) -> Built:
    return _keras_application("VGG16", seed, quick)


def build_keras_mobilenetv2(seed: int, quick: bool) -> Built:
    return _keras_application("MobileNetV2", seed, quick)


def build_minilm(seed: int, quick: bool) -> Built:
    """MiniLM-L6 at sequence length 128; the zoo's seeded token feeds (batches padded in part)."""
    from onnxopt.zoo import minilm

    model, _, _ = minilm(seq_len=128, batch=1, seed=seed)
    calibration = minilm(seq_len=128, batch=8 if quick else 16, seed=seed + 1)[1]
    tuning = minilm(seq_len=128, batch=8, seed=seed + 2)[1]
    evaluation = minilm(seq_len=128, batch=8, seed=seed + 3)[1]
    return Built(model, calibration=calibration, tuning=tuning, tuning_labels=None,
                 evaluation=evaluation, labels=None)


def _light(name: str) -> Callable[[int, bool], Built]:
    def build(seed: int, quick: bool) -> Built:
        from onnxopt.zoo import light_model

        model = light_model(name, seed=seed)
        return _random_data(model, n_calib=8 if quick else 16, n_eval=4, seed=seed)

    return build


# ----------------------------------------------------------------------------------------------
# The catalogue

SPECS: list[ModelSpec] = [
    ModelSpec("torch-mlp", "PyTorch MLP 784-128-64-10 trained on scikit-learn digits (28x28)",
              build_torch_mlp, quick=True),
    ModelSpec("keras-mlp", "Keras MLP 784-256-128-10 trained on scikit-learn digits (28x28)",
              build_keras_mlp),
    ModelSpec("sigmoid-3-4-2", "PyTorch 3-4-2 sigmoid net fitted to a seeded synthetic task",
              build_sigmoid_342),
    ModelSpec("keras-regression", "Keras Dense(10)-Dense(1) regression on scikit-learn diabetes",
              build_keras_regression),
    ModelSpec("digits-cnn", "PyTorch CNN Conv16-BN-ReLU-Pool, Conv32-BN-ReLU-Pool, FC10 on digits",
              build_digits_cnn, quick=True),
    ModelSpec("keras-vgg16", "Keras VGG16 (weights=None, logits), 224x224", build_keras_vgg16,
              heavy=True),
    ModelSpec("keras-mobilenetv2", "Keras MobileNetV2 (weights=None, logits), 224x224",
              build_keras_mobilenetv2),
    ModelSpec("minilm-l6", "MiniLM-L6 (all-MiniLM-L6-v2) last hidden state, sequence length 128",
              build_minilm),
] + [
    ModelSpec(f"light-{name.removeprefix('bvlc_')}",
              f"onnx wheel light zoo {name} architecture, weights randomized (onnxopt.zoo)",
              _light(name), heavy=name in ("vgg19", "bvlc_alexnet", "zfnet512"))
    for name in ("resnet50", "squeezenet", "shufflenet", "inception_v1", "inception_v2",
                 "densenet121", "vgg19", "bvlc_alexnet", "zfnet512")
]


def select(patterns: list[str] | None, quick: bool) -> list[ModelSpec]:
    """Specs matching any of ``patterns`` (shell globs); else all of them, or the quick set."""
    if not patterns:
        return [s for s in SPECS if s.quick or not quick]
    chosen = [s for s in SPECS if any(fnmatch.fnmatch(s.name, p) for p in patterns)]
    unknown = [p for p in patterns if not any(fnmatch.fnmatch(s.name, p) for s in SPECS)]
    if unknown:
        raise InputError(f"no suite model matches {', '.join(unknown)} "
                         f"(models: {', '.join(s.name for s in SPECS)})")
    return chosen


if __name__ == "__main__":  # a child of benchmarks/suite.py: NAME SEED quick|full FOLDER
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    name, seed, mode, out = sys.argv[1:5]
    (spec,) = [s for s in SPECS if s.name == name]
    save_built(spec.build(int(seed), mode == "quick"), Path(out))
