"""An ARM64 Python on this x86_64 host, through qemu user-mode emulation (no binfmt, no root
filesystem image): Debian's arm64 python3.11 unpacked into a sysroot, aarch64 wheels of the
device dependencies in a site folder, and a fake ARM ``/proc/cpuinfo`` per CPU model.

Built once into a cache folder and reused (``$EDGEPEFT_ARMEMU_DIR``, default
``~/.cache/edgepeft/armemu``; ~1.5 min and ~80 MB the first time, then seconds); only the
edgepeft wheel is reinstalled per run. ``python -m device_tests build-emu`` builds it ahead.

Layout of the cache folder:
    root/              the arm64 sysroot (dpkg -x of python3.11's Debian closure), shared
    cpu/<model>/       per CPU model: symlinks to root's top-level entries, plus its own
                       proc/cpuinfo and sys/.../midr_el1 (qemu -L looks there first)
    site-<key>/        aarch64 wheels (numpy, onnxruntime, ...) for Python 3.11
    app-<hash>/        the edgepeft wheel of a run (by the wheel's sha256)
Emulation is for correctness only: it runs 10-500x slower and adds ~100 MB of RSS."""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from edgepeft.errors import BackendError, SpecError

DEFAULT_DIR = Path.home() / ".cache" / "edgepeft" / "armemu"
# The Debian packages of the guest interpreter (their dependencies come along).
DEBS = ("python3.11", "libstdc++6", "libgomp1")
PY_VERSION = "3.11"
# The device side's dependencies (pyproject's core + [portable]); tomli only below 3.11.
WHEELS = ("numpy", "onnxruntime", "tokenizers", "safetensors", "click", "rich", "cryptography")
PLATFORM_FLAGS = ("--platform", "manylinux2014_aarch64", "--platform", "manylinux_2_17_aarch64",
                  "--platform", "manylinux_2_28_aarch64", "--python-version", PY_VERSION,
                  "--implementation", "cp", "--abi", "cp311", "--only-binary=:all:")


@dataclass(frozen=True)
class CpuModel:
    """What a qemu CPU model reports in /proc/cpuinfo (values from the cores' TRMs / real boards)."""

    variant: int
    part: int
    revision: int
    features: str


CPUS = {
    "cortex-a53": CpuModel(0x0, 0xD03, 4, "fp asimd evtstrm aes pmull sha1 sha2 crc32 cpuid"),
    "cortex-a72": CpuModel(0x0, 0xD08, 3, "fp asimd evtstrm crc32 cpuid"),
    "cortex-a76": CpuModel(0x4, 0xD0B, 1, "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid "
                                          "asimdrdm lrcpc dcpop asimddp"),
    "neoverse-n1": CpuModel(0x3, 0xD0C, 1, "fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid "
                                           "asimdrdm lrcpc dcpop asimddp ssbs"),
}


def _log(msg: str) -> None:
    print(f"[armemu] {msg}", file=sys.stderr, flush=True)


def cache_dir() -> Path:
    return Path(os.environ.get("EDGEPEFT_ARMEMU_DIR") or DEFAULT_DIR)


