"""Run a command under a hard memory cap (and optionally fewer cores), the way a small device
would hold it: a cgroup v1 memory controller where the host offers one (over the cap the
kernel kills the process: exit -9, as the OS kills an app), else an address-space rlimit
(a cleaner MemoryError, but it counts virtual reservations, so it is stricter than RSS)."""
from __future__ import annotations

import os
import resource
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from edgepeft.errors import SpecError

CGROUP_MEMORY = Path("/sys/fs/cgroup/memory")
CGROUP_CPU = Path("/sys/fs/cgroup/cpu")


@dataclass(frozen=True)
class CappedRun:
    returncode: int
    stdout: str
    stderr: str
    method: str            # "cgroup-v1" or "rlimit-as"
    limit: int
    max_usage: int | None  # the cgroup's high-water mark (cgroup only)
    oom_killed: bool

    @property
    def survived(self) -> bool:
        return self.returncode == 0 and not self.oom_killed


def cgroup_v1_available() -> bool:
    if not (CGROUP_MEMORY / "memory.limit_in_bytes").exists():
        return False
    probe = CGROUP_MEMORY / f"edgepeft-probe-{uuid.uuid4().hex[:8]}"
    try:
        probe.mkdir()
        probe.rmdir()
        return True
    except OSError:
        return False


def _write(path: Path, value: object) -> None:
    path.write_text(f"{value}\n")


def run_capped(cmd: Sequence[str], *, memory: int, cores: float | None = None, timeout: float | None = None,
               env: dict[str, str] | None = None, method: str = "auto") -> CappedRun:
    """Run ``cmd`` with at most ``memory`` bytes (RSS + page cache under cgroup v1; address
    space under rlimit) and, under cgroup v1, ``cores`` CPUs' worth of time."""
    if memory <= 0:
        raise SpecError(f"memory cap must be > 0 bytes, got {memory}")
    if method == "auto":
        method = "cgroup-v1" if cgroup_v1_available() else "rlimit-as"
    if method == "cgroup-v1":
        return _run_cgroup(list(cmd), memory, cores, timeout, env)
    if method == "rlimit-as":
        return _run_rlimit(list(cmd), memory, timeout, env)
    raise SpecError(f"cap method must be 'auto', 'cgroup-v1' or 'rlimit-as', got {method!r}")


def _run_cgroup(cmd, memory, cores, timeout, env) -> CappedRun:
    name = f"edgepeft-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    mem = CGROUP_MEMORY / name
    cpu = CGROUP_CPU / name if cores and (CGROUP_CPU / "cpu.cfs_quota_us").exists() else None
    mem.mkdir()
    try:
        _write(mem / "memory.limit_in_bytes", memory)
        if (mem / "memory.memsw.limit_in_bytes").exists():
            try:  # no swapping around the cap where swap accounting exists
                _write(mem / "memory.memsw.limit_in_bytes", memory)
            except OSError:
                pass
        if cpu is not None:
            cpu.mkdir()
            period = int((cpu / "cpu.cfs_period_us").read_text())
            _write(cpu / "cpu.cfs_quota_us", int(period * cores))
        procs = [mem / "cgroup.procs"] + ([cpu / "cgroup.procs"] if cpu else [])

        def enter() -> None:  # in the child, before exec: everything it runs is capped
            for p in procs:
                p.write_text(str(os.getpid()))

        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, preexec_fn=enter)
        usage = int((mem / "memory.max_usage_in_bytes").read_text())
        oom = any(line.split()[0] == "oom_kill" and int(line.split()[1]) > 0
                  for line in (mem / "memory.oom_control").read_text().splitlines() if len(line.split()) == 2)
        return CappedRun(r.returncode, r.stdout, r.stderr, "cgroup-v1", memory, usage,
                         oom or r.returncode == -9)
    finally:
        for d in (mem, cpu):
            if d is not None and d.exists():
                try:
                    d.rmdir()
                except OSError:
                    pass


def _run_rlimit(cmd, memory, timeout, env) -> CappedRun:
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))

    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, preexec_fn=limit)
    return CappedRun(r.returncode, r.stdout, r.stderr, "rlimit-as", memory, None,
                     "MemoryError" in r.stderr or r.returncode == -9)
