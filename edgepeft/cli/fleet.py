"""`edgepeft fleet`: fleet learning on Flower (edgepeft.fleet; `pip install 'edgepeft[fleet]'`)."""
from __future__ import annotations

import json
from pathlib import Path

import click

from edgepeft.cli._shared import backend_choice, console


@click.group()
def fleet() -> None:
    """Fleet learning: many devices improve one adapter together on Flower, their data staying
    on the devices."""


@fleet.command()
@click.option("--bundle", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--data", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help='JSONL: {"text", "label"} and optionally "user" (a device per user); without "user", '
                   "samples are dealt to the clients in turn.")
@click.option("--clients", default=3, show_default=True, type=click.IntRange(min=1), help="Simulated devices.")
@click.option("--rounds", default=3, show_default=True, type=click.IntRange(min=1))
@click.option("--steps", default=5, show_default=True, type=click.IntRange(min=1), help="Local steps per round.")
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(min=1))
@click.option("--lr", default=3e-3, show_default=True, type=float, help="Devices' AdamW learning rate.")
@click.option("-o", "--out", default="fleet-run", show_default=True, type=click.Path(file_okay=False, path_type=Path),
              help="Devices' folders, the published fleet adapters and fleet.json go here.")
@click.option("--key", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Publisher private key (`edgepeft keygen`): fleet adapters are signed and devices verify "
                   "them with KEY.pub.")
@click.option("--dp-mode", default="client", show_default=True, type=click.Choice(["client", "sample"]),
              help="DP's unit: a user's whole update (clipped on the device, noised on the server) or one sample "
                   "(DP-SGD on each device).")
@click.option("--dp-epsilon", type=float, help="DP: pick the noise for this epsilon after --rounds.")
@click.option("--dp-noise", default=0.0, show_default=True, type=float, help="DP noise multiplier (0: off).")
@click.option("--dp-clip", default=1.0, show_default=True, type=float,
              help="DP clipping norm (of an update; of a sample's gradient with --dp-mode sample).")
@click.option("--dp-delta", default=1e-5, show_default=True, type=float)
@click.option("--int8", is_flag=True, help="Devices upload int8 deltas.")
@click.option("--budget", default=None, help="Each device's memory budget, e.g. 512MB.")
@click.option("--backend", default="auto", show_default=True, type=backend_choice(auto=True))
@click.option("--threads", default=1, show_default=True, type=click.IntRange(min=1),
              help="CPUs for the simulated device process.")
def simulate(bundle: Path, data: Path, clients: int, rounds: int, steps: int, batch_size: int, lr: float, out: Path,
             key: Path | None, dp_mode: str, dp_epsilon: float | None, dp_noise: float, dp_clip: float, dp_delta: float,
             int8: bool,
             budget: str | None, backend: str, threads: int) -> None:
    """Run a fleet on Flower's simulation engine (one machine): CLIENTS devices, ROUNDS rounds."""
    from edgepeft.fleet.device import DeviceSettings
    from edgepeft.fleet.privacy import PrivacyConfig
    from edgepeft.fleet.server import FleetSettings
    from edgepeft.fleet.simulate import seed_samples, simulate as run

    users = _deal(data, clients)
    privacy = None if dp_epsilon is None and dp_noise == 0 else PrivacyConfig(
        dp_mode, epsilon=dp_epsilon, noise_multiplier=None if dp_epsilon is not None else dp_noise, clip=dp_clip,
        delta=dp_delta)
    seed_samples(out / "devices", users)
    doc = run(FleetSettings(bundle=str(bundle), out=str(out / "server"), rounds=rounds, clients=clients,
                            local_steps=steps, key=str(key) if key else None, privacy=privacy),
              DeviceSettings(bundle=str(bundle), root=str(out / "devices"), memory_budget=budget, backend=backend,
                             lr=lr, batch_size=batch_size, trusted_keys=(f"{key}.pub",) if key else ()),
              nodes=clients, int8=int8, cpus=threads)
    _show(doc, out)


def _deal(data: Path, clients: int) -> dict:
    """{user-ii: examples}: by the "user" field (the first CLIENTS users), else in turn."""
    from edgepeft.data import Example
    from edgepeft.errors import DataError
    from edgepeft.fleet.simulate import user_name

    rows = [json.loads(line) for line in data.read_text(encoding="utf-8").splitlines() if line.strip()]
    if any(not isinstance(r, dict) or "text" not in r or "label" not in r for r in rows):
        raise DataError(f"{str(data)!r}: every line must be a JSON object with 'text' and 'label'")
    owners = sorted({str(r["user"]) for r in rows if "user" in r})
    users: dict = {user_name(i): [] for i in range(clients)}
    for i, r in enumerate(rows):
        k = owners.index(str(r["user"])) if owners and "user" in r else i % clients
        if k < clients:
            users[user_name(k)].append(Example(str(r["text"]), str(r["label"])))
    if any(len(v) < 2 for v in users.values()):
        raise DataError(f"{str(data)!r} gives some of the {clients} clients fewer than 2 samples: "
                        "add data or lower --clients")
    return users


def _show(doc: dict, out: Path) -> None:
    c = console()
    for r in doc["rounds"]:
        ev = r.get("evaluate") or {}
        up = r.get("bytes_up_per_device") or [0]
        c.print(f"round {r['round']}: {r.get('replies', 0)} replies, {r.get('failures', 0)} failed, "
                f"{len(r.get('refused', []))} refused; held-out accuracy {ev.get('eval-accuracy', float('nan')):.3f}, "
                f"loss {ev.get('eval-loss', float('nan')):.4f}; bytes/device down {r.get('bytes_down_per_device', 0):,} "
                f"up {sum(up) / len(up):,.0f}" + (f"; epsilon {r['epsilon']:.3f}" if "epsilon" in r else "")
                + (f"; LoRA A/B averaging gap {r['lora_product_gap']:.2e}" if "lora_product_gap" in r else ""))
    c.print(f"fleet adapter version {doc['version']} published in {out / 'server' / 'published'}; "
            f"history in {out / 'server' / 'fleet.json'}")
