"""The fleet's two privacy modes, one config (``PrivacyConfig``), and sample-level DP-SGD on
the device. Torch-free: numpy and ``dp_accounting`` (installed with ``flwr[dp]``).

- ``client`` (user-level): each device's whole update is clipped (Flower's
  ``fixedclipping_mod``) and the server adds Gaussian noise to the mean (Flower's DP wrapper
  and RDP accountant; ``edgepeft.fleet.server``). Protects a whole user, but the noise on the
  mean shrinks only with the number of users.
- ``sample`` (example-level, the private fine-tuning literature's setting, e.g. Yu et al.
  2021): each device runs DP-SGD over its own samples: Poisson subsampling at rate
  q = batch / n, per-example gradients clipped to norm C, summed, Gaussian noise
  N(0, (sigma C)^2) added, divided by the expected batch q n, then the session's optimizer
  step (its update guard included). The device's samples are used only on that device, so
  its epsilon is the composition of its own steps (``dp_accounting``'s RDP accountant over
  PoissonSampledDpEvent(q, GaussianDpEvent(sigma))); what it sends is post-processing."""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np

from edgepeft.data import Batch
from edgepeft.errors import SpecError


@dataclass(frozen=True)
class PrivacyConfig:
    """``mode``: "sample" (DP-SGD on each device) or "client" (clipping on the device, noise
    on the server). Give ``epsilon`` (the noise is calibrated to reach it at ``delta`` after
    the planned rounds) or ``noise_multiplier`` (sigma; epsilon is then reported).
    ``clip``: the clipping norm (of an example's gradient in "sample" mode, of a device's
    update in "client" mode)."""

    mode: Literal["sample", "client"]
    epsilon: float | None = None
    noise_multiplier: float | None = None
    clip: float = 1.0
    delta: float = 1e-5

    def __post_init__(self) -> None:
        if self.mode not in ("sample", "client"):
            raise SpecError(f"`mode` must be 'sample' or 'client', got {self.mode!r}")
        if (self.epsilon is None) == (self.noise_multiplier is None):
            raise SpecError("give exactly one of `epsilon` (a target) or `noise_multiplier`, got "
                            f"epsilon={self.epsilon!r}, noise_multiplier={self.noise_multiplier!r}")
        if self.epsilon is not None and not (math.isfinite(self.epsilon) and self.epsilon > 0):
            raise SpecError(f"`epsilon` must be > 0, got {self.epsilon!r}")
        sigma = self.noise_multiplier
        if sigma is not None and not (math.isfinite(sigma) and sigma >= 0):
            raise SpecError(f"`noise_multiplier` must be >= 0, got {self.noise_multiplier!r}")
        if not (math.isfinite(self.clip) and self.clip > 0):
            raise SpecError(f"`clip` must be > 0, got {self.clip!r}")
        if not 0 < self.delta < 1:
            raise SpecError(f"`delta` must be in (0, 1), got {self.delta!r}")


# RDP orders from 2 up: dp_accounting's fractional orders below 2 fail to converge (and warn)
# at these sampling rates; they would only be dropped from the minimum anyway.
ORDERS = tuple([2 + x / 4 for x in range(40)] + list(range(12, 64)) + [128, 256, 512])


def _accountant():
    from dp_accounting.rdp import RdpAccountant

    return RdpAccountant(ORDERS)


def _event(noise: float, q: float, steps: int):
    import dp_accounting

    return dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(noise)), steps)


def dpsgd_epsilon(noise: float, *, q: float, steps: int, delta: float) -> float:
    """Epsilon at ``delta`` after ``steps`` DP-SGD steps (``dp_accounting``'s RDP accountant)."""
    if noise <= 0 and steps > 0:
        return math.inf
    acc = _accountant()
    acc.compose(_event(noise, q, steps))
    return float(acc.get_epsilon(delta))


