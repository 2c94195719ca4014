"""What the Session's public methods accept, checked before any work, with a DataError that
says what was expected. Python would otherwise take a string for a list of one-character texts,
or fail deep inside the tokenizer with a TypeError."""
from __future__ import annotations

from typing import Any, Iterable, Mapping

import numpy as np

from edgepeft.data import Batch, Example
from edgepeft.errors import DataError

_EXAMPLES = "a Batch, or a list of Example(text, label) objects"


def examples(batch: Any, what: str) -> list[Example]:
    """``batch`` (not a Batch) as a checked list of Examples."""
    if isinstance(batch, (str, bytes, Mapping)) or not isinstance(batch, Iterable):
        raise DataError(f"{what} takes {_EXAMPLES}, got {_kind(batch)}")
    items = list(batch)
    for i, e in enumerate(items):
        if not isinstance(e, Example):
            hint = f": write Example{tuple(e)!r}" if isinstance(e, tuple) and len(e) == 2 else ""
            raise DataError(f"{what} takes {_EXAMPLES}; item {i} is {_kind(e)}{hint}")
    return items


def batches(value: Any) -> Iterable:
    """``evaluate``'s argument: an iterable of batches, not one batch or a list of Examples."""
    if isinstance(value, Batch):
        raise DataError("evaluate() takes an iterable of batches, got one Batch: pass [batch]")
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Iterable):
        raise DataError(f"evaluate() takes an iterable of batches ({_EXAMPLES} each), got {_kind(value)}")
    return value


def check_batch_item(item: Any) -> None:
    """One item of ``evaluate``'s iterable: an Example means the caller passed examples, not batches."""
    if isinstance(item, Example):
        raise DataError("evaluate() takes batches, got an Example: pass session.encoder.batches(examples, 16) "
                        "or [examples] (a list of lists of Examples)")


def texts(value: Any, what: str) -> list[str]:
    """``infer``/``predict``'s texts: a list of strings (a lone string is refused, not split
    into characters)."""
    if isinstance(value, str):
        raise DataError(f"{what} takes a list of texts, got one string: pass [{_short(value)!r}]")
    if isinstance(value, bytes) or not isinstance(value, Iterable):
        raise DataError(f"{what} takes a list of texts or a mapping of input name -> array, got {_kind(value)}")
    items = list(value)
    for i, t in enumerate(items):
        if not isinstance(t, str):
            raise DataError(f"{what} takes a list of texts (strings); item {i} is {_kind(t)}")
    return items


def feeds(value: Mapping, inputs: list[str], max_length: int) -> dict[str, np.ndarray]:
    """Model input arrays by name: numeric arrays with a batch axis, one batch size across the
    bundle's ``inputs``, sequences no longer than the bundle's ``max_length``."""
    out = {}
    for name, v in value.items():
        if not isinstance(name, str):
            raise DataError(f"model inputs are named by strings ({inputs}), got key {name!r}")
        arr = np.asarray(v) if not isinstance(v, np.ndarray) else v
        if arr.dtype.kind not in "biuf" or arr.ndim == 0:
            raise DataError(f"model input {name!r} must be a numeric array with a batch axis, got {_kind(v)}")
        out[name] = arr
    long = [n for n in inputs if n in out and out[n].ndim >= 2 and out[n].dtype.kind in "iu"
            and out[n].shape[1] > max_length]
    if long:
        raise DataError(f"model inputs {long} are longer than the bundle's max_length {max_length} tokens: "
                        "truncate them (the bundle's tokenizer does)")
    # Missing names are the backend's check (base.check_inputs), as for a Batch.
    sizes = {len(out[n]) for n in inputs if n in out}
    if len(sizes) > 1:
        raise DataError(f"model inputs {inputs} have different batch sizes {sorted(sizes)}")
    return out


def _kind(v: Any) -> str:
    if isinstance(v, np.ndarray):
        return f"an array of shape {v.shape} and dtype {v.dtype}"
    return f"{type(v).__name__} {_short(repr(v))}"


def _short(text: str, n: int = 40) -> str:
    return text if len(text) <= n else text[:n] + "..."


def open_options(*, threads: Any, optimizer: Any, batch_size: Any, update_guard: Any) -> None:
    """Session.open's options, checked before anything loads (SpecError saying what is expected)."""
    from edgepeft.errors import SpecError
    from edgepeft.optim import OptimizerSpec
    from edgepeft.runtime.guard import UpdateGuard

    for name, v in (("threads", threads), ("batch_size", batch_size)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise SpecError(f"`{name}` must be a positive int or None, got {v!r}")
    if optimizer is not None and not isinstance(optimizer, OptimizerSpec):
        raise SpecError(f"`optimizer` must be an OptimizerSpec or None, got {_kind(optimizer)}: "
                        "e.g. OptimizerSpec(name='adamw', lr=1e-3)")
    if update_guard is not None and not isinstance(update_guard, UpdateGuard):
        raise SpecError(f"`update_guard` must be an UpdateGuard or None, got {_kind(update_guard)}: "
                        "e.g. UpdateGuard(max_ratio=10.0, floor=0.1)")
