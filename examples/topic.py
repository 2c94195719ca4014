"""Topic personalization: MiniLM + BBC News, one user who reads only three of the five topics.

The bundle's head knows all five BBC topics; the user's articles come from their own subset
(entertainment, sport, tech). They arrive on the device in small groups; the Personalizer
trains a round each time enough have come in, keeping a round only if it does not hurt the
user's own held-out samples. Reported: accuracy and loss on a separate test slice of the
user's topics, never seen by the loop."""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Sequence

if __package__ in (None, ""):  # run as a file: make `examples` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from examples._common import Sizes, export, feed, fresh_dir, parse_args, report, say

USER, TOPICS = "dana", ("entertainment", "sport", "tech")
FULL = Sizes(n_train=120, n_test=60, every=40, steps=10, max_length=64)
SMOKE = Sizes(n_train=32, n_test=9, every=16, steps=2, batch=4, max_length=32, min_holdout=2)
LR = 3e-3  # the demo's learning rate for the same model and data


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args("topic", __doc__, argv)
    z = SMOKE if args.smoke else FULL
    t0 = time.perf_counter()
    out = fresh_dir(args.out)
    from edgepeft.specs import LoraSpec

    bundle = export(out, "minilm", [LoraSpec(rank=8, alpha=16, targets=("query", "value"),
                                             modules_to_save=("classifier",))],
                    backend=args.backend, max_length=z.max_length)

    from edgepeft.cli.datasets import bbc_news, user_split
    from edgepeft.runtime import OptimizerSpec, Personalizer, PersonalizerConfig, Session

    train, test = user_split(bbc_news(TOPICS), n_train=z.n_train, n_test=z.n_test, seed=11)
    s = Session.open(bundle, memory_budget=args.budget, adapter="base", store=out / "adapters",
                     threads=args.threads, backend=args.backend, optimizer=OptimizerSpec(lr=LR))
    enc = s.encoder
    before = s.evaluate(enc.batches(test, 16))
    say(f"{USER} reads {', '.join(TOPICS)}: {len(train)} articles arrive on the device, {len(test)} held out for the report")
    p = Personalizer(s, out / "loop", PersonalizerConfig(every=z.every, steps=z.steps, batch_size=z.batch,
                                                      min_holdout=z.min_holdout))
    rounds = feed(p, USER, train, chunk=max(1, z.every // 4))
    p.activate(USER)
    after = s.evaluate(enc.batches(test, 16))
    s.close()
    return report("topic personalization (MiniLM + BBC News)", [
        ("accuracy", f"{before.accuracy:.3f}", f"{after.accuracy:.3f}"),
        ("loss", f"{before.loss:.3f}", f"{after.loss:.3f}"),
    ], {"user": USER, "topics": TOPICS, "before": before.__dict__, "after": after.__dict__,
        "rounds": [r.status for r in rounds], "steps": sum(r.steps for r in rounds if r.accepted),
        "n_test": len(test)}, out, t0)


if __name__ == "__main__":
    main()
