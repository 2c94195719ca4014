"""A causal LM's vocabulary projection and cross-entropy in chunks of the vocabulary, so that
(positions x vocab) logits never exist whole (SmolLM2 at 4 x 128: 100 MB; Gemma 3: 537 MB).

One pass over the (int8 or int4) head weight computes, per labelled position, the loss and the gradient
of the hidden state, with the running-max rescaling of an online softmax:
``g_x = sum_v softmax(z)_v W_v - W_label`` accumulates as ``acc = sum_v exp(z_v - m) W_v``
rescaled whenever the running maximum ``m`` grows. Only labelled positions are projected."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from edgepeft import names

CHUNK = 4096  # rows of the head per step: 4096 x 576 fp32 = 9.4 MB for SmolLM2


@dataclass(frozen=True)
class Head:
    """The (vocab, hidden) projection as stored: fp32 (``q`` only), int8 rows + per-row
    ``scale``, or int4: ``q`` packed codes (vocab, hidden/2) uint8, ``scale`` and ``min`` per
    block of ``block`` columns (w = code * scale + min; exporters.quantize writes them)."""

    q: np.ndarray
    scale: np.ndarray | None
    min: np.ndarray | None = None
    block: int = 32
    # Called once a chunk's stored rows have been converted: the backend drops the weight
    # file's pages from the resident set (Gemma 3's head alone is 168 MB of int8 rows).
    drop: Callable[[], None] | None = None

    @property
    def vocab(self) -> int:
        return int(self.q.shape[0])

    def rows(self, lo: int, hi: int) -> np.ndarray:
        return self._dropped(self._rows(lo, hi))

    def take(self, ids: np.ndarray) -> np.ndarray:
        return self._dropped(self._take(ids))

    def _dropped(self, w: np.ndarray) -> np.ndarray:
        if self.drop is not None and not np.may_share_memory(w, self.q):  # a converted copy, not the pages
            self.drop()
        return w

    def _rows(self, lo: int, hi: int) -> np.ndarray:
        if self.min is not None:
            return dequantize_int4(self.q[lo:hi], self.scale[lo:hi], self.min[lo:hi], self.block)
        w = self.q[lo:hi]
        if self.scale is None:
            return w
        out = w.astype(np.float32)
        out *= self.scale[lo:hi, None]
        return out

    def _take(self, ids: np.ndarray) -> np.ndarray:
        if self.min is not None:
            return dequantize_int4(self.q[ids], self.scale[ids], self.min[ids], self.block)
        w = self.q[ids]
        return w if self.scale is None else w.astype(np.float32) * self.scale[ids, None]


def dequantize_int4(packed: np.ndarray, scale: np.ndarray, mn: np.ndarray, block: int) -> np.ndarray:
    """Rows of int4 codes as float32: code 2j is the low nibble of byte j, 2j+1 the high one;
    then ``code * scale + min`` per block, in float32 and in that order (as the exporter's
    reference and the lean graphs compute it, so all three agree bit for bit)."""
    codes = np.empty((*packed.shape[:-1], packed.shape[-1] * 2), np.uint8)
    codes[..., 0::2] = packed & 0x0F
    codes[..., 1::2] = packed >> 4
    lead, cols = codes.shape[:-1], codes.shape[-1]
    out = codes.astype(np.float32).reshape(*lead, cols // block, block)
    out *= scale.astype(np.float32)[..., None]
    out += mn.astype(np.float32)[..., None]
    return out.reshape(*lead, cols)


def _labelled(hidden: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    keep = labels.reshape(-1) != names.IGNORE_INDEX
    x = hidden.reshape(-1, hidden.shape[-1])[keep]
    return keep, np.ascontiguousarray(x, dtype=np.float32), labels.reshape(-1)[keep]


def loss_and_grad(head: Head, hidden: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean cross-entropy over labelled positions and its gradient w.r.t. ``hidden``."""
    keep, x, y = _labelled(hidden, labels)
    n = len(y)
    grad = np.zeros(hidden.shape, np.float32)
    if n == 0:
        return float("nan"), grad
    m = np.full(n, -np.inf, np.float32)
    s = np.zeros(n, np.float32)
    acc = np.zeros_like(x)
    for lo in range(0, head.vocab, CHUNK):
        w = head.rows(lo, min(lo + CHUNK, head.vocab))
        z = x @ w.T
        m_new = np.maximum(m, z.max(axis=1))
        shrink = np.exp(m - m_new)
        z -= m_new[:, None]
        np.exp(z, out=z)  # in place: one (positions x chunk) buffer at a time
        s = s * shrink + z.sum(axis=1)
        acc *= shrink[:, None]
        acc += z @ w
        m = m_new
    w_y = head.take(y)
    lse = m + np.log(s)
    loss = float(np.mean(lse - np.einsum("nd,nd->n", x, w_y)))
    grad.reshape(-1, hidden.shape[-1])[keep] = (acc / s[:, None] - w_y) / n
    return loss, grad


def loss_and_argmax(head: Head, hidden: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean cross-entropy over labelled positions and the top-1 token at every labelled
    position (-1 elsewhere), without the full logits."""
    keep, x, y = _labelled(hidden, labels)
    pred = np.full(labels.size, -1, np.int64)
    if len(y) == 0:
        return float("nan"), pred.reshape(labels.shape)
    m = np.full(len(y), -np.inf, np.float32)
    s = np.zeros(len(y), np.float32)
    best, best_z = np.zeros(len(y), np.int64), np.full(len(y), -np.inf, np.float32)
    for lo in range(0, head.vocab, CHUNK):
        z = x @ head.rows(lo, min(lo + CHUNK, head.vocab)).T
        top = z.argmax(axis=1)
        top_z = z[np.arange(len(y)), top]
        better = top_z > best_z
        best, best_z = np.where(better, top + lo, best), np.where(better, top_z, best_z)
        m_new = np.maximum(m, z.max(axis=1))
        s = s * np.exp(m - m_new) + np.exp(z - m_new[:, None]).sum(axis=1)
        m = m_new
    loss = float(np.mean(m + np.log(s) - np.einsum("nd,nd->n", x, head.take(y))))
    pred[keep] = best
    return loss, pred.reshape(labels.shape)


def logits(head: Head, hidden: np.ndarray) -> np.ndarray:
    """Full logits (what ``infer`` returns), filled a vocabulary chunk at a time."""
    x = hidden.reshape(-1, hidden.shape[-1]).astype(np.float32, copy=False)
    # Filled vocabulary-major, each chunk written in place (no (positions x chunk) temporary),
    # and returned as a transposed view: (batch, seq, vocab) without a copy.
    out_t = np.empty((head.vocab, x.shape[0]), np.float32)
    for lo in range(0, head.vocab, CHUNK):
        hi = min(lo + CHUNK, head.vocab)
        np.matmul(head.rows(lo, hi), x.T, out=out_t[lo:hi])
    return out_t.T.reshape(*hidden.shape[:-1], head.vocab)
