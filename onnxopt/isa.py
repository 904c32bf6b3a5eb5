"""Which CPU the model will run on, and the INT8 data types that are fast *and* safe there.

The choice matters more than any other quantization setting (see ``INT8-NOTES``): on x86 with VNNI,
unsigned activations times signed weights (U8S8) run on ``vpdpbusd`` and were up to 2x faster than
ONNX Runtime's default signed activations; on x86 without VNNI the same U8S8 kernels use
``vpmaddubsw``, whose 16-bit pair sums can saturate, so weights are reduced to 7 bits
(``reduce_range``); ARM cores take signed activations and weights (ORT's own guidance in
``quantize_static``'s docstring; not measured here, there is no ARM hardware in this workplace).

Detection reads ``/proc/cpuinfo`` (Linux) or ``sysctl`` (macOS); a target name overrides it, e.g.
when quantizing on an x86 workstation for an ARM board.
"""

from __future__ import annotations

import dataclasses
import platform
import shutil
import subprocess
from pathlib import Path
from typing import Literal

from onnxopt.errors import InputError

QuantDType = Literal["uint8", "int8"]


@dataclasses.dataclass(frozen=True)
class CpuFeatures:
    """What the CPU offers, as far as INT8 kernels care. ``source`` says where it was read from."""

    arch: Literal["x86_64", "arm64", "other"]
    flags: frozenset[str]
    source: str

    @property
    def target_name(self) -> str:
        """The name of the :data:`TARGETS` entry these features map to."""
        if self.arch == "x86_64":
            if {"amx_int8", "amx_tile"} <= self.flags:
                return "x86-amx"
            if self.flags & {"avx512_vnni", "avx_vnni", "avx_vnni_int8"}:
                return "x86-vnni"
            if "avx512bw" in self.flags:
                return "x86-avx512"
            return "x86-avx2"
        if self.arch == "arm64":
            return "arm64-dotprod" if self.flags & {"asimddp", "dotprod", "i8mm"} else "arm64"
        return "generic"


@dataclasses.dataclass(frozen=True)
class QuantTarget:
    """The INT8 recipe for one kind of CPU: data types, weight range, format, and why."""

    name: str
    activation_type: QuantDType
    weight_type: QuantDType
    reduce_range: bool
    quant_format: Literal["qdq", "qoperator"]
    reason: str

    def describe(self) -> str:
        a, w = ("U8" if self.activation_type == "uint8" else "S8"), (
            "U8" if self.weight_type == "uint8" else "S8")
        rr = ", 7-bit weights (reduce_range)" if self.reduce_range else ""
        return f"{self.name}: {a}{w} {self.quant_format.upper()}{rr}"


_QDQ_WHY = "QDQ, which ORT's CPU provider fuses into its integer kernels (its preferred CPU format)"

