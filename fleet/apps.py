"""The ServerApp and ClientApp a deployment runs (the components of the Flower app that
``edgepeft.fleet.deploy`` writes). Everything comes from the run's config (``flwr run
--run-config``: the fleet's settings) and each SuperNode's node config (its device: ``root``,
``user``, ``memory-budget``, ``backend``)."""
from __future__ import annotations

from flwr.app import Context

from edgepeft.fleet.client import make_client_app
from edgepeft.fleet.device import DeviceSettings
from edgepeft.fleet.server import make_server_app


def device_from_context(context: Context) -> tuple[DeviceSettings, str]:
    run, node = context.run_config, context.node_config
    budget = str(node.get("memory-budget", "")) or None
    trusted = str(run.get("trusted-key", ""))
    return DeviceSettings(bundle=str(run["bundle"]), root=str(node["root"]), memory_budget=budget,
                          backend=str(node.get("backend", "portable")), threads=int(node.get("threads", 1)),
                          lr=float(run["lr"]), batch_size=int(run["batch-size"]),
                          trusted_keys=(trusted,) if trusted else ()), str(node["user"])


client_app = make_client_app(device_from_context)
server_app = make_server_app()
