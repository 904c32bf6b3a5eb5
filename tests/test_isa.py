"""Target CPUs: feature detection from /proc/cpuinfo text, and the INT8 types chosen for each."""

from __future__ import annotations

import pytest

from onnxopt.errors import InputError
from onnxopt.isa import TARGETS, CpuFeatures, detect_cpu, is_host, parse_cpuinfo, resolve_target

X86_VNNI = "processor\t: 0\nflags\t\t: fpu sse4_2 avx2 avx512f avx512bw avx512_vnni\n"
X86_AVX2 = "processor\t: 0\nflags\t\t: fpu sse4_2 avx avx2 fma\n"
X86_AVX512 = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512bw avx512vl\n"
X86_AMX = "flags\t\t: avx512_vnni amx_bf16 amx_tile amx_int8\n"
ARM_DOTPROD = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes crc32 atomics asimddp\n"
ARM_PLAIN = "processor\t: 0\nFeatures\t: fp asimd evtstrm crc32\n"


@pytest.mark.parametrize(("text", "machine", "expected"), [
    (X86_VNNI, "x86_64", "x86-vnni"),
    (X86_AVX2, "x86_64", "x86-avx2"),
    (X86_AVX512, "AMD64", "x86-avx512"),
    (X86_AMX, "x86_64", "x86-amx"),
    (ARM_DOTPROD, "aarch64", "arm64-dotprod"),
    (ARM_PLAIN, "aarch64", "arm64"),
    ("", "riscv64", "generic"),
])
def test_cpuinfo_maps_to_target(text: str, machine: str, expected: str) -> None:
    assert parse_cpuinfo(text, machine).target_name == expected


@pytest.mark.parametrize(("spec", "activation", "weight", "reduce_range"), [
    ("x86-vnni", "uint8", "int8", False),  # vpdpbusd: U8S8, no saturation
    ("x86-amx", "uint8", "int8", False),
    ("x86-avx512", "uint8", "int8", True),  # vpmaddubsw saturates: 7-bit weights
    ("x86-avx2", "uint8", "int8", True),
    ("arm64-dotprod", "int8", "int8", False),
    ("arm64", "int8", "int8", False),
    ("generic", "uint8", "int8", True),
])
def test_types_per_target(spec: str, activation: str, weight: str, reduce_range: bool) -> None:
    target = resolve_target(spec)
    assert (target.activation_type, target.weight_type, target.reduce_range) == (
        activation, weight, reduce_range)
    assert target.quant_format == "qdq"
    assert target.reason  # every choice says why


def test_aliases_and_case() -> None:
    assert resolve_target("VNNI").name == "x86-vnni"
    assert resolve_target("aarch64").name == "arm64"
    assert resolve_target("arm64-i8mm").name == "arm64-dotprod"


def test_auto_uses_the_detected_cpu() -> None:
    cpu = CpuFeatures("x86_64", frozenset({"avx2"}), "test")
    assert resolve_target("auto", cpu).name == "x86-avx2"
    assert resolve_target(None, cpu).name == "x86-avx2"
    assert is_host(TARGETS["x86-avx2"], cpu)
    assert not is_host(TARGETS["arm64"], cpu)


def test_this_machine_resolves() -> None:
    cpu = detect_cpu()
    assert resolve_target("auto").name == cpu.target_name
    assert cpu.target_name in TARGETS


def test_unknown_target_is_an_input_error() -> None:
    with pytest.raises(InputError, match="unknown target 'sparc'.*x86-vnni"):
        resolve_target("sparc")
