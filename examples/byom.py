"""Bring your own model: a plain nn.Module built from torch's standard layers (an embedding, an
nn.TransformerEncoderLayer, a linear head), exported with LoRA on its attention and FFN and
BitFit on its biases over an int8 base, then trained on the device on token batches (no
tokenizer in the bundle). Run: ``python -m examples.byom`` (``--backend portable`` for the
standard-ONNX gradient graph)."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn


class TextClassifier(nn.Module):
    """Token ids (batch, seq) -> logits (batch, classes)."""

    def __init__(self, vocab: int = 128, dim: int = 32, classes: int = 2):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.block = nn.TransformerEncoderLayer(dim, nhead=4, dim_feedforward=128, dropout=0.0, batch_first=True)
        self.head = nn.Linear(dim, classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.embed(ids)).mean(dim=1))


def data(n: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Class 0 uses the low half of the vocabulary, class 1 the high half."""
    g = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    return g.integers(0, 64, size=(n, 12)) + 64 * labels[:, None], labels


def main(argv: Sequence[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m examples.byom", description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("out/examples/byom"))
    ap.add_argument("--backend", default="ort-training", choices=("ort-training", "portable"))
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args(argv)

    # Host side (torch): the model, one example batch, the methods.
    from edgepeft.exporters import export_bundle
    from edgepeft.specs import BitFitSpec, LoraSpec

    torch.manual_seed(0)
    ids, labels = data()
    res = export_bundle(
        TextClassifier().eval(), {"ids": torch.from_numpy(ids)},   # forward's argument name -> example
        methods=[LoraSpec(rank=4, targets=("self_attn", "linear1", "linear2"), modules_to_save=("head",)),
                 BitFitSpec(pattern=r"^(?!head$).+$")],            # every bias except the head's (saved above)
        quant="int8", backends=(args.backend,), out=args.out / "model.edgepeft")
    print(f"exported {res.manifest.trainable_params} trainable of {res.manifest.base_params} parameters")

    # Device side (no torch): batches of model inputs and labels.
    from edgepeft.data import Batch
    from edgepeft.runtime import OptimizerSpec, Session

    with Session.open(res.path, adapter="me", store=args.out / "adapters", backend=args.backend,
                      optimizer=OptimizerSpec(lr=1e-2)) as s:
        batch = Batch({"ids": ids}, labels)
        losses = [s.train_step(batch) for _ in range(args.steps)]
        print("losses:", " ".join(f"{x:.3f}" for x in losses))
        s.save_adapter()
        accuracy = float((s.infer({"ids": ids}).argmax(1) == labels).mean())
    print(f"accuracy on the batch: {accuracy:.2f}")
    return {"losses": losses, "accuracy": accuracy, "bundle": str(res.path)}


if __name__ == "__main__":
    main()
