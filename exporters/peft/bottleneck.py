"""Bottleneck adapters: sequential ones wrap the Linear at a declared site (Houlsby: attention
and FFN outputs; Pfeiffer: FFN output); the parallel one fills each block's ParallelSlot."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from edgepeft.errors import TargetError
from edgepeft.exporters.peft.base import InjectContext, Trainable, declare, set_submodule, site_modules, slot_modules
from edgepeft.exporters.peft.slots import ParallelSlot
from edgepeft.specs import BottleneckSpec

_ACT = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh}


class Bottleneck(nn.Module):
    """up(act(down(x))) * scaling; ``up`` starts at zero so the adapted model equals the base."""

    def __init__(self, dim: int, size: int, activation: str, scaling: float, generator: torch.Generator):
        super().__init__()
        self.down = nn.Linear(dim, size)
        self.up = nn.Linear(size, dim)
        self.activation = activation
        self.scaling = scaling
        bound = 1.0 / dim ** 0.5
        with torch.no_grad():
            self.down.weight.uniform_(-bound, bound, generator=generator)
            self.down.bias.zero_()
            self.up.weight.zero_()
            self.up.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(_ACT[self.activation](self.down(x))) * self.scaling


class SequentialAdapter(nn.Module):
    """y = base(x); y + adapter(y)."""

    def __init__(self, base: nn.Module, adapter: Bottleneck):
        super().__init__()
        self.base_layer = base
        self.adapter = adapter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        return y + self.adapter(y)


def inject_bottleneck(model: nn.Module, spec: BottleneckSpec, ctx: InjectContext) -> list[Trainable]:
    g = torch.Generator().manual_seed(spec.init_seed)
    out: list[Trainable] = []
    if spec.kind == "parallel":
        for name, block in slot_modules(model, ParallelSlot, "parallel adapters", "blocks with a parallel-FFN slot"):
            block.ffn_parallel = Bottleneck(block.hidden_size, spec.size, spec.activation, spec.scaling, g)
            out += declare(f"{name}.ffn_parallel", dict(block.ffn_parallel.named_parameters()), spec.method)
        return out
    for site in spec.sites:
        for name, layer in site_modules(model, site, f"{spec.kind} adapters"):
            if not isinstance(layer, nn.Linear):
                raise TargetError(f"{spec.kind} adapter: site {site!r} module {name!r} is a {type(layer).__name__}, "
                                  "not a Linear (was it already wrapped by another method?)")
            wrapped = SequentialAdapter(layer, Bottleneck(layer.out_features, spec.size, spec.activation, spec.scaling, g))
            set_submodule(model, name, wrapped)
            out += declare(f"{name}.adapter", dict(wrapped.adapter.named_parameters()), spec.method)
    return out
