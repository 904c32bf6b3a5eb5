"""Shared fixtures: tiny models written in ONNX text, saved to a temporary folder."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest

# Quiet TensorFlow's C++ logs in every test process.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

MLP_TEXT = """
<ir_version: 8, opset_import: ["" : 17]>
mlp (float[N, 4] x) => (float[N, 3] y)
<float[4, 5] w1 = {WEIGHTS1}, float[5] b1 = {BIAS1}, float[5, 3] w2 = {WEIGHTS2}>
{
    h = MatMul(x, w1)
    hb = Add(h, b1)
    i = Identity(hb)
    r = Relu(i)
    y = MatMul(r, w2)
}
"""


def _floats(rng: np.random.Generator, n: int) -> str:
    return "{" + ", ".join(f"{v:.6f}" for v in rng.standard_normal(n)) + "}"


def make_mlp(seed: int = 0) -> onnx.ModelProto:
    """A 4-5-3 MLP with an Identity to clean up; weights seeded."""
    rng = np.random.default_rng(seed)
    text = (MLP_TEXT.replace("{WEIGHTS1}", _floats(rng, 20)).replace("{BIAS1}", _floats(rng, 5))
            .replace("{WEIGHTS2}", _floats(rng, 15)))
    model = onnx.parser.parse_model(text)
    onnx.checker.check_model(model)
    return model


@pytest.fixture
def mlp_model() -> onnx.ModelProto:
    return make_mlp()


@pytest.fixture
def mlp_path(tmp_path: Path, mlp_model: onnx.ModelProto) -> Path:
    path = tmp_path / "mlp.onnx"
    onnx.save(mlp_model, path)
    return path
