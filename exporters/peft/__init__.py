"""PEFT injection: one module per method, registered here (adding a method is its module and
one line in ``INJECTORS``)."""
from __future__ import annotations

from typing import Callable, Sequence

import torch.nn as nn

from edgepeft.errors import SpecError
from edgepeft.exporters.peft.base import Trainable
from edgepeft.exporters.peft.lora import LoraLinear, inject_lora
from edgepeft.specs import MethodSpec

INJECTORS: dict[str, Callable[[nn.Module, MethodSpec], list[Trainable]]] = {
    "lora": inject_lora,
}


def inject(model: nn.Module, methods: Sequence[MethodSpec]) -> list[Trainable]:
    """Freeze ``model`` (in place), inject each method, return the trainable tensors in a
    stable order. Two methods claiming one tensor is an error."""
    if not methods:
        raise SpecError("give at least one PEFT method, e.g. methods=[LoraSpec(rank=8)]")
    for p in model.parameters():
        p.requires_grad_(False)
    trainables: list[Trainable] = []
    for spec in methods:
        if spec.method not in INJECTORS:
            raise SpecError(f"method {spec.method!r} has no injector; supported: {sorted(INJECTORS)}")
        trainables.extend(INJECTORS[spec.method](model, spec))
    seen: dict[str, str] = {}
    for t in trainables:
        if t.name in seen:
            raise SpecError(f"tensor {t.name!r} is claimed by both {seen[t.name]!r} and {t.method!r}")
        seen[t.name] = t.method
        t.param.requires_grad_(True)
    return trainables


__all__ = ["INJECTORS", "LoraLinear", "Trainable", "inject"]
