"""What every command shares: the console, progress bars, comma-separated lists and the
``-o/--out`` option. rich is imported when a command prints, so `edgepeft --help` stays quick."""
from __future__ import annotations

import sys

import click


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


def out_option(help: str, **kwargs):
    """``-o/--out``: one spelling of "where to write" on every command that writes."""
    return click.option("-o", "--out", "out", help=help, **kwargs)
