"""python -m device_tests: run the device scenario on a target and compare it with this host."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from edgepeft.errors import EdgePeftError
from edgepeft.memory import parse_size

from device_tests import runner, scenarios
from device_tests import targets as T
from device_tests.ssh import DEFAULT_REMOTE_DIR, SshOptions


@click.group()
def main() -> None:
    """Validate a bundle on emulated ARM64 boards, under real memory caps, and on boards over SSH."""


@main.command()
@click.option("--target", "target_spec", required=True,
              help="host | emu:<device> | capped:<device> | ssh://user@host[:port] (devices: edgepeft/devices.toml).")
@click.option("--bundle", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="A bundle with the portable graph (edgepeft export --backend portable ...).")
@click.option("--scenario", "scenario_name", default="smoke", show_default=True,
              type=click.Choice(sorted(scenarios.SCENARIOS)))
@click.option("--seed", default=None, type=int, help="Synthetic-batch seed (default: the scenario's).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("--no-parity", is_flag=True, help="Do not run the host reference and compare.")
@click.option("--cap", default=None, help="capped: memory cap instead of the profile's budget, e.g. 300MB.")
@click.option("--memory-budget", default=None, help="Session.open's memory budget on the target, e.g. 300MB.")
@click.option("--store", default=None, type=click.Path(file_okay=False, path_type=Path),
              help="Adapter store to keep (host, emu, capped targets; default: a temporary one).")
@click.option("--profiles", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="Extra device profiles (TOML).")
@click.option("--identity", "-i", default=None, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="ssh: private key.")
@click.option("--remote-dir", default=DEFAULT_REMOTE_DIR, show_default=True,
              help="ssh: working folder on the board (relative to its home, or absolute).")
@click.option("--remote-python", default="python3", show_default=True, help="ssh: the board's Python.")
@click.option("--no-setup", is_flag=True, help="ssh: use --remote-python as it is (no venv, no pip).")
@click.option("--trust-new-host", is_flag=True, help="ssh: accept an unknown host key (throwaway boards).")
def run(target_spec, bundle, scenario_name, seed, as_json, no_parity, cap, memory_budget, store, profiles, identity,
        remote_dir, remote_python, no_setup, trust_new_host) -> None:
    """Run the scenario on TARGET; exit 1 when it did not complete or differs from the host."""
    try:
        target = T.parse(target_spec, tuple(profiles))
        res = runner.run(target, bundle, scenarios.get(scenario_name, seed=seed), compare=not no_parity,
                         store=store, memory_budget=memory_budget, cap=parse_size(cap),
                         ssh=SshOptions(identity, remote_dir, remote_python, not no_setup, trust_new_host))
    except EdgePeftError as e:
        raise click.ClickException(str(e)) from None
    click.echo(json.dumps(res.to_json()) if as_json else runner.summary(res))
    sys.exit(0 if res.ok else 1)


@main.command("build-emu")
@click.option("--device", "device_names", multiple=True, default=("rpi4-2gb", "rpi5-4gb"), show_default=True)
def build_emu(device_names) -> None:
    """Build (or check) the emulated ARM64 Python for each device's CPU model."""
    from device_tests import armemu
    from edgepeft import devices

    try:
        for name in device_names:
            dev = devices.get(name)
            if not dev.qemu_cpu:
                raise click.ClickException(f"device {name!r} has no qemu_cpu to emulate")
            arm = armemu.build(dev.qemu_cpu)
            click.echo(f"{name}: {dev.qemu_cpu} -> {arm.prefix}")
    except EdgePeftError as e:
        raise click.ClickException(str(e)) from None


if __name__ == "__main__":
    main()
