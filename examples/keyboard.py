"""Keyboard-style next-word prediction: SmolLM2-135M + one user's tweets, LoRA on attention.

The user is a frequent flyer whose tweets go to airlines (@united, @JetBlue, ...). As they
type, their tweets are buffered on the device; the Personalizer trains LoRA (rank 8 on the
attention q/k/v/o projections of the int8 base) in rounds and keeps a round only if the
user's held-out tweets' loss does not rise. Reported on a separate test slice of the user's
tweets: perplexity, and top-1 / top-5 next-token accuracy (would the keyboard's suggestion
strip have held the next token?)."""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np

if __package__ in (None, ""):  # run as a file: make `examples` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from examples._common import Sizes, export, feed, fresh_dir, parse_args, report, say

USER, PERSONA = "frank", "flyer"
FULL = Sizes(n_train=192, n_test=48, every=64, steps=8, batch=8, max_length=32)
SMOKE = Sizes(n_train=10, n_test=2, every=10, steps=1, batch=2, max_length=16, min_holdout=1)
LR = 1e-3
TOP_K = 5


def next_token_metrics(s, texts: list[str], k: int = TOP_K, batch: int = 8) -> dict:
    """Perplexity (from the session's evaluate) and top-1 / top-k next-token accuracy over the
    predicted positions (from inference logits)."""
    from edgepeft.data import Example

    enc = s.encoder
    ev = s.evaluate(enc.batches([Example(t) for t in texts], batch))
    hit1 = hitk = n = 0
    for i in range(0, len(texts), batch):
        feeds = enc.encode(texts[i:i + batch])
        labels = enc.next_token_labels(feeds)
        logits = s.infer(feeds)
        valid = labels >= 0
        topk = np.argpartition(-logits, k, axis=-1)[..., :k]
        hitk += int(((topk == labels[..., None]).any(-1) & valid).sum())
        hit1 += int(((logits.argmax(-1) == labels) & valid).sum())
        n += int(valid.sum())
    return {"perplexity": ev.perplexity, "loss": ev.loss, "top1": hit1 / n, f"top{k}": hitk / n, "tokens": n}


def main(argv: Sequence[str] | None = None) -> dict:
    # The lean backend (block-wise graphs, chunked LM head, memory-mapped int8 weights) trains
    # inside a Pi Zero 2 W's 320 MiB; the whole-graph backends needed ~3 GB here.
    args = parse_args("keyboard", __doc__, argv, budget="320MB", backend="lean")
    z = SMOKE if args.smoke else FULL
    t0 = time.perf_counter()
    out = fresh_dir(args.out)
    from edgepeft.specs import LoraSpec

    bundle = export(out, "smollm2-135m", [LoraSpec(rank=8, alpha=16, targets=("q_proj", "k_proj", "v_proj", "o_proj"))],
                    backend=args.backend, isolated=True, max_length=z.max_length)

    from edgepeft.data import Example
    from edgepeft.cli.datasets import tweets, user_split
    from edgepeft.runtime import OptimizerSpec, Personalizer, PersonalizerConfig, Session

    train, test = user_split(tweets(PERSONA), n_train=z.n_train, n_test=z.n_test, seed=31, balanced=False)
    s = Session.open(bundle, memory_budget=args.budget, adapter="base", store=out / "adapters",
                     threads=args.threads, backend=args.backend, optimizer=OptimizerSpec(lr=LR))
    test_texts = [e.text for e in test]
    before = next_token_metrics(s, test_texts)
    say(f"{USER}'s tweets ({PERSONA}): {len(train)} arrive on the device, {len(test)} held out for the report; "
        f"e.g. {train[0].text[:70]!r}")
    p = Personalizer(s, out / "loop", PersonalizerConfig(every=z.every, steps=z.steps, batch_size=z.batch,
                                                          min_holdout=z.min_holdout, eval_batch_size=8))
    # Next-token data has no label: the text is the target.
    rounds = feed(p, USER, [Example(e.text) for e in train], chunk=max(1, z.every // 4))
    p.activate(USER)
    after = next_token_metrics(s, test_texts)
    peaks = dict(s.budget.peaks)
    s.close()
    from edgepeft.memory import peak_rss_bytes

    process_peak = peak_rss_bytes()  # the whole device-side process (the export ran in a child)
    say(f"session peaks above its start: {', '.join(f'{k} {v / 2**20:.0f} MiB' for k, v in peaks.items())}; "
        f"whole process peak {process_peak / 2**20:.0f} MiB (torch loaded: {'torch' in sys.modules})")
    return report("keyboard next-token prediction (SmolLM2-135M + a user's tweets)", [
        ("perplexity", f"{before['perplexity']:.2f}", f"{after['perplexity']:.2f}"),
        ("top-1 next-token accuracy", f"{before['top1']:.3f}", f"{after['top1']:.3f}"),
        (f"top-{TOP_K} next-token accuracy", f"{before[f'top{TOP_K}']:.3f}", f"{after[f'top{TOP_K}']:.3f}"),
    ], {"user": USER, "persona": PERSONA, "before": before, "after": after, "rounds": [r.status for r in rounds],
        "steps": sum(r.steps for r in rounds if r.accepted), "n_test": len(test), "peaks": peaks,
        "process_peak": process_peak, "backend": s.backend.name, "budget": args.budget,
        "torch_loaded": "torch" in sys.modules}, out, t0)


if __name__ == "__main__":
    main()
