"""The demo end to end (quick mode: fewer epochs, shorter benchmark, same code path)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from onnxopt.digits import load_digits_28
from onnxopt.evaluation import top1_accuracy
from onnxopt.model_io import load_model

pytest.importorskip("torch")
pytest.importorskip("tensorflow")
pytest.importorskip("sklearn")

from onnxopt.demo import SCHEMA_VERSION, VALIDATION_SIZE, recipes_to_run, run_demo  # noqa: E402

MODELS = ("torch_mlp", "keras_mlp")


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any], list[str]]:
    out = tmp_path_factory.mktemp("demo")
    messages: list[str] = []
    returned = run_demo(out, progress=messages.append, quick=True)
    return out, returned, messages


@pytest.mark.slow
def test_demo_writes_reports_and_models(demo) -> None:
    out, returned, messages = demo
    report = json.loads((out / "report.json").read_text())
    assert report == returned
    assert report["schema_version"] == SCHEMA_VERSION
    assert list(report["recipes"]) == recipes_to_run() and "default" in report["recipes"]
    expected = {"report.md", "report.json", "report.html"} | {
        f"{m}.{v}.onnx" for m in MODELS for v in ["fp32", *recipes_to_run()]}
    assert {p.name for p in out.iterdir()} == expected  # no temporary files left behind
    assert messages and any("benchmark" in m for m in messages)


@pytest.mark.slow
def test_demo_accuracy_is_kept(demo) -> None:
    _, report, _ = demo
    for key in MODELS:
        variants = report["models"][key]["variants"]
        assert variants["fp32"]["top1"] >= 90.0, key
        for name in recipes_to_run():
            assert abs(variants[name]["top1"] - variants["fp32"]["top1"]) <= 0.3, (key, name)


@pytest.mark.slow
def test_demo_reports_what_is_on_disk(demo) -> None:
    out, report, _ = demo
    data = load_digits_28(seed=0, val_size=VALIDATION_SIZE)
    for key in MODELS:
        model = report["models"][key]
        bench_bytes = {m["name"]: m["bytes"] for m in model["benchmark"]["models"]}
        for name, variant in model["variants"].items():
            path = out / variant["file"]
            assert variant["file_bytes"] == path.stat().st_size
            assert bench_bytes[name] == path.stat().st_size  # the files were benchmarked
            on_disk = top1_accuracy(load_model(path), data.test_flat, data.y_test)
            assert on_disk == pytest.approx(variant["top1"])
            assert set(variant["latency"]) == {"1", "2"}
            if name != "fp32":
                steps = [p["name"] for p in variant["optimization"]["passes"]]
                assert steps == [s if isinstance(s, str) else s["pass"]
                                 for s in report["recipes"][name]]


@pytest.mark.slow
def test_demo_markdown_summarizes_every_variant(demo) -> None:
    out, report, _ = demo
    text = (out / "report.md").read_text()
    assert "## Summary" in text
    for model in report["models"].values():
        assert f"## {model['title']}" in text
        for name, variant in model["variants"].items():
            assert f"| {model['title']} | {name} | {variant['top1']:.2f} |" in text
    assert text.count("### Recipe `") == len(MODELS) * len(recipes_to_run())


@pytest.mark.slow
def test_demo_page_renders_its_report(demo) -> None:
    """report.html is the page `onnxopt report demo-report/report.json` renders, with the same
    figures as report.json."""
    pytest.importorskip("matplotlib")
    from onnxopt.report import load_results, render_html

    out, report, _ = demo
    page = (out / "report.html").read_text()
    assert page == render_html(load_results(out / "report.json"))
    assert "<h1>onnxopt demo report</h1>" in page and "top-1 on held-out digits" in page
    for name in recipes_to_run():  # the overview shows the speed-ups report.json recorded
        speedup = report["models"]["torch_mlp"]["variants"][name]["latency"]["1"]["speedup"]
        assert "<td>torch_mlp</td>" in page and f">{speedup:.2f}x" in page
    assert "None" not in page
