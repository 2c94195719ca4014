"""Fleet learning on Flower (edgepeft.fleet): in-process checks of the device client, the
strategy (weighted averaging, refusals, keeping the last good adapter), LoRA aggregation
(LoRA-FA exact; the measured gap of averaging A and B apart), signing, int8 deltas and
personalization; then real Flower simulations (tiny model, 3 clients, 2 rounds): plain with
standard LoRA, and DP + int8 + signed with LoRA-FA. The MiniLM run is examples/fleet.py; the
multi-process deployment is tests/test_fleet_deploy.py (make fleet-test)."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("flwr")

from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict  # noqa: E402

from conftest import HELDOUT, LORA, TRAIN, export_tiny  # noqa: E402
from edgepeft.data import Example  # noqa: E402
from edgepeft.errors import SpecError  # noqa: E402
from edgepeft.fleet import lora, signed  # noqa: E402
from edgepeft.fleet.client import close_devices  # noqa: E402
from edgepeft.fleet.device import Device, DeviceSettings  # noqa: E402
from edgepeft.fleet.errors import FleetError  # noqa: E402
from edgepeft.fleet.personal import adopt_fleet  # noqa: E402
from edgepeft.fleet.server import FleetSettings, epsilon_after, inner_strategy  # noqa: E402
from edgepeft.fleet.simulate import seed_samples, simulate, user_name  # noqa: E402
from edgepeft.fleet.strategy import FleetStrategy  # noqa: E402
from edgepeft.fleet.wire import (bundle_sha256, decode_int8_delta, encode_int8_delta, record_bytes,  # noqa: E402
                                 to_record)
from edgepeft.signing import generate_key  # noqa: E402

# Variants of the shared examples, so that each user's buffer has a held-out side (the split
# hashes each sample's content).
DATA = [Example(f"{e.text} ({i})", e.label) for i in range(3) for e in TRAIN + HELDOUT]
FA = dataclasses.replace(LORA, freeze_a=True)


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    d = tmp_path_factory.mktemp("fleet-bundles")
    return {"lora": export_tiny(d / "lora.edgepeft", "int8").path,
            "fa": export_tiny(d / "fa.edgepeft", "int8", methods=(FA,)).path}


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    d = tmp_path_factory.mktemp("fleet-keys")
    return generate_key(d / "publisher"), generate_key(d / "other")


@pytest.fixture
def device(tmp_path, bundles, cache_dir):
    """A device over the standard-LoRA bundle whose buffer holds users a (pos-heavy) and b (neg-heavy)."""
    seed_samples(tmp_path / "dev", {"a": [e for e in DATA if e.label == "pos"] + DATA[:2],
                                    "b": [e for e in DATA if e.label == "neg"] + DATA[:2]})
    dev = Device(DeviceSettings(bundle=str(bundles["lora"]), root=str(tmp_path / "dev"), cache_dir=str(cache_dir),
                                lr=0.05, batch_size=4))
    yield dev
    dev.close()


def initial(dev: Device) -> dict[str, np.ndarray]:
    from edgepeft.adapters import AdapterStore

    return AdapterStore(dev.session.bundle.root / "adapters", dev.manifest).load("initial")[0]


def reply(tensors, n: int, sha: str, node: int = 1) -> Message:
    from flwr.app.metadata import Metadata

    meta = Metadata(run_id=1, message_id=f"m{node}", src_node_id=node, dst_node_id=1, reply_to_message_id="i",
                    group_id="1", created_at=0.0, ttl=60.0, message_type="train")
    return Message(RecordDict({"arrays": to_record(tensors), "metrics": MetricRecord({"num-examples": n, "unit-weight": 1}),
                               "fleet": ConfigRecord({"bundle-sha256": sha})}), metadata=meta)


# -- the device side ------------------------------------------------------------------------------

def test_device_trains_from_the_fleet_adapter_and_returns_only_trainable_tensors(device):
    start = initial(device)
    new, n, losses = device.train("a", start, steps=3, seed="s")
    assert set(new) == set(device.manifest.trainable_names)
    assert n == len(device.samples("a")[0]) and len(losses) == 3
    assert any(not np.array_equal(new[k], start[k]) for k in new)
    # What travels is the adapter, orders of magnitude below the bundle (the frozen base stays).
    assert record_bytes(to_record(new)) < 4 * device.manifest.trainable_params + 200 * len(new)
    assert record_bytes(to_record(new)) < Path(device.settings.bundle).stat().st_size / 10
    # Each round starts from what the server sent, with fresh optimizer state: same in, same out.
    again, _, _ = device.train("a", start, steps=3, seed="s")
    assert all(np.array_equal(again[k], new[k]) for k in new)


def test_device_refuses_other_bundles_and_bad_signatures(device, bundles, keys, tmp_path):
    (priv, pub), (other_priv, _) = keys
    dev = Device(dataclasses.replace(device.settings, trusted_keys=(str(pub),), root=str(tmp_path / "dev2")))
    try:
        t = initial(dev)
        sha = dev.bundle_sha
        assert dev.accept(t, bundle_sha=sha, version=3, signature=signed.sign(t, sha, 3, priv)).keys() == t.keys()
        bad = [dict(bundle_sha=bundle_sha256(bundles["fa"]), version=3, signature=signed.sign(t, sha, 3, priv)),
               dict(bundle_sha=sha, version=3, signature=None),                                   # unsigned
               dict(bundle_sha=sha, version=3, signature=signed.sign(t, sha, 3, other_priv)),     # other key
               dict(bundle_sha=sha, version=4, signature=signed.sign(t, sha, 3, priv))]           # replayed
        for kw in bad:
            with pytest.raises(FleetError):
                dev.accept(t, **kw)
        tampered = {k: v.copy() for k, v in t.items()}
        next(iter(tampered.values())).flat[0] += 1e-3
        with pytest.raises(FleetError, match="signature"):
            dev.accept(tampered, bundle_sha=sha, version=3, signature=signed.sign(t, sha, 3, priv))
        with pytest.raises(FleetError, match="trainable"):  # an adapter of another method / bundle
            dev.accept({k: v for k, v in list(t.items())[1:]}, bundle_sha=sha, version=3,
                       signature=signed.sign(t, sha, 3, priv))
    finally:
        dev.close()


def test_personalization_adopts_the_fleet_only_behind_the_guardrail(device):
    own = device.train("a", initial(device), steps=4, seed="own")[0]
    device.load("a", own)  # user a's own adapter
    junk = {k: np.full_like(v, 3.0) for k, v in own.items()}  # a fleet adapter that hurts a
    a = adopt_fleet(device, "a", junk, mix=1.0, refine=False)
    assert not a.accepted and a.candidate.loss > a.before.loss
    assert all(np.array_equal(device.session.parameters()[k], own[k]) for k in own)  # own adapter kept
    b = adopt_fleet(device, "a", own, mix=0.5, refine=True)  # not worse: adopted, then a round on top
    assert b.accepted and b.round is not None and b.round.status in ("accepted", "rolled_back")
    with pytest.raises(SpecError):
        adopt_fleet(device, "a", own, mix=1.5)


# -- aggregation ----------------------------------------------------------------------------------

def test_strategy_weighted_average_refusals_and_last_good_adapter(device, tmp_path):
    m, sha = device.manifest, device.bundle_sha
    start = initial(device)
    a = device.train("a", start, steps=2, seed="1")[0]
    b = device.train("b", start, steps=2, seed="2")[0]
    strat = FleetStrategy(inner_strategy(FleetSettings(bundle=str(device.settings.bundle), out=str(tmp_path), clients=2)),
                          manifest=m, bundle_sha=sha, publish_dir=tmp_path / "pub")
    strat._sent = start
    other = {k: v + 1 for k, v in a.items()}
    nan = {k: v.copy() for k, v in a.items()}
    next(iter(nan.values())).flat[0] = np.nan
    arrays, _ = strat.aggregate_train(1, [reply(a, 3, sha), reply(b, 1, sha, 2), reply(other, 5, "f" * 64, 3),
                                          reply({"x": np.zeros(2, np.float32)}, 5, sha, 4), reply(nan, 5, sha, 5)])
    row = strat.history[-1]
    assert row["replies"] == 2 and len(row["refused"]) == 3
    assert any("bundle" in r for r in row["refused"]) and any("trainable" in r for r in row["refused"])
    got = {k: v.numpy() for k, v in arrays.items()}
    for k in got:  # FedAvg weighted by num-examples
        np.testing.assert_allclose(got[k], (3 * a[k] + 1 * b[k]) / 4, rtol=1e-5, atol=1e-7)
    assert strat.version == 1 and (tmp_path / "pub" / "round-0001").is_dir()
    assert "lora_product_gap" in row  # standard LoRA: the gap of averaging A and B apart is reported
    # A round with nothing usable keeps the current fleet adapter (version stays, nothing published).
    arrays, _ = strat.aggregate_train(2, [reply(other, 5, "f" * 64)])
    assert arrays is None and strat.version == 1 and not (tmp_path / "pub" / "round-0002").exists()


def test_averaging_lora_factors_apart_has_a_measured_gap_and_lora_fa_is_exact(device, bundles, cache_dir, tmp_path):
    start = initial(device)
    ups = [device.train(u, start, steps=4, seed=u)[0] for u in ("a", "b")]
    pairs = lora.lora_pairs(device.manifest)
    assert len(pairs) == 4 and not lora.a_is_frozen(device.manifest)
    gap = lora.product_gap(ups, [3, 1], pairs)
    assert gap > 1e-4, gap  # mean(B) mean(A) != mean(B A) on real client updates
    # The stated account: the gap is minus the weighted covariance of the clients' changes.
    w = np.array([0.75, 0.25])
    for a_name, b_name in pairs:
        dA = [u[a_name] - start[a_name] for u in ups]
        dB = [u[b_name] - start[b_name] for u in ups]
        mdA, mdB = sum(wi * x for wi, x in zip(w, dA)), sum(wi * x for wi, x in zip(w, dB))
        mB, mA = sum(wi * u[b_name] for wi, u in zip(w, ups)), sum(wi * u[a_name] for wi, u in zip(w, ups))
        direct = mB @ mA - sum(wi * (u[b_name] @ u[a_name]) for wi, u in zip(w, ups))
        cov = mdB @ mdA - sum(wi * (db @ da) for wi, db, da in zip(w, dB, dA))
        np.testing.assert_allclose(direct, cov, atol=1e-6)
    # Fewer local steps, smaller gap (second order in the updates).
    small = [device.train(u, start, steps=1, seed=u)[0] for u in ("a", "b")]
    assert lora.product_gap(small, [3, 1], pairs) < gap
    # LoRA-FA: A is frozen in the base and never travels; averaging B is the exact update.
    fa = Device(DeviceSettings(bundle=str(bundles["fa"]), root=str(tmp_path / "fa"), cache_dir=str(cache_dir)))
    try:
        assert lora.a_is_frozen(fa.manifest) and lora.lora_pairs(fa.manifest) == []
        assert not any(n.endswith("lora_A") for n in fa.manifest.trainable_names)
    finally:
        fa.close()
    rng = np.random.default_rng(0)
    A = rng.normal(size=(4, 64))
    Bs = [rng.normal(size=(64, 4)) for _ in range(3)]
    np.testing.assert_allclose(lora.weighted_mean([{"B": b} for b in Bs], [1, 2, 3])["B"] @ A,
                               sum(wi * (b @ A) for wi, b in zip([1 / 6, 2 / 6, 3 / 6], Bs)), rtol=1e-5, atol=1e-5)


def test_int8_delta_roundtrip_and_size():
    rng = np.random.default_rng(1)
    base = {"w": rng.normal(size=(64, 64)).astype(np.float32), "b": np.zeros(3, np.float32)}
    new = {"w": base["w"] + rng.normal(scale=1e-2, size=(64, 64)).astype(np.float32), "b": base["b"]}
    enc = encode_int8_delta(new, base)
    dec = decode_int8_delta(enc, base)
    scale = float(enc["w::int8-scale"][0])
    assert np.max(np.abs(dec["w"] - new["w"])) <= scale / 2 + 1e-7 and np.array_equal(dec["b"], new["b"])
    assert record_bytes(to_record(enc)) < 0.4 * record_bytes(to_record(new))
    with pytest.raises(FleetError):
        decode_int8_delta({"w": enc["w"].astype(np.float32), "w::int8-scale": enc["w::int8-scale"]}, base)


def test_signed_publication_detects_tampering(tmp_path, keys):
    (priv, pub), _ = keys
    t = {"x": np.arange(6, dtype=np.float32).reshape(2, 3)}
    signed.publish(tmp_path, t, "ab" * 32, 2, priv)
    got, r = signed.load_published(tmp_path, bundle_sha256="ab" * 32, trusted_keys=[pub])
    assert r == 2 and np.array_equal(got["x"], t["x"])
    with pytest.raises(FleetError):
        signed.load_published(tmp_path, bundle_sha256="cd" * 32, trusted_keys=[pub])
    from safetensors.numpy import save_file
    save_file({"x": t["x"] + 1}, str(tmp_path / "round-0002" / "adapter.safetensors"))
    with pytest.raises(FleetError):
        signed.load_published(tmp_path, bundle_sha256="ab" * 32, trusted_keys=[pub])


def test_settings_are_checked(bundles, tmp_path):
    with pytest.raises(SpecError):
        FleetSettings(bundle="b", out="o", rounds=0)
    with pytest.raises(SpecError):
        FleetSettings(bundle="b", out="o", dp_noise=-1)
    with pytest.raises(SpecError):
        DeviceSettings(bundle=str(tmp_path / "missing.edgepeft"), root=str(tmp_path))
    with pytest.raises(SpecError):
        DeviceSettings(bundle=str(bundles["lora"]), root=str(tmp_path), batch_size=0)


# -- sample-level DP (DP-SGD on the device) -------------------------------------------------------

def _dp_grads(dev: Device, monkeypatch, batch, **kw) -> dict[str, np.ndarray]:
    """The gradient one DP-SGD step hands to the session's optimizer step (captured there)."""
    from edgepeft.fleet import privacy as dp

    seen = {}
    monkeypatch.setattr(dev.session, "_apply", lambda loss, grads: seen.update(grads))
    dp.dpsgd_step(dev.session, batch, rng=np.random.default_rng(0), **kw)
    return seen


