"""The on-device personalization loop on the tiny encoder: crash-safe logs (torn tails ignored
and repaired), the bounded sample buffer, the trigger policy, the guardrail (a poisoned round
is rolled back, the last good adapter stays active, its samples are quarantined), per-user
adapters, and the metrics log."""
from __future__ import annotations

import json
import random

import numpy as np
import pytest

from edgepeft.data import Example
from edgepeft.errors import AdapterError, DataError, SpecError
from edgepeft.optim import OptimizerSpec
from edgepeft.runtime import Personalizer, PersonalizerConfig
from edgepeft.runtime.samples import RecordLog, SampleBuffer

POS = ("good", "great", "lovely", "superb", "fun", "wonderful", "loved", "brilliant")
NEG = ("bad", "awful", "boring", "dreadful", "painful", "worst", "hated", "dull")


def reviews(n: int, seed: int, *, flip: bool = False) -> list[Example]:
    """Short synthetic reviews; ``flip`` labels them wrong (the poisoned data)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        pos = i % 2 == 0
        words = " ".join(rng.choice(POS if pos else NEG) for _ in range(rng.randint(2, 4)))
        label = "pos" if pos != flip else "neg"
        out.append(Example(f"{words} {rng.randint(0, 999)}", label))
    return out


CFG = PersonalizerConfig(every=0, steps=24, batch_size=8, holdout=0.25, fsync=False)


@pytest.fixture
def personalizer(bundle_int8, open_session, tmp_path):
    def make(config=CFG, **kw):
        s = open_session(bundle_int8.path, adapter="owner", optimizer=OptimizerSpec(lr=2e-2), **kw)
        return Personalizer(s, tmp_path / "loop", config)
    return make


# -- record log and sample buffer -------------------------------------------------------------

def test_record_log_ignores_a_torn_tail_and_repairs_it(tmp_path):
    log = RecordLog(tmp_path / "r.jsonl")
    log.append({"a": 1}, {"a": 2})
    with open(log.path, "ab") as f:
        f.write(b'0badc0de {"a": 3')  # a crash in the middle of the third record
    assert log.read() == [{"a": 1}, {"a": 2}] and log.damaged == 1
    log.repair()
    log.append({"a": 4})
    assert log.read() == [{"a": 1}, {"a": 2}, {"a": 4}] and log.damaged == 0


def test_record_log_skips_a_record_whose_checksum_fails(tmp_path):
    log = RecordLog(tmp_path / "r.jsonl")
    log.append({"a": 1}, {"a": 2}, {"a": 3})
    lines = log.path.read_bytes().splitlines(keepends=True)
    lines[1] = lines[1].replace(b'"a":2', b'"a":9')  # bit rot, checksum unchanged
    log.path.write_bytes(b"".join(lines))
    assert log.read() == [{"a": 1}, {"a": 3}] and log.damaged == 1


def test_sample_buffer_is_bounded_persistent_and_compacted(tmp_path):
    path = tmp_path / "s.log"
    buf = SampleBuffer(path, capacity=5, fsync=False)
    for i in range(12):
        buf.add([{"text": f"t{i}", "label": "pos"}])
    assert [s.seq for s in buf.samples()] == [8, 9, 10, 11, 12]
    assert len(path.read_bytes().splitlines()) < 10  # compacted at 2x capacity
    with open(path, "ab") as f:
        f.write(b"0000")  # torn tail from a crash
    again = SampleBuffer(path, capacity=5)
    assert [s.data["text"] for s in again.samples()] == ["t7", "t8", "t9", "t10", "t11"]
    again.add([{"text": "t12"}])
    assert again.last_seq == 13 and SampleBuffer(path, capacity=5).last_seq == 13


def test_sample_buffer_refuses_non_json(tmp_path):
    with pytest.raises(DataError, match="JSON"):
        SampleBuffer(tmp_path / "s.log", 4).add([{"x": object()}])


@pytest.mark.parametrize("kw, field", [
    ({"every": -1}, "every"), ({"steps": 0}, "steps"), ({"holdout": 1.0}, "holdout"),
    ({"holdout": 0}, "holdout"), ({"metric": "f1"}, "metric"), ({"tolerance": -0.1}, "tolerance"),
    ({"capacity": 1}, "capacity"), ({"batch_size": True}, "batch_size"), ({"base_adapter": "../x"}, "adapter name"),
])
def test_config_is_checked_at_construction(kw, field):
    with pytest.raises((SpecError, AdapterError), match=field):
        PersonalizerConfig(**kw)


# -- the loop ---------------------------------------------------------------------------------

def test_trigger_every_n_samples(personalizer):
    p = personalizer(PersonalizerConfig(every=16, steps=2, holdout=0.25, min_holdout=2, fsync=False))
    data = reviews(40, seed=1)
    assert p.add("alice", data[:15]) is None
    r = p.add("alice", data[15:16])
    assert r is not None and r.trigger == "every" and r.round == 1 and r.steps == 2 and r.last_seq == 16
    assert p.add("alice", data[16:31]) is None
    assert p.add("alice", data[31:32]).round == 2
    assert [x["round"] for x in p.rounds("alice")] == [1, 2]


def test_on_demand_only_and_too_few_samples_skip(personalizer):
    p = personalizer()
    assert p.add("alice", reviews(3, seed=2)) is None  # every=0: no automatic rounds
    r = p.personalize("alice")
    assert r.status == "skipped" and "too few" in r.reason and r.steps == 0


def test_unknown_label_is_refused_before_it_is_stored(personalizer):
    p = personalizer()
    with pytest.raises(DataError, match="not in the bundle's labels"):
        p.add("alice", [Example("great", "maybe")])
    assert len(p.buffer("alice")) == 0


def test_guardrail_rolls_back_a_poisoned_round(personalizer, tmp_path):
    p = personalizer()
    s = p.session
    p.add("alice", reviews(64, seed=3))
    good = p.personalize("alice")
    assert good.status == "accepted", good.reason
    assert good.after.loss < good.before.loss and good.adapter_steps == CFG.steps
    good_params = s.parameters()

    # A round fed mislabeled data: its samples outnumber the clean ones.
    p.add("alice", reviews(96, seed=4, flip=True))
    bad = p.personalize("alice")
    assert bad.status == "rolled_back", bad.reason
    assert bad.extra["holdout_slice"] == "trusted"  # judged on the data the good adapter was accepted with
    assert bad.after.loss > bad.before.loss
    # The last good adapter is active (bit for bit), in memory and in the store.
    assert s.adapter == "alice" and s.steps == CFG.steps
    now = s.parameters()
    assert all(np.array_equal(now[k], good_params[k]) for k in good_params)
    stored, meta = s.store.load("alice")
    assert all(np.array_equal(stored[k], good_params[k]) for k in good_params) and meta["steps"] == CFG.steps

    # The poisoned samples are quarantined: the next round trains on the clean ones only.
    train, hold = p.split("alice")
    assert all(x.seq <= 64 for x in train + hold)
    again = p.personalize("alice")
    assert again.n_train == good.n_train and again.status == "accepted", again.reason

    log = p.rounds("alice")
    assert [r["status"] for r in log] == ["accepted", "rolled_back", "accepted"]
    assert {"before", "after", "losses", "reason", "seconds", "n_train", "n_holdout"} <= set(log[1])
    # The metrics log is JSONL with a checksum per record: every line's JSON parses after it.
    for line in (tmp_path / "loop" / "alice" / "rounds.jsonl").read_text().splitlines():
        assert json.loads(line.split(" ", 1)[1])["user"] == "alice"


def test_a_failed_step_rolls_back(personalizer):
    p = personalizer()
    p.add("alice", reviews(48, seed=5))
    assert p.personalize("alice").status == "accepted"
    before = p.session.parameters()
    p.session.optimizer_spec = OptimizerSpec(lr=1e39)  # for adapters loaded from now on: overflows to inf
    p._reload_active("alice")
    p.add("alice", reviews(16, seed=6))
    r = p.personalize("alice")
    assert r.status == "failed" and "NumericalError" in r.reason
    after = p.session.parameters()
    assert all(np.array_equal(after[k], before[k]) for k in before)


def test_users_have_their_own_adapters_and_state_survives_a_restart(personalizer, tmp_path):
    p = personalizer()
    p.add("alice", reviews(64, seed=7))
    p.add("bob", reviews(64, seed=8, flip=True))  # bob's labels are the other way round: his own
    ra, rb = p.personalize("alice"), p.personalize("bob")
    assert ra.accepted and rb.accepted
    assert p.session.adapter == "bob" and set(p.session.adapters()) >= {"alice", "bob"}
    p.activate("alice")
    pred = p.session.predict(["great lovely superb"])
    p.activate("bob")
    assert p.session.predict(["great lovely superb"]) != pred
    # Other users' adapters are not held in memory (they are in the store).
    assert "alice" not in p.session._others

    with open(tmp_path / "loop" / "alice" / "rounds.jsonl", "ab") as f:
        f.write(b'12345678 {"round": 2, "sta')  # a crash while logging round 2
    q = Personalizer(p.session, tmp_path / "loop", CFG)
    assert [r["round"] for r in q.rounds("alice")] == [1]
    assert q.personalize("alice").round == 2


def test_new_users_start_from_a_base_adapter(personalizer):
    p = personalizer()
    s = p.session
    s.train_step(s.encoder.batch(reviews(8, seed=9)))
    s.save_adapter()  # "owner": the shared starting point
    base = s.parameters()
    q = Personalizer(s, p.root, PersonalizerConfig(every=0, base_adapter="owner", fsync=False))
    q.activate("carol")
    now = s.parameters()
    assert all(np.array_equal(now[k], base[k]) for k in base) and s.steps == 0
    with pytest.raises(AdapterError, match="base adapter's name"):
        q.add("owner", reviews(2, seed=1))
