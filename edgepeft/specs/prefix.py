"""Prefix tuning: per-layer trainable key and value rows prepended inside attention."""
from __future__ import annotations

import dataclasses

from edgepeft.specs.base import MethodSpec, check_int, check_seed


@dataclasses.dataclass(frozen=True)
class PrefixSpec(MethodSpec):
    """``layers``: indices of the attention blocks (in model order) to give a prefix; empty
    means all of them."""

    method = "prefix"

    n_tokens: int = 8
    layers: tuple[int, ...] = ()
    init_seed: int = 0

    def __post_init__(self) -> None:
        check_int("n_tokens", self.n_tokens, 1)
        object.__setattr__(self, "layers", tuple(self.layers))
        for i in self.layers:
            check_int("layers[]", i, 0)
        check_seed(self.init_seed)
