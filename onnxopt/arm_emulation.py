"""An emulated aarch64 Linux on an x86-64 host, to check that the runner works there (tests only).

What it is for: proving that the runner and the models onnxopt writes load and give the same
outputs on aarch64. What it is not for: ARM performance. qemu user-mode timings are 100-600x off
native ones (``/work/shared/ARM-NOTES.md``); every timing taken here is labelled ``emulated``.

How (no chroot, no binfmt, no root; about 1.5 minutes the first time, cached after):

1. ``debootstrap --download-only --arch=arm64 --variant=minbase --include=python3`` fetches
   Debian bookworm's aarch64 packages, and ``dpkg-deb -x`` unpacks every one into a root folder.
   Nothing is configured or run inside it, so no root rights and no second stage are needed.
2. The host's own pip installs the aarch64 wheels of the host's onnxruntime and numpy versions
   into ``ROOT/opt/site`` (``--platform manylinux_2_28_aarch64``: with ``manylinux2014`` pip
   silently falls back to onnxruntime 1.16).
3. ``qemu-aarch64-static -cpu CPU -L ROOT ROOT/usr/bin/python3.11`` runs the guest Python. With
   ``-L``, qemu looks a path up under ROOT first and falls back to the host's, so host paths of
   models and outputs work unchanged.

Two traps handled here: ``import onnxruntime`` segfaults when the guest sees the host's x86
``/proc/cpuinfo`` (ORT's cpuinfo library cannot parse it), and ORT picks its dot-product kernels
by the core's part number (MIDR), so an aarch64 ``/proc/cpuinfo`` claiming another core than the
emulated one gives "Illegal instruction" on INT8 models. So each CPU model gets its own small root
(symlinks to the shared one) whose ``proc/cpuinfo`` is written from the MIDR and HWCAPs read inside
that very emulated CPU (:func:`probe_cpu`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from onnxopt.cache import cache_root
from onnxopt.errors import OnnxoptError

log = logging.getLogger(__name__)

SUITE = "bookworm"  # Python 3.11 and glibc 2.36 (current ORT wheels need glibc >= 2.28)
DEFAULT_MIRROR = "http://deb.debian.org/debian"
WHEEL_PLATFORM = "manylinux_2_28_aarch64"
LAYOUT_VERSION = 1  # bump when the layout built here changes, to rebuild cached environments
GUEST_SITE = "/opt/site"
TOOLS = ("qemu-aarch64-static", "debootstrap", "dpkg-deb")
DEBIAN_KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
# Top-level folders a per-CPU root does not link: the guest should see the host's /tmp, /dev,
# /sys and /run (paths missing under the root fall back to the host's), and /proc is its own.
_NOT_LINKED = {"proc", "dev", "sys", "tmp", "run"}

# Linux's arch/arm64/include/uapi/asm/hwcap.h bit order, as /proc/cpuinfo prints the names
# (arch/arm64/kernel/cpuinfo.c). Written out here because no library maps HWCAP bits to names.
HWCAP_NAMES = (
    "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm jscvt fcma "
    "lrcpc dcpop sha3 sm3 sm4 asimddp sha512 sve asimdfhm dit uscat ilrcpc flagm ssbs sb paca "
    "pacg gcs"
).split()
HWCAP2_NAMES = (
    "dcpodp sve2 sveaes svepmull svebitperm svesha3 svesm4 flagm2 frint svei8mm svef32mm "
    "svef64mm svebf16 i8mm bf16 dgh rng bti mte ecv afp rpres mte3 sme smei16i64 smef64f64 "
    "smei8i32 smef16f32 smeb16f32 smef32f32 smefa64 wfxt ebf16 sveebf16 cssc rprfm sve2p1 sme2 "
    "sme2p1 smei16i32 smebi32i32 smeb16b16 smef16f16 mops hbc sveb16b16 lrcpc3 lse128 fpmr lut "
    "faminmax f8cvt f8fma f8dp4 f8dp2 f8e4m3 f8e5m2 smelutv2 smef8f16 smef8f32 smesf8fma "
    "smesf8dp4 smesf8dp2 poe"
).split()

# Runs inside the emulated CPU: HWCAPs from the auxiliary vector, and MIDR_EL1 read by an
# ``mrs x0, midr_el1; ret`` placed on an executable page (Linux, and qemu, emulate that read
# for user space).
_PROBE = """
import ctypes, json, mmap, os
libc = ctypes.CDLL(None)
libc.getauxval.restype = ctypes.c_ulong
libc.getauxval.argtypes = [ctypes.c_ulong]
page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
page.write((0xD5380000).to_bytes(4, "little") + (0xD65F03C0).to_bytes(4, "little"))
read_midr = ctypes.CFUNCTYPE(ctypes.c_uint64)(ctypes.addressof(ctypes.c_char.from_buffer(page)))
print(json.dumps({"midr": read_midr(), "hwcap": libc.getauxval(16),
                  "hwcap2": libc.getauxval(26), "cpus": os.cpu_count()}))
