"""How a model declares its cut into parts for block-wise (lean) training.

A model that has ``lean_parts()`` can be trained one block at a time: the runtime keeps only
each block's input for backward and recomputes the block's inside (activation checkpointing
per block), and a causal LM's vocabulary projection runs in chunks so that (batch x seq x
vocab) logits never exist whole. The model's ``forward`` must be exactly
``post(blocks[-1](...blocks[0](*pre(inputs))...), inputs)`` (then the head for causal LMs)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch.nn as nn


@dataclass(frozen=True)
class LeanParts:
    """``pre(*inputs) -> (h, *ctx)``: embeddings, plus context tensors every block reads
    (rotary tables, attention bias), which must not depend on trainable tensors.
    ``blocks[i](h, *ctx) -> h``. ``post(h, *inputs)``: logits (classification), or for a causal
    LM the final hidden states that ``head`` (the name of a frozen (vocab, hidden) weight)
    projects onto the vocabulary.

    Blocks with the same parameters (names, shapes, trainables) share one pair of graphs; a block
    whose computation also depends on something else fixed at construction (e.g. Gemma 3's
    sliding vs full attention) must say so in a ``lean_key`` attribute."""

    pre: Callable
    blocks: Sequence[nn.Module]
    post: Callable
    head: str | None = None
