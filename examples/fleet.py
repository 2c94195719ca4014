"""Fleet learning on Flower: 20 BBC News readers, each reading 2-3 of the 5 topics, improve one
adapter together without their articles leaving their devices.

MiniLM with LoRA-FA (rank 8 on query/value, A frozen: averaging is exact) + a trainable topic
head, int8 base. Each user's device holds its own articles in its Personalizer buffer; Flower's
simulation engine runs R rounds of K local steps per device (FedAvg weighted by samples).
Reported on each user's own test slice (never trained on, nor in any buffer), averaged over all
users: the fleet adapter; each user's local-only adapter (the same local steps, alone); the
fleet adapter personalized on the device (mixed in behind the guardrail, then one Personalizer
round); centralized training on the union of every user's training articles; the fleet with
user-level DP (Flower's client-side clipping + server noise, RDP accountant: epsilon <= 8 at
delta 1e-5); the fleet with sample-level DP (DP-SGD on each device over its own articles,
dp_accounting's RDP accountant: epsilon <= 8 at delta 1e-5 per device); the fleet with int8 delta uploads. Also: bytes per device per round, and the
fleet's accuracy after each round (PNG)."""
from __future__ import annotations

import os
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

if __package__ in (None, ""):  # run as a file: make `examples` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from examples._common import export, fresh_dir, parse_args, report, say

TOPICS = ("business", "entertainment", "politics", "sport", "tech")


@dataclass(frozen=True)
class FleetSizes:
    """Fixed in advance, never tuned on the test slices."""

    users: int
    n_device: int        # articles on each device (the Personalizer splits 80/20 train/held-out)
    n_test: int          # each user's test slice, only for the report
    rounds: int
    steps: int           # local steps per round
    batch: int
    max_length: int
    central_steps: int   # centralized training on the union
    epsilon: float = 8.0
    delta: float = 1e-5
    sample_clip: float = 1.0  # sample-level DP's per-example clipping norm, fixed a priori
    # Sample-level DP's expected batch and learning rate: DP-SGD wants larger batches (the noise is
    # divided by them) and steps; chosen by pilot runs scored on the devices' own held-out articles
    # (the Personalizer's 20% split), never on the test slices.
    sample_batch: int = 16
    sample_lr: float = 0.1


FULL = FleetSizes(users=20, n_device=40, n_test=15, rounds=6, steps=3, batch=8, max_length=64, central_steps=120)
SMOKE = FleetSizes(users=3, n_device=10, n_test=4, rounds=2, steps=1, batch=4, max_length=32, central_steps=2,
                   sample_batch=4)
LR = 3e-3  # the demo's and the topic example's learning rate for this model and data


def make_users(z: FleetSizes, seed: int = 7) -> dict[str, dict]:
    """Each user reads 2 or 3 topics; their articles are disjoint from every other user's."""
    from edgepeft.cli.datasets import bbc_news

    rng = random.Random(seed)
    pool = {t: bbc_news((t,)) for t in TOPICS}
    for arts in pool.values():
        rng.shuffle(arts)
    users = {}
    for i in range(z.users):
        topics = tuple(sorted(rng.sample(TOPICS, 2 + i % 2)))
        need = z.n_device + z.n_test
        arts = [pool[topics[j % len(topics)]].pop() for j in range(need)]
        rng.shuffle(arts)
        users[f"user-{i:02d}"] = {"topics": topics, "device": arts[:z.n_device], "test": arts[z.n_device:]}
    return users


def evaluate_on_users(dev, users: dict, tensors) -> dict:
    """``tensors`` on every user's test slice: mean over users of their accuracy, and the loss."""
    from edgepeft.runtime.samples import Sample

    if tensors is not None:
        dev.load("eval", tensors)
    accs, losses = {}, []
    for u, d in users.items():
        res = dev.evaluate(u, samples=[Sample(i + 1, {"text": e.text, "label": e.label}) for i, e in enumerate(d["test"])])
        accs[u] = res.accuracy
        losses.append(res.loss)
    return {"accuracy": sum(accs.values()) / len(accs), "loss": sum(losses) / len(losses), "per_user": accs}