"""


class EmulationUnavailableError(OnnxoptError):
    """This machine cannot emulate aarch64 (missing tools, or not an x86-64 Linux host)."""


class EmulationBuildError(OnnxoptError):
    """Building the emulated environment failed (download, unpacking, wheel install)."""


@dataclasses.dataclass(frozen=True)
class CpuIdentity:
    """What an emulated CPU model reports: MIDR_EL1, the two HWCAP words, the CPU count."""

    name: str
    midr: int
    hwcap: int
    hwcap2: int
    cpus: int

    @property
    def features(self) -> list[str]:
        """HWCAP bits as the names /proc/cpuinfo's ``Features`` line uses."""
        return ([n for i, n in enumerate(HWCAP_NAMES) if self.hwcap >> i & 1]
                + [n for i, n in enumerate(HWCAP2_NAMES) if self.hwcap2 >> i & 1])

    def cpuinfo(self) -> str:
        """An aarch64 /proc/cpuinfo for this CPU (one block per processor, as Linux writes it)."""
        block = (
            "BogoMIPS\t: 50.00\n"
            f"Features\t: {' '.join(self.features)}\n"
            f"CPU implementer\t: 0x{self.midr >> 24 & 0xFF:02x}\n"
            "CPU architecture: 8\n"
            f"CPU variant\t: 0x{self.midr >> 20 & 0xF:x}\n"
            f"CPU part\t: 0x{self.midr >> 4 & 0xFFF:03x}\n"
            f"CPU revision\t: {self.midr & 0xF}\n"
        )
        return "\n".join(f"processor\t: {i}\n{block}" for i in range(self.cpus))


@dataclasses.dataclass(frozen=True)
class Aarch64Environment:
    """A built aarch64 root folder: Debian's Python plus the aarch64 onnxruntime and numpy."""

    root: Path
    python: str  # the guest interpreter, e.g. /usr/bin/python3.11
    versions: dict[str, str]

    def cpu_root(self, cpu: str) -> Path:
        """A root for one emulated CPU model: symlinks to :attr:`root` and a matching
        ``proc/cpuinfo`` (built on first use, then cached next to the environment)."""
        return _cpu_root(self, cpu)

    def identity(self, cpu: str) -> CpuIdentity:
        """The MIDR and HWCAPs of ``cpu`` as written into its root's ``proc/cpuinfo``."""
        data = json.loads((_cpu_dir(self, cpu) / "identity.json").read_text())
        return CpuIdentity(**data)

    def command(self, cpu: str, args: Sequence[str]) -> list[str]:
        """argv running the guest Python with ``args`` on the emulated ``cpu``."""
        root = self.cpu_root(cpu)
        return [qemu_binary(), "-cpu", cpu, "-L", str(root), f"{root}{self.python}", *args]

    @staticmethod
    def environment() -> dict[str, str]:
        """The guest process environment: only what it needs (no host PYTHON* variables)."""
        return {"PYTHONPATH": GUEST_SITE, "PYTHONNOUSERSITE": "1", "LANG": "C.UTF-8",
                "PATH": "/usr/bin:/bin"}

    def run(self, cpu: str, args: Sequence[str], *, timeout: float = 600,
            cwd: str | Path | None = None) -> subprocess.CompletedProcess[str]:
        """Run the guest Python on ``cpu`` (output captured as text)."""
        return subprocess.run(self.command(cpu, args), env=self.environment(), cwd=cwd,
                              capture_output=True, text=True, timeout=timeout, check=False)


