"""LoRA on nn.Conv1d and nn.Conv2d of any kernel, as PEFT's conv LoRA: A is a convolution
with the base's kernel, stride, padding and dilation down to r channels, B a pointwise one
back up: y = conv(x) + s * B(A(x)). Shapes (r, in, *kernel) and (out, r, 1, ...)."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from edgepeft.exporters.peft.lora_base import LoraBase, kaiming_a

def conv_refusal(layer: nn.Conv1d | nn.Conv2d, freeze_a: bool) -> str | None:
    """Why LoRA cannot wrap this convolution (None: it can)."""
    if layer.groups != 1:
        return (f"it is a grouped/depthwise convolution (groups={layer.groups}): a low-rank update does not fit "
                "its per-group weight; target the pointwise (1x1) convolutions around it, or use BitFit")
    if layer.padding_mode != "zeros":
        return f"its padding_mode is {layer.padding_mode!r}; only zero padding is supported"
    return None


class LoraConv(LoraBase):
    def __init__(self, base: nn.Conv1d | nn.Conv2d, rank: int, scaling: float, freeze_a: bool,
                 generator: torch.Generator):
        super().__init__(base, scaling)
        k = tuple(base.kernel_size)
        fan_in = base.in_channels * math.prod(k)
        self.init_ab(kaiming_a((rank, base.in_channels, *k), fan_in, generator),
                     torch.zeros((base.out_channels, rank, *[1] * len(k))), freeze_a)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        conv = F.conv1d if isinstance(base, nn.Conv1d) else F.conv2d
        h = conv(x, self.lora_A, stride=base.stride, padding=base.padding, dilation=base.dilation)
        return base(x) + conv(h, self.lora_B) * self.scaling
