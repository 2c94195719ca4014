"""`edgepeft train`: train an adapter on a JSONL file (device side)."""
from __future__ import annotations

import itertools
from pathlib import Path

import click

from edgepeft.cli._shared import auto_help, backend_choice, console, progress


@click.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--data", required=True, type=click.Path(path_type=Path), help='JSONL: {"text": ..., "label": ...}.')
@click.option("--adapter", required=True, help="Adapter to train (created from the bundle's initial one if new).")
@click.option("--steps", default=20, show_default=True, type=click.IntRange(min=1), help="Optimizer steps.")
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(min=1))
@click.option("--lr", default=1e-3, show_default=True, type=float, help="AdamW learning rate.")
@click.option("--eval-data", type=click.Path(path_type=Path), help="JSONL to evaluate before and after.")
@click.option("--store", type=click.Path(file_okay=False, path_type=Path),
              help="Adapter folder (default: BUNDLE's name with .adapters).")
@click.option("--budget", default=None, help="Memory budget, e.g. 512MB.", envvar="EDGEPEFT_MEMORY_BUDGET")
@click.option("--micro-batch", is_flag=True,
              help="Split batches predicted over --budget into micro-batches that fit (same step).")
@click.option("--threads", default=None, type=click.IntRange(min=1), help="Compute threads.")
@click.option("--seed", default=0, show_default=True, help="Shuffling seed.")
@click.option("--backend", default="auto", show_default=True,
              type=backend_choice(auto=True), help=auto_help(budget=True) + ".")
@click.option("--trust", "trust", multiple=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              envvar="EDGEPEFT_TRUSTED_KEYS",
              help="Only open BUNDLE if one of these public keys (.pub from `edgepeft keygen`) signed it. Repeatable.")
def train(bundle: Path, data: Path, adapter: str, steps: int, batch_size: int, lr: float, eval_data: Path | None,
          store: Path | None, budget: str | None, micro_batch: bool, threads: int | None, seed: int, backend: str,
          trust: tuple[Path, ...]) -> None:
    """Train an adapter on a JSONL file, then save it (device side)."""
    from edgepeft.memory import fmt_bytes
    from edgepeft.optim import OptimizerSpec
    from edgepeft.runtime import Session

    examples, held_out, labelled = _read_data(bundle, data, eval_data)
    s = Session.open(bundle, memory_budget=budget, adapter=adapter, store=store, threads=threads,
                     optimizer=OptimizerSpec(lr=lr), backend=backend, trusted_keys=list(trust) or None,
                     batch_size=None if micro_batch else batch_size, micro_batch=micro_batch)
    if labelled:
        s.encoder.label_array([e.label for e in examples])  # refuse unknown labels before training
    c = console()
    _evaluate(c, s, held_out, "before")
    loss = _run_steps(c, s, examples, adapter=adapter, steps=steps, batch_size=batch_size, seed=seed)
    path = s.save_adapter()
    c.print(f"last loss {loss:.4f}; adapter {adapter!r} ({s.steps} steps in all, {s.backend.name}) saved to {path}")
    _evaluate(c, s, held_out, "after")
    c.print("memory above start: " + ", ".join(f"{k} {fmt_bytes(v)}" for k, v in s.budget.peaks.items()))


def _read_data(bundle: Path, data: Path, eval_data: Path | None):
    """(training examples, held-out examples or None, whether they carry labels): next-token
    bundles read text only."""
    from edgepeft.bundle import read_manifest
    from edgepeft.data import read_jsonl

    label_field = None if read_manifest(bundle).task == "causal-lm" else "label"
    examples = read_jsonl(data, label_field=label_field)
    held_out = read_jsonl(eval_data, label_field=label_field) if eval_data else None
    return examples, held_out, label_field is not None


def _evaluate(c, s, held_out, when: str) -> None:
    if held_out:
        r = s.evaluate(s.encoder.batches(held_out, 16))
        c.print(f"{when}: loss {r.loss:.4f}, accuracy {r.accuracy:.3f} on {r.n}")


def _run_steps(c, s, examples, *, adapter: str, steps: int, batch_size: int, seed: int) -> float:
    """``steps`` optimizer steps over reshuffled epochs of ``examples``; the last loss."""
    enc = s.encoder
    epochs = (enc.batches(examples, batch_size, shuffle=True, seed=seed + e) for e in itertools.count())
    batches = itertools.chain.from_iterable(epochs)
    loss = float("nan")
    with progress(c, tty_only=True) as prog:
        task = prog.add_task(f"training {adapter}", total=steps)
        for _ in range(steps):
            loss = s.train_step(next(batches))
            prog.update(task, advance=1, description=f"training {adapter} loss {loss:.4f}")
    return loss
