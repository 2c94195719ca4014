"""The `edgepeft` command: thin click commands over the library, one module per command group,
plus the host tooling they use (profiler, caps, profile_plot, datasets, demo). This subpackage
is the only part of ``edgepeft/`` that imports both sides (``edgepeft.runtime`` and
``edgepeft.exporters``); tests/test_boundaries.py checks it. User errors (EdgePeftError) print
as one line without a traceback."""
from __future__ import annotations

import click

import edgepeft
from edgepeft.cli import adapters, demo, export, fleet, inspect_cmd, keygen, profile_cmd, train
from edgepeft.errors import EdgePeftError


class _Group(click.Group):
    def invoke(self, ctx: click.Context):
        # Subcommands (and their groups) run inside this call: one translation covers them all.
        try:
            return super().invoke(ctx)
        except EdgePeftError as e:
            raise click.ClickException(str(e)) from None


@click.group(cls=_Group)
@click.version_option(edgepeft.__version__, prog_name="edgepeft")
def main() -> None:
    """edgepeft: parameter-efficient fine-tuning on the device.

    Export a PyTorch model with PEFT adapters into a bundle (host), then train, evaluate and
    hot-swap adapters over its frozen int8 base (device)."""


for _command in (export.export, inspect_cmd.inspect_bundle, train.train, keygen.keygen, adapters.adapters,
                 demo.demo, profile_cmd.devices, profile_cmd.profile, fleet.fleet):
    main.add_command(_command)