def run_fleet(name: str, out: Path, bundle: Path, users: dict, z: FleetSizes, args, key: Path, *,
              dp_noise: float = 0.0, dp_clip: float = 1.0, int8: bool = False, privacy=None, lr: float = 0.0, batch: int = 0) -> dict:
    from edgepeft.fleet.device import DeviceSettings
    from edgepeft.fleet.server import FleetSettings
    from edgepeft.fleet.simulate import seed_samples, simulate

    root = out / name
    seed_samples(root / "dev", {u: d["device"] for u, d in users.items()})
    fleet = FleetSettings(bundle=str(bundle), out=str(root / "server"), rounds=z.rounds, clients=len(users),
                          local_steps=z.steps, key=str(key), dp_noise=dp_noise, dp_clip=dp_clip, dp_delta=z.delta,
                          privacy=privacy)
    device = DeviceSettings(bundle=str(bundle), root=str(root / "dev"), memory_budget=args.budget, backend=args.backend,
                            lr=lr or LR, batch_size=batch or z.batch, trusted_keys=(str(key) + ".pub",))
    t = time.perf_counter()
    doc = simulate(fleet, device, nodes=len(users), int8=int8, cpus=args.threads)
    doc["wall_seconds"] = round(time.perf_counter() - t, 1)
    for r in doc["rounds"]:
        say(f"  {name} round {r['round']}: {r.get('replies')} replies, held-out accuracy "
            f"{(r.get('evaluate') or {}).get('eval-accuracy', float('nan')):.3f}, up {_mean(r['bytes_up_per_device']):,.0f} B/device, "
            f"down {r['bytes_down_per_device']:,} B/device" + (f", epsilon {r['epsilon']:.2f}" if "epsilon" in r else ""))
    return doc


def curve(dev, users: dict, doc: dict, key: Path) -> list[dict]:
    """Every published version (0 = the bundle's initial adapter) on every user's test slice."""
    from edgepeft.fleet.signed import load_published

    pub = Path(doc["settings"]["out"]) / "published"
    rows = []
    for v in range(doc["version"] + 1):
        tensors, _ = load_published(pub, bundle_sha256=doc["bundle_sha256"], trusted_keys=[str(key) + ".pub"], round_=v)
        ev = evaluate_on_users(dev, users, tensors)
        rows.append({"round": v, "accuracy": ev["accuracy"], "loss": ev["loss"]})
    return rows


