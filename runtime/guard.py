"""The update-size guard: a step whose update is out of proportion to the adapter's weights is
refused like a non-finite one (NumericalError, nothing changed).

A finite but absurd learning rate (1e30) gives a finite update on the first step and NaN on the
next; the guard catches it on the first. Policy, per trainable tensor ``p`` with update ``d``
(RMS = root mean square over the tensor's elements):

    RMS(d) <= max_ratio * max(RMS(p), floor)

With the defaults (max_ratio 10, floor 0.1) a step may move a tensor by at most 10 times its own
RMS, and a tensor whose RMS is under 0.1 (a fresh LoRA B is all zeros, biases start near zero)
by at most RMS 1.0. AdamW moves each element by about ``lr`` per step, so it trips only for
lr >~ 1 on small tensors; SGD at lr 0.1 with gradients of RMS < 1 stays far below it. Normal
training (the examples, the demo, the test suite: lr <= 0.1) never comes near it."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import numpy as np

from edgepeft.errors import SpecError


@dataclass(frozen=True)
class UpdateGuard:
    """``RMS(update) <= max_ratio * max(RMS(tensor), floor)`` for every trainable tensor, or the
    step is refused. Pass ``Session.open(..., update_guard=UpdateGuard(max_ratio=100))`` to
    loosen it, ``update_guard=None`` to turn it off (non-finite steps are refused regardless)."""

    max_ratio: float = 10.0
    floor: float = 0.1

    def __post_init__(self) -> None:
        for field in ("max_ratio", "floor"):
            v = getattr(self, field)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise SpecError(f"UpdateGuard `{field}` must be a finite number > 0, got {v!r}: "
                                f"e.g. UpdateGuard(max_ratio=10.0, floor=0.1)")

    def violations(self, before: Mapping[str, np.ndarray], after: Mapping[str, np.ndarray]) -> list[str]:
        """One line per tensor whose update breaks the policy (empty: the step may go ahead)."""
        out = []
        for name, p in before.items():
            limit = self.max_ratio * max(_rms(p), self.floor)
            moved = _rms(np.asarray(after[name], np.float64) - np.asarray(p, np.float64))
            if moved > limit:
                out.append(f"{name} by RMS {moved:.3g} (limit {limit:.3g})")
        return out


def _rms(x: np.ndarray) -> float:
    x = np.asarray(x, np.float64)
    return float(np.sqrt(np.mean(np.square(x)))) if x.size else 0.0
