"""The fleet's ServerApp: the bundle's initial adapter as version 0, then R rounds of the
FleetStrategy over FedAvg (DP: inside Flower's client-side fixed-clipping wrapper, with its
RDP accountant), the history written to ``<out>/fleet.json`` and each version published,
signed, under ``<out>/published/``."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping, FedAvg

from edgepeft.adapters import AdapterStore
from edgepeft.bundle import open_bundle
from edgepeft.errors import SpecError
from edgepeft.fsutil import atomic_write_bytes
from edgepeft.signing import load_private_key

from edgepeft.fleet.privacy import PrivacyConfig
from edgepeft.fleet.strategy import FleetStrategy
from edgepeft.fleet.wire import bundle_sha256, to_record


@dataclass(frozen=True)
class FleetSettings:
    """One fleet run. ``clients``: nodes sampled per round (and the fewest that must be
    connected to start one). ``dp_noise`` > 0 turns on central DP with client-side clipping
    (clients must clip: ``make_client_app(clip=True)``): Gaussian noise of std
    ``dp_noise * dp_clip / clients`` on the mean update, accounted by Flower's RDP accountant
    at ``dp_delta`` (user-level, every client every round: no sampling amplification)."""

    bundle: str
    out: str
    rounds: int = 3
    clients: int = 2
    local_steps: int = 5
    key: str | None = None
    dp_noise: float = 0.0
    dp_clip: float = 1.0
    dp_delta: float = 1e-5
    timeout: float = 600.0
    cache_dir: str | None = None
    secagg: bool = False         # SecAgg+ (edgepeft.fleet.secagg): the server sees only the sum
    # DP as one config (edgepeft.fleet.privacy): mode "client" sets dp_noise/dp_clip/dp_delta
    # (noise calibrated here for its epsilon); mode "sample" runs DP-SGD on the devices.
    privacy: PrivacyConfig | None = None

    def __post_init__(self) -> None:
        if self.privacy is not None:
            self._resolve_privacy()
        for name in ("rounds", "clients", "local_steps"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise SpecError(f"`{name}` must be an int >= 1, got {v!r}")
        if self.dp_noise < 0 or self.dp_clip <= 0 or not 0 < self.dp_delta < 1 or self.timeout <= 0:
            raise SpecError(f"DP settings out of range: dp_noise={self.dp_noise} (>= 0), dp_clip={self.dp_clip} (> 0), "
                            f"dp_delta={self.dp_delta} (in (0, 1)), timeout={self.timeout} (> 0)")
        if self.secagg and (self.dp_noise > 0 or self.privacy is not None or self.clients < 3):
            raise SpecError("`secagg` needs >= 3 clients and runs without DP noise here (Flower's SecAgg+ workflow "
                            "is a legacy workflow, its DP wrappers are not); drop one of them")

    def _resolve_privacy(self) -> None:
        p = self.privacy
        if self.dp_noise > 0:
            raise SpecError("give DP either as `privacy` or as `dp_noise`, not both")
        if p.mode == "client":
            noise = p.noise_multiplier if p.noise_multiplier is not None else noise_for_epsilon(
                p.epsilon, rounds=self.rounds, clients=self.clients, delta=p.delta)
            for k, v in (("dp_noise", noise), ("dp_clip", p.clip), ("dp_delta", p.delta)):
                object.__setattr__(self, k, v)  # frozen: the derived fields are set once, here

    @property
    def sample_dp(self) -> bool:
        return self.privacy is not None and self.privacy.mode == "sample"


def accountant(settings: FleetSettings):
    from flwr.serverapp import PrivacyConfig, RdpAccountant
    from flwr.supercore.privacy_accounting import NeighboringRelation, SamplingMethod

    return RdpAccountant(PrivacyConfig(target_delta=settings.dp_delta, population_size=settings.clients,
                                       neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
                                       sampling_method=SamplingMethod.NO_AMPLIFICATION))


def epsilon_after(rounds: int, noise: float, clients: int, delta: float) -> float:
    """The accountant's epsilon after ``rounds`` releases at ``noise`` (to choose the noise)."""
    from flwr.supercore.privacy_accounting import GaussianPrivacyEvent

    acc = accountant(FleetSettings(bundle=__file__, out=".", clients=clients, dp_noise=noise, dp_delta=delta))
    acc.compose(GaussianPrivacyEvent(noise_multiplier=noise, sample_size=clients, population_size=clients), rounds)
    return acc.get_epsilon(delta)


def noise_for_epsilon(epsilon: float, *, rounds: int, clients: int, delta: float) -> float:
    """The smallest noise multiplier (to 1e-3) whose epsilon after ``rounds`` is <= ``epsilon``."""
    lo, hi = 0.05, 100.0
    while hi - lo > 1e-3:
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if epsilon_after(rounds, mid, clients, delta) <= epsilon else (mid, hi)
    return hi


def inner_strategy(settings: FleetSettings):
    n = settings.clients
    dp = settings.dp_noise > 0
    # DP weights devices uniformly: a weight by example count would depend on the data.
    avg = FedAvg(fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=n, min_evaluate_nodes=n,
                 min_available_nodes=n, weighted_by_key="unit-weight" if dp or settings.sample_dp else "num-examples")
    if not dp:
        return avg
    return DifferentialPrivacyClientSideFixedClipping(avg, settings.dp_noise, settings.dp_clip, n,
                                                      accountant=accountant(settings))


def run_fleet(grid: Grid, settings: FleetSettings) -> dict[str, Any]:
    """Run the fleet on ``grid`` and write ``<out>/fleet.json``; returns what it wrote."""
    opened = open_bundle(Path(settings.bundle), Path(settings.cache_dir) if settings.cache_dir else None)
    loaded = AdapterStore(opened.root / "adapters", opened.manifest).load("initial")[0]
    initial = {n: loaded[n] for n in opened.manifest.trainable_names}  # the manifest's order, everywhere
    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    key = load_private_key(settings.key) if settings.key else None
    strat = FleetStrategy(inner_strategy(settings), manifest=opened.manifest, bundle_sha=bundle_sha256(settings.bundle),
                          publish_dir=out / "published", key=key)
    strat.start(grid, to_record(initial), num_rounds=settings.rounds, timeout=settings.timeout,
                # planned-rounds: sample-level DP calibrates its noise over the whole run
                train_config=ConfigRecord({"local-steps": settings.local_steps, "planned-rounds": settings.rounds}),
                evaluate_config=ConfigRecord())
    doc = {"settings": asdict(settings), "bundle_sha256": strat.bundle_sha, "version": strat.version,
           "trainable_params": opened.manifest.trainable_params, "rounds": strat.history}
    atomic_write_bytes(out / "fleet.json", json.dumps(doc, indent=1, default=str).encode())
    return doc


def settings_from_context(context: Context) -> FleetSettings:
    """FleetSettings from a deployment run's config (``flwr run --run-config``)."""
    c = context.run_config
    return FleetSettings(bundle=str(c["bundle"]), out=str(c["out"]), rounds=int(c["rounds"]),
                         clients=int(c["clients"]), local_steps=int(c["local-steps"]),
                         key=str(c["key"]) or None, timeout=float(c["timeout"]))


def make_server_app(settings: FleetSettings | None = None) -> ServerApp:
    """A ServerApp running ``settings`` (None: read them from the run config)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        s = settings or settings_from_context(context)
        if s.secagg:
            from edgepeft.fleet.secagg import run_secagg

            run_secagg(grid, context, s)
        else:
            run_fleet(grid, s)

    return app
