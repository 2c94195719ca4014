"""`edgepeft demo`: the main job end to end on a real model and real data, offline.

Host: export all-MiniLM-L6-v2 with LoRA (rank 8 on query/value) and a trainable topic head
over an int8 frozen base into one bundle. Device: open it under a memory budget, personalize
two users' adapters on their own slices of BBC News, and hot-swap between them."""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import click

from edgepeft.cli._shared import backend_choice, console, out_option, progress
from edgepeft.names import BACKEND_ORT

USERS = {
    # Each user follows three topics; their held-out articles are never trained on.
    "alice": ("business", "politics", "tech"),
    "bob": ("entertainment", "sport", "tech"),
}
BATCH = 8
LR = 3e-3


@click.command()
@out_option("Folder for the bundle, the adapters and the users' JSONL files.", default="out/demo",
            show_default=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--steps", default=30, show_default=True, type=click.IntRange(min=1), help="Training steps per user.")
@click.option("--budget", default="1GB", show_default=True, help="Memory budget of the device session.")
@click.option("--backend", default=BACKEND_ORT, show_default=True, type=backend_choice(auto=False),
              help="Runtime backend to export for and train on (`edgepeft inspect` shows what each needs; "
                   "exports other than the default take a minute or two longer).")
@click.option("--results", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the figures as JSON here, with the machine, package versions and load "
                   "(`make demo` writes benchmarks/results/demo-<backend>.json).")
def demo(out: Path, steps: int, budget: str, backend: str, results: Path | None) -> None:
    """Export MiniLM + LoRA (int8 base), personalize two users on BBC News, hot-swap."""
    run_demo(out, steps=steps, budget=budget, backend=backend, results=results)


def run_demo(out: Path, *, steps: int = 30, budget: str = "1GB", n_test: int = 60,
             backend: str = BACKEND_ORT, results: Path | None = None) -> dict:
    from edgepeft.memory import fmt_bytes
    from edgepeft.provenance import machine
    from edgepeft.runtime import OptimizerSpec, Session

    c = console()
    out = Path(out)
    bundle = out / "minilm-bbc.edgepeft"
    store = out / "adapters"
    shutil.rmtree(store, ignore_errors=True)
    t0, start = time.perf_counter(), machine()
    c.rule("[bold]host: export")
    exported = _export(c, bundle, backend)

    c.rule("[bold]device: personalize")
    splits = _user_data(out, steps=steps, n_test=n_test)
    t = time.perf_counter()
    s = Session.open(bundle, memory_budget=budget, adapter="alice", store=store, threads=2,
                     optimizer=OptimizerSpec(lr=LR), backend=backend)
    c.print(f"session open in {time.perf_counter() - t:.2f} s on the {backend} backend, memory budget {budget}")
    users = {user: _personalize(c, s, user, splits[user], steps=steps, first=k == 0, seed=k)
             for k, user in enumerate(USERS)}

    c.rule("[bold]device: hot-swap")
    restored, swaps = _hot_swap(c, s, splits, users)
    peaks = ", ".join(f"{k} {fmt_bytes(v)}" for k, v in s.budget.peaks.items())
    c.print(f"memory above session start (peak per phase): {peaks}; budget {budget}")
    c.print(f"adapters in {store}: {s.adapters()}; total demo time {time.perf_counter() - t0:.0f} s")
    c.print(f"try the CLI: edgepeft train {bundle} --data {out}/alice.train.jsonl "
            f"--eval-data {out}/alice.test.jsonl --adapter alice --steps 10 --store {store}")
    s.close()
    if results:
        from edgepeft.provenance import write_results

        figures = _figures(exported, users, restored, swaps, dict(s.budget.peaks), time.perf_counter() - t0,
                           backend=backend, steps=steps, n_test=n_test, budget=budget)
        c.print(f"figures written to {write_results(results, figures, start=start)}")
    return {"users": users, "restored": restored, "peaks": dict(s.budget.peaks)}


def _figures(exported: dict, users: dict, restored: dict, swaps: dict, peaks: dict, total_s: float, **setup) -> dict:
    """The figures the README quotes, rounded as it prints them (ratios computed here)."""
    mib = 1 << 20
    return {"setup": {**setup, "batch": BATCH, "threads": 2, "lr": LR}, "export": exported,
            "users": {u: {"accuracy_before": round(r["before"], 3), "accuracy_after": round(r["after"], 3),
                          "loss_first": round(r["loss_first"], 4), "loss_last": round(r["loss_last"], 4),
                          "step_s": round(r["step_s"], 2), "steps": r["steps"],
                          "restored_exactly": restored[u] == r["eval"]} for u, r in users.items()},
            "hot_swap": swaps, "peak_above_start_mib": {k: round(v / mib) for k, v in peaks.items()},
            "total_s": round(total_s)}


def _export(c, bundle: Path, backend: str) -> dict:
    """Host side: MiniLM + LoRA r8 (query, value) + a trainable head, int8 base, into ``bundle``."""
    from edgepeft.exporters import export_bundle, load_model
    from edgepeft.specs import LoraSpec

    t = time.perf_counter()
    with c.status(f"exporting MiniLM-L6 + LoRA r8 (query, value) + head, int8 base, for {backend} ..."):
        res = export_bundle(load_model("minilm"), out=bundle, quant="int8", backends=(backend,),
                            methods=[LoraSpec(rank=8, alpha=16, targets=("query", "value"),
                                              modules_to_save=("classifier",))],
                            executorch_batch_size=BATCH)  # used by the executorch backend only
    m = res.manifest
    c.print(f"bundle {bundle} ({bundle.stat().st_size / 1e6:.1f} MB) in {time.perf_counter() - t:.1f} s: "
            f"{m.trainable_params:,} trainable of {m.base_params:,} params "
            f"({100 * m.trainable_params / m.base_params:.2f}%), "
            f"{len(m.quantization['tensors'])} frozen weights int8")
    # The eager reference model goes with ``res`` on return: the device side does not need it.
    return {"export_s": round(time.perf_counter() - t, 1), "bundle_mb": round(bundle.stat().st_size / 1e6, 1),
            "trainable_params": m.trainable_params, "base_params": m.base_params,
            "base_params_m": round(m.base_params / 1e6, 1),
            "trainable_pct": round(100 * m.trainable_params / m.base_params, 2), "max_length": m.max_length}


def _user_data(out: Path, *, steps: int, n_test: int) -> dict:
    """Each user's (train, held-out) slice of BBC News, also written as JSONL for trying the CLI."""
    from edgepeft.cli.datasets import bbc_news, user_split
    from edgepeft.data import write_jsonl

    splits = {u: user_split(bbc_news(topics), n_train=BATCH * steps, n_test=n_test, seed=i + 1)
              for i, (u, topics) in enumerate(USERS.items())}
    for user, (train, test) in splits.items():
        write_jsonl(out / f"{user}.train.jsonl", train)
        write_jsonl(out / f"{user}.test.jsonl", test)
    return splits


def _personalize(c, s, user: str, split, *, steps: int, first: bool, seed: int) -> dict:
    """Train ``user``'s adapter (a new one, unless it is the session's first) on their slice."""
    train, test = split
    enc = s.encoder
    if not first:
        s.swap_adapter(user, create=True)
    before = s.evaluate(enc.batches(test, 16))
    losses = []
    t = time.perf_counter()
    with progress(c) as prog:
        task = prog.add_task(f"{user}: training", total=steps)
        for batch in enc.batches(train, BATCH, shuffle=True, seed=seed):
            losses.append(s.train_step(batch))
            prog.update(task, advance=1, description=f"{user}: training, loss {losses[-1]:.3f}")
    step_s = (time.perf_counter() - t) / len(losses)
    after = s.evaluate(enc.batches(test, 16))
    s.save_adapter()
    c.print(f"{user} ({', '.join(USERS[user])}): held-out accuracy {before.accuracy:.3f} -> "
            f"{after.accuracy:.3f} after {len(losses)} steps ({step_s:.2f} s/step), saved")
    return {"before": before.accuracy, "after": after.accuracy, "eval": after, "loss_first": losses[0],
            "loss_last": losses[-1], "step_s": step_s, "steps": len(losses)}


def _hot_swap(c, s, splits: dict, results: dict) -> tuple[dict, dict]:
    """Swap to each user's adapter, evaluate on every user's held-out slice, and check that
    swapping back restores the saved results bit for bit. Returns the restored evaluations and,
    per adapter, the swap time and the accuracy on each user's held-out slice."""
    from rich.table import Table

    table = Table("active adapter", *(f"{u}'s held-out" for u in USERS), "swap time")
    restored, swaps = {}, {}
    for user in USERS:
        t = time.perf_counter()
        s.swap_adapter(user)
        swap_ms = (time.perf_counter() - t) * 1e3
        evals = {u: s.evaluate(s.encoder.batches(splits[u][1], 16)) for u in USERS}
        restored[user] = evals[user]
        swaps[user] = {"swap_ms": round(swap_ms, 2), **{f"accuracy_on_{u}": round(evals[u].accuracy, 3) for u in USERS}}
        table.add_row(user, *(f"{evals[u].accuracy:.3f}" for u in USERS), f"{swap_ms:.2f} ms")
    c.print(table)
    for user in USERS:
        ok = restored[user] == results[user]["eval"]  # loss and accuracy, bit for bit
        c.print(f"{user} after swapping back: accuracy {restored[user].accuracy:.3f}, loss "
                f"{restored[user].loss:.6f} ({'restored exactly' if ok else 'NOT restored'})")
    return restored, swaps
