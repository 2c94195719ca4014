"""Prompt tuning: trainable virtual token embeddings in the model's PromptSlot."""
from __future__ import annotations

import itertools

import torch
import torch.nn as nn

from edgepeft.errors import SpecError, TargetError
from edgepeft.exporters.peft.base import InjectContext, Trainable, slot_modules
from edgepeft.exporters.peft.slots import PromptSlot
from edgepeft.specs import PromptSpec


def _text_ids(ctx: InjectContext, text: str) -> list[int]:
    if ctx.tokenizer_json is None:
        raise SpecError('prompt init="text" needs the model\'s tokenizer; this model has none: use init="random"')
    from tokenizers import Tokenizer

    ids = Tokenizer.from_str(ctx.tokenizer_json).encode(text, add_special_tokens=False).ids
    if not ids:
        raise SpecError(f"`init_text` {text!r} tokenizes to no tokens")
    return ids


def inject_prompt(model: nn.Module, spec: PromptSpec, ctx: InjectContext) -> list[Trainable]:
    slots = slot_modules(model, PromptSlot, "prompt tuning", "an embedding module with a prompt slot")
    if len(slots) != 1:
        raise TargetError(f"prompt tuning: the model has {len(slots)} prompt slots ({[n for n, _ in slots]}); "
                          "it needs exactly one")
    name, slot = slots[0]
    table = slot.token_embedding.weight.detach()
    if spec.init == "text":
        ids = list(itertools.islice(itertools.cycle(_text_ids(ctx, spec.init_text)), spec.n_tokens))
        rows = table[torch.tensor(ids)].clone()
    else:
        g = torch.Generator().manual_seed(spec.init_seed)
        rows = torch.randn(spec.n_tokens, table.shape[1], generator=g) * table.std()
    slot.prompt = nn.Parameter(rows.float())
    full = f"{name}.prompt" if name else "prompt"
    # PEFT keeps a prompt-tuning adapter as one tensor named `prompt_embeddings`.
    return [Trainable(full, "prompt_embeddings", "prompt", slot.prompt)]
