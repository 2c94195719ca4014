"""Tiny vision and MLP models for tests: seeded random weights, milliseconds per step.

``tiny_cnn`` is EfficientNet-Lite's code path in miniature (same classes, names, PEFT sites,
pixel convention and BatchNorm folding); ``tiny_mlp`` is the smallest classifier over a float
feature vector."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from edgepeft.exporters.zoo import ModelSource
from edgepeft.exporters.zoo.efficientnet import (IMAGE_AXES, BlockArgs, EfficientNetLite, NetConfig,
                                                 fold_batchnorms, fresh_linear, image_inputs)

# Stem 3x3/2 (32 -> 16), a strided 5x5 block (asymmetric SAME padding, 16 -> 8), a 3x3 block
# with a residual, a 1x1 head: every layer kind of Lite0 once.
TINY_CNN = NetConfig(
    stages=(BlockArgs(5, 1, 8, 16, 4, 2), BlockArgs(3, 1, 16, 16, 4, 1)),
    image_size=32, stem_ch=8, head_ch=32,
)


@torch.no_grad()
def _randomize(model: nn.Module, g: torch.Generator) -> None:
    """Seeded weights (Kaiming-uniform convs) and non-trivial BatchNorm statistics."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            fan_in = m.weight[0].numel()
            bound = math.sqrt(6.0 / fan_in)
            m.weight.uniform_(-bound, bound, generator=g)
            if m.bias is not None:
                m.bias.uniform_(-0.1, 0.1, generator=g)
        elif isinstance(m, nn.BatchNorm2d):
            m.weight.uniform_(0.5, 1.5, generator=g)
            m.bias.normal_(0.0, 0.2, generator=g)
            m.running_mean.normal_(0.0, 0.5, generator=g)
            m.running_var.uniform_(0.5, 2.0, generator=g)
        elif isinstance(m, nn.Linear):
            bound = 1.0 / math.sqrt(m.in_features)
            m.weight.uniform_(-bound, bound, generator=g)
            m.bias.uniform_(-bound, bound, generator=g)


def build_tiny_cnn(num_classes: int, seed: int = 0, *, fold: bool = True) -> EfficientNetLite:
    """The tiny CNN in eval mode: with random BatchNorm statistics folded into its convolutions
    (``fold=True``, the exported form), or with the BatchNorm2d layers still in place."""
    with torch.random.fork_rng(devices=[]):  # module constructors draw from the global RNG
        model = EfficientNetLite(TINY_CNN, num_classes, batchnorm=True)
    _randomize(model, torch.Generator().manual_seed(seed))
    model.eval()
    return fold_batchnorms(model) if fold else model


def tiny_cnn(labels: tuple[str, ...] = ("a", "b", "c"), seed: int = 0) -> ModelSource:
    """EfficientNet-like CNN on float32 (B, 3, 32, 32) pixels in 0..255; ~7k parameters."""
    model = build_tiny_cnn(len(labels), seed)
    return ModelSource("tiny-cnn", model, image_inputs(2, TINY_CNN.image_size, seed), tuple(labels),
                       tokenizer_json=None, task="classification", dynamic_axes=dict(IMAGE_AXES))


class TinyMLP(nn.Module):
    """forward(x) -> logits: float32 (B, d_in) -> fc1 -> ReLU -> fc2 -> ReLU -> head."""

    PEFT_SITES = {"layers": r"^fc\d$"}

    def __init__(self, d_in: int, hidden: int, num_classes: int, seed: int):
        super().__init__()
        self.fc1 = fresh_linear(d_in, hidden, seed)
        self.fc2 = fresh_linear(hidden, hidden, seed + 1)
        self.head = fresh_linear(hidden, num_classes, seed + 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.fc2(F.relu(self.fc1(x)))))


def tiny_mlp(labels: tuple[str, ...] = ("a", "b", "c", "d"), seed: int = 0) -> ModelSource:
    """A 16 -> 64 -> 64 -> len(labels) MLP over input "x" float32 (B, 16)."""
    model = TinyMLP(16, 64, len(labels), seed).eval()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 16, generator=g)
    return ModelSource("tiny-mlp", model, {"x": x}, tuple(labels), tokenizer_json=None,
                       task="classification", dynamic_axes={"x": {0: "batch"}})
