"""PEFT method specs (torch-free) and their registry: adding a method is a module here and one
line in ``METHODS``."""
from __future__ import annotations

from typing import Any

from edgepeft.errors import SpecError
from edgepeft.specs.base import MethodSpec
from edgepeft.specs.lora import LoraSpec

METHODS: dict[str, type[MethodSpec]] = {
    LoraSpec.method: LoraSpec,
}


def spec_from_dict(data: dict[str, Any]) -> MethodSpec:
    name = data.get("method") if isinstance(data, dict) else None
    if name not in METHODS:
        raise SpecError(f"unknown PEFT method {name!r}; supported: {sorted(METHODS)}")
    return METHODS[name].from_dict(data)


__all__ = ["METHODS", "LoraSpec", "MethodSpec", "spec_from_dict"]
