"""Prefix tuning: trainable key/value rows in the PrefixSlot of each chosen attention block."""
from __future__ import annotations

import torch
import torch.nn as nn

from edgepeft.errors import SpecError
from edgepeft.exporters.peft.base import InjectContext, Trainable, declare, slot_modules
from edgepeft.exporters.peft.slots import PrefixSlot
from edgepeft.specs import PrefixSpec


def inject_prefix(model: nn.Module, spec: PrefixSpec, ctx: InjectContext) -> list[Trainable]:
    slots = slot_modules(model, PrefixSlot, "prefix tuning", "attention blocks with a prefix slot")
    chosen = spec.layers or tuple(range(len(slots)))
    bad = [i for i in chosen if i >= len(slots)]
    if bad:
        raise SpecError(f"prefix `layers` {bad} out of range: the model has {len(slots)} attention blocks (0..{len(slots) - 1})")
    g = torch.Generator().manual_seed(spec.init_seed)
    out: list[Trainable] = []
    for i in chosen:
        name, attn = slots[i]
        shape = (attn.kv_heads, spec.n_tokens, attn.head_dim)
        attn.prefix_key = nn.Parameter(torch.randn(shape, generator=g) * 0.02)
        attn.prefix_value = nn.Parameter(torch.randn(shape, generator=g) * 0.02)
        out += declare(name, {"prefix_key": attn.prefix_key, "prefix_value": attn.prefix_value}, "prefix")
    return out