def _norm(grads) -> float:
    return float(np.sqrt(sum(float(np.sum(np.square(g, dtype=np.float64))) for g in grads.values())))


def test_privacy_config_is_checked():
    from edgepeft.fleet.privacy import PrivacyConfig

    for bad in (dict(mode="example", epsilon=8), dict(mode="sample"), dict(mode="sample", epsilon=8, noise_multiplier=1),
                dict(mode="sample", epsilon=0), dict(mode="sample", epsilon=8, clip=0),
                dict(mode="client", noise_multiplier=-1), dict(mode="sample", epsilon=8, delta=1)):
        with pytest.raises(SpecError):
            PrivacyConfig(**bad)
    c = FleetSettings(bundle="b", out="o", rounds=6, clients=20, privacy=PrivacyConfig("client", epsilon=8, clip=0.5))
    assert (c.dp_clip, c.dp_delta) == (0.5, 1e-5) and epsilon_after(6, c.dp_noise, 20, 1e-5) <= 8


def test_dpsgd_clips_each_example_and_noise_has_std_sigma_clip(device, monkeypatch):
    from edgepeft.fleet.privacy import clip_grads, one

    device.load("a.fleet", initial(device))
    batch = device.batch(device.samples("a")[0][:4])
    raw = [device.session.backend.forward_backward(one(batch, i))[1] for i in range(4)]
    clip = min(_norm(g) for g in raw) / 3  # every example's gradient is longer than the clip
    assert all(_norm(clip_grads(g, clip)[0]) == pytest.approx(clip, rel=1e-5) for g in raw)
    # One example's contribution to the (noise-free) sum: with it minus without it, <= clip,
    # where the unclipped contribution is 3x longer.
    full = _dp_grads(device, monkeypatch, batch, noise=0.0, clip=clip, expected_batch=1)
    rest = _dp_grads(device, monkeypatch, device.batch(device.samples("a")[0][1:4]),
                     noise=0.0, clip=clip, expected_batch=1)
    assert _norm({k: full[k] - rest[k] for k in full}) <= clip * (1 + 1e-4)
    assert _norm(raw[0]) > 2.9 * clip
    # An empty Poisson draw is a noise-only step: std sigma * clip / expected batch.
    noise = _dp_grads(device, monkeypatch, None, noise=1.5, clip=0.2, expected_batch=4)
    flat = np.concatenate([g.ravel() for g in noise.values()])
    assert flat.size > 1000 and abs(float(flat.mean())) < 0.01
    assert float(flat.std()) == pytest.approx(1.5 * 0.2 / 4, rel=0.1)


