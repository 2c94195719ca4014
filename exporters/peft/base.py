"""What the PEFT injectors share: the trainable-tensor record each method declares."""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

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


def find_modules(model: nn.Module, names: tuple[str, ...], pattern: str | None,
                 kind: type[nn.Module], what: str) -> list[tuple[str, nn.Module]]:
    """Modules of type ``kind`` whose names match; a clear error listing candidates if none."""
    hits = [(n, m) for n, m in model.named_modules() if n and name_matches(n, names, pattern)]
    wrong = [n for n, m in hits if not isinstance(m, kind)]
    if wrong:
        raise TargetError(f"{what}: {wrong[:5]} are not {kind.__name__} layers; only {kind.__name__} is supported")
    if not hits:
        have = [n for n, m in model.named_modules() if n and isinstance(m, kind)]
        short = sorted({n.rsplit('.', 1)[-1] for n in have})
        raise TargetError(
            f"{what}: no layer matches targets {list(names)}"
            + (f" / pattern {pattern!r}" if pattern else "")
            + f"; the model's {kind.__name__} layers are named {short} (e.g. {have[:3]})"
        )
    return hits


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
