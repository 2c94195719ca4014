"""LoRA on nn.Embedding, as PEFT: y = E[ids] + s * A^T[ids] B^T with A (r, num_embeddings)
zero-initialised and B (embedding_dim, r) normal, stored under PEFT's ``lora_embedding_A`` /
``lora_embedding_B`` keys. A model that reads the table itself (a tied LM head) sees the
frozen base table through the wrapper."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from edgepeft.exporters.peft.lora_base import LoraBase


def embedding_refusal(layer: nn.Embedding, freeze_a: bool) -> str | None:
    if freeze_a:
        return ("LoRA-FA (freeze_a) keeps A fixed, and an embedding's A starts at zero (PEFT's init), so it "
                "would never learn; export the embedding without freeze_a or leave it out of the targets")
    if layer.max_norm is not None or layer.sparse:
        return "it renormalises rows (max_norm) or has sparse gradients; neither can be exported for training"
    return None


class LoraEmbedding(LoraBase):
    A_NAME, B_NAME, PEFT_SUFFIX = "lora_embedding_A", "lora_embedding_B", ""

    def __init__(self, base: nn.Embedding, rank: int, scaling: float, freeze_a: bool, generator: torch.Generator):
        super().__init__(base, scaling)
        # PEFT's init: A zero, B normal (the opposite of Linear's: A alone would not reach a
        # row the batch does not gather).
        b = torch.empty((base.embedding_dim, rank)).normal_(generator=generator)
        self.init_ab(torch.zeros((rank, base.num_embeddings)), b, freeze_a)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        after_a = F.embedding(ids, self.lora_embedding_A.t(), padding_idx=self.base_layer.padding_idx)
        return self.base_layer(ids) + (after_a @ self.lora_embedding_B.t()) * self.scaling
