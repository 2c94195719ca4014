"""Many users over one base: MiniLM + BBC News, one process, one frozen base in memory.

Users join one after another, each reading their own three of the five topics. Each gets a
Personalizer-trained adapter (rounds as their articles arrive, guardrail on their own held-out
samples); only the active user's adapter is held in memory, the others wait in the adapter
store. After each user joins, the process's resident memory is printed: it stays flat, since a
user costs an adapter on disk (~0.9 MB with its optimizer state), not a model in memory.
Finally every user's adapter is swapped in and checked on that user's own test slice."""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Sequence

if __package__ in (None, ""):  # run as a file: make `examples` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from examples._common import Sizes, export, feed, fresh_dir, parse_args, report, rss, say

USERS = {
    "ana": ("business", "politics", "tech"),
    "ben": ("entertainment", "sport", "tech"),
    "cai": ("business", "entertainment", "sport"),
    "dev": ("politics", "sport", "tech"),
    "eva": ("business", "entertainment", "politics"),
    "fay": ("entertainment", "politics", "tech"),
}
FULL = Sizes(n_train=48, n_test=30, every=24, steps=6, max_length=64)
SMOKE = Sizes(n_train=16, n_test=6, every=16, steps=1, batch=4, max_length=32, min_holdout=2)
LR = 3e-3


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args("multiuser", __doc__, argv)
    z = SMOKE if args.smoke else FULL
    users = dict(list(USERS.items())[:3]) if args.smoke else USERS
    t0 = time.perf_counter()
    out = fresh_dir(args.out)
    from edgepeft.specs import LoraSpec

    bundle = export(out, "minilm", [LoraSpec(rank=8, alpha=16, targets=("query", "value"),
                                             modules_to_save=("classifier",))],
                    backend=args.backend, max_length=z.max_length)

    from edgepeft.cli.datasets import bbc_news, user_split
    from edgepeft.memory import fmt_bytes
    from edgepeft.runtime import OptimizerSpec, Personalizer, PersonalizerConfig, Session

    splits = {u: user_split(bbc_news(t), n_train=z.n_train, n_test=z.n_test, seed=50 + i)
              for i, (u, t) in enumerate(users.items())}
    s = Session.open(bundle, memory_budget=args.budget, adapter="base", store=out / "adapters",
                     threads=args.threads, backend=args.backend, optimizer=OptimizerSpec(lr=LR))
    enc = s.encoder
    p = Personalizer(s, out / "loop", PersonalizerConfig(every=z.every, steps=z.steps, batch_size=z.batch,
                                                          min_holdout=z.min_holdout))
    before = {u: s.evaluate(enc.batches(te, 16)) for u, (_, te) in splits.items()}
    memory = []
    for i, (user, topics) in enumerate(users.items(), 1):
        say(f"{user} joins ({', '.join(topics)})")
        feed(p, user, splits[user][0], chunk=max(1, z.every // 3))
        memory.append(rss())
        say(f"  {i} user(s): resident memory {fmt_bytes(memory[-1])}")
    after, swaps = {}, []
    for user in users:
        t = time.perf_counter()
        p.activate(user)
        swaps.append(time.perf_counter() - t)
        after[user] = s.evaluate(enc.batches(splits[user][1], 16))
    s.close()
    growth = memory[-1] - memory[0]
    say(f"memory after each user: {', '.join(fmt_bytes(m) for m in memory)} "
        f"(first -> last user: {growth / 2**20:+.1f} MiB); activating a stored user: "
        f"{1e3 * sum(swaps) / len(swaps):.1f} ms on average")
    rows = [(f"{u} accuracy", f"{before[u].accuracy:.3f}", f"{after[u].accuracy:.3f}") for u in users]
    return report("multi-user loop (MiniLM + BBC News)", rows, {
        "before": {u: r.__dict__ for u, r in before.items()}, "after": {u: r.__dict__ for u, r in after.items()},
        "rss_after_each_user": memory, "rss_growth_first_to_last": growth, "activate_s": swaps}, out, t0)


if __name__ == "__main__":
    main()
