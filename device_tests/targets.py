"""Where a scenario runs: ``host`` (this machine, the reference), ``emu:<device>`` (an ARM64
Python under qemu with the device's CPU model), ``capped:<device>`` (this host inside the
device's memory cap and cores, cgroup v1) and ``ssh://user@host[:port]`` (a real board).

Every target runs ``python -m edgepeft.runtime.scenario`` on its own Python and returns a
``TargetRun``: the scenario's report, or how it ended (refused by the memory model, killed
by the cap, failed)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from edgepeft import devices, memory_model, names
from edgepeft.bundle import read_manifest
from edgepeft.cli.caps import run_capped
from edgepeft.devices import Device
from edgepeft.errors import SpecError

from device_tests.scenarios import Scenario

Kind = Literal["host", "emu", "capped", "ssh"]
# What a target's timings and memory figures are worth.
FIGURES = {
    "host": "host: this machine's figures",
    "emu": "emulated: qemu user mode, 10-500x slower and ~100 MB more RSS; for correctness only, never device figures",
    "capped": "capped host: this machine's CPU under the device's memory cap and core quota",
    "ssh": "device: measured on the board",
}
SCENARIO_MODULE = ("-m", "edgepeft.runtime.scenario")
TIMEOUT_S = 1800.0


@dataclass(frozen=True)
class Target:
    kind: Kind
    spec: str
    device: Device | None = None
    user: str | None = None
    host: str | None = None
    port: int = 22

    @property
    def address(self) -> str:
        return f"{self.user}@{self.host}" if self.user else str(self.host)


def parse(spec: str, profiles: tuple[str, ...] = ()) -> Target:
    """``host``, ``emu:<device>``, ``capped:<device>`` or ``ssh://user@host[:port]``."""
    if spec == "host":
        return Target("host", spec)
    if spec.startswith("ssh://"):
        u = urlsplit(spec)
        if not u.hostname or u.path not in ("", "/"):
            raise SpecError(f"cannot read SSH target {spec!r}: use ssh://user@host or ssh://user@host:port")
        return Target("ssh", spec, user=u.username, host=u.hostname, port=u.port or 22)
    kind, _, name = spec.partition(":")
    if kind in ("emu", "capped") and name:
        dev = devices.get(name, profiles)
        if kind == "emu" and (dev.qemu_cpu is None or dev.arch != "aarch64"):
            raise SpecError(f"device {name!r} has no ARM64 CPU model to emulate (qemu_cpu); "
                            "pick an aarch64 profile such as rpi4-2gb, or run it as capped:{name}")
        return Target(kind, spec, device=dev)  # type: ignore[arg-type]
    raise SpecError(f"unknown target {spec!r}: use host, emu:<device>, capped:<device> or ssh://user@host[:port] "
                    f"(devices: {', '.join(devices.load(profiles))})")


@dataclass(frozen=True)
class TargetRun:
    """One scenario run on one target. ``report`` is None unless the scenario completed."""

    target: str
    kind: Kind
    report: dict | None
    refused: str | None
    returncode: int
    killed: bool
    wall_seconds: float
    details: dict = field(default_factory=dict)
    stderr_tail: str = ""

    @property
    def outcome(self) -> str:
        if self.report is not None:
            return "completed"
        if self.refused is not None:
            return "refused"
        return "killed" if self.killed else "failed"

    def to_json(self) -> dict:
        return {"target": self.target, "kind": self.kind, "figures": FIGURES[self.kind], "outcome": self.outcome,
                "report": self.report, "refused": self.refused, "returncode": self.returncode, "killed": self.killed,
                "wall_seconds": self.wall_seconds, "details": self.details,
                **({"stderr_tail": self.stderr_tail} if self.report is None else {})}


