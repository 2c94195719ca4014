"""Micro-batches: one training step's loss and gradients computed over parts of its batch.

Every backend's loss is a mean over labelled positions (labels other than IGNORE_INDEX), so
the whole batch's mean is the parts' means weighted by their labelled positions; gradients
follow the same weights. The session splits a batch to fit its memory budget, a fixed-batch
backend splits (and pads) to its program's batch size: both accumulate here."""
from __future__ import annotations

from typing import Callable, Iterable, Iterator, Mapping, Sequence

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


def fixed_chunks(feeds: Mapping[str, np.ndarray], labels: np.ndarray | None, inputs: Sequence[str],
                 rows: int) -> Iterator[tuple[int, Batch]]:
    """(real rows, chunk of exactly ``rows`` rows) over the rows of ``feeds``, for a backend
    whose programs are built for a fixed batch (ExecuTorch plans its memory for one): the last
    chunk is padded with copies of its first row, labelled IGNORE_INDEX, so padding changes
    neither the loss nor the gradients (``accumulate`` weights chunks by labelled positions)."""
    arrays = [np.asarray(feeds[n]) for n in inputs]
    total = len(arrays[0])
    for start in range(0, total, rows):
        real = min(rows, total - start)
        parts = {n: _pad_rows(a[start:start + real], rows) for n, a in zip(inputs, arrays)}
        lab = None
        if labels is not None:
            lab = np.full((rows, *labels.shape[1:]), names.IGNORE_INDEX, dtype=np.int64)
            lab[:real] = labels[start:start + real]
        yield real, Batch(parts, lab)


def _pad_rows(a: np.ndarray, rows: int) -> np.ndarray:
    """``a`` with ``rows`` rows: copies of its first row fill the gap (real, finite inputs, so
    the padded rows' outputs stay finite and their zero loss weight gives zero gradient)."""
    a = np.ascontiguousarray(a)
    if len(a) == rows:
        return a
    return np.ascontiguousarray(np.concatenate([a, np.repeat(a[:1], rows - len(a), axis=0)]))
