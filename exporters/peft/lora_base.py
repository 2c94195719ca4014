"""What every LoRA layer wrapper shares: the frozen ``base_layer`` (PEFT's name), A and B with
PEFT's initialisation, the declared trainable tensors, and the base's attributes seen through
the wrapper; and the wrapper of nn.Linear.

Torch's own layers read their sub-layers' tensors directly (``nn.TransformerEncoderLayer``
checks ``linear1.weight`` for its fast path; ``nn.MultiheadAttention`` hands ``out_proj.weight``
to the functional attention), so a wrapper answers ``.weight``, ``.bias`` and any other
attribute it does not have itself with the frozen base layer's, as PEFT's wrappers do."""
from __future__ import annotations

import math

import torch
import torch.nn as nn


class LoraBase(nn.Module):
    """A and B around a frozen ``base_layer``. B starts at zero so the adapted model equals
    the base. With ``freeze_a`` (LoRA-FA), A is a buffer: frozen, exported with the base, and
    absent from the adapter."""

    # Attribute names of A and B, and what PEFT appends to them in its state dict keys.
    A_NAME, B_NAME, PEFT_SUFFIX = "lora_A", "lora_B", ".weight"

    def __init__(self, base: nn.Module, scaling: float):
        super().__init__()
        self.base_layer = base
        self.scaling = scaling

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":  # not set yet (inside __init__): no base to ask
                raise
            return getattr(self.base_layer, name)

    def init_ab(self, a: torch.Tensor, b: torch.Tensor, freeze_a: bool) -> None:
        if freeze_a:
            self.register_buffer(self.A_NAME, a)
        else:
            setattr(self, self.A_NAME, nn.Parameter(a))
        setattr(self, self.B_NAME, nn.Parameter(b))

    def adapter_params(self) -> dict[str, nn.Parameter]:
        """The declared trainable tensors of this layer (suffix -> parameter)."""
        a, b = getattr(self, self.A_NAME), getattr(self, self.B_NAME)
        out = {self.B_NAME: b}
        return {self.A_NAME: a, **out} if isinstance(a, nn.Parameter) else out


def kaiming_a(shape: tuple[int, ...], fan_in: int, generator: torch.Generator) -> torch.Tensor:
    """PEFT's init of A: kaiming-uniform(a=sqrt(5)), i.e. uniform(+-1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


class LoraLinear(LoraBase):
    """A (r, in) and B (out, r) beside a frozen nn.Linear."""

    def __init__(self, base: nn.Linear, rank: int, scaling: float, freeze_a: bool, generator: torch.Generator):
        super().__init__(base, scaling)
        self.init_ab(kaiming_a((rank, base.in_features), base.in_features, generator),
                     torch.zeros((base.out_features, rank)), freeze_a)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + (x @ self.lora_A.t() @ self.lora_B.t()) * self.scaling