def _finish(target: Target, rc: int, stdout: str, stderr: str, t0: float, *, killed: bool = False,
            details: dict | None = None) -> TargetRun:
    """The scenario prints one JSON line last: a report (exit 0) or {"error", "type"} (exit 2)."""
    last = stdout.strip().splitlines()[-1] if stdout.strip() else ""
    try:
        out = json.loads(last) if last.startswith("{") else None
    except json.JSONDecodeError:
        out = None
    report = out if rc == 0 and out and "losses" in out else None
    refused = f"{out['type']}: {out['error']}" if rc == 2 and out and "error" in out else None
    return TargetRun(target.spec, target.kind, report, refused, rc, killed or rc in (-9, 137),
                     round(time.perf_counter() - t0, 3), details or {}, stderr[-3000:])


def scenario_args(bundle: Path, scenario: Scenario, threads: int | None, *, store: Path | None = None,
                  memory_budget: str | None = None) -> list[str]:
    args = [str(bundle), *scenario.args(threads), "--json"]
    args += ["--store", str(store)] if store else []
    return args + (["--memory-budget", memory_budget] if memory_budget else [])


def run_host(target: Target, bundle: Path, scenario: Scenario, *, store: Path | None = None,
             memory_budget: str | None = None) -> TargetRun:
    """The reference: the scenario with this environment's Python, in a fresh process."""
    t0 = time.perf_counter()
    cmd = [sys.executable, *SCENARIO_MODULE, *scenario_args(bundle.resolve(), scenario, os.cpu_count(), store=store,
                                                          memory_budget=memory_budget)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, cwd="/")
    return _finish(target, r.returncode, r.stdout, r.stderr, t0, details={"python": sys.executable})


def run_emu(target: Target, bundle: Path, scenario: Scenario, *, wheel: Path, store: Path | None = None,
            memory_budget: str | None = None) -> TargetRun:
    from device_tests import armemu

    dev = target.device
    assert dev is not None and dev.qemu_cpu
    t0 = time.perf_counter()
    arm = armemu.build(dev.qemu_cpu, wheel=wheel)
    built = time.perf_counter() - t0
    t1 = time.perf_counter()
    # Paths are the host's: qemu -L falls back to them for anything not in the sysroot.
    cmd = arm.command(*SCENARIO_MODULE, *scenario_args(bundle.resolve(), scenario, dev.cores, store=store,
                                                        memory_budget=memory_budget))
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, env=arm.env(), cwd="/")
    return _finish(target, r.returncode, r.stdout, r.stderr, t1,
                   details={"qemu_cpu": dev.qemu_cpu, "device": dev.name, "sysroot_ready_seconds": round(built, 3),
                            "sysroot": str(arm.prefix)})


def predicted_peak(bundle: Path, scenario: Scenario) -> int | None:
    """The memory model's whole-process peak for the scenario on the portable backend."""
    m = read_manifest(bundle)
    if not m.memory:
        return None
    return memory_model.predict(m, backend=names.BACKEND_PORTABLE, batch=scenario.batch, seq=scenario.seq).peak


def run_capped_target(target: Target, bundle: Path, scenario: Scenario, *, cap: int | None = None,
                      store: Path | None = None, memory_budget: str | None = None) -> TargetRun:
    """This host's Python under the device's memory cap (or ``cap``) and its cores' worth of CPU."""
    dev = target.device
    assert dev is not None
    limit = cap or dev.budget
    cores = min(dev.cores, len(os.sched_getaffinity(0)))
    predicted = predicted_peak(bundle, scenario)
    t0 = time.perf_counter()
    cmd = [sys.executable, *SCENARIO_MODULE, *scenario_args(bundle.resolve(), scenario, cores, store=store,
                                                          memory_budget=memory_budget)]
    r = run_capped(cmd, memory=limit, cores=cores, timeout=TIMEOUT_S)
    details = {"device": dev.name, "cap_bytes": limit, "cap_method": r.method, "cores": cores,
               "max_usage_bytes": r.max_usage, "predicted_peak_bytes": predicted,
               "predicted_fits": None if predicted is None else predicted <= limit,
               "memory_budget": memory_budget}
    run = _finish(target, r.returncode, r.stdout, r.stderr, t0, killed=r.oom_killed, details=details)
    if predicted is not None:  # over the cap, refusing and being killed are both what was predicted
        fits = details["predicted_fits"]
        details["as_predicted"] = run.outcome == "completed" if fits else run.outcome in ("refused", "killed")
    return run
