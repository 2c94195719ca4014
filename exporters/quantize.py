"""int8 frozen weights: symmetric per-channel (per output row / output channel) quantization.

One numpy computation feeds both the ONNX graph (int8 + scale) and the eager reference model
(the same values dequantized), so parity against eager is exact in the weights."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

MIN_NUMEL = 4096  # smaller tensors (LayerNorm, biases, tiny tables) stay fp32: no saving worth a node


@dataclass(frozen=True)
class QuantizedTensor:
    q: np.ndarray       # int8, same shape as the weight
    scale: np.ndarray   # float32, one per row (axis 0)

    def dequantize(self) -> np.ndarray:
        return self.q.astype(np.float32) * self.scale.reshape(-1, *[1] * (self.q.ndim - 1))


def quantize_rows(w: np.ndarray) -> QuantizedTensor:
    """One scale per slice along axis 0 (output features of a Linear, output channels of a
    Conv, rows of an embedding table)."""
    w = np.asarray(w, dtype=np.float32)
    amax = np.abs(w.reshape(w.shape[0], -1)).max(axis=1)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(w / scale.reshape(-1, *[1] * (w.ndim - 1))), -127, 127).astype(np.int8)
    return QuantizedTensor(q, scale)


def quantize_frozen(model: nn.Module, trainable: set[str]) -> dict[str, QuantizedTensor]:
    """Quantize every frozen float weight of 2 or more dimensions of ``model`` in place (its values become the
    dequantized ones) and return the int8 form by parameter name."""
    out: dict[str, QuantizedTensor] = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in trainable or p.dim() < 2 or not p.is_floating_point() or p.numel() < MIN_NUMEL:
                continue
            qt = quantize_rows(p.detach().cpu().numpy())
            p.copy_(torch.from_numpy(qt.dequantize()))
            out[name] = qt
    return out