TARGETS: dict[str, QuantTarget] = {
    t.name: t
    for t in (
        QuantTarget(
            "x86-amx", "uint8", "int8", False, "qdq",
            "AMX-INT8 and VNNI multiply unsigned activations by signed weights with 32-bit "
            f"accumulation (no saturation); ORT has U8S8 AMX/VNNI kernels; {_QDQ_WHY}."),
        QuantTarget(
            "x86-vnni", "uint8", "int8", False, "qdq",
            "VNNI (vpdpbusd) multiplies unsigned activations by signed weights into 32-bit sums "
            "without saturation; signed activations take a slower path (ResNet50 1.35x vs 2.74x "
            f"over FP32 on this kind of machine); {_QDQ_WHY}."),
        QuantTarget(
            "x86-avx512", "uint8", "int8", True, "qdq",
            "no VNNI: ORT's U8S8 kernels use vpmaddubsw, whose 16-bit pair sums saturate with "
            "full-range weights; 7-bit weights (reduce_range) avoid that and keep the fast U8S8 "
            f"path (U8U8 would also be exact but slower); {_QDQ_WHY}."),
        QuantTarget(
            "x86-avx2", "uint8", "int8", True, "qdq",
            "no VNNI: ORT's U8S8 kernels use (v)pmaddubsw, whose 16-bit pair sums saturate with "
            "full-range weights; 7-bit weights (reduce_range) avoid that and keep the fast U8S8 "
            f"path (U8U8 would also be exact but slower); {_QDQ_WHY}."),
        QuantTarget(
            "arm64-dotprod", "int8", "int8", False, "qdq",
            "ARM64 with dot-product (sdot/udot, i8mm): ORT recommends symmetric signed activations "
            "and weights for ARM CPUs; 32-bit accumulation, no saturation; not measured here "
            "(no ARM hardware): confirm the speed-up on the board."),
        QuantTarget(
            "arm64", "int8", "int8", False, "qdq",
            "ARM64 without dot-product: INT8 GEMMs fall back to widening NEON multiplies, so gains "
            "are small and tiny models may lose; signed types per ORT's ARM guidance; "
            "measure on the board."),
        QuantTarget(
            "generic", "uint8", "int8", True, "qdq",
            "unknown CPU: U8S8 with 7-bit weights is exact on every ORT CPU kernel "
            "(reduce_range avoids vpmaddubsw saturation if it is an x86 without VNNI)."),
    )
}

_ALIASES = {
    "amx": "x86-amx", "vnni": "x86-vnni", "avx512": "x86-avx512", "avx2": "x86-avx2",
    "x86": "x86-avx2", "x86_64": "x86-avx2", "aarch64": "arm64", "arm64-i8mm": "arm64-dotprod",
    "aarch64-dotprod": "arm64-dotprod", "dotprod": "arm64-dotprod",
}


def parse_cpuinfo(text: str, machine: str) -> CpuFeatures:
    """Features from the text of ``/proc/cpuinfo`` (x86 ``flags``, ARM ``Features``)."""
    arch = _arch(machine)
    flags: set[str] = set()
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() in ("flags", "features"):
            flags.update(value.split())
            break  # every core reports the same list
    return CpuFeatures(arch, frozenset(flags), "/proc/cpuinfo")


def detect_cpu() -> CpuFeatures:
    """This machine's CPU features (empty flags when the OS does not say)."""
    machine = platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        return parse_cpuinfo(cpuinfo.read_text(errors="replace"), machine)
    if platform.system() == "Darwin" and _arch(machine) == "arm64" and shutil.which("sysctl"):
        out = subprocess.run(["sysctl", "-n", "hw.optional.arm.FEAT_DotProd"],
                             capture_output=True, text=True, check=False).stdout.strip()
        return CpuFeatures("arm64", frozenset({"dotprod"} if out == "1" else set()), "sysctl")
    return CpuFeatures(_arch(machine), frozenset(), "platform")


def resolve_target(spec: str | None = None, cpu: CpuFeatures | None = None) -> QuantTarget:
    """The target named by ``spec`` (``None``/``"auto"``: this machine's CPU)."""
    if spec is None or spec in ("", "auto", "host"):
        return TARGETS[(cpu or detect_cpu()).target_name]
    name = _ALIASES.get(spec.lower(), spec.lower())
    if name not in TARGETS:
        known = ", ".join([*TARGETS, "auto"])
        raise InputError(f"unknown target '{spec}' (known: {known})")
    return TARGETS[name]


def is_host(target: QuantTarget, cpu: CpuFeatures | None = None) -> bool:
    """Whether latency measured on this machine says something about ``target``."""
    return target.name == (cpu or detect_cpu()).target_name


def _arch(machine: str) -> Literal["x86_64", "arm64", "other"]:
    m = machine.lower()
    if m in ("x86_64", "amd64", "x64", "i686", "i386"):
        return "x86_64"
    if m in ("aarch64", "arm64", "armv8", "armv8l"):
        return "arm64"
    return "other"
