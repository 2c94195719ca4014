"""Fleet learning on Flower (``pip install 'edgepeft[fleet]'``; imported as ``edgepeft.fleet``):
many devices improve one adapter together, their samples never leaving them, and each keeps
its own. Flower (flwr 1.42, Message API) does the federation; this package is the PEFT side.
Torch-free: the core, the runtime, numpy and flwr.

Layout (one concern per module):
- ``device``: a device = one Session over the bundle + one Personalizer holding its users'
  samples; K local steps from the fleet adapter inside the session's memory budget.
- ``client``: the Flower ClientApp (``@app.train`` / ``@app.evaluate``) over devices, with the
  int8-delta and DP-clipping mods.
- ``strategy``: FleetStrategy, a wrapper around FedAvg (or Flower's DP wrapper): bundle and
  tensor checks, int8 decoding, bytes per device, the LoRA A/B averaging gap, signed publishing,
  the last good adapter kept.
- ``lora``: LoRA aggregation (LoRA-FA exact; what averaging A and B apart does).
- ``wire``: what travels (trainable tensors only) and the int8 delta encoding.
- ``signed``: the signed fleet adapter (edgepeft.signing's ed25519 keys).
- ``personal``: a device's own adapter mixed with the fleet's behind the Personalizer's guardrail.
- ``server``: the ServerApp (FedAvg, DP with Flower's RDP accountant).
- ``secagg``: SecAgg+ (Flower's legacy workflow).
- ``simulate``: Flower's simulation engine; ``deploy`` + ``apps``: a SuperLink and SuperNodes
  as processes on loopback."""
from edgepeft.fleet.device import Device, DeviceSettings
from edgepeft.fleet.errors import FleetError
from edgepeft.fleet.server import FleetSettings

__all__ = ["Device", "DeviceSettings", "FleetError", "FleetSettings"]
