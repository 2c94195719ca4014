"""The fleet deployed as real processes on loopback (``make fleet-test``; skipped otherwise):
a Flower SuperLink and three SuperNodes, each a device on the portable backend with its own
folder, user and memory budget; the ServerApp publishes signed fleet adapters that the devices
verify. One SuperNode is killed (SIGKILL, with its ClientApp) while it trains in round 1: the
round completes with the other two, round 2 runs with them, and the published fleet adapter
verifies, is finite and trains and evaluates in a fresh session."""
from __future__ import annotations

import json
import os
import sys
import time

import numpy as np
import pytest

pytestmark = pytest.mark.skipif(os.environ.get("EDGEPEFT_FLEET_DEPLOY") != "1",
                                reason="multi-process deployment: run `make fleet-test`")

from conftest import HELDOUT, LABELS, LORA, TRAIN  # noqa: E402
from edgepeft.data import Example  # noqa: E402

DATA = [Example(f"{e.text} ({i})", e.label) for i in range(3) for e in TRAIN + HELDOUT]


def wait_for(cond, timeout: float, what: str, poll: float = 0.2):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return
        time.sleep(poll)
    raise AssertionError(f"timed out waiting for {what}")


def test_superlink_and_supernodes_survive_a_killed_device(tmp_path):
    from edgepeft.exporters import export_bundle, load_model
    from edgepeft.fleet.deploy import LocalFederation
    from edgepeft.fleet.device import Device, DeviceSettings
    from edgepeft.fleet.signed import load_published
    from edgepeft.fleet.simulate import seed_samples
    from edgepeft.signing import generate_key

    bundle = tmp_path / "tiny.edgepeft"
    export_bundle(load_model("tiny-encoder", labels=LABELS), methods=[LORA], out=bundle, quant="int8",
                  backends=("portable",))
    priv, pub = generate_key(tmp_path / "publisher")
    budgets = ["300MB", "400MB", "500MB"]
    for i in range(3):
        seed_samples(tmp_path / f"device-{i}", {f"user-{i}": DATA[i:] + DATA[:i]})
    out = tmp_path / "server"
    with LocalFederation(tmp_path / "flower") as fed:
        fed.start_link()
        for i in range(3):
            fed.start_node(i, root=tmp_path / f"device-{i}", user=f"user-{i}", memory_budget=budgets[i])
        run = fed.run({"bundle": str(bundle), "out": str(out), "rounds": 2, "clients": 2, "local-steps": 300,
                       "key": str(priv), "trusted-key": str(pub), "timeout": 60.0, "lr": 0.05, "batch-size": 4})
        # Kill device 2 once it has taken round 1's train message (its ClientApp is training).
        wait_for(lambda: "Receiving: train message" in fed.node_log(2), 180, "device 2 to receive round 1")
        time.sleep(0.5)
        fed.kill_node(2)
        t_kill = time.time()
        assert run.wait(timeout=400) == 0, (tmp_path / "flower" / "run.log").read_text()[-3000:]
        doc = json.loads((out / "fleet.json").read_text())
        for i in (0, 1):  # the two survivors each trained in both rounds
            assert fed.node_log(i).count("Receiving: train message") == 2
    rounds = doc["rounds"]
    after_kill = round(time.time() - t_kill, 1)
    print(f"\nround 1 after the kill: {rounds[0]['replies']} replies, {rounds[0]['failures']} failures; "
          f"run finished {time.time() - t_kill:.0f} s after the kill", file=sys.stderr)
    assert [r["round"] for r in rounds] == [1, 2]
    assert rounds[0]["sampled"] == 3 and rounds[0]["replies"] == 2   # the killed device never answered
    assert rounds[1]["replies"] == 2 and doc["version"] == 2          # both rounds produced a new version
    assert all(r["evaluate"] is not None for r in rounds)
    # Only trainable tensors travelled; devices trained inside their budgets (peak reported).
    per = doc["trainable_params"] * 4
    assert all(per <= b < per + 3000 for r in rounds for b in r["bytes_up_per_device"])
    assert all(0 < m["train-peak-bytes"] for r in rounds for m in r["train_per_device"])
    # The published fleet adapter is intact: signed by the publisher, hashes match, finite, usable.
    tensors, v = load_published(out / "published", bundle_sha256=doc["bundle_sha256"], trusted_keys=[pub])
    assert v == 2 and all(np.all(np.isfinite(t)) for t in tensors.values())
    seed_samples(tmp_path / "check", {"user-9": DATA})
    dev = Device(DeviceSettings(bundle=str(bundle), root=str(tmp_path / "check"), backend="portable",
                                trusted_keys=(str(pub),)))
    try:
        res = dev.evaluate("user-9", tensors)
        assert np.isfinite(res.loss) and res.n > 0
        new, _, losses = dev.train("user-9", tensors, steps=2, seed="check")
        assert all(np.isfinite(x) for x in losses)
    finally:
        dev.close()
    _record(doc, after_kill, budgets, res)


def _record(doc: dict, after_kill: float, budgets: list, res) -> None:
    """What `make fleet-test` measured, for the README (benchmarks/results/examples/fleet_deploy.json)."""
    from benchmarks.common import RESULTS, machine

    keep = ("round", "sampled", "replies", "failures", "bytes_down_per_device", "bytes_up_per_device", "version")
    from importlib.metadata import version

    out = {"command": "make fleet-test", "machine": machine(), "flwr": version("flwr"), "supernodes": 3, "killed": "supernode 2, in round 1",
           "memory_budgets": budgets, "backend": "portable", "run_seconds_after_kill": after_kill,
           "rounds": [{k: r.get(k) for k in keep} | {"train_peak_bytes": [m["train-peak-bytes"] for m in r["train_per_device"]],
                                                      "train_peak_mib": [round(m["train-peak-bytes"] / 2**20, 1)
                                                                         for m in r["train_per_device"]],
                                                      "eval_accuracy": (r.get("evaluate") or {}).get("eval-accuracy")}
                      for r in doc["rounds"]],
           "final_version": doc["version"], "final_adapter_verified": True,
           "final_adapter_check": {"loss": res.loss, "accuracy": res.accuracy, "n": res.n}}
    (RESULTS / "examples").mkdir(parents=True, exist_ok=True)
    (RESULTS / "examples" / "fleet_deploy.json").write_text(json.dumps(out, indent=1) + "\n")
