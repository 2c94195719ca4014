"""The Flower ClientApp of a device (Message API: ``@app.train``, ``@app.evaluate``).

Train message in: ``arrays`` (the fleet adapter's trainable tensors) and ``config``
(``local-steps``, ``server-round``, ``bundle-sha256``, ``fleet-version``, ``fleet-signature``).
Reply: ``arrays`` (the trainable tensors after K local steps: nothing else leaves the device),
``metrics`` (``num-examples``, the FedAvg weight; ``unit-weight`` = 1 for DP's uniform
weighting; first/last local loss; the step's measured peak memory) and ``fleet``
(this device's bundle sha256, which the server checks).

Mods, outermost first: ``int8_delta_mod`` (optional: the reply leaves as an int8 delta) then
Flower's ``fixedclipping_mod`` (DP: the update is clipped to the norm the server's DP wrapper
sends). A SecAgg+ run (legacy message layout) is served by ``edgepeft.fleet.secagg``."""
from __future__ import annotations

from typing import Callable

import numpy as np

from flwr.app import ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod

from edgepeft.fleet.device import Device, DeviceSettings
from edgepeft.fleet.wire import from_record, int8_delta_mod, to_record

# (settings, user) for the node that runs this message, from its Context.
Resolver = Callable[[Context], "tuple[DeviceSettings, str]"]

# One Device per process and settings. Flower calls the app once per message; opening the
# bundle each time would cost a base load per message (seconds for MiniLM). In a simulation
# several virtual nodes share a process, and their users' adapters share this one session.
_DEVICES: dict[DeviceSettings, Device] = {}


def device_for(settings: DeviceSettings) -> Device:
    if settings not in _DEVICES:
        _DEVICES[settings] = Device(settings)
    return _DEVICES[settings]


def close_devices() -> None:
    """Close every Device this process opened (tests; a process exiting needs nothing)."""
    while _DEVICES:
        _DEVICES.popitem()[1].close()


def _accepted(dev: Device, msg: Message):
    cfg = msg.content["config"]
    sig = cfg.get("fleet-signature")
    return dev.accept(from_record(msg.content["arrays"]), bundle_sha=str(cfg["bundle-sha256"]),
                      version=int(cfg["fleet-version"]), signature=bytes(sig) if sig else None), cfg


def handle_train(msg: Message, context: Context, resolve: Resolver) -> Message:
    if "fitins.parameters" in msg.content.array_records:  # SecAgg+ speaks the legacy layout
        from edgepeft.fleet.secagg import legacy_train

        return legacy_train(msg, context, resolve)
    settings, user = resolve(context)
    dev = device_for(settings)
    fleet, cfg = _accepted(dev, msg)
    steps, extra = int(cfg["local-steps"]), {}
    if dev.settings.privacy is not None:  # sample-level DP-SGD; its epsilon so far goes back
        new, n, losses, info = dev.train_private(user, fleet, steps=steps, round_=int(cfg["server-round"]),
                                                 rounds=int(cfg["planned-rounds"]))
        extra = {"dp-epsilon": info["epsilon"], "dp-delta": info["delta"], "dp-noise": info["noise"]}
    else:
        new, n, losses = dev.train(user, fleet, steps=steps, seed=f"{cfg['server-round']}:{user}")
    norm = float(np.sqrt(sum(float(np.sum((new[k] - fleet[k]) ** 2)) for k in new)))
    metrics = MetricRecord({"num-examples": n, "unit-weight": 1, "update-norm": norm, "train-loss-first": losses[0],
                            "train-loss-last": losses[-1],
                            "train-peak-bytes": int(dev.session.budget.peaks.get("train_step", 0)), **extra})
    # In the manifest's order, as received: Flower's clipping mod compares the key lists.
    content = RecordDict({"arrays": to_record({k: new[k] for k in dev.manifest.trainable_names}), "metrics": metrics,
                          "fleet": ConfigRecord({"bundle-sha256": dev.bundle_sha})})
    return Message(content, reply_to=msg)


def handle_evaluate(msg: Message, context: Context, resolve: Resolver) -> Message:
    settings, user = resolve(context)
    dev = device_for(settings)
    fleet, _ = _accepted(dev, msg)
    res = dev.evaluate(user, fleet)
    metrics = MetricRecord({"num-examples": res.n, "unit-weight": 1, "eval-accuracy": res.accuracy,
                            "eval-loss": res.loss})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)


def clip_train_replies(msg: Message, ctx: Context, call_next) -> Message:
    """Flower's ``fixedclipping_mod`` on train messages only: in flwr 1.42 it also demands the
    clipping norm in evaluate messages (which carry none) and fails them."""
    if msg.metadata.message_type != MessageType.TRAIN:
        return call_next(msg, ctx)
    return fixedclipping_mod(msg, ctx, call_next)


def make_client_app(resolve: Resolver, *, clip: bool = False, int8: bool = False, secagg: bool = False) -> ClientApp:
    """A ClientApp whose nodes are devices; ``clip``: DP's client-side fixed clipping (pair
    it with the server's ``dp_noise``); ``int8``: replies as int8 deltas; ``secagg``: Flower's
    SecAgg+ mod (pair it with the server's ``secagg``)."""
    if secagg:
        from flwr.client.mod import secaggplus_mod

        return _app(resolve, [secaggplus_mod])
    return _app(resolve, ([int8_delta_mod] if int8 else []) + ([clip_train_replies] if clip else []))


def _app(resolve: Resolver, mods: list) -> ClientApp:
    app = ClientApp(mods=mods)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return handle_train(msg, context, resolve)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return handle_evaluate(msg, context, resolve)

    return app
