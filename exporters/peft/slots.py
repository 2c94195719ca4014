"""Slots: places in a model's own forward where PEFT methods that are not layer wrappers plug
in. A zoo block declares a slot by inheriting the mixin and calling ``init_*`` in __init__ and
the helper in forward; the injectors look for the mixins (never for names).

- PromptSlot: the module that embeds token ids; prompt tuning prepends virtual tokens.
- PrefixSlot: an attention module; prefix tuning adds trainable key/value rows.
- ParallelSlot: a block whose FFN can take a parallel bottleneck adapter.

Sequential bottleneck adapters and LoRA wrap Linear layers instead: a model names those
places in ``PEFT_SITES`` (site -> anchored regex over module names)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class PromptSlot:
    """Mixin for the module that turns ids into input embeddings. It must provide
    ``token_embedding`` (the nn.Embedding of the vocabulary) and call ``prepend_prompt`` on the
    token embeddings before positions are added."""

    token_embedding: nn.Embedding

    def init_prompt_slot(self) -> None:
        self.register_parameter("prompt", None)

    @property
    def n_prompt(self) -> int:
        return 0 if self.prompt is None else self.prompt.size(0)

    def prepend_prompt(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, D) -> (B, n + T, D)."""
        if self.prompt is None:
            return x
        return torch.cat([self.prompt.unsqueeze(0).expand(x.shape[0], -1, -1), x], dim=1)


def extend_mask(mask: torch.Tensor, n: int) -> torch.Tensor:
    """A (B, T) attention mask with n leading ones (for prepended virtual tokens)."""
    if n == 0:
        return mask
    return torch.cat([torch.ones(mask.shape[0], n, dtype=mask.dtype, device=mask.device), mask], dim=1)


class PrefixSlot:
    """Mixin for an attention module with ``kv_heads`` and ``head_dim`` attributes. In forward,
    after projecting (and rotating) keys and values to (B, kv_heads, T, head_dim), call
    ``add_prefix(k, v, bias)`` where bias is the additive attention mask (B or 1, 1, Tq, Tk)."""

    kv_heads: int
    head_dim: int

    def init_prefix_slot(self) -> None:
        self.register_parameter("prefix_key", None)
        self.register_parameter("prefix_value", None)

    def add_prefix(self, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor):
        if self.prefix_key is None:
            return k, v, bias
        b = k.shape[0]
        pk = self.prefix_key.unsqueeze(0).expand(b, -1, -1, -1)
        pv = self.prefix_value.unsqueeze(0).expand(b, -1, -1, -1)
        n = self.prefix_key.shape[1]
        # Every query may attend to every prefix row: zero bias on n new leading key columns.
        return torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2), F.pad(bias, (n, 0))


class ParallelSlot:
    """Mixin for a block with an FFN sub-layer of width ``hidden_size``; in forward the FFN
    output gets ``+ parallel_ffn(ffn_input)``."""

    hidden_size: int

    def init_parallel_slot(self) -> None:
        self.ffn_parallel = None

    def parallel_ffn(self, x: torch.Tensor) -> torch.Tensor | float:
        return 0.0 if self.ffn_parallel is None else self.ffn_parallel(x)
