"""A real board over SSH: copy the runtime wheel and the bundle, make (once) a virtualenv with
the board's own python3 and the device dependencies from PyPI, run the scenario there, bring
back its report. Uses the system ``ssh``/``scp`` (keys, agent and ~/.ssh/config apply)."""
from __future__ import annotations

import shlex
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from edgepeft.errors import BackendError

from device_tests.scenarios import Scenario
from device_tests.targets import SCENARIO_MODULE, TIMEOUT_S, Target, TargetRun, _finish, scenario_args

# Relative to the login directory: the board user's home.
DEFAULT_REMOTE_DIR = ".cache/edgepeft-device"
SETUP_TIMEOUT_S = 1200.0


@dataclass(frozen=True)
class SshOptions:
    """``identity``: a private key (default: ssh's own). ``remote_python``: the board's
    interpreter that creates the venv. ``setup=False`` runs ``remote_python`` as it is (its
    environment must already hold edgepeft and its device dependencies)."""

    identity: Path | None = None
    remote_dir: str = DEFAULT_REMOTE_DIR
    remote_python: str = "python3"
    setup: bool = True
    # Throwaway boards and loopback: no host-key prompts, nothing written to known_hosts.
    trust_new_hosts: bool = False


def _common(o: SshOptions) -> list[str]:
    opts = ["-o", "BatchMode=yes", "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=20"]
    if o.trust_new_hosts:
        opts += ["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null"]
    return opts + (["-i", str(o.identity), "-o", "IdentitiesOnly=yes"] if o.identity else [])


def _ssh(t: Target, o: SshOptions, command: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(["ssh", *_common(o), "-p", str(t.port), t.address, command], capture_output=True, text=True,
                          timeout=timeout)


def _check(r: subprocess.CompletedProcess, what: str, t: Target) -> None:
    if r.returncode != 0:
        raise BackendError(f"{what} on {t.spec} failed ({r.returncode}): {r.stderr.strip()[-2000:]}; "
                           "check that `ssh` reaches the board with this key and that it has python3 with venv")


def run_ssh(target: Target, bundle: Path, scenario: Scenario, *, wheel: Path, options: SshOptions = SshOptions(),
            memory_budget: str | None = None) -> TargetRun:
    o, d = options, options.remote_dir
    q = shlex.quote
    t0 = time.perf_counter()
    _check(_ssh(target, o, f"mkdir -p {q(d)}", 120), "creating the remote folder", target)
    r = subprocess.run(["scp", *_common(o), "-q", "-P", str(target.port), str(wheel), str(bundle),
                        f"{target.address}:{d}/"], capture_output=True, text=True, timeout=SETUP_TIMEOUT_S)
    _check(r, "copying the wheel and the bundle", target)
    copied = time.perf_counter() - t0
    whl, bun = f"{d}/{wheel.name}", f"{d}/{bundle.name}"
    py = o.remote_python
    if o.setup:
        venv, py = f"{d}/venv", f"{d}/venv/bin/python"
        pip = f"{q(py)} -m pip install -q --disable-pip-version-check"
        # The venv is kept between runs; the wheel is reinstalled each time (same version, new code).
        setup = (f"(test -x {q(py)} || {q(o.remote_python)} -m venv {q(venv)}) && "
                 f"{pip} {q(whl + '[portable]')} && {pip} --no-deps --force-reinstall {q(whl)}")
        _check(_ssh(target, o, setup, SETUP_TIMEOUT_S), "setting up the board's virtualenv", target)
    ready = time.perf_counter() - t0
    t1 = time.perf_counter()
    parts = [q(a) for a in [py, *SCENARIO_MODULE, *scenario_args(Path(bun), scenario, None,
                                                                  memory_budget=memory_budget)]]
    if scenario.threads is None:  # the board's cores, as the board counts them
        parts[parts.index("--threads") + 1] = '"$(nproc)"'
    r = _ssh(target, o, " ".join(parts), TIMEOUT_S)
    if r.returncode == 255:  # ssh's own failure, not the scenario's
        _check(r, "running the scenario", target)
    return _finish(target, r.returncode, r.stdout, r.stderr, t1,
                   details={"address": target.address, "port": target.port, "remote_dir": d, "python": py,
                            "copy_seconds": round(copied, 3), "setup_seconds": round(ready - copied, 3)})