def qemu_binary() -> str:
    path = shutil.which("qemu-aarch64-static") or shutil.which("qemu-aarch64")
    if path is None:
        raise EmulationUnavailableError("qemu-aarch64-static is not installed "
                                        "(apt-get install qemu-user-static)")
    return path


def check_available() -> None:
    """Raise :class:`EmulationUnavailableError` saying what is missing, if anything."""
    if sys.platform != "linux" or platform.machine().lower() not in ("x86_64", "amd64"):
        raise EmulationUnavailableError(
            f"aarch64 emulation is set up for x86-64 Linux hosts, this is {sys.platform} "
            f"{platform.machine()}")
    missing = [tool for tool in TOOLS if shutil.which(tool) is None
               and not (tool == "qemu-aarch64-static" and shutil.which("qemu-aarch64"))]
    if missing:
        raise EmulationUnavailableError(
            f"missing {', '.join(missing)} (apt-get install qemu-user-static debootstrap)")
    if not Path(DEBIAN_KEYRING).is_file():  # debootstrap checks Debian's signatures with it
        raise EmulationUnavailableError(
            f"missing {DEBIAN_KEYRING} (apt-get install debian-archive-keyring)")


def cache_key() -> str:
    """The folder name of an environment: everything that decides its contents."""
    return (f"aarch64-{SUITE}-ort{ort.__version__}-numpy{np.__version__}-layout{LAYOUT_VERSION}")


def ensure_environment(cache: str | Path | None = None) -> Aarch64Environment:
    """The cached environment for this host's onnxruntime and numpy versions, built if missing.

    ``cache`` defaults to :func:`onnxopt.cache.cache_root`. A lock file makes concurrent callers wait for
    one build; a build happens in a staging folder renamed into place at the end, so an
    interrupted build is never taken for a finished one.
    """
    check_available()
    base = Path(cache) if cache is not None else cache_root()
    base.mkdir(parents=True, exist_ok=True)
    final = base / cache_key()
    with _locked(base / f"{cache_key()}.lock"):
        if not (final / "environment.json").is_file():
            staging = Path(tempfile.mkdtemp(prefix=f"{cache_key()}.build-", dir=base))
            try:
                _build(staging)
                if final.exists():
                    shutil.rmtree(final)
                staging.rename(final)
            finally:
                if staging.exists():
                    shutil.rmtree(staging, ignore_errors=True)
    data = json.loads((final / "environment.json").read_text())
    return Aarch64Environment(root=final / "root", python=data["python"],
                              versions=data["versions"])


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _build(folder: Path) -> None:
    """Download and unpack the Debian packages, install the wheels, check the guest Python."""
    root = folder / "root"
    root.mkdir()
    started = time.perf_counter()
    mirror = debian_mirror()
    log.info("downloading Debian %s arm64 packages from %s", SUITE, mirror)
    _check_call(["debootstrap", "--download-only", "--arch=arm64", "--variant=minbase",
                 "--include=python3", SUITE, str(root), mirror], "debootstrap")
    debs = sorted((root / "var/cache/apt/archives").glob("*.deb"))
    if not debs:
        raise EmulationBuildError(f"debootstrap downloaded no packages into {root}")
    for deb in debs:  # unpack only: nothing in the root is ever configured or run as root
        _check_call(["dpkg-deb", "-x", str(deb), str(root)], f"dpkg-deb -x {deb.name}")
        deb.unlink()
    pythons = sorted(root.glob("usr/bin/python3.[0-9]*"))
    pythons = [p for p in pythons if re.fullmatch(r"python3\.\d+", p.name)]
    if not pythons:
        raise EmulationBuildError("the unpacked root has no usr/bin/python3.X")
    python = f"/{pythons[-1].relative_to(root)}"
    py_version = pythons[-1].name.removeprefix("python")
    log.info("installing aarch64 onnxruntime %s and numpy %s wheels", ort.__version__,
             np.__version__)
    _check_call([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                 "--target", str(root / GUEST_SITE.lstrip("/")), "--platform", WHEEL_PLATFORM,
                 "--python-version", py_version, "--implementation", "cp",
                 "--abi", f"cp{py_version.replace('.', '')}", "--only-binary=:all:",
                 f"onnxruntime=={ort.__version__}", f"numpy=={np.__version__}"], "pip install")
    versions = {"debian": SUITE, "python": py_version, "onnxruntime": ort.__version__,
                "numpy": np.__version__, "qemu": _qemu_version()}
    (folder / "environment.json").write_text(json.dumps(
        {"python": python, "versions": versions, "layout": LAYOUT_VERSION,
         "build_s": round(time.perf_counter() - started, 1)}, indent=2))
    log.info("aarch64 environment built in %.0f s", time.perf_counter() - started)


