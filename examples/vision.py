"""Vision under domain shift: EfficientNet-Lite0 (ImageNet photos) + MNIST handwritten digits.

The base has never seen a digit: its head is new (ten outputs, seeded), and its features were
learned on photos. On the device, BitFit trains the biases of the blocks and of the head
convolution (the biases BatchNorm folding left: re-centering features for a new domain is
what they can do) plus the new head, in Personalizer rounds as the user's digits arrive.
Digits (28x28, white on black) are scaled 8x to the model's fixed 224x224 and fed as RGB
pixels 0..255. Reported: accuracy and loss on a separate balanced test slice of digits."""
from __future__ import annotations

import base64
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

if __package__ in (None, ""):  # run as a file: make `examples` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from examples._common import Sizes, export, feed, fresh_dir, parse_args, report, say

USER = "gita"
LABELS = tuple(str(d) for d in range(10))
FULL = Sizes(n_train=200, n_test=100, every=50, steps=10, batch=8)
SMOKE = Sizes(n_train=20, n_test=10, every=10, steps=1, batch=2, min_holdout=2)
LR = 1e-2
SCALE = 8  # 28 * 8 = 224, EfficientNet-Lite0's input size


def to_record(img: np.ndarray, label: int) -> dict:
    """A digit as the sample buffer stores it: 784 bytes, base64 (JSON-safe, 1 KB)."""
    return {"pixels": base64.b64encode(np.ascontiguousarray(img, dtype=np.uint8).tobytes()).decode(),
            "label": str(int(label))}


def to_pixels(imgs: np.ndarray) -> np.ndarray:
    """uint8 (B, 28, 28) -> float32 (B, 3, 224, 224), nearest-neighbour upscaling, grey as RGB."""
    big = imgs.repeat(SCALE, axis=1).repeat(SCALE, axis=2).astype(np.float32)
    return np.repeat(big[:, None], 3, axis=1)


def batcher(records: Sequence[Mapping[str, Any]]):
    from edgepeft.data import Batch

    imgs = np.stack([np.frombuffer(base64.b64decode(r["pixels"]), dtype=np.uint8).reshape(28, 28) for r in records])
    return Batch({"pixel_values": to_pixels(imgs)}, np.array([LABELS.index(r["label"]) for r in records], dtype=np.int64))


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args("vision", __doc__, argv)
    z = SMOKE if args.smoke else FULL
    t0 = time.perf_counter()
    out = fresh_dir(args.out)
    from edgepeft.specs import BitFitSpec, SelectiveSpec

    bundle = export(out, "efficientnet-lite0", [BitFitSpec(pattern=r"^(_blocks\.\d+|_conv_head)$"),
                                                SelectiveSpec(modules=("_fc",))],
                    backend=args.backend, labels=LABELS)

    from edgepeft.cli.datasets import mnist_digits, split_indices
    from edgepeft.runtime import OptimizerSpec, Personalizer, PersonalizerConfig, Session

    images, labels = mnist_digits()
    tr, te = split_indices(labels.tolist(), n_train=z.n_train, n_test=z.n_test, seed=41)
    train = [to_record(images[i], labels[i]) for i in tr]
    test = [to_record(images[i], labels[i]) for i in te]
    s = Session.open(bundle, memory_budget=args.budget, adapter="base", store=out / "adapters",
                     threads=args.threads, backend=args.backend, optimizer=OptimizerSpec(lr=LR))

    def evaluate():
        return s.evaluate(batcher(test[i:i + 10]) for i in range(0, len(test), 10))

    before = evaluate()
    say(f"{USER}'s digits: {len(train)} arrive on the device, {len(test)} held out for the report")
    p = Personalizer(s, out / "loop", PersonalizerConfig(every=z.every, steps=z.steps, batch_size=z.batch,
                                                          min_holdout=z.min_holdout, eval_batch_size=10),
                     batcher=batcher)
    rounds = feed(p, USER, train, chunk=max(1, z.every // 5))
    p.activate(USER)
    after = evaluate()
    peaks = dict(s.budget.peaks)
    s.close()
    return report("vision domain shift (EfficientNet-Lite0 + MNIST digits, BitFit + head)", [
        ("accuracy", f"{before.accuracy:.3f}", f"{after.accuracy:.3f}"),
        ("loss", f"{before.loss:.3f}", f"{after.loss:.3f}"),
    ], {"user": USER, "before": before.__dict__, "after": after.__dict__, "rounds": [r.status for r in rounds],
        "steps": sum(r.steps for r in rounds if r.accepted), "n_test": len(test), "peaks": peaks}, out, t0)


if __name__ == "__main__":
    main()
