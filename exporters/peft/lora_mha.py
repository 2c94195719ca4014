"""LoRA on nn.MultiheadAttention, as PEFT: one low-rank update of the packed input projection
(B is (3E, r), so its row blocks adapt the q, k and v slices) and a LoRA Linear on
``out_proj``. MultiheadAttention hands its weight tensors to the functional attention instead
of calling its sub-layers, so the wrapper does the same with merged weights W + s B A (their
gradients reach A and B through the sum)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from edgepeft.exporters.peft.lora_base import LoraBase, LoraLinear, kaiming_a


def mha_refusal(layer: nn.MultiheadAttention, freeze_a: bool) -> str | None:
    if not layer._qkv_same_embed_dim:
        return (f"its keys/values have other widths (kdim={layer.kdim}, vdim={layer.vdim}) than its embed_dim "
                f"{layer.embed_dim}, so it has no packed input projection; LoRA supports attention with "
                "kdim == vdim == embed_dim")
    return None


def delta(layer: LoraBase) -> torch.Tensor:
    """s * B A of a Linear-shaped LoRA pair."""
    return (layer.lora_B @ layer.lora_A) * layer.scaling


class LoraMultiheadAttention(LoraBase):
    def __init__(self, base: nn.MultiheadAttention, rank: int, scaling: float, freeze_a: bool,
                 generator: torch.Generator):
        super().__init__(base, scaling)
        e = base.embed_dim
        self.init_ab(kaiming_a((rank, e), e, generator), torch.zeros((3 * e, rank)), freeze_a)
        # As PEFT: out_proj becomes a LoRA Linear inside the base (base_layer.out_proj.lora_A ...).
        base.out_proj = LoraLinear(base.out_proj, rank, scaling, freeze_a, generator)

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        """nn.MultiheadAttention.forward's general path, on merged weights."""
        m, out_proj = self.base_layer, self.base_layer.out_proj
        batched = query.dim() == 3
        if m.batch_first and batched:
            query, key, value = (x.transpose(1, 0) for x in (query, key, value))
        out, weights = F.multi_head_attention_forward(
            query, key, value, m.embed_dim, m.num_heads, m.in_proj_weight + delta(self), m.in_proj_bias,
            m.bias_k, m.bias_v, m.add_zero_attn, m.dropout, out_proj.base_layer.weight + delta(out_proj),
            out_proj.base_layer.bias, training=m.training, key_padding_mask=key_padding_mask,
            need_weights=need_weights, attn_mask=attn_mask, average_attn_weights=average_attn_weights,
            is_causal=is_causal)
        if m.batch_first and batched:
            out = out.transpose(1, 0)
        return out, weights

