"""Selective (layer-wise) fine-tuning: named modules, or the last N layers, trained in full."""
from __future__ import annotations

import dataclasses

from edgepeft.errors import SpecError
from edgepeft.specs.base import MethodSpec, as_name_tuple, check_int


@dataclasses.dataclass(frozen=True)
class SelectiveSpec(MethodSpec):
    """``modules``: module names (whole dotted components), e.g. ("classifier",), as PEFT's
    ``modules_to_save``; ``last_n_layers``: the last N blocks of the model's layer stack."""

    method = "selective"

    modules: tuple[str, ...] = ()
    last_n_layers: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "modules", as_name_tuple("modules", self.modules))
        check_int("last_n_layers", self.last_n_layers, 0)
        if not self.modules and not self.last_n_layers:
            raise SpecError("selective training needs `modules` or `last_n_layers` > 0")
