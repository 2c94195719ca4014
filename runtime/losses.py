"""Losses computed on the device side in numpy, for backends whose inference graph gives logits
but no loss (the training graphs compute their own, as output 0)."""
from __future__ import annotations

import numpy as np

from edgepeft import names


def cross_entropy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Mean cross-entropy over labelled positions (classes in the last axis), in float64."""
    x = logits.reshape(-1, logits.shape[-1]).astype(np.float64)
    y = labels.reshape(-1)
    keep = y != names.IGNORE_INDEX
    x, y = x[keep], y[keep]
    if len(y) == 0:
        return float("nan")
    m = x.max(axis=1, keepdims=True)
    logz = np.log(np.exp(x - m).sum(axis=1)) + m[:, 0]
    return float(np.mean(logz - x[np.arange(len(y)), y]))