def test_dpsgd_without_noise_and_clipping_is_a_plain_step(device):
    from edgepeft.fleet.privacy import dpsgd_step

    start = initial(device)
    batch = device.batch(device.samples("a")[0][:4])
    device.load("a.fleet", start)
    loss = dpsgd_step(device.session, batch, noise=0.0, clip=1e9, expected_batch=4, rng=np.random.default_rng(0))
    private = device.session.parameters()
    device.load("a.fleet", start)
    assert device.session.train_step(batch) == pytest.approx(loss, rel=1e-5)
    plain = device.session.parameters()
    assert any(not np.array_equal(plain[k], start[k]) for k in plain)
    assert all(np.allclose(private[k], plain[k], rtol=1e-4, atol=1e-6) for k in plain)


def test_dpsgd_accounting_meets_the_target_epsilon(device, monkeypatch):
    from edgepeft.fleet.privacy import PrivacyConfig, dpsgd_epsilon, dpsgd_noise

    sigma = dpsgd_noise(8.0, q=0.25, steps=18, delta=1e-5)
    assert 7.9 < dpsgd_epsilon(sigma, q=0.25, steps=18, delta=1e-5) <= 8.0
    assert dpsgd_epsilon(0.95 * sigma, q=0.25, steps=18, delta=1e-5) > 8.0  # the smallest such sigma
    assert dpsgd_epsilon(sigma, q=1.0, steps=18, delta=1e-5) > 8.0  # subsampling amplifies
    monkeypatch.setattr(device, "settings", dataclasses.replace(device.settings, privacy=PrivacyConfig("sample", epsilon=2.0)))
    eps = [device.train_private("a", initial(device), steps=2, round_=r, rounds=3)[3]["epsilon"] for r in (1, 3)]
    assert 0 < eps[0] < eps[1] <= 2.0 and eps[1] > 1.98