def debian_mirror() -> str:
    """The host's Debian mirror (apt's deb822 or one-line sources), else deb.debian.org."""
    deb822 = Path("/etc/apt/sources.list.d/debian.sources")
    if deb822.is_file():
        for stanza in deb822.read_text().split("\n\n"):
            fields = dict(re.findall(r"^(\w[\w-]*):\s*(.+)$", stanza, flags=re.M))
            if "security" not in fields.get("Suites", "security") and fields.get("URIs"):
                return fields["URIs"].split()[0]
    legacy = Path("/etc/apt/sources.list")
    if legacy.is_file():
        for line in legacy.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3 and parts[0] == "deb" and "security" not in line:
                url = next((p for p in parts[1:] if "://" in p), None)
                if url and "debian" in url:
                    return url
    return DEFAULT_MIRROR


def _qemu_version() -> str:
    done = subprocess.run([qemu_binary(), "--version"], capture_output=True, text=True,
                          check=False)
    first = (done.stdout.splitlines() or ["unknown"])[0]
    match = re.search(r"version\s+(\S+)", first)
    return match.group(1) if match else first


def _check_call(cmd: list[str], what: str) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        tail = " | ".join((done.stderr or done.stdout).strip().splitlines()[-3:])
        raise EmulationBuildError(f"{what} failed (exit {done.returncode}): {tail}")


def _cpu_dir(env: Aarch64Environment, cpu: str) -> Path:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", cpu):
        raise EmulationUnavailableError(f"bad qemu CPU model name '{cpu}'")
    return env.root.parent / "cpus" / cpu


def _cpu_root(env: Aarch64Environment, cpu: str) -> Path:
    folder = _cpu_dir(env, cpu)
    root = folder / "root"
    if (folder / "identity.json").is_file():
        return root
    with _locked(env.root.parent / "cpus.lock"):
        if (folder / "identity.json").is_file():
            return root
        if folder.exists():
            shutil.rmtree(folder)
        (root / "proc").mkdir(parents=True)
        for entry in env.root.iterdir():
            if entry.name not in _NOT_LINKED:  # relative links: the cache folder may move
                (root / entry.name).symlink_to(os.path.relpath(entry, root))
        identity = probe_cpu(env, cpu, root)
        # ORT's cpuinfo library reads this file instead of the host's /proc/cpuinfo.
        (root / "proc" / "cpuinfo").write_text(identity.cpuinfo())
        (folder / "identity.json").write_text(json.dumps(dataclasses.asdict(identity)))
    return root


def probe_cpu(env: Aarch64Environment, cpu: str, root: Path) -> CpuIdentity:
    """MIDR_EL1, HWCAPs and CPU count seen by a guest process on the emulated ``cpu``."""
    cmd = [qemu_binary(), "-cpu", cpu, "-L", str(root), f"{root}{env.python}", "-c", _PROBE]
    done = subprocess.run(cmd, env=env.environment(), capture_output=True, text=True,
                          timeout=120, check=False)
    if done.returncode != 0:
        detail = " | ".join(done.stderr.strip().splitlines()[-2:]) or f"exit {done.returncode}"
        raise EmulationUnavailableError(f"qemu cannot run CPU model '{cpu}': {detail}")
    data = json.loads(done.stdout)
    return CpuIdentity(name=cpu, midr=int(data["midr"]), hwcap=int(data["hwcap"]),
                       hwcap2=int(data["hwcap2"]), cpus=max(1, int(data["cpus"] or 1)))
