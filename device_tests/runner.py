"""Run a scenario on a target and, unless told not to, on this host too, and compare them."""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from edgepeft.errors import BundleError

from device_tests import parity as parity_mod
from device_tests import targets as T
from device_tests.scenarios import Scenario
from device_tests.ssh import SshOptions, run_ssh


@dataclass(frozen=True)
class Result:
    run: T.TargetRun
    host: T.TargetRun | None
    parity: parity_mod.Parity | None

    @property
    def ok(self) -> bool:
        """The target completed the scenario and (when compared) matched the host."""
        return self.run.report is not None and (self.parity is None or self.parity.ok)

    def to_json(self) -> dict:
        return {"ok": self.ok, "target": self.run.to_json(), "host": self.host.to_json() if self.host else None,
                "parity": self.parity.to_json() if self.parity else None}


def _wheel(wheel: Path | None, tmp: Path) -> Path:
    if wheel is not None:
        return wheel
    from device_tests.venv import build_wheel

    return build_wheel(tmp / "wheel")


def run_target(target: T.Target, bundle: Path, scenario: Scenario, *, wheel: Path | None = None,
               store: Path | None = None, memory_budget: str | None = None, cap: int | None = None,
               ssh: SshOptions = SshOptions()) -> T.TargetRun:
    """The scenario on ``target`` alone (the wheel is built from this checkout when needed)."""
    if not Path(bundle).is_file():
        raise BundleError(f"no bundle at {str(bundle)!r}: export one with `edgepeft export --backend portable ...`")
    bundle = Path(bundle)
    with tempfile.TemporaryDirectory(prefix="edgepeft-device-") as tmp:
        if target.kind == "host":
            return T.run_host(target, bundle, scenario, store=store, memory_budget=memory_budget)
        if target.kind == "capped":
            return T.run_capped_target(target, bundle, scenario, cap=cap, store=store, memory_budget=memory_budget)
        if target.kind == "emu":
            return T.run_emu(target, bundle, scenario, wheel=_wheel(wheel, Path(tmp)), store=store,
                             memory_budget=memory_budget)
        return run_ssh(target, bundle, scenario, wheel=_wheel(wheel, Path(tmp)), options=ssh,
                       memory_budget=memory_budget)


def run(target: T.Target, bundle: Path, scenario: Scenario, *, compare: bool = True, host: T.TargetRun | None = None,
        **kw) -> Result:
    """The scenario on ``target``, then (``compare``) on the host with the same bundle and
    seed; ``host`` reuses a host run already made."""
    got = run_target(target, bundle, scenario, **kw)
    if not compare or target.kind == "host" or got.report is None:
        return Result(got, host, None)
    ref = host or T.run_host(T.parse("host"), Path(bundle), scenario)
    if ref.report is None:
        raise BundleError(f"the host reference run failed ({ref.outcome}): {ref.refused or ref.stderr_tail}")
    return Result(got, ref, parity_mod.compare(got.report, ref.report))


def summary(res: Result) -> str:
    """Human-readable lines; emulated timings and memory are labelled, never shown bare."""
    r = res.run
    lines = [f"{r.target}: {r.outcome} ({T.FIGURES[r.kind]})"]
    if r.refused:
        lines.append(f"  refused: {r.refused}")
    if r.kind == "capped":
        d = r.details
        use = f"{d['max_usage_bytes'] / 2**20:.0f} MiB" if d.get("max_usage_bytes") else "n/a"
        pred = f"{d['predicted_peak_bytes'] / 2**20:.0f} MiB" if d.get("predicted_peak_bytes") else "n/a"
        lines.append(f"  cap {d['cap_bytes'] / 2**20:.0f} MiB ({d['cap_method']}), {d['cores']} cores; "
                     f"peak usage {use}; predicted peak {pred}; as predicted: {d.get('as_predicted', 'n/a')}")
    if r.report:
        rep = r.report
        label = "emulated " if r.kind == "emu" else ""
        steps = rep["seconds"]["train_step"]
        lines.append(f"  {rep['platform']['machine']} {rep['platform'].get('cpu_part', rep['platform'].get('model_name', ''))}, "
                     f"Python {rep['platform']['python']}, onnxruntime {rep['platform']['onnxruntime']}")
        lines.append(f"  losses {', '.join(f'{x:.6f}' for x in rep['losses'])}; outputs sha256 "
                     f"{rep['outputs']['sha256'][:16]}; swap restored: {rep['swap_restored']}")
        lines.append(f"  {label}median step {sorted(steps)[len(steps) // 2] * 1000:.1f} ms, {label}peak RSS "
                     f"{rep['peak_rss'] / 2**20:.0f} MiB, wall {r.wall_seconds:.1f} s")
    elif r.outcome == "failed":
        lines.append(f"  exit {r.returncode}: {r.stderr_tail[-800:]}")
    if res.parity:
        p = res.parity
        lines.append(f"  parity with host: {'OK' if p.ok else 'DIFFERS'} (max loss diff {p.max_loss_diff:.3g}, "
                     f"max output diff {p.max_output_diff:.3g})")
        lines += [f"    {d}" for d in p.diffs]
    return "\n".join(lines)
