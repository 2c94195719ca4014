"""Named scenarios: how much of the runtime's cycle a target runs (``runtime/scenario.py``
runs it; these are its arguments). The same scenario and seed on two machines must give the
same losses and outputs, within ``parity``'s tolerances."""
from __future__ import annotations

from dataclasses import dataclass

from edgepeft.errors import SpecError


@dataclass(frozen=True)
class Scenario:
    """``seq=None``: the bundle's max_length. ``threads=None``: the target's cores (a device
    profile's, or this host's)."""

    name: str
    steps: int
    batch: int
    seq: int | None
    seed: int = 0
    threads: int | None = 1
    lr: float = 1e-2

    def __post_init__(self):
        for field in ("steps", "batch"):
            if getattr(self, field) < 1:
                raise SpecError(f"scenario {self.name!r}: `{field}` must be >= 1, got {getattr(self, field)}")
        if self.seq is not None and self.seq < 1:
            raise SpecError(f"scenario {self.name!r}: `seq` must be >= 1 or None, got {self.seq}")

    def args(self, threads: int | None) -> list[str]:
        """Command-line arguments of ``python -m edgepeft.runtime.scenario``."""
        out = ["--steps", str(self.steps), "--batch", str(self.batch), "--seed", str(self.seed), "--lr", repr(self.lr),
               "--threads", str(self.threads or threads or 1)]
        return out + (["--seq", str(self.seq)] if self.seq else [])


SCENARIOS = {
    # Emulation runs 10-500x slower: a few steps of a short batch prove the arithmetic.
    "smoke": Scenario("smoke", steps=3, batch=2, seq=16),
    # What an app would do on the board: full-length batches of 8, every core.
    "standard": Scenario("standard", steps=5, batch=8, seq=None, threads=None),
}


def get(name: str, *, seed: int | None = None) -> Scenario:
    if name not in SCENARIOS:
        raise SpecError(f"unknown scenario {name!r}; known: {', '.join(SCENARIOS)}")
    s = SCENARIOS[name]
    if seed is None:
        return s
    return Scenario(s.name, s.steps, s.batch, s.seq, seed, s.threads, s.lr)
