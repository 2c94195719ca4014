"""LoRA for nn.Linear: y = W x + b + (alpha / r) * B (A x)."""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from edgepeft import names
from edgepeft.exporters.peft.base import Trainable, find_modules, set_submodule
from edgepeft.specs import LoraSpec


class LoraLinear(nn.Module):
    """Wraps a frozen Linear (kept as ``base_layer``, as PEFT names it) with A (r x in) and
    B (out x r). B starts at zero, so the injected model equals the base model."""

    def __init__(self, base: nn.Linear, rank: int, scaling: float, generator: torch.Generator):
        super().__init__()
        self.base_layer = base
        self.scaling = scaling
        a = torch.empty(rank, base.in_features)
        # PEFT's init: kaiming-uniform A (a=sqrt(5), as nn.Linear), zero B.
        bound = 1.0 / math.sqrt(base.in_features)
        a.uniform_(-bound, bound, generator=generator)
        self.lora_A = nn.Parameter(a)
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + (x @ self.lora_A.t() @ self.lora_B.t()) * self.scaling

    def adapter_params(self) -> dict[str, nn.Parameter]:
        """The declared trainable tensors of this layer (suffix -> parameter)."""
        return {"lora_A": self.lora_A, "lora_B": self.lora_B}


def inject_lora(model: nn.Module, spec: LoraSpec) -> list[Trainable]:
    g = torch.Generator().manual_seed(spec.init_seed)
    out: list[Trainable] = []
    for mod_name, layer in find_modules(model, spec.targets, spec.target_pattern, nn.Linear, "LoRA"):
        wrapped = LoraLinear(layer, spec.rank, spec.scaling, g)
        set_submodule(model, mod_name, wrapped)
        for suffix, p in wrapped.adapter_params().items():
            out.append(Trainable(f"{mod_name}.{suffix}", f"{names.PEFT_PREFIX}{mod_name}.{suffix}.weight", "lora", p))
    saved = find_modules(model, spec.modules_to_save, None, nn.Module, "modules_to_save") if spec.modules_to_save else []
    for mod_name, mod in saved:
        for pname, p in mod.named_parameters():
            full = f"{mod_name}.{pname}"
            out.append(Trainable(full, f"{names.PEFT_PREFIX}{full}", "modules_to_save", p))
    return out
