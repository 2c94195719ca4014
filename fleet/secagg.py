"""Secure aggregation with Flower's SecAgg+ (``SecAggPlusWorkflow`` on the server,
``secaggplus_mod`` on the devices): the server learns only the weighted sum of the devices'
adapters, never one device's. In flwr 1.42 SecAgg+ runs on the legacy workflow
(``LegacyContext`` + ``DefaultWorkflow`` + a ``flwr.server.strategy`` strategy) and its messages
use the legacy layout (``fitins.*`` / ``fitres.*``), so this module serves both ends of it:
the devices' ``legacy_train`` (called by the ClientApp when such a message arrives) and the
server's ``run_secagg``. Tensors travel as a list in the manifest's order.

What SecAgg+ changes: each device scales its tensors by its weight ``num_examples /
max_weight``, clips them to ``[-clipping_range, clipping_range]`` and quantizes them (a share of
``quantization_range`` levels) before masking, so the aggregate carries a quantization error:
about ``2 * clipping_range * devices / quantization_range / (num_examples / max_weight)`` per
value (~4e-5 for 3 devices of ~30 samples here; hence ``MAX_WEIGHT`` near the devices'
sample counts, not Flower's default 1000: a device with more samples than it would overflow).
The int8 delta encoding and per-reply checks do not apply (the server never sees a single
reply); the round's aggregate is checked and published as usual."""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from flwr.app import Context, Message

from edgepeft.adapters import AdapterStore
from edgepeft.bundle import open_bundle
from edgepeft.fsutil import atomic_write_bytes
from edgepeft.signing import load_private_key

from edgepeft.fleet import signed
from edgepeft.fleet.errors import FleetError
from edgepeft.fleet.wire import bundle_sha256, check_tensors

CLIPPING_RANGE = 8.0
QUANTIZATION_RANGE = 1 << 22
MAX_WEIGHT = 200.0


def legacy_train(msg: Message, context: Context, resolve) -> Message:
    """A device's train step for a SecAgg+ round (legacy FitIns in, FitRes out)."""
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.compat.common import recorddict_compat as compat

    from edgepeft.fleet.client import device_for

    settings, user = resolve(context)
    dev = device_for(settings)
    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    names = dev.manifest.trainable_names
    cfg = fitins.config
    sig = cfg.get("fleet-signature")
    fleet = dev.accept(dict(zip(names, parameters_to_ndarrays(fitins.parameters))), bundle_sha=str(cfg["bundle-sha256"]),
                       version=int(cfg["fleet-version"]), signature=bytes(sig) if sig else None)
    new, n, losses = dev.train(user, fleet, steps=int(cfg["local-steps"]), seed=f"{cfg['fleet-version']}:{user}")
    res = FitRes(status=Status(code=Code.OK, message=""), parameters=ndarrays_to_parameters([new[k] for k in names]),
                 num_examples=n, metrics={"train-loss-last": float(losses[-1])})
    return Message(compat.fitres_to_recorddict(res, keep_input=True), reply_to=msg)


def _signed_fedavg(manifest, sha: str, key, publish_dir: Path, local_steps: int, n: int, initial, history: list):
    from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.server.strategy import FedAvg

    names = manifest.trainable_names

    class SignedFedAvg(FedAvg):
        """Legacy FedAvg that stamps each round's FitIns (bundle, version, signature) and
        checks and publishes each aggregate (SecAgg+ hands it the unmasked sum only)."""

        version = 0

        def configure_fit(self, server_round, parameters, client_manager):
            pairs = super().configure_fit(server_round, parameters, client_manager)
            tensors = dict(zip(names, parameters_to_ndarrays(parameters)))
            stamp = {"bundle-sha256": sha, "fleet-version": self.version, "local-steps": local_steps}
            if key is not None:
                stamp["fleet-signature"] = signed.sign(tensors, sha, self.version, key)
            for _, ins in pairs:
                ins.config.update(stamp)
            history.append({"round": server_round, "sampled": len(pairs)})
            return pairs

        def aggregate_fit(self, server_round, results, failures):
            params, metrics = super().aggregate_fit(server_round, results, failures)
            row = history[-1]
            row.update(replies=len(results), failures=len(failures))
            if params is None:
                row["kept_previous"] = "no aggregate"
                return None, metrics
            try:
                tensors = check_tensors(dict(zip(names, parameters_to_ndarrays(params))), manifest, "the aggregate")
            except FleetError as e:
                row["kept_previous"] = str(e)
                return None, metrics
            self.version = server_round
            row["published"] = str(signed.publish(publish_dir, tensors, sha, server_round, key))
            return ndarrays_to_parameters([tensors[k] for k in names]), metrics

    return SignedFedAvg(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=n, min_available_clients=n,
                        initial_parameters=ndarrays_to_parameters([initial[k] for k in names]))


def run_secagg(grid, context: Context, settings) -> dict[str, Any]:
    """Run ``settings.rounds`` SecAgg+ rounds on ``grid``; writes ``<out>/fleet.json``."""
    from flwr.server import LegacyContext, ServerConfig
    from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow

    opened = open_bundle(Path(settings.bundle), Path(settings.cache_dir) if settings.cache_dir else None)
    initial = AdapterStore(opened.root / "adapters", opened.manifest).load("initial")[0]
    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    sha = bundle_sha256(settings.bundle)
    key = load_private_key(settings.key) if settings.key else None
    signed.publish(out / "published", initial, sha, 0, key)
    history: list[dict[str, Any]] = []
    strategy = _signed_fedavg(opened.manifest, sha, key, out / "published", settings.local_steps, settings.clients,
                              initial, history)
    legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=settings.rounds), strategy=strategy)
    n = settings.clients
    workflow = DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(
        num_shares=n, reconstruction_threshold=max(2, n - 1), clipping_range=CLIPPING_RANGE, max_weight=MAX_WEIGHT,
        quantization_range=QUANTIZATION_RANGE, timeout=settings.timeout))
    workflow(grid, legacy)
    doc = {"settings": asdict(settings), "bundle_sha256": sha, "version": strategy.version, "secagg": True,
           "trainable_params": opened.manifest.trainable_params, "rounds": history}
    atomic_write_bytes(out / "fleet.json", json.dumps(doc, indent=1, default=str).encode())
    return doc