# -- real Flower simulations ----------------------------------------------------------------------

def _simulate(bundle, tmp_path, cache_dir, **kw):
    seed_samples(tmp_path / "dev", {user_name(i): DATA[i:] + DATA[:i] for i in range(3)})
    dev_kw = {k: kw.pop(k) for k in ("trusted_keys",) if k in kw}
    int8 = kw.pop("int8", False)
    try:
        return simulate(FleetSettings(bundle=str(bundle), out=str(tmp_path / "server"), rounds=2, clients=3,
                                      local_steps=2, cache_dir=str(cache_dir), **kw),
                        DeviceSettings(bundle=str(bundle), root=str(tmp_path / "dev"), cache_dir=str(cache_dir),
                                       batch_size=4, lr=0.05, **dev_kw), nodes=3, int8=int8, cpus=1)
    finally:
        close_devices()


def test_cli_simulation_standard_lora(bundles, tmp_path, monkeypatch, cache_dir):
    from click.testing import CliRunner

    from edgepeft.cli import main

    monkeypatch.setenv("EDGEPEFT_CACHE", str(cache_dir))
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": e.text, "label": e.label, "user": f"u{i % 3}"}) + "\n"
                            for i, e in enumerate(DATA * 2)))
    try:
        res = CliRunner().invoke(main, ["fleet", "simulate", "--bundle", str(bundles["lora"]), "--data", str(data),
                                        "--clients", "3", "--rounds", "2", "--steps", "2", "--batch-size", "4",
                                        "--lr", "0.05", "--out", str(tmp_path / "run")])
    finally:
        close_devices()
    assert res.exit_code == 0, res.output
    assert "round 2: 3 replies" in res.output and "LoRA A/B averaging gap" in res.output
    doc = json.loads((tmp_path / "run" / "server" / "fleet.json").read_text())
    rounds = doc["rounds"]
    assert [r["round"] for r in rounds] == [1, 2] and all(r["replies"] == 3 and r["failures"] == 0 for r in rounds)
    assert doc["version"] == 2 and all(r["evaluate"] is not None for r in rounds)
    assert all(r["lora_product_gap"] > 0 for r in rounds)  # measured every round
    # Only trainable tensors travel, both ways (npy headers aside).
    per = doc["trainable_params"] * 4
    assert all(per <= r["bytes_down_per_device"] < per + 200 * 10 for r in rounds)
    assert all(per <= b < per + 200 * 10 for r in rounds for b in r["bytes_up_per_device"])
    t, v = signed.load_published(tmp_path / "run" / "server" / "published", bundle_sha256=doc["bundle_sha256"],
                                 trusted_keys=None)
    assert v == 2 and all(np.all(np.isfinite(x)) for x in t.values())
    # Each device's buffer got its own user's samples only.
    assert sorted(p.name for p in (tmp_path / "run" / "devices" / "loop").iterdir()) == ["user-00", "user-01", "user-02"]


