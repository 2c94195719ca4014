"""What every command shares: the console, progress bars, comma-separated lists, the
``-o/--out`` option and the backend choices (from the registry, edgepeft.backends). rich is imported when a command prints, so `edgepeft --help` stays quick."""
from __future__ import annotations

import sys

import click

from edgepeft.backends import DEFAULT_EXPORT_BACKENDS, REGISTRY


def console(width: int | None = None):
    """The rich console commands print through (``width``: fixed for wide tables)."""
    from rich.console import Console

    return Console(highlight=False, width=width)


def progress(con, *, tty_only: bool = False):
    """A progress bar with step counts and elapsed time (``tty_only``: hidden when stdout is
    not a terminal, so piped output stays clean)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=con, transient=False, disable=tty_only and not sys.stdout.isatty())


def names(value: str | None) -> tuple[str, ...]:
    """``"a, b,"`` -> ``("a", "b")``; empty or None -> ``()``."""
    return tuple(x.strip() for x in value.split(",") if x.strip()) if value else ()


def backend_choice(*, auto: bool) -> click.Choice:
    """The backends of the registry (edgepeft.backends), in its order; with ``auto`` first
    where a command lets Session.open choose."""
    return click.Choice((["auto"] if auto else []) + list(REGISTRY))


def auto_help(*, budget: bool) -> str:
    """What "auto" picks, in the registry's order (Session.open's rule; ``budget``: the command
    takes a memory budget, which changes the rule)."""
    return (f"auto: the first of {', '.join(REGISTRY)} that the bundle has and this machine runs"
            + (" (with --budget: the one predicted leanest within it)" if budget else ""))


def export_backends_help() -> str:
    """--backend's help: what export_bundle writes when not told, from the registry."""
    skipped = [n for n, r in REGISTRY.items() if r.best_effort]
    return (f"Training graphs to write (repeatable). Default: {', '.join(DEFAULT_EXPORT_BACKENDS)}"
            + (f" ({', '.join(skipped)} left out with a warning where the model cannot be turned into one)."
               if skipped else "."))


def out_option(help: str, **kwargs):
    """``-o/--out``: one spelling of "where to write" on every command that writes."""
    return click.option("-o", "--out", "out", help=help, **kwargs)
