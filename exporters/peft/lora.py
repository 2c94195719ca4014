"""LoRA: y = base(x) + s * B(A(x)). The layers it wraps are an ordered list (first match
wins): nn.Linear (lora_base), convolutions (lora_conv), embeddings (lora_embedding) and
nn.MultiheadAttention (lora_mha). Anything else is refused with the supported list."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from edgepeft.errors import TargetError
from edgepeft.exporters.peft.base import InjectContext, Trainable, declare, set_submodule
from edgepeft.exporters.peft.lora_base import LoraBase, LoraLinear
from edgepeft.exporters.peft.lora_conv import LoraConv, conv_refusal
from edgepeft.exporters.peft.lora_embedding import LoraEmbedding, embedding_refusal
from edgepeft.exporters.peft.lora_mha import LoraMultiheadAttention, mha_refusal
from edgepeft.exporters.peft.selective import select_modules
from edgepeft.specs import LoraSpec
from edgepeft.specs.base import name_matches


@dataclass(frozen=True)
class Wrapper:
    """One kind of layer LoRA wraps: its types, why a given layer of them cannot be wrapped
    (None: it can), and the wrapper class."""

    kinds: tuple[type[nn.Module], ...]
    refusal: Callable[[nn.Module, bool], str | None]
    cls: type[LoraBase]


WRAPPERS: tuple[Wrapper, ...] = (
    Wrapper((nn.Linear,), lambda layer, freeze_a: None, LoraLinear),
    Wrapper((nn.Conv1d, nn.Conv2d), conv_refusal, LoraConv),
    Wrapper((nn.Embedding,), embedding_refusal, LoraEmbedding),
    Wrapper((nn.MultiheadAttention,), mha_refusal, LoraMultiheadAttention),
)
SUPPORTED = "nn.Linear, nn.Conv1d, nn.Conv2d (any kernel, groups=1), nn.Embedding, nn.MultiheadAttention"
# Why a layer kind is not wrapped, in the user's terms, and what to do instead.
_HINTS: tuple[tuple[type[nn.Module], str], ...] = (
    (nn.RNNBase, "its gates live in fused per-layer tensors that no low-rank wrapper reaches; target the Linear "
                 "layers around it (e.g. the classifier) with LoRA, or train its biases with BitFit"),
    (nn.modules.batchnorm._NormBase, "a normalization layer has no weight matrix; train its bias with BitFit or "
                                     "the whole layer with SelectiveSpec(modules=...)"),
    (nn.LayerNorm, "a normalization layer has no weight matrix; train it with BitFit or SelectiveSpec"),
)


def _refusal(name: str, layer: nn.Module, model: nn.Module) -> str | None:
    """Why ``layer`` (matched by the targets) cannot take LoRA, in the user's terms."""
    parent_name = name.rpartition(".")[0]
    if isinstance(layer, nn.Linear) and isinstance(model.get_submodule(parent_name), nn.MultiheadAttention):
        return (f"it is the output projection of nn.MultiheadAttention {parent_name!r}, which reads its weight "
                f"directly; target the attention module {parent_name.rpartition('.')[2]!r} instead (LoRA then "
                "adapts its q, k, v and output projections)")
    wrapper = next((w for w in WRAPPERS if isinstance(layer, w.kinds)), None)
    if wrapper is not None:
        return None
    hint = next((h for kind, h in _HINTS if isinstance(layer, kind)), None)
    if hint is None:
        children = [n for n, m in layer.named_modules() if n and any(isinstance(m, w.kinds) for w in WRAPPERS)]
        hint = (f"name the layers inside it instead, e.g. {children[:4]}" if children
                else "it holds no layer LoRA wraps; pick another method (BitFit, SelectiveSpec)")
    return f"it is a {type(layer).__name__}: {hint}"


def lora_targets(model: nn.Module, spec: LoraSpec) -> list[tuple[str, nn.Module]]:
    """The modules the spec's targets name, each checked to be wrappable (TargetError naming
    the module, the reason and the fix otherwise)."""
    hits = [(n, m) for n, m in model.named_modules() if n and name_matches(n, spec.targets, spec.target_pattern)]
    if not hits:
        kinds = tuple(k for w in WRAPPERS for k in w.kinds)
        have = [n for n, m in model.named_modules() if n and isinstance(m, kinds)]
        short = sorted({n.rsplit('.', 1)[-1] for n in have})
        raise TargetError(f"LoRA: no layer matches targets {list(spec.targets)}"
                          + (f" / pattern {spec.target_pattern!r}" if spec.target_pattern else "")
                          + f"; the model's layers LoRA can wrap are named {short} (e.g. {have[:3]})")
    for name, layer in hits:
        why = _refusal(name, layer, model)
        if why is None:
            why = next(w for w in WRAPPERS if isinstance(layer, w.kinds)).refusal(layer, spec.freeze_a)
        if why is not None:
            raise TargetError(f"LoRA cannot wrap {name!r}: {why}. LoRA wraps {SUPPORTED}")
    return hits


def inject_lora(model: nn.Module, spec: LoraSpec, ctx: InjectContext) -> list[Trainable]:
    g = torch.Generator().manual_seed(spec.init_seed)
    out: list[Trainable] = []
    for mod_name, layer in lora_targets(model, spec):
        cls = next(w.cls for w in WRAPPERS if isinstance(layer, w.kinds))
        wrapped = cls(layer, spec.rank, spec.scaling, spec.freeze_a, g)
        set_submodule(model, mod_name, wrapped)
        out += _declare(mod_name, wrapped)
    if spec.modules_to_save:
        out += select_modules(model, spec.modules_to_save, "modules_to_save")
    return out


def _declare(mod_name: str, wrapped: LoraBase) -> list[Trainable]:
    """The wrapper's trainables (and those of LoRA layers inside it: an attention module's
    out_proj), with PEFT's keys (`<module>.lora_A.weight`, `<module>.lora_embedding_A`)."""
    out = []
    for sub_name, sub in wrapped.named_modules():
        if isinstance(sub, LoraBase):
            full = f"{mod_name}.{sub_name}" if sub_name else mod_name
            out += [Trainable(t.name, t.peft_key + sub.PEFT_SUFFIX, t.method, t.param)
                    for t in declare(full, sub.adapter_params(), "lora")]
    return out
