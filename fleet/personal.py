"""Personalization on top of the fleet: each device keeps its own adapter (named after its
user, owned by the Personalizer), started from or mixed with the fleet adapter, and kept only
if it passes the Personalizer's guardrail.

``adopt_fleet`` forms ``own * (1 - mix) + fleet * mix`` (mix=1: start from the fleet's) and
keeps it as the user's adapter only if it is not worse than the user's current one on the
user's held-out slice (the Personalizer's guard slice and metric); then a Personalizer round
(K local steps, its own guardrail) can refine it on the device's samples."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np

from edgepeft.errors import SpecError
from edgepeft.runtime import EvalResult, RoundResult

from edgepeft.fleet.device import Device


@dataclass(frozen=True)
class Adoption:
    user: str
    mix: float
    accepted: bool
    before: EvalResult
    candidate: EvalResult
    round: RoundResult | None = None


def adopt_fleet(dev: Device, user: str, fleet: Mapping[str, np.ndarray], *, mix: float = 1.0,
                refine: bool = True) -> Adoption:
    """Mix the fleet adapter into ``user``'s own behind the guardrail, then (``refine``) run
    one Personalizer round on the user's samples."""
    if not (isinstance(mix, (int, float)) and 0.0 <= mix <= 1.0):
        raise SpecError(f"`mix` must be in [0, 1], got {mix!r}")
    p, s = dev.personalizer, dev.session
    p.activate(user)
    own = s.parameters()
    hold = p.guard_slice(user)[0]
    before = dev.evaluate(user, samples=hold)
    candidate = {k: ((1.0 - mix) * own[k] + mix * np.asarray(fleet[k], np.float32)).astype(np.float32) for k in own}
    dev.load(user, candidate, meta={"steps": s.steps, "fleet_mix": mix})
    after = dev.evaluate(user, samples=hold)
    ok = _not_worse(p.config.metric, p.config.tolerance, before, after)
    if not ok:
        dev.load(user, own, meta={"steps": s.steps})
    rnd = p.personalize(user) if refine else None
    return Adoption(user, float(mix), ok, before, after, rnd)


def _not_worse(metric: str, tolerance: float, before: EvalResult, after: EvalResult) -> bool:
    if not np.isfinite(after.loss):
        return False
    if metric == "loss":
        return after.loss <= before.loss + tolerance
    return after.accuracy >= before.accuracy - tolerance
