"""Real data without a network: scikit-learn's handwritten digits at MNIST's 28x28, and trainers.

scikit-learn ships 1,797 8x8 digits (values 0..16). Upsampled bilinearly to 28x28 and scaled to
[0, 1], they fit MNIST-shaped models (784 inputs, 1x28x28 images), so the demo and the benchmarks
train real classifiers in seconds. Every trainer is seeded and deterministic for a given thread
count; torch and keras are imported inside the functions that need them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from onnxopt.errors import InputError
from onnxopt.export._frameworks import require

if TYPE_CHECKING:  # pragma: no cover
    import keras
    import torch

SIDE = 28
NUM_CLASSES = 10
_SOURCE_SIDE = 8
_SOURCE_MAX = 16.0


@dataclasses.dataclass(frozen=True)
class DigitsData:
    """A stratified train/validation/test split; images are float32 (N, 1, 28, 28) in [0, 1].

    ``*_flat`` views are (N, 784) for MLPs; labels are int64. The validation split is empty unless
    asked for (it is carved from the training part, for passes that search on accuracy).
    """

    train_images: np.ndarray
    y_train: np.ndarray
    test_images: np.ndarray
    y_test: np.ndarray
    val_images: np.ndarray
    y_val: np.ndarray

    @property
    def train_flat(self) -> np.ndarray:
        return self.train_images.reshape(len(self.train_images), -1)

    @property
    def test_flat(self) -> np.ndarray:
        return self.test_images.reshape(len(self.test_images), -1)

    @property
    def val_flat(self) -> np.ndarray:
        return self.val_images.reshape(len(self.val_images), -1)


def load_digits_28(seed: int = 0, test_size: float = 0.25, val_size: float = 0.0) -> DigitsData:
    """scikit-learn's digits upsampled to 28x28, split with stratification by ``seed``.

    ``test_size`` is a fraction of all samples; ``val_size`` a fraction of all samples taken out
    of the training part.
    """
    try:
        from scipy.ndimage import zoom  # a scikit-learn dependency
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as exc:
        raise InputError(f"the digits data needs scikit-learn ({exc}); install onnxopt[demo]"
                         ) from exc

    digits = load_digits()
    small = digits.images.astype(np.float32) / _SOURCE_MAX
    # order=1 is bilinear interpolation: the result stays within [0, 1].
    images = zoom(small, (1, SIDE / _SOURCE_SIDE, SIDE / _SOURCE_SIDE), order=1)
    images = np.clip(images, 0.0, 1.0).astype(np.float32)[:, None, :, :]
    labels = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=test_size, random_state=seed, stratify=labels)
    if val_size > 0:
        x_train, x_val, y_train, y_val = train_test_split(
            x_train, y_train, test_size=val_size / (1.0 - test_size), random_state=seed,
            stratify=y_train)
    else:
        x_val, y_val = images[:0], labels[:0]
    return DigitsData(*(np.ascontiguousarray(a) for a in (
        x_train, y_train, x_test, y_test, x_val, y_val)))


# ----------------------------------------------------------------------------------------------
# PyTorch


def torch_mlp(hidden: Sequence[int] = (128, 64)) -> torch.nn.Module:
    """784-hidden...-10 with ReLU; ``(300, 100)`` is the LeNet-300-100 analogue."""
    nn = require("torch", "a PyTorch digits model").nn

    layers: list[nn.Module] = [nn.Flatten()]
    width = SIDE * SIDE
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, NUM_CLASSES))
    return nn.Sequential(*layers)


def torch_cnn(channels: Sequence[int] = (16, 32), fc: Sequence[int] = ()) -> torch.nn.Module:
    """Conv3x3-BN-ReLU-MaxPool2 per entry of ``channels``, FC hidden layers ``fc``, then FC10.

    ``(16, 32)`` is the small digits CNN; ``(64, 128)`` with ``fc=(256,)`` the wider CNN.
    """
    nn = require("torch", "a PyTorch digits model").nn

    layers: list[nn.Module] = []
    c_in, side = 1, SIDE
    for c in channels:
        layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(), nn.MaxPool2d(2)]
        c_in, side = c, side // 2
    layers.append(nn.Flatten())
    width = c_in * side * side
    for h in fc:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, NUM_CLASSES))
    return nn.Sequential(*layers)


def torch_lenet5() -> torch.nn.Module:
    """LeNet-5 with today's ReLU and max pooling: C5(6)-pool-C5(16)-pool-120-84-10."""
    nn = require("torch", "a PyTorch digits model").nn

    return nn.Sequential(
        nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * 5 * 5, 120), nn.ReLU(),
        nn.Linear(120, 84), nn.ReLU(),
        nn.Linear(84, NUM_CLASSES),
    )


