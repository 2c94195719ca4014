"""The device side of the fleet: one Session over the bundle and one Personalizer holding its
users' samples (a phone has one user; a simulation puts many virtual devices in one process
and swaps their adapters over the one frozen base). Torch-free: numpy, the runtime, flwr.

A fleet round on a device: check the fleet adapter (its bundle, its signature), load it into
the user's working adapter ``<user>.fleet`` (fresh optimizer state), train K steps on batches
drawn from the user's own buffered samples (the Personalizer's train side; its held-out side
stays for evaluation and the guardrail), inside the session's memory budget, and return the
trainable tensors with the number of training samples. The user's personal adapter (named
after the user) is only touched by ``edgepeft.fleet.personal``."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np

from edgepeft.data import Batch, Example
from edgepeft.errors import SignatureError, SpecError
from edgepeft.memory import parse_size
from edgepeft.runtime import EvalResult, OptimizerSpec, Personalizer, PersonalizerConfig, Session
from edgepeft.runtime.samples import Sample, shuffled_batches

from edgepeft.fleet import signed
from edgepeft.fleet.errors import FleetError
from edgepeft.fleet.privacy import PrivacyConfig
from edgepeft.fleet.wire import Tensors, bundle_sha256, check_tensors

BASE_ADAPTER = "fleet-base"


@dataclass(frozen=True)
class DeviceSettings:
    """One device process. ``root`` holds its adapter store (``adapters/``) and its users'
    sample buffers (``loop/``). ``trusted_keys``: publisher .pub files; when given, a fleet
    adapter must be signed by one of them or the device refuses it."""

    bundle: str
    root: str
    memory_budget: str | None = None
    backend: str = "auto"
    threads: int = 1
    lr: float = 3e-3
    batch_size: int = 8
    eval_batch_size: int = 16
    trusted_keys: tuple[str, ...] = ()
    cache_dir: str | None = None
    personal_steps: int = 10     # steps of a personalization round (edgepeft.fleet.personal)
    privacy: PrivacyConfig | None = None  # mode "sample": local steps are DP-SGD (edgepeft.fleet.privacy)

    def __post_init__(self) -> None:
        for name in ("threads", "batch_size", "eval_batch_size", "personal_steps"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise SpecError(f"`{name}` must be an int >= 1, got {v!r}")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise SpecError(f"`lr` must be > 0, got {self.lr!r}")
        if self.privacy is not None and self.privacy.mode != "sample":
            raise SpecError(f"a device's `privacy` is sample-level DP (mode 'sample'), got mode {self.privacy.mode!r}: "
                            "client-level DP is the server's FleetSettings(privacy=...)")
        if self.memory_budget is not None:
            parse_size(self.memory_budget)
        if not Path(self.bundle).is_file():
            raise SpecError(f"`bundle` {self.bundle!r} is not a file: pass the exported .edgepeft bundle")


class Device:
    """One Session + Personalizer over a bundle (see the module docstring)."""

    def __init__(self, settings: DeviceSettings):
        self.settings = settings
        root = Path(settings.root)
        self.bundle_sha = bundle_sha256(settings.bundle)
        self.session = Session.open(settings.bundle, memory_budget=settings.memory_budget, adapter=BASE_ADAPTER,
                                    store=root / "adapters", backend=settings.backend, threads=settings.threads,
                                    optimizer=OptimizerSpec(lr=settings.lr), cache_dir=settings.cache_dir,
                                    batch_size=settings.batch_size)
        self.personalizer = Personalizer(self.session, root / "loop", PersonalizerConfig(
            every=0, steps=settings.personal_steps, batch_size=settings.batch_size, eval_batch_size=settings.eval_batch_size, min_holdout=1,
            min_train=1))

    @property
    def manifest(self):
        return self.session.manifest

    def accept(self, tensors: Mapping[str, np.ndarray], *, bundle_sha: str, version: int,
               signature: bytes | None) -> Tensors:
        """The fleet adapter as sent, checked: for this bundle, the declared tensors, finite,
        and (with trusted keys) signed by the publisher over exactly these tensors."""
        if bundle_sha != self.bundle_sha:
            raise FleetError(f"the fleet adapter is for bundle {bundle_sha[:12]}, this device runs "
                             f"{self.bundle_sha[:12]}: update the device's bundle or join the right fleet")
        out = check_tensors(tensors, self.manifest, "the fleet adapter")
        if self.settings.trusted_keys:
            try:
                signed.verify(out, self.bundle_sha, version, signature, self.settings.trusted_keys)
            except SignatureError as e:
                raise FleetError(f"refusing the fleet adapter: {e}") from None
        return out

    def load(self, name: str, tensors: Mapping[str, np.ndarray], meta: Mapping | None = None) -> None:
        """Make ``tensors`` the active adapter ``name``, stored, with fresh optimizer state."""
        s = self.session
        s.store.save(name, tensors, meta=dict(meta or {"steps": 0}))
        s.swap_adapter(name)
        s.revert_adapter()  # back from the store: a swap may have found a stale in-memory copy

    def samples(self, user: str) -> tuple[list[Sample], list[Sample]]:
        """The user's buffered samples as (train, held-out): the Personalizer's split."""
        return self.personalizer.split(user)

    def batch(self, samples: Sequence[Sample]) -> Batch:
        return self.session.encoder.batch([Example(s.data["text"], s.data.get("label")) for s in samples])

    def train(self, user: str, fleet: Mapping[str, np.ndarray], *, steps: int, seed: str) -> tuple[Tensors, int, list[float]]:
        """K local steps from the fleet adapter on the user's own training samples."""
        train = self.samples(user)[0]
        if not train:
            raise FleetError(f"user {user!r} has no training samples in {self.settings.root!r}: add samples first")
        self.load(f"{user}.fleet", fleet)
        losses = [self.session.train_step(b) for b in self._batches(train, steps, seed)]
        return self.session.parameters(), len(train), losses

    def train_private(self, user: str, fleet: Mapping[str, np.ndarray], *, steps: int, round_: int,
                      rounds: int, rng: np.random.Generator | None = None) -> tuple[Tensors, int, list[float], dict]:
        """``train`` as DP-SGD (``settings.privacy``, mode "sample"): Poisson batches of expected
        size ``batch_size``, sigma calibrated for the target epsilon over ``rounds`` x ``steps``
        steps; also returns {noise, q, clip, delta, epsilon after ``round_`` rounds}."""
        from edgepeft.fleet import privacy as dp

        cfg = self.settings.privacy
        train = self.samples(user)[0]
        if not train:
            raise FleetError(f"user {user!r} has no training samples in {self.settings.root!r}: add samples first")
        q = dp.sampling_rate(self.settings.batch_size, len(train))
        noise = dp.noise_for(cfg, q=q, planned_steps=rounds * steps)
        rng = rng or np.random.default_rng()  # OS entropy: DP noise must not be predictable
        self.load(f"{user}.fleet", fleet)
        losses = []
        for _ in range(steps):
            pick = dp.poisson_sample(len(train), q, rng)
            losses.append(dp.dpsgd_step(self.session, self.batch([train[i] for i in pick]) if pick else None,
                                        noise=noise, clip=cfg.clip, expected_batch=q * len(train), rng=rng))
        eps = dp.dpsgd_epsilon(noise, q=q, steps=round_ * steps, delta=cfg.delta)
        info = {"noise": noise, "q": q, "clip": cfg.clip, "delta": cfg.delta, "epsilon": eps}
        return self.session.parameters(), len(train), losses, info

    def evaluate(self, user: str, tensors: Mapping[str, np.ndarray] | None = None,
                 samples: Sequence[Sample] | None = None) -> EvalResult:
        """``tensors`` (default: the active adapter) on ``samples`` (default: the user's
        held-out side)."""
        if tensors is not None:
            self.load(f"{user}.fleet", tensors)
        hold = list(samples) if samples is not None else self.samples(user)[1]
        if not hold:
            raise FleetError(f"user {user!r} has no held-out samples to evaluate on: add more samples")
        k = self.settings.eval_batch_size
        return self.session.evaluate(self.batch(hold[i:i + k]) for i in range(0, len(hold), k))

    def _batches(self, train: list[Sample], steps: int, seed: str) -> Iterator[Batch]:
        """``steps`` batches without replacement, reshuffled after each pass."""
        for batch in shuffled_batches(train, steps, self.settings.batch_size, seed):
            yield self.batch(batch)

    def close(self) -> None:
        self.session.close()
