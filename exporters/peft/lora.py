"""LoRA for nn.Linear and pointwise (1x1) nn.Conv2d: y = base(x) + s * B(A(x))."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from edgepeft.errors import TargetError
from edgepeft.exporters.peft.base import InjectContext, Trainable, declare, find_modules, set_submodule
from edgepeft.exporters.peft.selective import select_modules
from edgepeft.specs import LoraSpec


class _LoraBase(nn.Module):
    """A (rank x in) and B (out x rank) around a frozen ``base_layer`` (PEFT's name). B starts
    at zero so the adapted model equals the base. With ``freeze_a`` (LoRA-FA), A is a buffer:
    frozen, exported with the base, and absent from the adapter."""

    def _init_ab(self, a_shape: tuple[int, ...], b_shape: tuple[int, ...], fan_in: int, freeze_a: bool,
                 generator: torch.Generator) -> None:
        bound = 1.0 / math.sqrt(fan_in)  # PEFT's kaiming-uniform(a=sqrt(5)) bound
        a = torch.empty(a_shape).uniform_(-bound, bound, generator=generator)
        if freeze_a:
            self.register_buffer("lora_A", a)
        else:
            self.lora_A = nn.Parameter(a)
        self.lora_B = nn.Parameter(torch.zeros(b_shape))

    def adapter_params(self) -> dict[str, nn.Parameter]:
        """The declared trainable tensors of this layer (suffix -> parameter)."""
        out = {"lora_B": self.lora_B}
        if isinstance(self.lora_A, nn.Parameter):
            out = {"lora_A": self.lora_A, **out}
        return out


class LoraLinear(_LoraBase):
    def __init__(self, base: nn.Linear, rank: int, scaling: float, freeze_a: bool, generator: torch.Generator):
        super().__init__()
        self.base_layer = base
        self.scaling = scaling
        self._init_ab((rank, base.in_features), (base.out_features, rank), base.in_features, freeze_a, generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + (x @ self.lora_A.t() @ self.lora_B.t()) * self.scaling


class LoraConv1x1(_LoraBase):
    """Pointwise convolutions (the expand/project convs of MobileNet/EfficientNet blocks). A and
    B have PEFT's Conv2d shapes (r, in, 1, 1) and (out, r, 1, 1)."""

    def __init__(self, base: nn.Conv2d, rank: int, scaling: float, freeze_a: bool, generator: torch.Generator):
        super().__init__()
        self.base_layer = base
        self.scaling = scaling
        self._init_ab((rank, base.in_channels, 1, 1), (base.out_channels, rank, 1, 1), base.in_channels, freeze_a,
                      generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.conv2d(x, self.lora_A, stride=self.base_layer.stride)
        return self.base_layer(x) + F.conv2d(h, self.lora_B) * self.scaling


def _wrap(layer: nn.Module, name: str, spec: LoraSpec, g: torch.Generator) -> _LoraBase:
    if isinstance(layer, nn.Linear):
        return LoraLinear(layer, spec.rank, spec.scaling, spec.freeze_a, g)
    if layer.kernel_size != (1, 1) or layer.groups != 1 or layer.dilation != (1, 1) or layer.padding not in (0, (0, 0)):
        raise TargetError(f"LoRA: Conv2d {name!r} is not pointwise (kernel {layer.kernel_size}, groups {layer.groups}); "
                          "only 1x1 convolutions are supported")
    return LoraConv1x1(layer, spec.rank, spec.scaling, spec.freeze_a, g)


def inject_lora(model: nn.Module, spec: LoraSpec, ctx: InjectContext) -> list[Trainable]:
    g = torch.Generator().manual_seed(spec.init_seed)
    out: list[Trainable] = []
    for mod_name, layer in find_modules(model, spec.targets, spec.target_pattern, (nn.Linear, nn.Conv2d), "LoRA"):
        wrapped = _wrap(layer, mod_name, spec, g)
        set_submodule(model, mod_name, wrapped)
        for t in declare(mod_name, wrapped.adapter_params(), "lora"):
            # PEFT stores LoRA matrices as `<module>.lora_A.weight`.
            out.append(Trainable(t.name, t.peft_key + ".weight", t.method, t.param))
    if spec.modules_to_save:
        out += select_modules(model, spec.modules_to_save, "modules_to_save")
    return out
