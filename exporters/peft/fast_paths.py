"""torch's fused "fast paths" for its transformer layers (nn.TransformerEncoderLayer,
nn.TransformerEncoder, nn.MultiheadAttention in eval mode without grad) call one kernel on the
layers' frozen weights: they skip any adapter wrapped inside and neither ONNX nor torch.export
can capture the kernel. The exporter turns them off in the injected copy (so its eager
reference computes what the graphs compute) and while tracing."""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn as nn


def disable_fast_paths(model: nn.Module) -> None:
    """Clear the flags only the layers' fast paths read (the standard path computes the same)."""
    for mod in model.modules():
        if isinstance(mod, nn.TransformerEncoderLayer):
            mod.activation_relu_or_gelu = 0
        elif isinstance(mod, nn.TransformerEncoder):
            mod.use_nested_tensor = False


@contextlib.contextmanager
def fast_paths_off() -> Iterator[None]:
    """torch's global switch, for tracing (it also covers nn.MultiheadAttention, which has no
    flag of its own); restored afterwards."""
    was = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(was)
