"""Real-model checks on all-MiniLM-L6-v2 and BBC News (marked slow: ~1 min together)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from edgepeft.cli.datasets import bbc_news, user_split
from edgepeft.runtime import OptimizerSpec, Session
from edgepeft.specs import LoraSpec

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    from edgepeft.exporters import export_bundle, load_model

    d = tmp_path_factory.mktemp("minilm")
    res = export_bundle(load_model("minilm"), out=d / "minilm.edgepeft", quant="int8", backends=("ort-training",),
                        methods=[LoraSpec(rank=8, targets=("query", "value"), modules_to_save=("classifier",))])
    train, test = user_split(bbc_news(("business", "sport", "tech")), n_train=48, n_test=24, seed=5)
    return res, d, train, test


def _session(res, d, **kw):
    return Session.open(res.path, store=d / "store", cache_dir=d / "cache", threads=2, **kw)


def test_manifest_of_the_real_bundle(minilm):
    res, *_ = minilm
    m = res.manifest
    # LoRA r8 on 6 layers x (query, value): 12 x (8x384 + 384x8) = 73,728; head 384x5+5 = 1,925.
    assert m.trainable_params == 73_728 + 1_925
    assert m.trainable_params / m.base_params < 0.005
    assert "embeddings.word_embeddings.weight" in m.quantization["tensors"]
    assert m.quantization["int8_bytes"] < m.quantization["fp32_bytes"] / 3.9


def test_int8_parity_loss_grads_logits(minilm):
    res, d, train, _ = minilm
    s = _session(res, d)
    b = s.encoder.batch(train[:8])
    ids, mask, y = (torch.from_numpy(b.feeds["input_ids"]), torch.from_numpy(b.feeds["attention_mask"]),
                    torch.from_numpy(b.labels))
    ref = res.reference
    ref.zero_grad()
    logits = ref(ids, mask)
    loss = F.cross_entropy(logits, y)
    loss.backward()
    rt_loss, grads = s.backend.forward_backward(b)
    assert abs(rt_loss - loss.item()) < 1e-5
    np.testing.assert_allclose(s.infer(b.feeds), logits.detach().numpy(), atol=2e-5)
    params = dict(ref.named_parameters())
    for name, g in grads.items():
        np.testing.assert_allclose(g, params[name].grad.numpy(), atol=2e-5, rtol=1e-3, err_msg=name)


def test_personalization_improves_held_out(minilm):
    res, d, train, test = minilm
    s = _session(res, d, adapter="carol", optimizer=OptimizerSpec(lr=3e-3), memory_budget="1GB")
    before = s.evaluate(s.encoder.batches(test, 12))
    for batch in s.encoder.batches(train, 8, shuffle=True):
        s.train_step(batch)
    after = s.evaluate(s.encoder.batches(test, 12))
    assert after.accuracy > before.accuracy + 0.3, (before, after)
    assert s.budget.peaks["train_step"] < 1 << 30


def test_demo_smoke(tmp_path, monkeypatch):
    from edgepeft.cli.demo import run_demo

    monkeypatch.setenv("EDGEPEFT_CACHE", str(tmp_path / "cache"))
    out = run_demo(tmp_path / "demo", steps=2, n_test=6)
    for user, r in out["users"].items():
        assert out["restored"][user] == r["eval"], user  # swap back restores loss and accuracy exactly
        assert r["steps"] == 2
    assert (tmp_path / "demo" / "adapters" / "alice" / "adapter_model.safetensors").is_file()


def test_minilm_matches_transformers(minilm):
    """The zoo's plain-torch BERT reproduces transformers' BertModel on the packaged weights
    (mean-pooled sentence embeddings), before any PEFT injection."""
    transformers = pytest.importorskip("transformers")
    from edgepeft.exporters.zoo import load_model, minilm_dir

    _, _, train, _ = minilm
    src = load_model("minilm")
    hf = transformers.BertModel.from_pretrained(str(minilm_dir()), add_pooling_layer=False).eval()
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(src.tokenizer_json)
    tok.enable_truncation(128)
    tok.enable_padding()
    encs = tok.encode_batch([e.text for e in train[:4]] + ["a short one"])
    ids = torch.tensor([e.ids for e in encs])
    mask = torch.tensor([e.attention_mask for e in encs])
    with torch.no_grad():
        ours = src.model.embed(ids, mask)
        h = hf(input_ids=ids, attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).float()
        theirs = (h * m).sum(1) / m.sum(1)
    assert float((ours - theirs).abs().max()) < 1e-5
