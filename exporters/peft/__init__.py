"""PEFT injection: one module per method, registered here (adding a method is its spec, its
module and one line in ``INJECTORS``)."""
from __future__ import annotations

from typing import Callable, Sequence

import torch.nn as nn

from edgepeft.errors import SpecError
from edgepeft.exporters.peft.base import InjectContext, Trainable
from edgepeft.exporters.peft.bitfit import inject_bitfit
from edgepeft.exporters.peft.bottleneck import inject_bottleneck
from edgepeft.exporters.peft.fast_paths import disable_fast_paths
from edgepeft.exporters.peft.lora import LoraLinear, inject_lora
from edgepeft.exporters.peft.lora_conv import LoraConv
from edgepeft.exporters.peft.lora_embedding import LoraEmbedding
from edgepeft.exporters.peft.lora_mha import LoraMultiheadAttention
from edgepeft.exporters.peft.prefix import inject_prefix
from edgepeft.exporters.peft.prompt import inject_prompt
from edgepeft.exporters.peft.selective import inject_selective
from edgepeft.specs import METHODS, MethodSpec

INJECTORS: dict[str, Callable[[nn.Module, MethodSpec, InjectContext], list[Trainable]]] = {
    "lora": inject_lora,
    "prompt": inject_prompt,
    "prefix": inject_prefix,
    "bitfit": inject_bitfit,
    "bottleneck": inject_bottleneck,
    "selective": inject_selective,
}
assert set(INJECTORS) == set(METHODS), "every registered spec needs an injector"


def inject(model: nn.Module, methods: Sequence[MethodSpec], ctx: InjectContext | None = None) -> list[Trainable]:
    """Freeze ``model`` (in place), inject each method in order, return the trainable tensors
    as one list. Two methods claiming one tensor, or a method given twice, is an error."""
    if not methods:
        raise SpecError("give at least one PEFT method, e.g. methods=[LoraSpec(rank=8)]")
    kinds = [m.method for m in methods]
    dup = sorted({k for k in kinds if kinds.count(k) > 1})
    if dup:
        raise SpecError(f"method(s) {dup} given more than once; give each method one spec")
    ctx = ctx or InjectContext()
    for p in model.parameters():
        p.requires_grad_(False)
    trainables: list[Trainable] = []
    for spec in methods:
        if spec.method not in INJECTORS:
            raise SpecError(f"method {spec.method!r} has no injector; supported: {sorted(INJECTORS)}")
        trainables.extend(INJECTORS[spec.method](model, spec, ctx))
    seen: dict[str, str] = {}
    for t in trainables:
        if t.name in seen:
            raise SpecError(f"hybrid methods overlap: tensor {t.name!r} is claimed by both {seen[t.name]!r} and "
                            f"{t.method!r}; narrow one of them (e.g. BitFit `modules`, selective `modules`)")
        seen[t.name] = t.method
        t.param.requires_grad_(True)
    disable_fast_paths(model)
    return trainables


__all__ = ["INJECTORS", "InjectContext", "LoraConv", "LoraEmbedding", "LoraLinear", "LoraMultiheadAttention",
           "Trainable", "inject"]
