"""PyTorch export: real dynamo / TorchScript exporters, checked against torch with ONNX Runtime."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from onnxopt import runner  # noqa: E402
from onnxopt.errors import InputError, QualityGateError  # noqa: E402
from onnxopt.export import ExportCheck, export, export_to_file  # noqa: E402
from onnxopt.model_io import load_model  # noqa: E402

DYNAMO, TORCHSCRIPT = "torch.onnx (dynamo)", "torch.onnx (torchscript)"


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


class SmallCNN(nn.Module):
    """Conv + BatchNorm with non-trivial running statistics, so train/eval mode matters."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.head = nn.Linear(16, 5)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-1, 1)
            self.bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3)))


class TwoInTwoOut(nn.Module):
    """Token ids (int64, index an embedding of 10) plus float features; two outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.fc = nn.Linear(4 + 3, 2)

    def forward(self, ids: torch.Tensor, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.cat([self.emb(ids).mean(dim=1), feats], dim=1)
        return self.fc(h), h.sum(dim=1)


class DataDependentBranch(nn.Module):
    """Python control flow on a tensor value: torch.export refuses it, the tracer records one branch
    (the branch every finite input takes)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.abs().sum() >= 0:
            return x * 2 + 1
        return x


def _ort(model: ir.Model, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    session = runner.reference_session(ir.serde.serialize_model(model).SerializeToString())
    return runner.run(session, feeds)


def _assert_matches_torch(model: ir.Model, module: nn.Module, shape_tail: tuple[int, ...]) -> None:
    """ORT at batch 1 and 5 reproduces torch (eval mode)."""
    name = model.graph.inputs[0].name
    for batch in (1, 5):
        x = torch.randn(batch, *shape_tail, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            want = module.eval()(x).numpy()
        got = _ort(model, {name: x.numpy()})[model.graph.outputs[0].name]
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.slow  # the first dynamo export of a process warms torch up (~5 s)
def test_mlp_dynamic_batch_names_and_detached_weights() -> None:
    torch.manual_seed(0)
    module = MLP()
    model = export(module, torch.randn(4, 8))

    assert [v.name for v in model.graph.inputs] == ["input"]
    assert [v.name for v in model.graph.outputs] == ["output"]
    assert list(model.graph.inputs[0].shape) == [ir.SymbolicDim("batch"), 8]
    assert list(model.graph.outputs[0].shape) == [ir.SymbolicDim("batch"), 3]
    check = ExportCheck.from_model(model)
    assert check.exporter == DYNAMO and check.status == "passed"
    assert check.batch_sizes == (4, 1)
    assert 0 <= check.max_abs_error <= 1e-5
    assert model.metadata_props["onnxopt.export.max_abs_error"] == repr(check.max_abs_error)

    x = np.random.default_rng(1).standard_normal((5, 8)).astype(np.float32)
    before = _ort(model, {"input": x})["output"]
    with torch.no_grad():  # training after export must not reach the exported weights
        module.fc1.weight.add_(1.0)
    np.testing.assert_array_equal(_ort(model, {"input": x})["output"], before)


@pytest.mark.slow
def test_cnn_with_batchnorm_matches_torch_and_keeps_module_state() -> None:
    torch.manual_seed(0)
    module = SmallCNN()
    module.train()
    module.head.eval()  # mixed modes must come back exactly as they were
    stats = module.bn.running_mean.clone()

    model = export(module, (torch.randn(2, 3, 12, 12),))

    assert module.training and module.bn.training and not module.head.training
    torch.testing.assert_close(module.bn.running_mean, stats)  # no forward ran in train mode
    _assert_matches_torch(model, module, (3, 12, 12))
    assert ExportCheck.from_model(model).batch_sizes == (2, 1)


@pytest.mark.slow
def test_integer_inputs_multiple_outputs_and_user_names() -> None:
    torch.manual_seed(0)
    module = TwoInTwoOut()
    ids, feats = torch.randint(0, 10, (3, 6)), torch.randn(3, 3)

    model = export(module, (ids, feats))  # ids in 0..99 would crash the embedding: examples reused
    assert [v.name for v in model.graph.inputs] == ["input_0", "input_1"]
    assert [v.name for v in model.graph.outputs] == ["output_0", "output_1"]
    assert ExportCheck.from_model(model).status == "passed"

    named = export(module, (ids, feats), input_names=["ids", "feats"], output_names=["logits", "s"])
    assert [v.name for v in named.graph.inputs] == ["ids", "feats"]
    assert [v.name for v in named.graph.outputs] == ["logits", "s"]
    got = _ort(named, {"ids": ids.numpy(), "feats": feats.numpy()})
    with torch.no_grad():
        logits, total = module(ids, feats)
    np.testing.assert_allclose(got["logits"], logits.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got["s"], total.numpy(), rtol=1e-4, atol=1e-5)


def test_static_batch() -> None:
    model = export(MLP(), torch.randn(3, 8), dynamic_batch=False)
    assert list(model.graph.inputs[0].shape) == [3, 8]
    assert ExportCheck.from_model(model).batch_sizes == (3,)


@pytest.mark.slow
def test_pt2_file(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = SmallCNN().eval()
    program = torch.export.export(
        module, (torch.randn(2, 3, 12, 12),), dynamic_shapes=({0: torch.export.Dim("n")},)
    )
    path = tmp_path / "cnn.pt2"
    torch.export.save(program, path)

    model = export(path)

    assert [v.name for v in model.graph.inputs] == ["input"]
    assert model.graph.inputs[0].shape[0] == ir.SymbolicDim("batch")
    assert ExportCheck.from_model(model).status == "passed"
    _assert_matches_torch(model, module, (3, 12, 12))


def test_corrupt_pt2_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.pt2"
    path.write_bytes(b"PK not a zip")
    with pytest.raises(InputError, match="not a readable torch.export archive") as err:
        export(path)
    assert err.value.path == str(path)


@pytest.mark.slow
def test_factory_string_to_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "tiny_torch_models.py").write_text(
        "import torch\n"
        "def build():\n"
        "    torch.manual_seed(0)\n"
        "    model = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.Tanh())\n"
        "    return model, torch.randn(2, 6)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    out = export_to_file("tiny_torch_models:build", tmp_path / "out" / "tiny.onnx")

    model = load_model(out)
    assert list(model.graph.inputs[0].shape) == [ir.SymbolicDim("batch"), 6]
    check = ExportCheck.from_model(model)
    assert check.status == "passed" and check.batch_sizes == (2, 1)

    import tiny_torch_models

    module, _ = tiny_torch_models.build()
    _assert_matches_torch(model, module, (6,))


def test_explicit_torchscript_exporter() -> None:
    torch.manual_seed(0)
    module = SmallCNN()
    model = export(module, torch.randn(2, 3, 12, 12), exporter="torchscript")
    check = ExportCheck.from_model(model)
    assert check.exporter == TORCHSCRIPT and check.fallback_reason is None
    assert [v.name for v in model.graph.inputs] == ["input"]
    assert model.graph.inputs[0].shape[0] == ir.SymbolicDim("batch")
    _assert_matches_torch(model, module, (3, 12, 12))


@pytest.mark.slow
def test_auto_falls_back_to_torchscript_when_dynamo_fails(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="onnxopt.export"):
        model = export(DataDependentBranch(), torch.randn(2, 4))
    check = ExportCheck.from_model(model)
    assert check.exporter == TORCHSCRIPT and check.status == "passed"
    assert "data-dependent" in check.fallback_reason
    assert "falling back to the TorchScript exporter" in caplog.text
    x = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32)
    np.testing.assert_allclose(_ort(model, {"input": x})["output"], x * 2 + 1, rtol=1e-6)

    with pytest.raises(InputError, match="the dynamo exporter failed: .*data-dependent"):
        export(DataDependentBranch(), torch.randn(2, 4), exporter="dynamo")


@pytest.mark.slow
def test_verification_failure_reports_the_numbers() -> None:
    """Zero tolerance: ORT's and torch's convolution kernels differ in the last bits."""
    torch.manual_seed(0)
    with pytest.raises(QualityGateError) as err:
        export(SmallCNN(), torch.randn(2, 3, 12, 12), rtol=0.0, atol=0.0)
    check = err.value.check
    assert check.status == "failed" and 0 < check.max_abs_error < 1e-4
    message = str(err.value)
    assert f"max abs error {check.max_abs_error:.3g}" in message
    assert f"max rel error {check.max_rel_error:.3g}" in message
    assert "rtol=0, atol=0" in message


def test_wrong_examples() -> None:
    with pytest.raises(InputError, match="needs example_inputs"):
        export(MLP())
    with pytest.raises(InputError, match="example input 0 is a str"):
        export(MLP(), ("abc",))
