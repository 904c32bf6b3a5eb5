"""aarch64 under qemu: the runner and the models onnxopt writes load there and give the host's
outputs (QDQ INT8 bit for bit, FP32 within 1e-4 relative), for the neoverse-n1 and max CPU models.

The emulated environment is built from scratch the first time (Debian packages + aarch64 wheels,
about 1.5 minutes) and cached under onnxopt's cache folder; without qemu-user-static and
debootstrap (``.ci/run`` installs them) these tests skip and say so. Timings are never asserted:
emulated timings mean nothing for ARM.
"""

from __future__ import annotations

import platform
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx
import onnx.parser
import onnxruntime as ort
import pytest
from onnx import numpy_helper

import onnxopt
from onnxopt import arm_emulation, runner
from onnxopt.cli import main
from onnxopt.model_io import save_model
from onnxopt.targets import QemuTarget, RunOptions

CPUS = ("neoverse-n1", "max")
MIDR = {"neoverse-n1": 0x414FD0C1, "max": 0x000F0510}  # as ARM-NOTES.md reports them


def small_cnn(seed: int = 0) -> onnx.ModelProto:
    """Conv-BN-Relu-Pool, Conv-Relu, GlobalAvgPool, Gemm on 1x28x28 (about 0.5 MFLOP)."""
    model = onnx.parser.parse_model("""
        <ir_version: 8, opset_import: ["" : 17]>
        cnn (float[N, 1, 28, 28] x) => (float[N, 10] y) {
          c1 = Conv<pads=[1,1,1,1]>(x, W1, B1)
          n1 = BatchNormalization(c1, S1, O1, M1, V1)
          r1 = Relu(n1)
          p1 = MaxPool<kernel_shape=[2,2], strides=[2,2]>(r1)
          c2 = Conv<pads=[1,1,1,1]>(p1, W2, B2)
          r2 = Relu(c2)
          g = GlobalAveragePool(r2)
          f = Flatten(g)
          y = Gemm<transB=1>(f, W3, B3)
        }""")
    rng = np.random.default_rng(seed)
    shapes = {"W1": (8, 1, 3, 3), "B1": (8,), "S1": (8,), "O1": (8,), "M1": (8,), "V1": (8,),
              "W2": (16, 8, 3, 3), "B2": (16,), "W3": (10, 16), "B3": (10,)}
    for name, shape in shapes.items():
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        values = rng.standard_normal(shape) / np.sqrt(fan_in)
        if name == "V1":
            values = np.abs(values) + 0.5
        model.graph.initializer.append(numpy_helper.from_array(values.astype(np.float32), name))
    onnx.checker.check_model(model)
    return model


# --- fast checks (no emulation) ---------------------------------------------------------------


def test_cpuinfo_matches_the_emulated_midr_and_hwcaps(monkeypatch: pytest.MonkeyPatch) -> None:
    # the neoverse-n1 values read inside qemu 7.2: MIDR 0x414fd0c1, HWCAP 0x119ffb
    identity = arm_emulation.CpuIdentity("neoverse-n1", midr=0x414FD0C1, hwcap=0x119FFB,
                                         hwcap2=0, cpus=2)
    assert identity.features == [
        "fp", "asimd", "aes", "pmull", "sha1", "sha2", "crc32", "atomics", "fphp", "asimdhp",
        "cpuid", "asimdrdm", "lrcpc", "dcpop", "asimddp"]
    sme = arm_emulation.CpuIdentity("max", midr=0x000F0510, hwcap=0, hwcap2=1 << 23 | 1 << 13,
                                    cpus=1)
    assert sme.features == ["i8mm", "sme"]
    text = identity.cpuinfo()
    # the runner reads it back as an ARM machine: Arm Ltd part 0xd0c is Neoverse-N1
    monkeypatch.setattr(runner, "_read_text", lambda path: text if path == "/proc/cpuinfo" else "")
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    info = runner.machine_info()
    assert info["cpu_model"] == "Neoverse-N1 x2"
    assert info["cpu_parts"] == ["0xd0c"]
    assert info["isa"]["asimddp"] and not info["isa"]["sve"]
    assert "CPU variant\t: 0x4\n" in text and "CPU revision\t: 1\n" in text


def test_debian_mirror_falls_back_to_deb_debian_org(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Path, "is_file", lambda self: False)
    assert arm_emulation.debian_mirror() == arm_emulation.DEFAULT_MIRROR


def test_cache_key_names_the_versions() -> None:
    key = arm_emulation.cache_key()
    assert f"ort{ort.__version__}" in key and f"numpy{np.__version__}" in key


