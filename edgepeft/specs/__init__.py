"""PEFT method specs (torch-free) and their registry: adding a method is a module here and one
line in ``METHODS`` (plus its injector in edgepeft.exporters.peft)."""
from __future__ import annotations

import dataclasses
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
# Former method names -> their registry key. "adapter" was BottleneckSpec's name until the
# word was kept for a user's trained tensors; manifests and --method specs using it still load.
METHOD_ALIASES: dict[str, str] = {"adapter": BottleneckSpec.method}


def canonical_method(name: str) -> str:
    """The registry key for ``name`` (an alias maps to its method; anything else is returned
    unchanged, e.g. "modules_to_save", the method of LoRA's saved modules)."""
    return METHOD_ALIASES.get(name, name) if isinstance(name, str) else name


def spec_from_dict(data: dict[str, Any]) -> MethodSpec:
    name = canonical_method(data.get("method")) if isinstance(data, dict) else None
    if name not in METHODS:
        raise SpecError(f"unknown PEFT method {name!r}; supported: {sorted(METHODS)}")
    return METHODS[name].from_dict(data)


def parse_method(text: str) -> MethodSpec:
    """A spec from the CLI form ``name[:key=value,key=value]``; list values are separated
    by ``|`` (e.g. ``lora:rank=8,targets=query|value,modules_to_save=classifier``)."""
    name, _, rest = text.partition(":")
    name = canonical_method(name.strip())
    if name not in METHODS:
        raise SpecError(f"unknown PEFT method {name!r} in {text!r}; supported: {sorted(METHODS)}")
    fields = {f.name: f for f in dataclasses.fields(METHODS[name])}
    kwargs: dict[str, Any] = {}
    for item in filter(None, (x.strip() for x in rest.split(","))):
        key, eq, raw = item.partition("=")
        if not eq or key not in fields:
            raise SpecError(f"{text!r}: {item!r} is not key=value with a key of {name} ({sorted(fields)})")
        kwargs[key] = _value(raw, str(fields[key].type))
    return METHODS[name](**kwargs)


def _value(raw: str, type_name: str) -> Any:
    if "tuple" in type_name:
        items = [x for x in raw.split("|") if x]
        return tuple(int(x) for x in items) if "int" in type_name else tuple(items)
    if raw.lower() in ("true", "false"):
        return raw.lower() == "true"
    if raw.lower() == "none":
        return None
    for cast in (int, float):
        try:
            return cast(raw)
        except ValueError:
            pass
    return raw


__all__ = ["METHODS", "METHOD_ALIASES", "BitFitSpec", "BottleneckSpec", "LoraSpec", "MethodSpec", "PrefixSpec", "PromptSpec",
           "SelectiveSpec", "canonical_method", "parse_method", "spec_from_dict"]