def torch_lenet5_caffe() -> torch.nn.Module:
    """The LeNet-5 of Deep Compression's Table 1 (Caffe's MNIST example, 431k weights, a 1.7 MB
    file): C5(20)-pool-C5(50)-pool-500-10, ReLU only after the 500; the classic
    :func:`torch_lenet5` has 61k."""
    nn = require("torch", "a PyTorch digits model").nn

    return nn.Sequential(
        nn.Conv2d(1, 20, 5), nn.MaxPool2d(2),
        nn.Conv2d(20, 50, 5), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(50 * 4 * 4, 500), nn.ReLU(),
        nn.Linear(500, NUM_CLASSES),
    )


def train_torch_mlp(data: DigitsData, hidden: Sequence[int] = (128, 64), epochs: int = 30,
                    seed: int = 0) -> torch.nn.Module:
    """A trained :func:`torch_mlp` (eval mode); takes flat (N, 784) inputs."""
    return _fit_torch(lambda: torch_mlp(hidden), data.train_flat, data.y_train, epochs, seed)


def train_torch_cnn(data: DigitsData, channels: Sequence[int] = (16, 32), fc: Sequence[int] = (),
                    epochs: int = 8, seed: int = 0) -> torch.nn.Module:
    """A trained :func:`torch_cnn` (eval mode); takes (N, 1, 28, 28) images."""
    return _fit_torch(lambda: torch_cnn(channels, fc), data.train_images, data.y_train, epochs,
                      seed)


def train_torch_lenet5(data: DigitsData, epochs: int = 12, seed: int = 0,
                       caffe: bool = False) -> torch.nn.Module:
    """A trained :func:`torch_lenet5` (or, with ``caffe``, :func:`torch_lenet5_caffe`) in eval
    mode; takes (N, 1, 28, 28) images."""
    build = torch_lenet5_caffe if caffe else torch_lenet5
    return _fit_torch(build, data.train_images, data.y_train, epochs, seed)


def _fit_torch(build: Any, x: np.ndarray, y: np.ndarray, epochs: int, seed: int,
               batch_size: int = 32, lr: float = 1e-3) -> torch.nn.Module:
    """Adam on cross-entropy with seeded init and shuffling.

    Trains on one thread, so the weights do not depend on the machine's core count (and a busy
    machine does not slow small steps down), and flushes denormals: Adam's decaying moments of
    rarely-used pixels become denormal floats, which made training six times slower. The global
    RNG, thread count and denormal mode (torch's default, off) are restored afterwards.
    """
    torch = require("torch", "training a PyTorch digits model")

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    try:
        return _fit_torch_loop(build, x, y, epochs, seed, batch_size, lr)
    finally:
        torch.set_flush_denormal(False)
        torch.set_num_threads(threads)


def _fit_torch_loop(build: Any, x: np.ndarray, y: np.ndarray, epochs: int, seed: int,
                    batch_size: int, lr: float) -> torch.nn.Module:
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build()
        shuffle = torch.Generator().manual_seed(seed)
        xs, ys = torch.from_numpy(x), torch.from_numpy(y)
        optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        loss_fn = torch.nn.CrossEntropyLoss()
        model.train()
        for _ in range(epochs):
            order = torch.randperm(len(xs), generator=shuffle)
            for start in range(0, len(xs), batch_size):
                idx = order[start:start + batch_size]
                optimizer.zero_grad()
                loss_fn(model(xs[idx]), ys[idx]).backward()
                optimizer.step()
    return model.eval()


def torch_accuracy(model: torch.nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy in percent of a torch model, computed by torch (the reference for exports)."""
    import torch

    with torch.no_grad():
        logits = model(torch.from_numpy(x)).numpy()
    return float(100.0 * np.mean(logits.argmax(axis=-1) == y))


# ----------------------------------------------------------------------------------------------
# Keras


def train_keras_mlp(data: DigitsData, hidden: Sequence[int] = (256, 128), epochs: int = 20,
                    seed: int = 0) -> keras.Model:
    """A trained 784-256-128-10 ReLU ``keras.Sequential`` (logits out); takes flat inputs.

    ``keras.utils.set_random_seed`` seeds Python, numpy and the backend, so weights and shuffling
    repeat for a given seed.
    """
    keras = require("keras", "training the Keras digits MLP")

    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [keras.Input(shape=(SIDE * SIDE,), name="x")]
        + [keras.layers.Dense(h, activation="relu") for h in hidden]
        + [keras.layers.Dense(NUM_CLASSES)],
        name="keras_mlp",
    )
    model.compile(optimizer=keras.optimizers.Adam(1e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(data.train_flat, data.y_train, batch_size=32, epochs=epochs, shuffle=True, verbose=0)
    return model