@contextlib.contextmanager
def _locked(d: Path) -> Iterator[None]:
    """One builder at a time (two test processes may ask for the same sysroot at once)."""
    d.mkdir(parents=True, exist_ok=True)
    with open(d / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class EmulatorUnavailable(BackendError):
    """What the emulation needs cannot be had here: qemu (not installed, and no root or apt-get
    to install it), Debian's arm64 packages or PyPI's aarch64 wheels (no network, or a
    registry refused). The emulated targets cannot run; that is not a parity failure."""


def _run(cmd: list[str], **kw) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if r.returncode != 0:
        raise BackendError(f"`{' '.join(cmd[:6])} ...` failed ({r.returncode}): {r.stderr[-2000:]}")


def _fetch(cmd: list[str], **kw) -> None:
    """``_run`` for a command that downloads from a package registry (apt, pip)."""
    try:
        _run(cmd, **kw)
    except BackendError as e:
        raise EmulatorUnavailable(f"cannot fetch what the emulated board needs: {e}") from None


def ensure_qemu() -> Path:
    """qemu-aarch64-static, installed from Debian (qemu-user-static) when missing."""
    found = shutil.which("qemu-aarch64-static")
    if found:
        return Path(found)
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise EmulatorUnavailable("qemu-aarch64-static is missing: install Debian's qemu-user-static "
                                  "(`apt-get install qemu-user-static`), or run as root on Debian to have it "
                                  "installed")
    _log("installing qemu-user-static (apt-get)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    if not list(Path("/var/lib/apt/lists").glob("*_Packages*")):
        _fetch(["apt-get", "update", "-qq"], env=env)
    _fetch(["apt-get", "install", "-y", "-qq", "--no-install-recommends", "qemu-user-static"], env=env)
    return Path(shutil.which("qemu-aarch64-static") or "/usr/bin/qemu-aarch64-static")


def _build_root(d: Path) -> Path:
    """arm64 .debs through a private apt state (the host's dpkg architectures stay untouched),
    unpacked with dpkg -x: no maintainer scripts run, so no chroot or binfmt is needed."""
    root = d / "root"
    if (d / "stamps" / "root").exists():
        return root
    apt = d / "apt"
    for sub in ("lists/partial", "cache/archives/partial"):
        (apt / sub).mkdir(parents=True, exist_ok=True)
    (apt / "status").touch()
    opts = ["-o", "APT::Architecture=arm64", "-o", "APT::Architectures=arm64",
            "-o", f"Dir::State::Lists={apt / 'lists'}", "-o", f"Dir::State::status={apt / 'status'}",
            "-o", f"Dir::Cache={apt / 'cache'}", "-o", f"Dir::Cache::archives={apt / 'cache' / 'archives'}",
            "-o", "Debug::NoLocking=1"]
    _log("apt (arm64, private state): downloading python3.11's closure")
    _fetch(["apt-get", *opts, "update", "-qq"])
    _fetch(["apt-get", *opts, "install", "-y", "-qq", "--download-only", "--no-install-recommends", *DEBS])
    tmp = d / "root.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    debs = sorted((apt / "cache" / "archives").glob("*.deb"))
    _log(f"dpkg -x {len(debs)} packages into {root}")
    for deb in debs:
        _run(["dpkg", "-x", str(deb), str(tmp)])
    shutil.rmtree(root, ignore_errors=True)
    tmp.rename(root)
    (d / "stamps").mkdir(exist_ok=True)
    (d / "stamps" / "root").touch()
    return root


def _cpu_overlay(d: Path, root: Path, cpu: str) -> Path:
    """A -L prefix for ``cpu``: the shared sysroot by symlinks, with this CPU's /proc/cpuinfo.

    qemu 7.2 passes the host's x86 /proc/cpuinfo through, and onnxruntime's cpuinfo then
    segfaults on import; qemu -L resolves guest absolute paths in the prefix first, so the
    guest reads these files instead. One processor entry per host CPU: /sys/.../possible is
    the host's, and the two must agree."""
    m = CPUS[cpu]
    over = d / "cpu" / cpu
    over.mkdir(parents=True, exist_ok=True)
    for entry in root.iterdir():
        link = over / entry.name
        if entry.name not in ("proc", "sys") and not link.is_symlink():
            link.symlink_to(os.path.relpath(entry, over))
    text = []
    for i in range(os.cpu_count() or 1):
        text.append(f"processor\t: {i}\nBogoMIPS\t: 108.00\nFeatures\t: {m.features}\nCPU implementer\t: 0x41\n"
                    f"CPU architecture: 8\nCPU variant\t: {m.variant:#x}\nCPU part\t: {m.part:#x}\n"
                    f"CPU revision\t: {m.revision}\n\n")
        ident = over / "sys/devices/system/cpu" / f"cpu{i}" / "regs/identification"
        ident.mkdir(parents=True, exist_ok=True)
        midr = (0x41 << 24) | (m.variant << 20) | (0xF << 16) | (m.part << 4) | m.revision
        (ident / "midr_el1").write_text(f"0x{midr:016x}\n")
    (over / "proc").mkdir(exist_ok=True)
    (over / "proc" / "cpuinfo").write_text("".join(text))
    return over


def _site(d: Path, wheels: tuple[str, ...]) -> Path:
    """aarch64 wheels resolved by the host's pip with cross-platform flags, cached by their list."""
    key = hashlib.sha256(" ".join(wheels).encode()).hexdigest()[:12]
    site = d / f"site-{key}"
    if (d / "stamps" / f"site-{key}").exists():
        return site
    _log(f"pip: aarch64 wheels for Python {PY_VERSION} -> {site.name} ({' '.join(wheels)})")
    tmp = d / f"site-{key}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    _fetch([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--target", str(tmp),
            *PLATFORM_FLAGS, *wheels])
    shutil.rmtree(site, ignore_errors=True)
    tmp.rename(site)
    (d / "stamps" / f"site-{key}").touch()
    return site


@dataclass(frozen=True)
class ArmPython:
    """An aarch64 python3.11 launched through qemu with ``cpu``'s model and /proc/cpuinfo."""

    qemu: Path
    cpu: str
    prefix: Path       # the -L prefix (cpu overlay)
    python: Path       # the guest interpreter (a host path qemu loads)
    pythonpath: tuple[Path, ...]

    def command(self, *args: str) -> list[str]:
        return [str(self.qemu), "-cpu", self.cpu, "-L", str(self.prefix), str(self.python), *args]

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ if base is None else base)
        env["PYTHONPATH"] = os.pathsep.join(map(str, self.pythonpath))
        # Child aarch64 processes (only with binfmt registered) get the same sysroot and CPU.
        env["QEMU_LD_PREFIX"], env["QEMU_CPU"] = str(self.prefix), self.cpu
        env.pop("PYTHONHOME", None)
        return env


def build(cpu: str, *, wheel: Path | None = None, extra_wheels: tuple[str, ...] = ()) -> ArmPython:
    """The emulated Python for ``cpu`` (built or reused), with ``wheel`` (edgepeft) installed."""
    if cpu not in CPUS:
        raise SpecError(f"no emulation for CPU {cpu!r}; known: {', '.join(sorted(CPUS))}")
    d = cache_dir()
    qemu = ensure_qemu()
    with _locked(d):
        root = _build_root(d)
        over = _cpu_overlay(d, root, cpu)
        site = _site(d, WHEELS + tuple(extra_wheels))
        paths: tuple[Path, ...] = (site,)
        if wheel is not None:
            # Per run: the checkout's wheel changes between runs, its dependencies do not.
            # Keyed by the wheel's hash: runs of another checkout in parallel keep their own.
            app = d / f"app-{hashlib.sha256(wheel.read_bytes()).hexdigest()[:12]}"
            if not app.is_dir():
                tmp = app.with_suffix(".tmp")
                shutil.rmtree(tmp, ignore_errors=True)
                _run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps",
                      "--target", str(tmp), str(wheel)])
                tmp.rename(app)
            paths = (app, site)
    return ArmPython(qemu, cpu, over, root / "usr" / "bin" / f"python{PY_VERSION}", paths)
