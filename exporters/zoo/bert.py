"""A plain-PyTorch BERT encoder with a sequence-classification head (mean pooling, as
sentence-transformers pools MiniLM). Module names follow Hugging Face's BertModel so real
checkpoints load as they are, PEFT adapter keys match, and LoRA targets read `query` /
`value` as users expect. Blocks declare PEFT slots (prompt, prefix, parallel adapter)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from edgepeft.exporters.peft.slots import ParallelSlot, PrefixSlot, PromptSlot, extend_mask
from edgepeft.exporters.zoo.parts import LeanParts


@dataclass(frozen=True)
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 384
    num_hidden_layers: int = 6
    num_attention_heads: int = 12
    intermediate_size: int = 1536
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12


class BertEmbeddings(nn.Module, PromptSlot):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(c.vocab_size, c.hidden_size)
        self.position_embeddings = nn.Embedding(c.max_position_embeddings, c.hidden_size)
        self.token_type_embeddings = nn.Embedding(c.type_vocab_size, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.init_prompt_slot()

    @property
    def token_embedding(self) -> nn.Embedding:
        return self.word_embeddings

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # Virtual prompt tokens are prepended to the word embeddings, then positions and the
        # token type are added over the whole sequence (as PEFT feeds inputs_embeds to BERT).
        x = self.prepend_prompt(self.word_embeddings(input_ids))
        pos = torch.arange(x.shape[1], device=input_ids.device).unsqueeze(0)
        # Single-segment inputs: token type 0 everywhere (row 0 of the table, broadcast).
        x = x + self.position_embeddings(pos) + self.token_type_embeddings.weight[0]
        return self.LayerNorm(x)


class BertSelfAttention(nn.Module, PrefixSlot):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.heads = self.kv_heads = c.num_attention_heads
        self.head_dim = c.hidden_size // c.num_attention_heads
        self.query = nn.Linear(c.hidden_size, c.hidden_size)
        self.key = nn.Linear(c.hidden_size, c.hidden_size)
        self.value = nn.Linear(c.hidden_size, c.hidden_size)
        self.init_prefix_slot()

    def forward(self, x: torch.Tensor, mask_bias: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q = self.query(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = self.key(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        v = self.value(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k, v, mask_bias = self.add_prefix(k, v, mask_bias)
        att = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_dim) + mask_bias
        out = torch.matmul(torch.softmax(att, dim=-1), v)
        return out.transpose(1, 2).reshape(b, t, d)


class BertSelfOutput(nn.Module):
    def __init__(self, c: BertConfig, d_in: int):
        super().__init__()
        self.dense = nn.Linear(d_in, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, h: torch.Tensor, residual: torch.Tensor, parallel: torch.Tensor | float = 0.0) -> torch.Tensor:
        return self.LayerNorm(self.dense(h) + parallel + residual)


class BertAttention(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.self = BertSelfAttention(c)
        self.output = BertSelfOutput(c, c.hidden_size)

    def forward(self, x: torch.Tensor, mask_bias: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(x, mask_bias), x)


class BertIntermediate(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.dense = nn.Linear(c.hidden_size, c.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(x))


class BertLayer(nn.Module, ParallelSlot):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.hidden_size = c.hidden_size
        self.attention = BertAttention(c)
        self.intermediate = BertIntermediate(c)
        self.output = BertSelfOutput(c, c.intermediate_size)
        self.init_parallel_slot()

    def forward(self, x: torch.Tensor, mask_bias: torch.Tensor) -> torch.Tensor:
        a = self.attention(x, mask_bias)
        return self.output(self.intermediate(a), a, self.parallel_ffn(a))


class BertEncoder(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(c) for _ in range(c.num_hidden_layers))


class BertForSequenceClassification(nn.Module):
    """forward(input_ids, attention_mask) -> logits (batch, num_labels)."""

    PEFT_SITES = {
        "attention_output": r"^encoder\.layer\.\d+\.attention\.output\.dense$",
        "ffn_output": r"^encoder\.layer\.\d+\.output\.dense$",
        "layers": r"^encoder\.layer\.\d+$",
    }

    def __init__(self, config: BertConfig, num_labels: int):
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)
        self.classifier = nn.Linear(config.hidden_size, num_labels)

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Mean-pooled sentence embedding (what all-MiniLM-L6-v2 was trained to produce);
        virtual prompt tokens, if any, are pooled with the text."""
        x, mask_bias = self._pre(input_ids, attention_mask)
        for layer in self.encoder.layer:
            x = layer(x, mask_bias)
        return self._pool(x, attention_mask)

    def _pre(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m = extend_mask(attention_mask, self.embeddings.n_prompt).to(torch.float32)
        return self.embeddings(input_ids), ((1.0 - m) * -1e4)[:, None, None, :]

    def _pool(self, x: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        w = extend_mask(attention_mask, self.embeddings.n_prompt).to(torch.float32).unsqueeze(-1)
        return (x * w).sum(dim=1) / w.sum(dim=1).clamp(min=1e-9)

    def _post(self, h: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.classifier(self._pool(h, attention_mask))

    def lean_parts(self) -> LeanParts:
        return LeanParts(pre=self._pre, blocks=list(self.encoder.layer), post=self._post)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(input_ids, attention_mask))
