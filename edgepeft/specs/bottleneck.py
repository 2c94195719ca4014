"""Bottleneck adapters: x + up(act(down(x))) placed after sub-layers (Houlsby: after attention
and after the FFN; Pfeiffer: after the FFN) or beside the FFN (parallel, He et al. 2022)."""
from __future__ import annotations

import dataclasses
import math

from edgepeft.errors import SpecError
from edgepeft.specs.base import MethodSpec, check_choice, check_int, check_seed

KINDS = ("houlsby", "pfeiffer", "parallel")
ACTIVATIONS = ("relu", "gelu", "silu", "tanh")


@dataclasses.dataclass(frozen=True)
class BottleneckSpec(MethodSpec):
    """``size``: the bottleneck width; the up projection starts at zero, so the adapted model
    starts equal to the base."""

    # Not "adapter": that word means a user's trained tensors everywhere else. Manifests and
    # --method specs written with the old name still load (edgepeft.specs.METHOD_ALIASES).
    method = "bottleneck"

    kind: str = "houlsby"
    size: int = 64
    activation: str = "relu"
    scaling: float = 1.0
    init_seed: int = 0

    def __post_init__(self) -> None:
        check_choice("kind", self.kind, KINDS)
        check_int("size", self.size, 1)
        check_choice("activation", self.activation, ACTIVATIONS)
        if isinstance(self.scaling, bool) or not isinstance(self.scaling, (int, float)) \
                or not math.isfinite(self.scaling) or self.scaling <= 0:
            raise SpecError(f"`scaling` must be a finite number > 0, got {self.scaling!r}")
        object.__setattr__(self, "scaling", float(self.scaling))
        check_seed(self.init_seed)

    @property
    def sites(self) -> tuple[str, ...]:
        return {"houlsby": ("attention_output", "ffn_output"), "pfeiffer": ("ffn_output",), "parallel": ()}[self.kind]
