"""``edgepeft fleet simulate``: the fleet on Flower's simulation engine (ray), one machine.

The N virtual devices run in ONE ray actor, i.e. one device process: one Session over the
bundle, each virtual device's adapter swapped in over the one frozen base (what the Session is
built for), and each user's samples in its own Personalizer buffer under ``<root>/loop/``.
One actor also keeps a user's adapters in one process: an adapter store locks an adapter to
the process using it."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Mapping, Sequence

from flwr.app import Context

from edgepeft.bundle import default_cache_dir
from edgepeft.data import Example
from edgepeft.runtime.samples import SampleBuffer

from edgepeft.fleet.client import make_client_app
from edgepeft.fleet.device import DeviceSettings
from edgepeft.fleet.server import FleetSettings, make_server_app


def user_name(partition: int) -> str:
    return f"user-{int(partition):02d}"


@dataclass(frozen=True)
class SimResolver:
    """Node ``partition-id`` i is user ``user-ii`` of the one simulated device process."""

    settings: DeviceSettings

    def __call__(self, context: Context) -> tuple[DeviceSettings, str]:
        return self.settings, user_name(int(context.node_config["partition-id"]))


def seed_samples(root: str | Path, users: Mapping[str, Sequence[Example]], capacity: int = 1000) -> None:
    """Put each user's samples in its Personalizer buffer (as the device collected them)."""
    for user, examples in users.items():
        buf = SampleBuffer(Path(root) / "loop" / user / "samples.log", capacity, fsync=False)
        buf.add([{"text": e.text, "label": e.label} for e in examples])


def simulate(fleet: FleetSettings, device: DeviceSettings, *, nodes: int, int8: bool = False,
             cpus: int = 2) -> dict:
    """Run ``fleet`` over ``nodes`` virtual devices (samples already seeded under
    ``device.root``); returns the run's history (also in ``<fleet.out>/fleet.json``)."""
    from flwr.simulation import run_simulation

    # The bundle cache is resolved here: ray's worker processes need not see this process's
    # environment (EDGEPEFT_CACHE).
    device = replace(device, threads=max(1, cpus), cache_dir=device.cache_dir or str(default_cache_dir()),
                     privacy=fleet.privacy if fleet.sample_dp else device.privacy)
    client = make_client_app(SimResolver(device), clip=fleet.dp_noise > 0, int8=int8, secagg=fleet.secagg)
    backend = {"client_resources": {"num_cpus": cpus, "num_gpus": 0.0},
               "init_args": {"num_cpus": cpus, "num_gpus": 0, "include_dashboard": False,
                             "logging_level": "error", "log_to_driver": True}}
    # Ray sets PYTHONPATH in this process's environment and leaves it: restore it, or every later
    # subprocess of the caller (a device script, a fresh venv) imports the driver's paths.
    saved = os.environ.get("PYTHONPATH")
    try:
        run_simulation(make_server_app(fleet), client, num_supernodes=nodes, backend_config=backend)
    finally:
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved
    path = Path(fleet.out) / "fleet.json"
    if not path.exists():
        from edgepeft.fleet.errors import FleetError

        raise FleetError(f"the simulation ended without writing {path}: see the log above")
    return json.loads(path.read_text())
