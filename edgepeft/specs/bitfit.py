"""BitFit: train the bias terms only."""
from __future__ import annotations

import dataclasses

from edgepeft.specs.base import MethodSpec, as_name_tuple, check_pattern


@dataclasses.dataclass(frozen=True)
class BitFitSpec(MethodSpec):
    """Every bias of the model, or only those of the modules named in ``modules`` (whole
    dotted components, as LoRA targets) or matching ``pattern`` (anchored regex)."""

    method = "bitfit"

    modules: tuple[str, ...] = ()
    pattern: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "modules", as_name_tuple("modules", self.modules))
        check_pattern("pattern", self.pattern)
