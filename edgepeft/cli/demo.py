"""`edgepeft demo`: the main job end to end on a real model and real data, offline.

Host: export all-MiniLM-L6-v2 with LoRA (rank 8 on query/value) and a trainable topic head
over an int8 frozen base into one bundle. Device: open it under a memory budget, personalize
two users' adapters on their own slices of BBC News, and hot-swap between them."""
from __future__ import annotations

import shutil
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from edgepeft.data import write_jsonl
from edgepeft.cli.datasets import bbc_news, user_split
from edgepeft.memory import fmt_bytes

USERS = {
    # Each user follows three topics; their held-out articles are never trained on.
    "alice": ("business", "politics", "tech"),
    "bob": ("entertainment", "sport", "tech"),
}
BATCH = 8
LR = 3e-3


def run_demo(out: Path, *, steps: int = 30, budget: str = "1GB", n_test: int = 60,
             backend: str = "ort-training") -> dict:
    console = Console(highlight=False)
    out = Path(out)
    bundle = out / "minilm-bbc.edgepeft"
    store = out / "adapters"
    shutil.rmtree(store, ignore_errors=True)
    t0 = time.perf_counter()

    # ---- host ----------------------------------------------------------------------------
    console.rule("[bold]host: export")
    from edgepeft.exporters import export_bundle, load_model
    from edgepeft.specs import LoraSpec

    t = time.perf_counter()
    with console.status(f"exporting MiniLM-L6 + LoRA r8 (query, value) + head, int8 base, for {backend} ..."):
        res = export_bundle(load_model("minilm"), out=bundle, quant="int8", backends=(backend,),
                            methods=[LoraSpec(rank=8, alpha=16, targets=("query", "value"),
                                              modules_to_save=("classifier",))],
                            executorch_batch_size=BATCH)  # used by the executorch backend only
    m = res.manifest
    console.print(f"bundle {bundle} ({bundle.stat().st_size / 1e6:.1f} MB) in {time.perf_counter() - t:.1f} s: "
                  f"{m.trainable_params:,} trainable of {m.base_params:,} params "
                  f"({100 * m.trainable_params / m.base_params:.2f}%), "
                  f"{len(m.quantization['tensors'])} frozen weights int8")
    del res  # the eager reference model is not needed on the device side

    # ---- device --------------------------------------------------------------------------
    console.rule("[bold]device: personalize")
    from edgepeft.runtime import OptimizerSpec, Session

    splits = {u: user_split(bbc_news(topics), n_train=BATCH * steps, n_test=n_test, seed=i + 1)
              for i, (u, topics) in enumerate(USERS.items())}
    for user, (train, test) in splits.items():  # for trying the CLI on the same data
        write_jsonl(out / f"{user}.train.jsonl", train)
        write_jsonl(out / f"{user}.test.jsonl", test)
    t = time.perf_counter()
    s = Session.open(bundle, memory_budget=budget, adapter="alice", store=store, threads=2,
                     optimizer=OptimizerSpec(lr=LR), backend=backend)
    console.print(f"session open in {time.perf_counter() - t:.2f} s on the {backend} backend, memory budget {budget}")
    enc = s.encoder
    results: dict[str, dict] = {}
    for k, user in enumerate(USERS):
        train, test = splits[user]
        if k:
            s.swap_adapter(user, create=True)
        before = s.evaluate(enc.batches(test, 16))
        losses = []
        t = time.perf_counter()
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=console) as prog:
            task = prog.add_task(f"{user}: training", total=steps)
            for batch in enc.batches(train, BATCH, shuffle=True, seed=k):
                losses.append(s.train_step(batch))
                prog.update(task, advance=1, description=f"{user}: training, loss {losses[-1]:.3f}")
        step_s = (time.perf_counter() - t) / len(losses)
        after = s.evaluate(enc.batches(test, 16))
        s.save_adapter()
        results[user] = {"before": before.accuracy, "after": after.accuracy, "eval": after, "loss_first": losses[0],
                         "loss_last": losses[-1], "step_s": step_s, "steps": len(losses)}
        console.print(f"{user} ({', '.join(USERS[user])}): held-out accuracy {before.accuracy:.3f} -> "
                      f"{after.accuracy:.3f} after {len(losses)} steps ({step_s:.2f} s/step), saved")

    console.rule("[bold]device: hot-swap")
    table = Table("active adapter", *(f"{u}'s held-out" for u in USERS), "swap time")
    restored = {}
    for user in USERS:
        t = time.perf_counter()
        s.swap_adapter(user)
        swap_ms = (time.perf_counter() - t) * 1e3
        evals = {u: s.evaluate(enc.batches(splits[u][1], 16)) for u in USERS}
        restored[user] = evals[user]
        table.add_row(user, *(f"{evals[u].accuracy:.3f}" for u in USERS), f"{swap_ms:.2f} ms")
    console.print(table)
    for user in USERS:
        ok = restored[user] == results[user]["eval"]  # loss and accuracy, bit for bit
        console.print(f"{user} after swapping back: accuracy {restored[user].accuracy:.3f}, loss "
                      f"{restored[user].loss:.6f} ({'restored exactly' if ok else 'NOT restored'})")
    peaks = ", ".join(f"{k} {fmt_bytes(v)}" for k, v in s.budget.peaks.items())
    console.print(f"memory above session start (peak per phase): {peaks}; budget {budget}")
    console.print(f"adapters in {store}: {s.adapters()}; total demo time {time.perf_counter() - t0:.0f} s")
    console.print(f"try the CLI: edgepeft train {bundle} --data {out}/alice.train.jsonl "
                  f"--eval-data {out}/alice.test.jsonl --adapter alice --steps 10 --store {store}")
    s.close()
    return {"users": results, "restored": restored, "peaks": dict(s.budget.peaks)}