def train_alone(dev, user: str, steps: int, seed: str) -> None:
    """``steps`` local steps from the bundle's initial adapter on the user's own buffer."""
    from edgepeft.adapters import AdapterStore

    initial = AdapterStore(dev.session.bundle.root / "adapters", dev.manifest).load("initial")[0]
    new, _, _ = dev.train(user, initial, steps=steps, seed=seed)
    dev.load(f"{user}.alone", new)


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def plot(path: Path, curves: dict[str, list[dict]], lines: dict[str, float], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for (label, rows), (style, mark) in zip(curves.items(), (("-", "o"), ("-", "s"), ("-", "^"), ("--", "x"))):
        ax.plot([r["round"] for r in rows], [r["accuracy"] for r in rows], linestyle=style, marker=mark, label=label)
    for (label, y), style in zip(lines.items(), (":", "--", "-.")):
        ax.axhline(y, linestyle=style, color="gray", label=f"{label} ({y:.3f})")
    ax.set_xlabel("round")
    ax.set_ylabel("accuracy on the users' test slices")
    ax.set_title(title, fontsize=9)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def fleets(out: Path, bundle: Path, users: dict, z: FleetSizes, args, key: Path) -> tuple[dict, dict]:
    """The four Flower runs: plain, user-level DP and sample-level DP (epsilon <= z.epsilon
    each) and int8 uploads."""
    from edgepeft.fleet.privacy import PrivacyConfig
    from edgepeft.fleet.server import epsilon_after, noise_for_epsilon

    runs = {"fleet": run_fleet("fleet", out, bundle, users, z, args, key)}
    # The DP clipping norm: the median update norm the devices sent in the non-private run's
    # first round (a property of training, not of the test slices).
    norms = sorted(m["update-norm"] for m in runs["fleet"]["rounds"][0]["train_per_device"])
    clip = norms[len(norms) // 2]
    noise = noise_for_epsilon(z.epsilon, rounds=z.rounds, clients=len(users), delta=z.delta)
    say(f"DP: clip {clip:.4f}, noise multiplier {noise:.3f} -> epsilon "
        f"{epsilon_after(z.rounds, noise, len(users), z.delta):.3f} after {z.rounds} rounds at delta {z.delta:g}")
    runs["fleet_dp"] = run_fleet("fleet_dp", out, bundle, users, z, args, key, dp_noise=noise, dp_clip=clip)
    sample = PrivacyConfig("sample", epsilon=z.epsilon, clip=z.sample_clip, delta=z.delta)
    runs["fleet_sample_dp"] = run_fleet("fleet_sample_dp", out, bundle, users, z, args, key, privacy=sample,
                                        lr=z.sample_lr, batch=z.sample_batch)
    runs["fleet_int8"] = run_fleet("fleet_int8", out, bundle, users, z, args, key, int8=True)
    return runs, {"noise_multiplier": noise, "clip": clip, "delta": z.delta}


def baselines(dev, users: dict, z: FleetSizes, runs: dict, key: Path) -> dict:
    """Local-only (each user alone, the same local steps), centralized (the union), and the
    fleet adapter personalized on each device behind the guardrail."""
    from edgepeft.fleet.personal import adopt_fleet
    from edgepeft.fleet.signed import load_published

    pub = Path(runs["fleet"]["settings"]["out"]) / "published"
    t = time.perf_counter()
    local_acc = {}
    for u in users:
        train_alone(dev, u, z.rounds * z.steps, seed=f"alone:{u}")
        local_acc[u] = evaluate_on_users(dev, {u: users[u]}, None)["accuracy"]
    local = {"accuracy": _mean(list(local_acc.values())), "per_user": local_acc,
             "seconds": round(time.perf_counter() - t, 1)}
    say(f"local-only ({z.rounds * z.steps} steps per user, alone): mean accuracy {local['accuracy']:.3f}")

    t = time.perf_counter()
    start = load_published(pub, bundle_sha256=dev.bundle_sha, trusted_keys=None, round_=0)[0]
    central = evaluate_on_users(dev, users, dev.train("union", start, steps=z.central_steps, seed="union")[0])
    central["seconds"] = round(time.perf_counter() - t, 1)
    say(f"centralized ({z.central_steps} steps on the union): mean accuracy {central['accuracy']:.3f}")

    fleet_final = load_published(pub, bundle_sha256=dev.bundle_sha, trusted_keys=[str(key) + ".pub"])[0]
    personal_acc, adopted = {}, 0
    for u in users:
        adopted += adopt_fleet(dev, u, fleet_final, mix=1.0).accepted
        dev.personalizer.activate(u)
        personal_acc[u] = evaluate_on_users(dev, {u: users[u]}, None)["accuracy"]
    personal = {"accuracy": _mean(list(personal_acc.values())), "per_user": personal_acc, "adopted": adopted}
    say(f"fleet + personalization: mean accuracy {personal['accuracy']:.3f} ({adopted} of {len(users)} adopted the fleet's)")
    return {"local_only": local, "centralized": central, "fleet_personalized": personal}


def summarize(z: FleetSizes, users: dict, runs: dict, dp: dict, curves: dict, base: dict, args, start: dict) -> dict:
    from importlib.metadata import version

    final = {name: c[-1] for name, c in curves.items()}
    dp_gap = final["fleet"]["accuracy"] - final["fleet_dp"]["accuracy"]
    up = {n: _mean([_mean(r["bytes_up_per_device"]) for r in runs[n]["rounds"]]) for n in runs}
    return {
        "sizes": z.__dict__, "users": {u: list(d["topics"]) for u, d in users.items()},
        "initial": curves["fleet"][0], **final, **base, "curves": curves,
        "dp": {**dp, "epsilon_per_round": [r.get("epsilon") for r in runs["fleet_dp"]["rounds"]],
               "accuracy_gap_points": 100 * dp_gap, "target_points": 3.0, "met": 100 * dp_gap <= 3.0},
        "sample_dp": sample_dp_summary(z, runs["fleet_sample_dp"], final),
        "int8": {"accuracy_cost_points": 100 * (final["fleet"]["accuracy"] - final["fleet_int8"]["accuracy"]),
                 "bytes_up_per_device_per_round": up["fleet_int8"]},
        "bytes_per_device_per_round": {"down": runs["fleet"]["rounds"][0]["bytes_down_per_device"], "up": up["fleet"]},
        "runs": {n: {"wall_seconds": r["wall_seconds"], "rounds": r["rounds"]} for n, r in runs.items()},
        "trainable_params": runs["fleet"]["trainable_params"], "backend": args.backend,
        "machine": start, "flwr": version("flwr"), "ray": version("ray"), "dp_accounting": version("dp-accounting"), "loadavg_end": list(os.getloadavg()),
        "command": "python -m examples.fleet" + (" --smoke" if args.smoke else ""),
    }


def sample_dp_summary(z: FleetSizes, run: dict, final: dict) -> dict:
    """Sample-level DP: each device's sigma (calibrated to its sampling rate), its epsilon after
    each round (the largest over devices), and the gap to the non-private fleet."""
    per_dev = [m for r in run["rounds"] for m in r.get("train_per_device", [])]
    noises = sorted({round(m["dp-noise"], 6) for m in per_dev})
    gap = 100 * (final["fleet"]["accuracy"] - final["fleet_sample_dp"]["accuracy"])
    return {"mode": "sample", "target_epsilon": z.epsilon, "delta": z.delta, "clip": z.sample_clip,
            "expected_batch": z.sample_batch, "lr": z.sample_lr, "steps_per_device": z.rounds * z.steps,
            "noise_multiplier_min": noises[0] if noises else None, "noise_multiplier_max": noises[-1] if noises else None,
            "epsilon_per_round": [r.get("epsilon") for r in run["rounds"]],
            "accuracy_gap_points": gap, "target_points": 3.0, "met": gap <= 3.0}


def table(res: dict) -> list[tuple[str, str, str]]:
    b = f"{res['initial']['accuracy']:.3f}"
    eps = res["dp"]["epsilon_per_round"][-1] or 0.0
    return [("fleet adapter (accuracy)", b, f"{res['fleet']['accuracy']:.3f}"),
            ("local-only", b, f"{res['local_only']['accuracy']:.3f}"),
            ("fleet + personalization", b, f"{res['fleet_personalized']['accuracy']:.3f}"),
            ("centralized", b, f"{res['centralized']['accuracy']:.3f}"),
            (f"fleet, DP eps {eps:.2f}", b,
             f"{res['fleet_dp']['accuracy']:.3f} (gap {res['dp']['accuracy_gap_points']:.1f} points)"),
            (f"fleet, sample-level DP eps {res['sample_dp']['epsilon_per_round'][-1] or 0.0:.2f}", b,
             f"{res['fleet_sample_dp']['accuracy']:.3f} (gap {res['sample_dp']['accuracy_gap_points']:.1f} points)"),
            ("fleet, int8 uploads", b,
             f"{res['fleet_int8']['accuracy']:.3f} (cost {res['int8']['accuracy_cost_points']:.1f} points)")]


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args("fleet", __doc__, argv)
    z = SMOKE if args.smoke else FULL
    t0 = time.perf_counter()
    out = fresh_dir(args.out)
    for sub in ("fleet", "fleet_dp", "fleet_sample_dp", "fleet_int8", "keys"):
        shutil.rmtree(out / sub, ignore_errors=True)
    from edgepeft.specs import LoraSpec

    bundle = export(out, "minilm", [LoraSpec(rank=8, alpha=16, targets=("query", "value"),
                                             modules_to_save=("classifier",), freeze_a=True)],
                    backend=args.backend, isolated=True, max_length=z.max_length, labels=TOPICS)
    from benchmarks.common import machine
    from edgepeft.fleet.device import Device, DeviceSettings
    from edgepeft.fleet.simulate import seed_samples
    from edgepeft.signing import generate_key

    start = machine()
    key = generate_key(out / "keys" / "fleet")[0]
    users = make_users(z)
    say(f"{len(users)} users, {z.n_device} articles on each device, {z.n_test} test articles each; topics: "
        + "; ".join(f"{u} {'/'.join(d['topics'])}" for u, d in list(users.items())[:4]) + " ...")
    runs, dp = fleets(out, bundle, users, z, args, key)

    # The device-side evaluations, local-only training and personalization: this process, as
    # one device holding every user's adapter (its store in out/adapters, buffers in out/loop).
    seed_samples(out, {**{u: d["device"] for u, d in users.items()},
                       "union": [a for d in users.values() for a in d["device"]]})
    dev = Device(DeviceSettings(bundle=str(bundle), root=str(out), memory_budget=args.budget, backend=args.backend,
                                lr=LR, batch_size=z.batch, threads=args.threads, personal_steps=z.steps * 2))
    curves = {name: curve(dev, users, runs[name], key) for name in runs}
    base = baselines(dev, users, z, runs, key)
    dev.close()

    result = summarize(z, users, runs, dp, curves, base, args, start)
    png = out / "fleet_rounds.png"
    plot(png, {"fleet": curves["fleet"], f"fleet, DP (eps {result['dp']['epsilon_per_round'][-1] or 0:.1f})":
               curves["fleet_dp"], f"fleet, sample-level DP (eps {result['sample_dp']['epsilon_per_round'][-1] or 0:.1f})":
               curves["fleet_sample_dp"], "fleet, int8 uploads": curves["fleet_int8"]},
         {"local-only (mean)": base["local_only"]["accuracy"], "centralized": base["centralized"]["accuracy"],
          "fleet + personalization": base["fleet_personalized"]["accuracy"]},
         f"MiniLM LoRA-FA, {len(users)} BBC News users, {z.rounds} rounds x {z.steps} local steps")
    if getattr(args, "results", None):  # a full run: the figures go to args.results (report() writes them)
        args.results.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(png, args.results.with_name("fleet_rounds.png"))
        say(f"plot: {args.results.with_name('fleet_rounds.png')}")
    result["before"] = {"loss": result["initial"]["loss"], "accuracy": result["initial"]["accuracy"]}
    result["after"] = {n: {"loss": result[n]["loss"], "accuracy": result[n]["accuracy"]}
                       for n in ("fleet", "fleet_dp", "fleet_sample_dp", "fleet_int8")}
    return report("fleet learning (MiniLM + BBC News, Flower simulation)", table(result), result, out, t0)


if __name__ == "__main__":
    main()
