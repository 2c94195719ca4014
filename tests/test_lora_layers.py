"""LoRA on layers whose owners read their weights directly (eager PyTorch, no export): torch's
transformer layers in every batch_first x norm_first setting give, with LoRA injected, exactly
what the same layers with the merged weights W + s B A give, in training-style calls and in
eval under no_grad (where torch's fused fast paths would otherwise skip the adapters)."""
from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn as nn

from edgepeft.exporters.peft import LoraLinear, LoraMultiheadAttention, inject
from edgepeft.exporters.peft.lora_base import LoraBase
from edgepeft.specs import LoraSpec

D, HEADS, FF = 16, 2, 32
TARGETS = ("self_attn", "multihead_attn", "linear1", "linear2")


def _layer(kind: str, batch_first: bool, norm_first: bool) -> nn.Module:
    kw = dict(dropout=0.0, batch_first=batch_first, norm_first=norm_first)
    if kind == "encoder-layer":
        return nn.TransformerEncoderLayer(D, HEADS, FF, **kw)
    if kind == "encoder":
        return nn.TransformerEncoder(nn.TransformerEncoderLayer(D, HEADS, FF, **kw), 2, enable_nested_tensor=False)
    if kind == "decoder-layer":
        return nn.TransformerDecoderLayer(D, HEADS, FF, **kw)
    return nn.Transformer(D, HEADS, 1, 1, FF, **kw)


def _inputs(kind: str, batch_first: bool) -> tuple[tuple, dict]:
    g = torch.Generator().manual_seed(1)
    shape = (3, 5, D) if batch_first else (5, 3, D)
    a, b = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    causal = nn.Transformer.generate_square_subsequent_mask(5)
    if kind in ("encoder-layer", "encoder"):
        pad = torch.tensor([[False] * 5, [False] * 4 + [True], [False] * 3 + [True] * 2])
        return (a,), {"src_key_padding_mask": pad}
    if kind == "decoder-layer":
        return (a, b), {"tgt_mask": causal, "tgt_is_causal": True}
    return (a, b), {"tgt_mask": causal, "tgt_is_causal": True}


def _merged(original: nn.Module, injected: nn.Module) -> nn.Module:
    """``original`` with every LoRA layer's update folded into the weight it adapts."""
    merged = copy.deepcopy(original)
    with torch.no_grad():
        for name, layer in injected.named_modules():
            if not isinstance(layer, LoraBase):
                continue
            target = merged.get_submodule(".".join(p for p in name.split(".") if p != "base_layer"))
            delta = (layer.lora_B @ layer.lora_A) * layer.scaling
            if isinstance(layer, LoraMultiheadAttention):
                target.in_proj_weight += delta
            else:
                target.weight += delta
    return merged


CASES = list(itertools.product(("encoder-layer", "encoder", "decoder-layer", "transformer"), (True, False),
                               (True, False)))


@pytest.mark.parametrize("kind, batch_first, norm_first", CASES,
                         ids=[f"{k}-{'bf' if b else 'sf'}-{'pre' if n else 'post'}norm" for k, b, n in CASES])
def test_lora_on_torch_transformer_layers(kind, batch_first, norm_first):
    torch.manual_seed(0)
    original = _layer(kind, batch_first, norm_first).eval()
    args, kwargs = _inputs(kind, batch_first)
    with torch.no_grad():
        base_out = original(*args, **kwargs)
    model = copy.deepcopy(original)
    spec = LoraSpec(rank=2, alpha=4, target_pattern=rf"^(.*\.)?({'|'.join(TARGETS)})$")
    trainables = inject(model, [spec])
    assert trainables and all(t.param.requires_grad for t in trainables)
    # B = 0: the adapted model is the base model (with grad, and in eval without grad).
    torch.testing.assert_close(model(*args, **kwargs), base_out, rtol=0, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(model(*args, **kwargs), base_out, rtol=0, atol=1e-6)
        for t in trainables:
            t.param.normal_(0, 0.3)
        want = _merged(original, model)(*args, **kwargs)   # torch's own layers (fast paths allowed)
        got = model(*args, **kwargs)
    assert (got - base_out).abs().max() > 1e-2, "the adapters change the output"
    torch.testing.assert_close(got, want, rtol=0, atol=2e-5)
    torch.testing.assert_close(model(*args, **kwargs), want, rtol=0, atol=2e-5)   # with grad: the general path
    names = {t.name.rsplit(".", 1)[0] for t in trainables}
    n_attn = sum(isinstance(m, nn.MultiheadAttention) for m in original.modules())
    n_ffn = sum(isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in ("linear1", "linear2")
                for n, m in original.named_modules())
    assert len(names) == 2 * n_attn + n_ffn   # in_proj and out_proj per attention, each FFN linear


def test_a_wrapped_layer_shows_its_base_weights():
    model = nn.Sequential(nn.Linear(4, 3))
    base = model[0]
    inject(model, [LoraSpec(rank=2, targets=("0",))])
    wrapped = model[0]
    assert isinstance(wrapped, LoraLinear)
    assert wrapped.weight is base.weight and wrapped.bias is base.bias and wrapped.in_features == 4
    with pytest.raises(AttributeError):
        wrapped.no_such_attribute  # noqa: B018


class _Mixed(nn.Module):
    """One of each layer kind LoRA wraps, on one input path."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.conv1d = nn.Conv1d(8, 8, 3, stride=2, padding=1)
        self.conv2d = nn.Conv2d(1, 4, 3, padding=1, dilation=1)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.fc = nn.Linear(8, 3)

    def forward(self, ids):
        x = self.conv1d(self.embed(ids).transpose(1, 2)).transpose(1, 2)          # (B, T/2, 8)
        x = self.conv2d(x.unsqueeze(1)).mean(1)                                    # (B, T/2, 8)
        return self.fc(self.attn(x, x, x, need_weights=False)[0].mean(1))


def _peft_and_ours(targets: list[str]):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = _Mixed().eval()
    cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=targets, init_lora_weights=False)
    theirs = peft.get_peft_model(copy.deepcopy(base), cfg).eval()
    state = peft.get_peft_model_state_dict(theirs)
    ours = copy.deepcopy(base)
    trainables = inject(ours, [LoraSpec(rank=2, alpha=4, targets=tuple(targets))])
    with torch.no_grad():
        for t in trainables:
            t.param.copy_(state[t.peft_key])
    return base, theirs, ours, state, trainables


def test_lora_layers_match_hugging_face_peft():
    """PEFT's LoRA on Embedding, Conv1d, k x k Conv2d and Linear, with its (random) adapter loaded
    into edgepeft's layers by the PEFT keys they declare: the same logits. On MultiheadAttention
    the keys and shapes are PEFT's; its values are not compared with PEFT 0.21, whose forward adds
    the out_proj update twice (huggingface/peft#3774): test_lora_on_torch_transformer_layers
    checks ours against the merged weights W + s B A instead."""
    ids = torch.randint(0, 20, (2, 6), generator=torch.Generator().manual_seed(1))
    base, theirs, ours, state, trainables = _peft_and_ours(["embed", "conv1d", "conv2d", "fc"])
    assert sorted(t.peft_key for t in trainables) == sorted(state)   # same tensors under the same keys
    with torch.no_grad():
        want, got = theirs(ids), ours(ids)
        assert (want - base(ids)).abs().max() > 1e-3, "PEFT's random adapter changes the output"
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    _, _, _, state, trainables = _peft_and_ours(["attn"])
    assert {t.peft_key: tuple(t.param.shape) for t in trainables} == {k: tuple(v.shape) for k, v in state.items()}
