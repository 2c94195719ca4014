"""What the PEFT injectors share: the trainable-tensor record each method declares, module
lookup by declared names or patterns, and the model's declared sites."""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch.nn as nn

from edgepeft import names
from edgepeft.errors import TargetError
from edgepeft.specs.base import name_matches


@dataclass(frozen=True)
class Trainable:
    """A tensor a method made trainable, identified by its declared full name (never found by
    searching names for substrings)."""

    name: str       # full parameter name in the injected model (= the ONNX initializer name)
    peft_key: str   # key in a PEFT adapter_model.safetensors
    method: str
    param: nn.Parameter


@dataclass(frozen=True)
class InjectContext:
    """What injectors may need besides the model and the spec."""

    tokenizer_json: str | None = None


def declare(module_name: str, params: dict[str, nn.Parameter], method: str) -> list[Trainable]:
    """Trainables for ``module_name``'s declared parameters (suffix -> parameter)."""
    out = []
    for suffix, p in params.items():
        full = f"{module_name}.{suffix}" if module_name else suffix
        out.append(Trainable(full, f"{names.PEFT_PREFIX}{full}", method, p))
    return out


def find_modules(model: nn.Module, names_: tuple[str, ...], pattern: str | None,
                 kind: type[nn.Module] | tuple[type[nn.Module], ...], what: str) -> list[tuple[str, nn.Module]]:
    """Modules of type ``kind`` whose names match; a clear error listing candidates if none."""
    hits = [(n, m) for n, m in model.named_modules() if n and name_matches(n, names_, pattern)]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    kind_names = "/".join(k.__name__ for k in kinds)
    wrong = [n for n, m in hits if not isinstance(m, kinds)]
    if wrong:
        raise TargetError(f"{what}: {wrong[:5]} are not {kind_names} layers; only {kind_names} is supported")
    if not hits:
        have = [n for n, m in model.named_modules() if n and isinstance(m, kinds)]
        short = sorted({n.rsplit('.', 1)[-1] for n in have})
        raise TargetError(
            f"{what}: no layer matches targets {list(names_)}"
            + (f" / pattern {pattern!r}" if pattern else "")
            + f"; the model's {kind_names} layers are named {short} (e.g. {have[:3]})"
        )
    return hits


def site_modules(model: nn.Module, site: str, what: str) -> list[tuple[str, nn.Module]]:
    """The modules at a site the model declares in ``PEFT_SITES`` (site -> anchored regex)."""
    sites = getattr(type(model), "PEFT_SITES", {})
    if site not in sites:
        raise TargetError(f"{what} needs the model to declare the site {site!r} in PEFT_SITES "
                          f"({type(model).__name__} declares {sorted(sites) or 'none'}); zoo models declare them. "
                          f"Declare it on your model's class, an anchored regex over module names, e.g. "
                          f"PEFT_SITES = {{{site!r}: r'^layers\\.\\d+$'}}, or pick LoRA, BitFit or selective "
                          "training, which need no site")
    pattern = re.compile(sites[site])
    hits = [(n, m) for n, m in model.named_modules() if n and pattern.fullmatch(n)]
    if not hits:
        raise TargetError(f"{what}: the model's {site!r} site pattern {sites[site]!r} matches no module")
    return hits


def slot_modules(model: nn.Module, slot: type, what: str, hint: str) -> list[tuple[str, nn.Module]]:
    hits = [(n, m) for n, m in model.named_modules() if isinstance(m, slot)]
    if not hits:
        raise TargetError(f"{what} needs {hint} ({slot.__name__} in edgepeft.exporters.peft.slots); "
                          f"{type(model).__name__} has none. Zoo models have them; your model can inherit the "
                          "mixin and call its helper in forward (see that module); or pick LoRA, BitFit or "
                          "selective training, which need no slot")
    return hits


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