def test_simulation_dp_int8_signed_lora_fa(bundles, keys, tmp_path, cache_dir):
    (priv, pub), _ = keys
    doc = _simulate(bundles["fa"], tmp_path, cache_dir, key=str(priv), trusted_keys=(str(pub),), dp_noise=1.0,
                    dp_clip=0.5, int8=True)
    rounds = doc["rounds"]
    assert all(r["replies"] == 3 and not r["refused"] for r in rounds)
    assert all(r["evaluate"] is not None and len(r["evaluate_per_device"]) == 3 for r in rounds)
    eps = [r["epsilon"] for r in rounds]
    assert 0 < eps[0] < eps[1]  # the accountant's epsilon, per round, growing
    assert eps[1] == pytest.approx(epsilon_after(2, 1.0, 3, 1e-5), rel=1e-6)
    assert "lora_product_gap" not in rounds[0]  # LoRA-FA: exact, nothing to measure
    # int8 uploads: one byte per parameter (+ a scale and an .npy header per tensor, which weigh
    # a lot on this tiny adapter: ~0.5x here, ~0.3x on MiniLM) vs four coming down.
    n = doc["trainable_params"]
    assert all(n <= b < n + 300 * 2 * 6 and b < 0.6 * r["bytes_down_per_device"]
               for r in rounds for b in r["bytes_up_per_device"])
    # Devices verified every signed version they loaded; the final one verifies with the key.
    t, v = signed.load_published(tmp_path / "server" / "published", bundle_sha256=doc["bundle_sha256"],
                                 trusted_keys=[pub])
    assert v == 2 and (tmp_path / "server" / "published" / "round-0002" / "fleet.sig").is_file()


