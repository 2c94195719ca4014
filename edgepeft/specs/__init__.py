"""PEFT method specs (torch-free) and their registry: adding a method is a module here and one
line in ``METHODS`` (plus its injector in edgepeft.exporters.peft)."""
from __future__ import annotations

from typing import Any

from edgepeft.errors import SpecError
from edgepeft.specs.base import MethodSpec
from edgepeft.specs.bitfit import BitFitSpec
from edgepeft.specs.bottleneck import BottleneckSpec
from edgepeft.specs.lora import LoraSpec
from edgepeft.specs.prefix import PrefixSpec
from edgepeft.specs.prompt import PromptSpec
from edgepeft.specs.selective import SelectiveSpec

METHODS: dict[str, type[MethodSpec]] = {
    LoraSpec.method: LoraSpec,
    PromptSpec.method: PromptSpec,
    PrefixSpec.method: PrefixSpec,
    BitFitSpec.method: BitFitSpec,
    BottleneckSpec.method: BottleneckSpec,
    SelectiveSpec.method: SelectiveSpec,
}


def spec_from_dict(data: dict[str, Any]) -> MethodSpec:
    name = data.get("method") if isinstance(data, dict) else None
    if name not in METHODS:
        raise SpecError(f"unknown PEFT method {name!r}; supported: {sorted(METHODS)}")
    return METHODS[name].from_dict(data)


__all__ = ["METHODS", "BitFitSpec", "BottleneckSpec", "LoraSpec", "MethodSpec", "PrefixSpec", "PromptSpec",
           "SelectiveSpec", "spec_from_dict"]
