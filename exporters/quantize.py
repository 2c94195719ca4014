"""Frozen weights stored small. One numpy computation feeds both the ONNX graphs and the eager
reference model (the same values dequantized), so parity against eager is exact in the weights.

- int8: symmetric per-channel (per output row / output channel), ``w = q * scale``.
- int4: asymmetric blocks of ``INT4_BLOCK`` along the input dimension, ``w = q * scale + min``
  with q in 0..15, two codes per byte. This holds llama.cpp's Q4_0, Q4_1 and Q4_K blocks exactly
  (Q4_K's per-32 sub-block scale and min are d*sc and -dmin*m): the quantizer finds the 4-bit grid
  a block already lies on (``_snap``), so a Q4 GGUF's weights come over unchanged. A 2-D weight
  whose input dimension is not a multiple of the block falls back to int8 per row."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

MIN_NUMEL = 4096  # smaller tensors (LayerNorm, biases, tiny tables) stay fp32: no saving worth a node
INT4_BLOCK = 32
# Per-block scale and min: None chooses per tensor (quantize_int4): float16, or float32 where a
# weight sits exactly on grids float16 cannot hold. On SmolLM2, float32 everywhere gave the same
# weight error (rel. RMS 0.0307 both; perplexity 43.68 vs 43.76, rounding noise) for 20% more
# weight bytes (benchmarks/results/quant_accuracy.md).
INT4_SCALE_DTYPE = None
MIN_SUFFIX = "_min"  # beside names.Q_SUFFIX (the packed codes) and names.SCALE_SUFFIX
_ROWS_ELEMS = 1 << 22  # elements quantized at a time (bounds the temporaries of a large table)


@dataclass(frozen=True)
class QuantizedTensor:
    q: np.ndarray       # int8, same shape as the weight
    scale: np.ndarray   # float32, one per row (axis 0)

    def dequantize(self) -> np.ndarray:
        return self.q.astype(np.float32) * self.scale.reshape(-1, *[1] * (self.q.ndim - 1))

    @property
    def numel(self) -> int:
        return int(self.q.size)

    @property
    def nbytes(self) -> int:
        return int(self.q.nbytes + self.scale.nbytes)


@dataclass(frozen=True)
class Int4Tensor:
    """A (rows, cols) weight as 4-bit codes: ``packed`` (rows, cols/2) uint8 holds code 2j in the
    low nibble of byte j and code 2j+1 in the high one; ``scale`` and ``min`` (rows, cols/32)."""

    packed: np.ndarray
    scale: np.ndarray
    min: np.ndarray

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.packed.shape[0]), int(self.packed.shape[1]) * 2

    @property
    def numel(self) -> int:
        return int(self.packed.size * 2)

    @property
    def nbytes(self) -> int:
        return int(self.packed.nbytes + self.scale.nbytes + self.min.nbytes)

    @property
    def q(self) -> np.ndarray:
        """The codes 0..15, unpacked (uint8, the weight's shape)."""
        return unpack_int4(self.packed)

    def dequantize(self) -> np.ndarray:
        return dequantize_int4(self.packed, self.scale, self.min)


def pack_int4(q: np.ndarray) -> np.ndarray:
    """Codes 0..15 (last axis even) -> bytes, two codes each (even index in the low nibble)."""
    q = np.asarray(q, dtype=np.uint8)
    return (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)


def unpack_int4(packed: np.ndarray) -> np.ndarray:
    """The inverse of ``pack_int4`` (runtime.lean_head has the same for the device)."""
    out = np.empty((*packed.shape[:-1], packed.shape[-1] * 2), np.uint8)
    out[..., 0::2] = packed & 0x0F
    out[..., 1::2] = packed >> 4
    return out


def dequantize_int4(packed: np.ndarray, scale: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """``q * scale + min`` per block, in float32 and in this order (the lean graphs compute the
    same two operations, so graph and reference weights agree bit for bit)."""
    q = unpack_int4(packed).astype(np.float32)
    lead, cols = q.shape[:-1], q.shape[-1]
    q = q.reshape(*lead, cols // INT4_BLOCK, INT4_BLOCK)
    q *= scale.astype(np.float32)[..., None]
    q += mn.astype(np.float32)[..., None]
    return q.reshape(*lead, cols)


def quantize_rows(w: np.ndarray) -> QuantizedTensor:
    """One scale per slice along axis 0 (output features of a Linear, output channels of a
    Conv, rows of an embedding table)."""
    w = np.asarray(w, dtype=np.float32)
    amax = np.abs(w.reshape(w.shape[0], -1)).max(axis=1)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(w / scale.reshape(-1, *[1] * (w.ndim - 1))), -127, 127).astype(np.int8)
    return QuantizedTensor(q, scale)


def int4_fits(w: np.ndarray) -> bool:
    """A 2-D weight whose rows split into whole blocks, with values a float16 scale can hold."""
    return w.ndim == 2 and w.shape[1] % INT4_BLOCK == 0 and bool(np.all(np.abs(w) < 3e4))


def quantize_int4(w: np.ndarray, scale_dtype=None) -> Int4Tensor:
    """Blocks of ``INT4_BLOCK`` along the input dimension (axis 1), asymmetric (block min/max,
    snapped to the 4-bit grid a block already lies on). ``scale_dtype`` None (default: the
    module's ``INT4_SCALE_DTYPE``, None there too means per tensor): float16, except for a weight
    that lies exactly on 4-bit grids whose scales float16 cannot hold (a GGUF's Q4_K layers: d*sc
    has up to 17 significant bits), which keeps float32 scales and so comes over unchanged."""
    w = np.asarray(w, dtype=np.float32)
    if not int4_fits(w):
        raise ValueError(f"int4 needs a 2-D weight with a multiple of {INT4_BLOCK} columns, got {w.shape}")
    dtype = scale_dtype or INT4_SCALE_DTYPE
    if dtype is not None:
        return _quantize_int4(w, dtype)[0]
    qt, exact = _quantize_int4(w, np.float32)
    s16, m16 = qt.scale.astype(np.float16), qt.min.astype(np.float16)
    if exact and np.array_equal(s16.astype(np.float32), qt.scale) and np.array_equal(m16.astype(np.float32), qt.min):
        return Int4Tensor(qt.packed, s16, m16)  # e.g. Q4_0/Q4_1 layers: their d and m are float16
    return qt if exact else _quantize_int4(w, np.float16)[0]


def _quantize_int4(w: np.ndarray, dtype) -> tuple[Int4Tensor, bool]:
    """The int4 form with ``dtype`` scales, and whether it reproduces ``w`` (to float32 rounding)."""
    rows, cols = w.shape
    packed = np.empty((rows, cols // 2), np.uint8)
    scale = np.empty((rows, cols // INT4_BLOCK), dtype)
    mn = np.empty_like(scale)
    exact = True
    step = max(1, _ROWS_ELEMS // cols)
    for lo in range(0, rows, step):
        x = w[lo:lo + step].reshape(-1, cols // INT4_BLOCK, INT4_BLOCK)
        s, m, q, off = _snap(x, dtype)
        packed[lo:lo + step] = pack_int4(q.reshape(len(x), cols))
        scale[lo:lo + step], mn[lo:lo + step] = s, m
        exact = exact and not off
    return Int4Tensor(packed, scale, mn), exact


def _fit(x: np.ndarray, lo: np.ndarray, span: np.ndarray, levels: int, dtype):
    """Scale span/levels and min lo (rounded to ``dtype``), the codes, and each block's largest error."""
    s = (span / levels).astype(dtype)
    m = lo.astype(dtype)
    s32, m32 = s.astype(np.float32)[..., None], m.astype(np.float32)[..., None]
    q = np.clip(np.rint((x - m32) / np.where(s32 > 0, s32, 1)), 0, 15)
    err = np.abs(q * s32 + m32 - x).max(axis=-1)
    return s, m, q.astype(np.uint8), err


def _snap(x: np.ndarray, dtype):
    """Per block (last axis): min/max over 15 steps. A block already on a 4-bit grid that uses
    fewer than 16 levels (Q4_K picks its scale by a search: a sub-block need not reach both 0
    and 15) has at most 16 distinct values; for those, span/k over k levels may fit exactly, and
    the k with the smallest error wins. Also returns whether any block is off (not reproduced)."""
    lo, hi = x.min(axis=-1), x.max(axis=-1)
    span = hi - lo
    s, m, q, err = _fit(x, lo, span, 15, dtype)
    tol = 1e-6 * np.maximum(np.abs(lo), np.abs(hi))
    srt = np.sort(x, axis=-1)
    distinct = 1 + (np.diff(srt, axis=-1) > 0).sum(axis=-1)
    search = (err > tol) & (distinct <= 16)
    if search.any():
        xs, los, spans = x[search], lo[search], span[search]
        best = (s[search], m[search], q[search], err[search])
        for k in range(14, 0, -1):
            cand = _fit(xs, los, spans, k, dtype)
            better = cand[3] < best[3]
            best = tuple(np.where(better.reshape(-1, *[1] * (b.ndim - 1)), c, b) for c, b in zip(cand, best))
        s[search], m[search], q[search], err[search] = best
    return s, m, q, bool((err > tol).any())


def quantize_frozen(model: nn.Module, trainable: set[str], scheme: str = "int8") -> dict[str, QuantizedTensor | Int4Tensor]:
    """Quantize every frozen float weight of 2 or more dimensions of ``model`` in place (its values
    become the dequantized ones) and return the stored form by parameter name. ``scheme`` "int4":
    2-D weights whose rows split into whole blocks become ``Int4Tensor``; the others int8."""
    out: dict[str, QuantizedTensor | Int4Tensor] = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in trainable or p.dim() < 2 or not p.is_floating_point() or p.numel() < MIN_NUMEL:
                continue
            w = p.detach().cpu().numpy()
            qt = quantize_int4(w) if scheme == "int4" and int4_fits(w) else quantize_rows(w)
            p.copy_(torch.from_numpy(qt.dequantize()))
            out[name] = qt
    return out
