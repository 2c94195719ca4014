"""Sentiment personalization: MiniLM + CrowdFlower tweets, one user whose tweets lean their own way.

A vendor ships a general sentiment adapter ("general"), trained here on the device on tweets
of other subjects. The user is a festival-goer (tweets about Coachella: mostly positive,
unlike the complaint-heavy general mix). Their adapter starts from the general one and the
Personalizer adapts it as their tweets arrive. Reported on a separate test slice of the
user's tweets: the fresh head, the general adapter, and the user's own adapter."""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Sequence

if __package__ in (None, ""):  # run as a file: make `examples` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from examples._common import Sizes, export, feed, fresh_dir, parse_args, report, say

USER, PERSONA = "erin", "festival"
FULL = Sizes(n_train=160, n_test=150, every=40, steps=10, batch=16, max_length=48)
SMOKE = Sizes(n_train=32, n_test=12, every=16, steps=2, batch=4, max_length=32, min_holdout=2)
GENERAL_STEPS, GENERAL_STEPS_SMOKE = 40, 2
LR = 3e-3


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args("sentiment", __doc__, argv)
    z = SMOKE if args.smoke else FULL
    t0 = time.perf_counter()
    out = fresh_dir(args.out)
    from edgepeft.cli.datasets import SENTIMENTS, TWEET_PERSONAS, tweets, user_split
    from edgepeft.specs import LoraSpec

    bundle = export(out, "minilm", [LoraSpec(rank=8, alpha=16, targets=("query", "value"),
                                             modules_to_save=("classifier",))],
                    backend=args.backend, labels=SENTIMENTS, max_length=z.max_length)

    from edgepeft.runtime import OptimizerSpec, Personalizer, PersonalizerConfig, Session

    # The user's own label mix is kept (not balanced): that is what personalization adapts to.
    train, test = user_split(tweets(PERSONA), n_train=z.n_train, n_test=z.n_test, seed=21, balanced=False)
    others = [e for p in TWEET_PERSONAS if p != PERSONA for e in tweets(p)]
    s = Session.open(bundle, memory_budget=args.budget, adapter="general", store=out / "adapters",
                     threads=args.threads, backend=args.backend, optimizer=OptimizerSpec(lr=LR))
    enc = s.encoder
    fresh = s.evaluate(enc.batches(test, 32))
    # The vendor balances its general training set over the labels (the raw mix is mostly
    # airline complaints, which would teach "negative" and little else).
    n_general = (GENERAL_STEPS_SMOKE if args.smoke else GENERAL_STEPS) * z.batch
    general_data, _ = user_split(others, n_train=n_general, n_test=0, seed=22)
    t = time.perf_counter()
    losses = [s.train_step(b) for b in enc.batches(general_data, z.batch)]
    s.save_adapter()
    general = s.evaluate(enc.batches(test, 32))
    say(f"general adapter: {n_general} tweets of other subjects, training loss {losses[0]:.3f} -> "
        f"{sum(losses[-5:]) / len(losses[-5:]):.3f} (mean of the last 5), {time.perf_counter() - t:.0f} s")

    say(f"{USER} tweets about {PERSONA}: {len(train)} tweets arrive on the device, {len(test)} held out for the report")
    p = Personalizer(s, out / "loop", PersonalizerConfig(every=z.every, steps=z.steps, batch_size=z.batch,
                                                          min_holdout=z.min_holdout, base_adapter="general"))
    rounds = feed(p, USER, train, chunk=max(1, z.every // 4))
    p.activate(USER)
    after = s.evaluate(enc.batches(test, 32))
    s.close()
    mix = {lab: sum(e.label == lab for e in test) for lab in SENTIMENTS}
    say(f"test slice label mix: {mix}")
    return report("sentiment personalization (MiniLM + tweets)", [
        ("accuracy (fresh head -> general)", f"{fresh.accuracy:.3f}", f"{general.accuracy:.3f}"),
        ("accuracy (general -> personal)", f"{general.accuracy:.3f}", f"{after.accuracy:.3f}"),
        ("loss (general -> personal)", f"{general.loss:.3f}", f"{after.loss:.3f}"),
    ], {"user": USER, "persona": PERSONA, "fresh": fresh.__dict__, "before": general.__dict__,
        "after": after.__dict__, "rounds": [r.status for r in rounds], "n_test": len(test), "test_mix": mix}, out, t0)


if __name__ == "__main__":
    main()