@functools.lru_cache(maxsize=256)
def dpsgd_noise(epsilon: float, *, q: float, steps: int, delta: float) -> float:
    """The noise multiplier whose epsilon after ``steps`` steps at rate ``q`` is ``epsilon``
    (``dp_accounting.calibrate_dp_mechanism``: the smallest sigma within its tolerance that
    does not exceed the target)."""
    import dp_accounting

    return float(dp_accounting.calibrate_dp_mechanism(
        _accountant, lambda s: _event(s, q, steps), epsilon, delta,
        bracket_interval=dp_accounting.ExplicitBracketInterval(1e-3, 1e3), tol=1e-3))


def sampling_rate(batch_size: int, n: int) -> float:
    """Poisson rate giving an expected batch of ``batch_size`` out of ``n`` samples."""
    return min(1.0, batch_size / n)


def noise_for(cfg: PrivacyConfig, *, q: float, planned_steps: int) -> float:
    return cfg.noise_multiplier if cfg.noise_multiplier is not None else dpsgd_noise(
        cfg.epsilon, q=q, steps=planned_steps, delta=cfg.delta)


def poisson_sample(n: int, q: float, rng: np.random.Generator) -> list[int]:
    """Each of ``n`` indices kept independently with probability ``q`` (may be empty)."""
    return [int(i) for i in np.flatnonzero(rng.random(n) < q)]


def clip_grads(grads: dict[str, np.ndarray], clip: float) -> tuple[dict[str, np.ndarray], float]:
    """``grads`` scaled to norm <= ``clip`` (over all tensors together); returns them and the norm before."""
    norm = math.sqrt(sum(float(np.sum(np.square(g, dtype=np.float64))) for g in grads.values()))
    scale = min(1.0, clip / norm) if norm > 0 else 1.0
    return {k: (g * scale).astype(g.dtype, copy=False) for k, g in grads.items()}, norm


def noisy_mean(clipped: Sequence[dict[str, np.ndarray]], shapes: dict[str, tuple], *, noise: float, clip: float,
               expected_batch: float, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """(sum of the clipped per-example gradients + N(0, (noise clip)^2)) / expected batch.
    Dividing by the expected, not the drawn, batch size keeps the sum's sensitivity at ``clip``."""
    out = {}
    for k, shape in shapes.items():
        total = np.zeros(shape, np.float64)
        for g in clipped:
            total += g[k]
        total += rng.normal(0.0, noise * clip, size=shape)
        out[k] = (total / expected_batch).astype(np.float32)
    return out


def one(b: Batch, i: int) -> Batch:
    """Example ``i`` of ``b`` as a batch of one (its per-example gradient)."""
    return Batch({k: v[i:i + 1] for k, v in b.feeds.items()}, None if b.labels is None else b.labels[i:i + 1])


def dpsgd_step(session, batch: Batch | None, *, noise: float, clip: float, expected_batch: float,
               rng: np.random.Generator) -> float:
    """One DP-SGD step on the session's active adapter over ``batch`` (the Poisson draw; None:
    empty): per-example gradients from the backend, each clipped to ``clip``, the noisy mean,
    then the session's optimizer step behind its update guard. Returns the mean example loss
    (0.0 for an empty draw, which still takes a noise-only step, as the accounting assumes)."""
    shapes = {t.name: tuple(t.shape) for t in session.manifest.trainable}
    losses, clipped = [], []
    with session.training_phase():
        for i in range(0 if batch is None else len(batch)):
            loss, grads = session.backend.forward_backward(one(batch, i))
            losses.append(float(loss))
            clipped.append(clip_grads(grads, clip)[0])
        grads = noisy_mean(clipped, shapes, noise=noise, clip=clip, expected_batch=expected_batch, rng=rng)
        loss = sum(losses) / len(losses) if losses else 0.0
        # The session's own step: gradient shape checks, finite checks, the update guard.
        session.apply_gradients(loss, grads)
    return loss