# --- under emulation --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def aarch64() -> arm_emulation.Aarch64Environment:
    try:
        arm_emulation.check_available()
    except arm_emulation.EmulationUnavailableError as exc:
        pytest.skip(f"no aarch64 emulation here: {exc}")
    return arm_emulation.ensure_environment()


@pytest.fixture(scope="module")
def optimized(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The CNN through onnxopt's ``default`` (FP32) and ``int8`` recipes, saved by onnxopt."""
    folder = tmp_path_factory.mktemp("arm-models")
    rng = np.random.default_rng(1)
    calibration = [{"x": rng.standard_normal((4, 1, 28, 28)).astype(np.float32)}
                   for _ in range(4)]
    fp32, _ = onnxopt.optimize(small_cnn(), "default", calibration=calibration)
    # A model this small is not faster in INT8, so the pass's latency check would keep FP32;
    # switched off here, since this test is about portability, not speed.
    int8, _ = onnxopt.optimize(small_cnn(), "int8", calibration=calibration,
                               overrides={"quantize.measure_latency": False,
                                          "quantize.mode": "static"})
    assert {n.op_type for n in int8.graph} >= {"QuantizeLinear", "DequantizeLinear"}
    paths = {"fp32": save_model(fp32, folder / "cnn.onnx"),
             "int8": save_model(int8, folder / "cnn.int8.onnx")}
    np.savez(folder / "feeds.npz", x=rng.standard_normal((2, 1, 28, 28)).astype(np.float32))
    # What ORT itself would serialize at ORT_ENABLE_ALL on this x86 host (the negative control).
    options = runner.session_options(opt_level="all")
    options.optimized_model_filepath = str(folder / "cnn.ort-all.onnx")
    ort.InferenceSession(str(paths["fp32"]), options, providers=["CPUExecutionProvider"])
    paths["ort-all"] = folder / "cnn.ort-all.onnx"
    paths["feeds"] = folder / "feeds.npz"
    return paths


def host_outputs(model: Path, feeds: Path) -> dict[str, np.ndarray]:
    with np.load(feeds) as data:
        session = runner.create_session(str(model), threads=1)
        return runner.run(session, {k: data[k] for k in data.files})


@pytest.mark.slow
def test_optimized_models_run_on_emulated_aarch64_with_host_outputs(
        aarch64: arm_emulation.Aarch64Environment, optimized: dict[str, Path],
        tmp_path: Path) -> None:
    # onnxopt never writes ORT-internal ops: files load on any ORT, x86 or aarch64
    for kind in ("fp32", "int8"):
        domains = {n.domain for n in onnx.load(str(optimized[kind])).graph.node}
        assert domains <= {"", "ai.onnx"}, domains
    jobs = [(cpu, kind) for cpu in CPUS for kind in ("fp32", "int8")]

    def run(job: tuple[str, str]) -> dict:
        cpu, kind = job
        return QemuTarget(cpu).run(optimized[kind], RunOptions(warmup=1, iterations=2),
                                   inputs=optimized["feeds"],
                                   outputs=tmp_path / f"{cpu}-{kind}.npz")

    with ThreadPoolExecutor(max_workers=2) as pool:  # one qemu process per core
        results = dict(zip(jobs, pool.map(run, jobs), strict=True))

    for cpu in CPUS:
        for kind in ("fp32", "int8"):
            doc = results[(cpu, kind)]
            assert doc["machine"]["arch"] == "aarch64"
            assert doc["machine"]["versions"]["onnxruntime"] == ort.__version__
            assert doc["target"]["emulated"] and doc["latency"]["timing"] == "emulated"
            assert int(doc["target"]["emulated_cpu"]["midr_el1"], 16) == MIDR[cpu]
            expected = host_outputs(optimized[kind], optimized["feeds"])
            with np.load(tmp_path / f"{cpu}-{kind}.npz") as got:
                assert got.files == list(expected)
                for name, want in expected.items():
                    if kind == "int8":  # integer kernels: bit for bit on both ISAs
                        np.testing.assert_array_equal(got[name], want)
                    else:
                        np.testing.assert_allclose(got[name], want, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_file_ort_optimized_on_x86_fails_on_aarch64_through_bench(
        aarch64: arm_emulation.Aarch64Environment, optimized: dict[str, Path],
        capsys: pytest.CaptureFixture[str]) -> None:
    """The negative control: what onnxopt never writes (an ORT_ENABLE_ALL serialization, with
    x86's NCHWc ops) does not load on aarch64, and ``bench --target`` says so in one line."""
    code = main(["bench", str(optimized["ort-all"]), "--target", "qemu-aarch64:neoverse-n1",
                 "--inputs", str(optimized["feeds"])])
    err = capsys.readouterr().err
    assert code == 2
    assert "nchwc" in err.lower() and "cannot load" in err