def test_simulation_sample_level_dp(bundles, tmp_path, cache_dir):
    from edgepeft.fleet.privacy import PrivacyConfig

    doc = _simulate(bundles["fa"], tmp_path, cache_dir, privacy=PrivacyConfig("sample", epsilon=4.0, clip=0.5))
    rounds = doc["rounds"]
    assert all(r["replies"] == 3 and not r["refused"] for r in rounds)
    # Each device's own accountant, per round; the server reports the largest.
    assert all(len(r["epsilon_per_device"]) == 3 and r["epsilon"] == max(r["epsilon_per_device"]) for r in rounds)
    assert 0 < rounds[0]["epsilon"] < rounds[1]["epsilon"] <= 4.0 and rounds[1]["delta"] == 1e-5
    assert all(m["dp-noise"] > 0 for r in rounds for m in r["train_per_device"])
    assert doc["settings"]["privacy"]["mode"] == "sample" and doc["settings"]["dp_noise"] == 0


def test_simulation_secure_aggregation_gives_the_weighted_mean(bundles, keys, tmp_path, cache_dir):
    """SecAgg+: the server only ever holds the masked sum, yet the published round-1 adapter is
    the devices' weighted mean (replayed here from the same start, samples and seeds)."""
    (priv, pub), _ = keys
    doc = _simulate(bundles["fa"], tmp_path, cache_dir, key=str(priv), trusted_keys=(str(pub),), secagg=True)
    assert doc["secagg"] and [r["replies"] for r in doc["rounds"]] == [3, 3] and doc["version"] == 2
    pubdir = tmp_path / "server" / "published"
    start, _ = signed.load_published(pubdir, bundle_sha256=doc["bundle_sha256"], trusted_keys=[pub], round_=0)
    got, _ = signed.load_published(pubdir, bundle_sha256=doc["bundle_sha256"], trusted_keys=[pub], round_=1)
    dev = Device(DeviceSettings(bundle=str(bundles["fa"]), root=str(tmp_path / "dev"), cache_dir=str(cache_dir),
                                batch_size=4, lr=0.05))
    try:
        outs = [dev.train(user_name(i), start, steps=2, seed=f"0:{user_name(i)}") for i in range(3)]
    finally:
        dev.close()
    want = lora.weighted_mean([o[0] for o in outs], [o[1] for o in outs])
    moved = max(float(np.max(np.abs(want[k] - start[k]))) for k in want)
    assert moved > 1e-3  # the devices did move the adapter
    for k in want:  # SecAgg+ quantizes (see edgepeft.fleet.secagg): ~4e-5 per value here
        np.testing.assert_allclose(got[k], want[k], atol=1.5e-4)
    assert max(float(np.max(np.abs(got[k] - want[k]))) for k in want) < moved / 20


def test_a_device_process_never_imports_torch(bundles, tmp_path, cache_dir):
    """The device side of the fleet (flwr's ClientApp, the Device, a training step) stays torch-free."""
    import subprocess
    import sys

    seed_samples(tmp_path / "dev", {"u": DATA})
    code = f"""
import sys
from edgepeft.fleet.client import make_client_app, device_for
from edgepeft.fleet.apps import client_app
from edgepeft.fleet.device import DeviceSettings
dev = device_for(DeviceSettings(bundle={str(bundles['fa'])!r}, root={str(tmp_path / 'dev')!r},
                                cache_dir={str(cache_dir)!r}, batch_size=4))
from edgepeft.adapters import AdapterStore
start = AdapterStore(dev.session.bundle.root / "adapters", dev.manifest).load("initial")[0]
dev.train("u", start, steps=1, seed="s")
print("torch" in sys.modules, "onnx" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-2:] == ["False", "False"]
