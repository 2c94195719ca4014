"""Selective (layer-wise) training: every parameter of the named modules or of the last N
layers. Also serves LoRA's ``modules_to_save``."""
from __future__ import annotations

import torch.nn as nn

from edgepeft.exporters.peft.base import InjectContext, Trainable, declare, find_modules, site_modules
from edgepeft.specs import SelectiveSpec


def select_modules(model: nn.Module, module_names: tuple[str, ...], method: str) -> list[Trainable]:
    out: list[Trainable] = []
    for mod_name, mod in find_modules(model, module_names, None, nn.Module, method):
        out += declare(mod_name, dict(mod.named_parameters()), method)
    return out


def inject_selective(model: nn.Module, spec: SelectiveSpec, ctx: InjectContext) -> list[Trainable]:
    out = select_modules(model, spec.modules, "selective") if spec.modules else []
    if spec.last_n_layers:
        layers = site_modules(model, "layers", "selective `last_n_layers`")
        if spec.last_n_layers > len(layers):
            from edgepeft.errors import SpecError

            raise SpecError(f"`last_n_layers` is {spec.last_n_layers} but the model has {len(layers)} layers")
        for name, mod in layers[-spec.last_n_layers:]:
            out += declare(name, dict(mod.named_parameters()), "selective")
    seen: set[str] = set()
    return [t for t in out if not (t.name in seen or seen.add(t.name))]
