"""Micro-batches: one training step's loss and gradients computed over parts of its batch.

Every backend's loss is a mean over labelled positions (labels other than IGNORE_INDEX), so
the whole batch's mean is the parts' means weighted by their labelled positions; gradients
follow the same weights. The session splits a batch to fit its memory budget, a fixed-batch
backend splits (and pads) to its program's batch size: both accumulate here."""
from __future__ import annotations

from typing import Callable, Iterable, Mapping

import numpy as np

from edgepeft import names
from edgepeft.data import Batch
from edgepeft.errors import DataError

Step = Callable[[Batch], "tuple[float, Mapping[str, np.ndarray]]"]


def labelled(batch: Batch) -> int:
    """Positions of ``batch`` that count in its loss."""
    return int((np.asarray(batch.labels) != names.IGNORE_INDEX).sum())


def accumulate(chunks: Iterable[Batch], fn: Step) -> tuple[float, dict[str, np.ndarray]]:
    """Loss and gradients of the batch ``chunks`` make up, from ``fn(chunk)`` -> (mean loss,
    gradients) of each chunk. A chunk with no labelled positions is skipped, not run (its mean
    would be 0/0); DataError if no chunk has any."""
    total, loss, grads = 0, 0.0, {}
    only = None  # the first chunk's own result, while it is the only one run
    for c in chunks:
        n = labelled(c)
        if n == 0:
            continue
        l_c, g_c = fn(c)
        only = (float(l_c), dict(g_c)) if total == 0 else None
        loss += n * l_c
        for k, g in g_c.items():
            grads[k] = grads[k] + n * g if k in grads else n * g
        total += n
    if total == 0:
        raise DataError("the batch has no labelled positions to train on: label at least one example or token")
    if only is not None:  # a mean of one part is that part, bit for bit (no n * x / n rounding)
        return only
    return loss / total, {k: g / total for k, g in grads.items()}
