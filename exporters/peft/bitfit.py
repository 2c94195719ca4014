"""BitFit: the bias terms (of every module, or of the selected ones) are trainable."""
from __future__ import annotations

import torch.nn as nn

from edgepeft.errors import TargetError
from edgepeft.exporters.peft.base import InjectContext, Trainable, declare
from edgepeft.specs import BitFitSpec
from edgepeft.specs.base import name_matches


def inject_bitfit(model: nn.Module, spec: BitFitSpec, ctx: InjectContext) -> list[Trainable]:
    """Biases of every module, or of the modules matching ``spec`` and everything inside them."""
    restrict = bool(spec.modules or spec.pattern)
    roots = [n for n, _ in model.named_modules() if n and name_matches(n, spec.modules, spec.pattern)]
    out: list[Trainable] = []
    for name, mod in model.named_modules():
        if restrict and not any(name == r or name.startswith(r + ".") for r in roots):
            continue
        bias = mod._parameters.get("bias")  # the module's own bias, not its children's
        if isinstance(bias, nn.Parameter):
            out += declare(name, {"bias": bias}, "bitfit")
    if not out:
        where = f"modules {list(spec.modules)}" + (f" / pattern {spec.pattern!r}" if spec.pattern else "") \
            if restrict else "the model"
        raise TargetError(f"BitFit: {where} has no bias terms to train (e.g. Llama-style models have none); "
                          "use LoRA or bottleneck adapters instead")
    return out
