"""Interop with Hugging Face PEFT both ways, on the tiny BERT (same module names as
transformers' BertModel): an adapter trained on the device loads with
peft.PeftModel.from_pretrained and gives the runtime's outputs; an adapter trained with PEFT
on a host starts a bundle (export_bundle(init_adapter=...))."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from conftest import ORT_ONLY  # noqa: E402
from edgepeft.errors import AdapterError  # noqa: E402
from edgepeft.exporters import export_bundle, load_model  # noqa: E402
from edgepeft.runtime import OptimizerSpec, Session  # noqa: E402
from edgepeft.specs import LoraSpec  # noqa: E402


class HFMeanPoolClassifier(transformers.BertModel):
    """transformers' BertModel + a mean-pooled `classifier`: the zoo model's structure."""

    def __init__(self, config, num_labels):
        super().__init__(config, add_pooling_layer=False)
        self.classifier = torch.nn.Linear(config.hidden_size, num_labels)

    def forward(self, input_ids=None, attention_mask=None, **_):
        h = super().forward(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.unsqueeze(-1).float()
        return self.classifier((h * m).sum(1) / m.sum(1).clamp(min=1e-9))


def hf_twin(src):
    c = src.model.config
    cfg = transformers.BertConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_hidden_layers=c.num_hidden_layers,
        num_attention_heads=c.num_attention_heads, intermediate_size=c.intermediate_size,
        max_position_embeddings=c.max_position_embeddings, layer_norm_eps=c.layer_norm_eps, hidden_act="gelu")
    model = HFMeanPoolClassifier(cfg, len(src.labels)).eval()
    missing, unexpected = model.load_state_dict(src.model.state_dict(), strict=False)
    assert not unexpected and not [k for k in missing if "position_ids" not in k]
    return model


def logits_of(model, batch):
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(batch.feeds["input_ids"]),
                    attention_mask=torch.from_numpy(batch.feeds["attention_mask"]))
    return (out if isinstance(out, torch.Tensor) else out.logits).numpy()


SPEC = LoraSpec(rank=4, alpha=8.0, targets=("query", "value"), modules_to_save=("classifier",))


# The tolerances the README quotes. Over an fp32 base PEFT gives the runtime's logits to 1e-5;
# over the int8 base the runtime's frozen weights are quantized and PEFT's (transformers') are
# not, so the logits differ by the quantization (1.7e-3 measured on the tiny encoder, logits ~0.8).
INTEROP_ATOL = {"none": 1e-5, "int8": 3e-3}


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("zoo, quant", [("tiny-encoder", "none"), ("tiny-encoder", "int8"),
                                        pytest.param("minilm", "none", marks=pytest.mark.slow)])
def test_device_adapter_loads_in_peft(tmp_path, train_examples, zoo, quant):
    src = load_model(zoo, labels=("neg", "pos"))
    res = export_bundle(src, methods=[SPEC], quant=quant, out=tmp_path / "b.edgepeft", backends=ORT_ONLY)
    s = Session.open(res.path, adapter="alice", store=tmp_path / "st", cache_dir=tmp_path / "c",
                     optimizer=OptimizerSpec(lr=1e-2), threads=1)
    for _ in range(5):
        s.train_step(train_examples)
    folder = s.save_adapter()
    cfg = json.loads((folder / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["modules_to_save"] == ["classifier"]
    pm = peft.PeftModel.from_pretrained(hf_twin(src), str(folder)).eval()
    b = s.encoder.batch(train_examples)
    theirs, ours = logits_of(pm, b), s.infer(b.feeds)
    assert np.abs(ours).max() > 0.1  # trained, not the zero-init identity
    np.testing.assert_allclose(theirs, ours, rtol=0, atol=INTEROP_ATOL[quant])


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_peft_adapter_starts_a_bundle(tmp_path, train_examples):
    src = load_model("tiny-encoder", labels=("neg", "pos"))
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], modules_to_save=["classifier"])
    pm = peft.get_peft_model(hf_twin(src), cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # stand in for host training: non-trivial values everywhere
        for n, p in pm.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    pm.save_pretrained(tmp_path / "hf_adapter")
    res = export_bundle(src, methods=[SPEC], quant="none", out=tmp_path / "b.edgepeft", backends=ORT_ONLY,
                        init_adapter=tmp_path / "hf_adapter")
    s = Session.open(res.path, adapter="x", store=tmp_path / "st", cache_dir=tmp_path / "c", threads=1)
    b = s.encoder.batch(train_examples)
    np.testing.assert_allclose(s.infer(b.feeds), logits_of(pm.eval(), b), atol=1e-5)


@pytest.mark.parametrize("change, needle", [
    (lambda d: _set_cfg(d, r=8), "rank r=8"),
    (lambda d: _set_cfg(d, lora_alpha=32), "lora_alpha=32"),
    (lambda d: _set_cfg(d, peft_type="IA3"), "'IA3'"),
    (lambda d: (d / "adapter_model.safetensors").unlink(), "not a PEFT adapter folder"),
])
def test_bad_init_adapter_is_refused(tmp_path, change, needle):
    src = load_model("tiny-encoder", labels=("neg", "pos"))
    pm = peft.get_peft_model(hf_twin(src), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"]))
    pm.save_pretrained(tmp_path / "a")
    change(tmp_path / "a")
    with pytest.raises(AdapterError, match=needle):
        export_bundle(src, methods=[SPEC], quant="none", out=tmp_path / "b.edgepeft", init_adapter=tmp_path / "a", backends=ORT_ONLY)
    assert not (tmp_path / "b.edgepeft").exists()


def test_init_adapter_with_wrong_targets_is_refused(tmp_path):
    src = load_model("tiny-encoder", labels=("neg", "pos"))
    pm = peft.get_peft_model(hf_twin(src), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["key"]))
    pm.save_pretrained(tmp_path / "a")
    with pytest.raises(AdapterError, match="no place in this export"):
        export_bundle(src, methods=[SPEC], quant="none", out=tmp_path / "b.edgepeft", init_adapter=tmp_path / "a", backends=ORT_ONLY)
    shutil.rmtree(tmp_path / "a")


def _set_cfg(folder, **kw):
    p = folder / "adapter_config.json"
    cfg = json.loads(p.read_text())
    cfg.update(kw)
    p.write_text(json.dumps(cfg))
