"""Device profiles: the memory an app may use, cores, arch and an emulation CPU per device
class, from the TOML shipped with edgepeft (``devices.toml``) plus the user's own files."""
from __future__ import annotations

import os
import platform
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from edgepeft.errors import SpecError
from edgepeft.memory import parse_size

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 devices
    import tomli as tomllib

BUILTIN = Path(__file__).with_name("devices.toml")
_KEYS = {"title", "ram", "budget", "cores", "arch", "qemu_cpu"}


@dataclass(frozen=True)
class Device:
    """One device class. ``budget`` is what one foreground app may really use (bytes)."""

    name: str
    title: str
    ram: int
    budget: int
    cores: int
    arch: str
    qemu_cpu: str | None

    def __post_init__(self):
        if not self.name or any(c.isspace() for c in self.name):
            raise SpecError(f"device name must be non-empty without spaces, got {self.name!r}")
        if self.budget > self.ram:
            raise SpecError(f"device {self.name!r}: `budget` ({self.budget}) cannot exceed `ram` ({self.ram})")
        if self.cores < 1:
            raise SpecError(f"device {self.name!r}: `cores` must be >= 1, got {self.cores}")


def _meminfo(field: str) -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    raise SpecError(f"cannot read {field} of this machine (no /proc/meminfo): give the host's figures "
                    "in a --profiles file")


def _device(name: str, d: dict, origin: str) -> Device:
    if not isinstance(d, dict):
        raise SpecError(f"{origin}: [{name}] must be a table of {sorted(_KEYS)}")
    unknown = sorted(set(d) - _KEYS)
    missing = sorted(_KEYS - set(d) - {"title", "qemu_cpu"})
    if unknown or missing:
        raise SpecError(f"{origin}: device [{name}] has unknown keys {unknown} / lacks {missing}; "
                        f"keys are {sorted(_KEYS)}")
    auto = lambda k, f: f() if d[k] == "auto" else d[k]  # noqa: E731 - one-line dispatch
    try:
        ram = parse_size(auto("ram", lambda: _meminfo("MemTotal")))
        budget = parse_size(auto("budget", lambda: _meminfo("MemAvailable")))
        cores = int(auto("cores", lambda: os.cpu_count() or 1))
    except (TypeError, ValueError) as e:
        raise SpecError(f"{origin}: device [{name}]: {e}") from None
    qemu = d.get("qemu_cpu")
    return Device(name, str(d.get("title", name)), ram, budget, cores, str(auto("arch", platform.machine)),
                  None if qemu in (None, "none") else str(qemu))


def load(files: Iterable[str | Path] = ()) -> dict[str, Device]:
    """The built-in profiles, then each file's (a later device of the same name replaces)."""
    out: dict[str, Device] = {}
    for f in [BUILTIN, *map(Path, files)]:
        try:
            data = tomllib.loads(Path(f).read_text(encoding="utf-8"))
        except OSError as e:
            raise SpecError(f"cannot read device profiles {str(f)!r}: {e.strerror}") from None
        except tomllib.TOMLDecodeError as e:
            raise SpecError(f"device profiles {str(f)!r} are not valid TOML: {e}") from None
        for name, d in data.items():
            out[name] = _device(name, d, str(f))
    return out


def get(name: str, files: Iterable[str | Path] = ()) -> Device:
    devices = load(files)
    if name not in devices:
        raise SpecError(f"unknown device {name!r}; known: {', '.join(devices)} (add your own with --profiles FILE)")
    return devices[name]
