"""LoRA: W x + s * B A x, with A (r x in) and B (out x r), B zero-initialised;
s = alpha / r, or alpha / sqrt(r) with rsLoRA. LoRA-FA freezes A (random, shipped in the base)
and trains only B, so backward keeps only the r-wide A x, not x."""
from __future__ import annotations

import dataclasses
import math

from edgepeft.errors import SpecError
from edgepeft.specs.base import MethodSpec, as_name_tuple, check_pattern, check_seed


@dataclasses.dataclass(frozen=True)
class LoraSpec(MethodSpec):
    """LoRA on the layers named by ``targets`` (module names, matched by whole dotted components
    as PEFT does) or by ``target_pattern`` (an anchored regex over full names): nn.Linear,
    nn.Conv1d/nn.Conv2d (any kernel, groups=1), nn.Embedding, nn.MultiheadAttention.

    ``modules_to_save`` names modules trained in full alongside (PEFT's option of the same
    name), e.g. a fresh classification head."""

    method = "lora"

    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("query", "value")
    target_pattern: str | None = None
    modules_to_save: tuple[str, ...] = ()
    use_rslora: bool = False
    freeze_a: bool = False
    init_seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank <= 0:
            raise SpecError(f"`rank` must be an integer > 0, got {self.rank!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not math.isfinite(self.alpha) \
                or self.alpha <= 0:
            raise SpecError(f"`alpha` must be a finite number > 0, got {self.alpha!r}")
        object.__setattr__(self, "alpha", float(self.alpha))
        object.__setattr__(self, "targets", as_name_tuple("targets", self.targets))
        object.__setattr__(self, "modules_to_save", as_name_tuple("modules_to_save", self.modules_to_save))
        check_pattern("target_pattern", self.target_pattern)
        for flag in ("use_rslora", "freeze_a"):
            if not isinstance(getattr(self, flag), bool):
                raise SpecError(f"`{flag}` must be True or False, got {getattr(self, flag)!r}")
        check_seed(self.init_seed)
        if not self.targets and self.target_pattern is None:
            raise SpecError("LoRA needs `targets` or `target_pattern`: name the layers to adapt (Linear, Conv, "
                            "Embedding, MultiheadAttention)")

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)
