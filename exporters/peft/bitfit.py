"""BitFit: the bias terms (of every module, or of the selected ones) are trainable. A layer's
own bias is its ``bias`` parameter (Linear, Conv, norms; BatchNorm's shift, while its frozen
running statistics normalise), plus the biases torch's fused layers keep under other names."""
from __future__ import annotations

import torch.nn as nn

from edgepeft.errors import TargetError
from edgepeft.exporters.peft.base import InjectContext, Trainable, declare
from edgepeft.specs import BitFitSpec
from edgepeft.specs.base import name_matches


def own_biases(mod: nn.Module) -> dict[str, nn.Parameter]:
    """The module's own bias parameters (not its children's), by parameter name."""
    names_ = ["bias"]
    if isinstance(mod, nn.MultiheadAttention):
        names_.append("in_proj_bias")  # its out_proj's bias is out_proj's own
    elif isinstance(mod, nn.RNNBase):
        names_ += [n for n in mod._flat_weights_names if n.startswith("bias_")]  # bias_ih_l0, bias_hh_l0, ...
    return {n: p for n in names_ if isinstance(p := mod._parameters.get(n), nn.Parameter)}


def inject_bitfit(model: nn.Module, spec: BitFitSpec, ctx: InjectContext) -> list[Trainable]:
    """Biases of every module, or of the modules matching ``spec`` and everything inside them."""
    restrict = bool(spec.modules or spec.pattern)
    roots = [n for n, _ in model.named_modules() if n and name_matches(n, spec.modules, spec.pattern)]
    out: list[Trainable] = []
    for name, mod in model.named_modules():
        if restrict and not any(name == r or name.startswith(r + ".") for r in roots):
            continue
        out += declare(name, own_biases(mod), "bitfit")
    if not out:
        where = f"modules {list(spec.modules)}" + (f" / pattern {spec.pattern!r}" if spec.pattern else "") \
            if restrict else "the model"
        raise TargetError(f"BitFit: {where} has no bias terms to train (e.g. Llama-style models have none); "
                          "use LoRA or bottleneck adapters instead")
    return out
