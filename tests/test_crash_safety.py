"""Crash safety of the adapter store: a process SIGKILLed at random points while training and
saving, or just before each file-system operation of a save, leaves every adapter as its
previous or its new complete version, and training resumes from it; a write that fails (file
too large for the disk, permission denied) keeps the previous version and says why; steps with
non-finite losses or gradients never reach the saved adapter.

The random campaign runs EDGEPEFT_KILL_TRIALS trials (default 50); the `slow` variant runs
EDGEPEFT_KILL_TRIALS_SLOW (default 300)."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

import _reliability as rel
from _figures import record
import edgepeft.adapters
from edgepeft import names
from edgepeft.adapters import AdapterStore
from edgepeft.errors import AdapterError, EdgePeftError
from edgepeft.optim import OptimizerSpec
from edgepeft.runtime import NumericalError


@pytest.fixture(scope="module")
def ctx():
    return rel.context()


def _assert_exact(store: AdapterStore, replay: rel.Replay) -> int:
    """The stored adapter is exactly the state after its recorded number of steps (weights and
    optimizer state from one and the same save); returns that step count."""
    tensors, meta = store.load(rel.ADAPTER)
    steps = meta["steps"]
    want, (want_opt, want_t) = replay.at(steps)
    for n in want:
        np.testing.assert_array_equal(tensors[n], want[n], err_msg=f"{n} after {steps} steps")
    opt = store.load_optimizer(rel.ADAPTER)
    if steps == 0:
        assert opt is None
        return steps
    flat, t = opt
    assert t == want_t == steps and set(flat) == set(want_opt)
    for k in flat:
        np.testing.assert_array_equal(flat[k], want_opt[k], err_msg=k)
    return steps


def _kill_campaign(ctx, root, trials: int, seed: int) -> dict:
    """Run ``trials`` workers one after another on one store, each resuming alice and
    training until SIGKILLed at a random moment; check the store after every kill."""
    rng = np.random.default_rng(seed)
    replay = rel.Replay()
    manifest = rel.synthetic_manifest()
    figures = {"trials": 0, "failures": 0, "steps_saved": 0, "killed_mid_save": 0, "debris_seen": 0}
    last = 0
    for _ in range(trials):
        # No lock: a worker SIGKILLed while holding a synchronized Value's lock would leave the
        # next read here waiting forever (seen once in 300 trials).
        progress, started = ctx.Value("q", -1, lock=False), ctx.Event()
        proc = ctx.Process(target=rel.train_forever, args=(str(root), progress, started))
        proc.start()
        assert started.wait(30), "worker did not start"
        resumed_at = progress.value
        assert resumed_at == last, f"training resumed at step {resumed_at}, the store held {last}"
        rel.sleep_random(rng, 0.1)
        proc.kill()
        rel.wait_dead(proc)
        assert proc.exitcode == -9
        reported = progress.value
        debris = sorted(p.name for p in root.iterdir() if p.name.startswith((".tmp-", ".old-")))
        figures["debris_seen"] += bool(debris)
        store = AdapterStore(root, manifest)  # a fresh process's view
        assert store.names() == ([rel.ADAPTER] if reported > 0 or store.exists(rel.ADAPTER) else [])
        steps = _assert_exact(store, replay) if store.exists(rel.ADAPTER) else 0
        # The previous complete version (the last save that returned) or the new one.
        assert steps in (reported, reported + 1), (steps, reported, debris)
        figures["killed_mid_save"] += steps == reported + 1 or bool(debris)
        figures["trials"] += 1
        last = steps
    figures["steps_saved"] = last
    return figures


def test_sigkill_campaign(ctx, tmp_path, request):
    trials = int(os.environ.get("EDGEPEFT_KILL_TRIALS", "50"))
    figures = _kill_campaign(ctx, tmp_path / "store", trials, seed=1)
    print(f"\nkill campaign: {json.dumps(figures)}")
    record(request, "kill_campaign", figures)
    assert figures["trials"] == trials and figures["steps_saved"] > 0
    # The kills landed inside saves, not only between them.
    assert figures["killed_mid_save"] > 0


@pytest.mark.slow
def test_sigkill_campaign_long(ctx, tmp_path, request):
    trials = int(os.environ.get("EDGEPEFT_KILL_TRIALS_SLOW", "300"))
    figures = _kill_campaign(ctx, tmp_path / "store", trials, seed=2)
    print(f"\nlong kill campaign: {json.dumps(figures)}")
    record(request, "kill_campaign_long", figures)
    assert figures["trials"] == trials


def _ops_in_one_save(tmp_path) -> int:
    store = AdapterStore(tmp_path / "count", rel.synthetic_manifest())
    store.save(rel.ADAPTER, rel.initial_tensors(), meta={"steps": 1})
    counter = [0]
    saved = (edgepeft.adapters.save_file, edgepeft.adapters.fsync_dir, os.replace, os.fsync, os.mkdir)
    import shutil
    rmtree = shutil.rmtree
    try:
        rel.install_tripwire(None, counter)
        store.save(rel.ADAPTER, rel.initial_tensors(), meta={"steps": 2})
    finally:
        edgepeft.adapters.save_file, edgepeft.adapters.fsync_dir, os.replace, os.fsync, os.mkdir = saved
        shutil.rmtree = rmtree
    return counter[0]


def test_sigkill_before_every_filesystem_operation_of_a_save(ctx, tmp_path, request):
    """Deterministic: die just before the 1st, 2nd, ... file-system call of a replacing save
    (including between the two renames); the store holds version 1 or version 2, complete,
    and the next save succeeds and cleans up."""
    n_ops = _ops_in_one_save(tmp_path)
    assert n_ops >= 8
    manifest = rel.synthetic_manifest()
    outcomes = []
    for die_at in range(1, n_ops + 2):
        root = tmp_path / f"store-{die_at}"
        AdapterStore(root, manifest).save(rel.ADAPTER, {n: np.full(s, 1.0, np.float32) for n, s in rel.SHAPES.items()},
                                          meta={"steps": 1})
        proc = ctx.Process(target=rel.save_and_die, args=(str(root), 2.0, die_at))
        proc.start()
        rel.wait_dead(proc)
        assert proc.exitcode == (-9 if die_at <= n_ops else 0)
        store = AdapterStore(root, manifest)
        tensors, meta = store.load(rel.ADAPTER)
        version = meta["steps"]
        assert version in (1, 2)
        for n, v in tensors.items():
            np.testing.assert_array_equal(v, np.full(rel.SHAPES[n], float(version), np.float32), err_msg=n)
        outcomes.append(version)
        store.save(rel.ADAPTER, {n: np.full(s, 3.0, np.float32) for n, s in rel.SHAPES.items()}, meta={"steps": 3})
        assert store.load(rel.ADAPTER)[1]["steps"] == 3
        assert sorted(p.name for p in root.iterdir()) == [edgepeft.adapters.LOCK_DIR, rel.ADAPTER]
    print(f"\nkill before each of {n_ops} fs operations: outcomes {outcomes}")
    # Early deaths keep version 1, late ones give version 2, and the switch happens once.
    assert outcomes[0] == 1 and outcomes[-1] == 2
    assert outcomes == sorted(outcomes)
    record(request, "kill_points", {"fs_operations_per_save": n_ops, "kill_points": len(outcomes), "failures": 0})


def test_file_too_large_keeps_the_previous_version(ctx, tmp_path):
    """A real kernel write failure (RLIMIT_FSIZE: EFBIG, what a full disk looks like to the
    writer) surfaces as AdapterError and the previous version stays."""
    root = tmp_path / "store"
    AdapterStore(root, rel.synthetic_manifest()).save(rel.ADAPTER, rel.initial_tensors(), meta={"steps": 1})
    result = ctx.Queue()
    proc = ctx.Process(target=rel.save_with_file_size_limit, args=(str(root), 64 * 1024, result))
    proc.start()
    kind, msg = result.get(timeout=30)
    rel.wait_dead(proc)
    assert kind == "edgepeft.errors.AdapterError", (kind, msg)
    assert "File too large" in msg and "previous version is kept" in msg and "free some disk space" in msg
    store = AdapterStore(root, rel.synthetic_manifest())
    tensors, meta = store.load(rel.ADAPTER)
    assert meta["steps"] == 1
    for n, v in tensors.items():
        np.testing.assert_array_equal(v, rel.initial_tensors()[n])
    assert not [p for p in root.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("where, error", [
    ("mkdir", PermissionError(13, "Permission denied")),
    ("write", OSError(28, "No space left on device")),
    ("replace-aside", PermissionError(13, "Permission denied")),
    ("replace-in", OSError(28, "No space left on device")),
])
def test_injected_write_faults_keep_the_previous_version(tmp_path, monkeypatch, where, error):
    store = AdapterStore(tmp_path / "store", rel.synthetic_manifest())
    store.save(rel.ADAPTER, rel.initial_tensors(), meta={"steps": 1})
    real_replace, real_mkdir = os.replace, os.mkdir
    calls = []

    def fail(*a, **kw):
        raise error

    if where == "mkdir":
        monkeypatch.setattr(os, "mkdir", lambda p, *a, **kw: fail() if ".tmp-" in str(p) else real_mkdir(p, *a, **kw))
    elif where == "write":
        monkeypatch.setattr(edgepeft.adapters, "save_file", fail)
    else:
        def replace(src, dst):
            calls.append(src)
            if len(calls) == (1 if where == "replace-aside" else 2):
                raise error
            return real_replace(src, dst)
        monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(AdapterError) as exc:
        store.save(rel.ADAPTER, {n: np.full(s, 2.0, np.float32) for n, s in rel.SHAPES.items()}, meta={"steps": 2})
    monkeypatch.undo()
    msg = str(exc.value)
    assert error.strerror in msg and "previous version is kept" in msg and "'alice'" in msg
    tensors, meta = store.load(rel.ADAPTER)
    assert meta["steps"] == 1
    for n, v in tensors.items():
        np.testing.assert_array_equal(v, rel.initial_tensors()[n])
    assert not [p for p in store.root.iterdir() if p.name.startswith(".")]


# -- a real session: killed while training, resumed --------------------------------------------------
def _replay_session(path, cache_dir, store, batch, steps: int) -> list[tuple[dict, tuple]]:
    """(weights, optimizer state) after 0, 1, ... ``steps`` steps of an uninterrupted session
    on ``batch``: what every complete save of the killed runs must equal exactly."""
    from edgepeft.runtime import Session

    s = Session.open(path, adapter="alice", store=store, cache_dir=cache_dir, threads=1)
    try:
        states = []
        for i in range(steps + 1):
            flat, t = s._cur.optimizer.state_dict()
            states.append((s.parameters(), ({k: v.copy() for k, v in flat.items()}, t)))
            if i < steps:
                s.train_step(batch)
        return states
    finally:
        s.close()


def _assert_state(where: str, tensors: dict, opt: tuple | None, want: tuple[dict, tuple]) -> None:
    """``tensors`` and optimizer state ``opt`` are exactly the replay's ``want``."""
    want_tensors, (want_flat, want_t) = want
    assert set(tensors) == set(want_tensors), where
    for n, v in tensors.items():
        np.testing.assert_array_equal(v, want_tensors[n], err_msg=f"{where}: {n}")
    flat, t = opt if opt is not None else ({}, 0)
    assert t == want_t and set(flat) == set(want_flat), (where, t, want_t)
    for k, v in flat.items():
        np.testing.assert_array_equal(v, want_flat[k], err_msg=f"{where}: optimizer {k}")


def test_session_killed_while_training_resumes(bundle_int8, tmp_path, cache_dir, train_examples, request):
    """SIGKILL a real training process mid-run (3 times). After each kill the stored adapter is
    one complete save: its weights and optimizer state equal, bit for bit, those of an
    uninterrupted session after the recorded number of steps; the next session resumes exactly
    that state (weights and optimizer) and trains on from it."""
    import subprocess
    import sys
    import time

    from edgepeft.data import read_jsonl, write_jsonl
    from edgepeft.runtime import Session

    data = tmp_path / "train.jsonl"
    write_jsonl(data, train_examples)
    store = tmp_path / "store"
    env = {**os.environ, "EDGEPEFT_CACHE": str(cache_dir)}
    code = ("import sys\nfrom edgepeft.runtime import Session\nfrom edgepeft.data import read_jsonl\n"
            "s = Session.open(sys.argv[1], adapter='alice', store=sys.argv[2], threads=1)\n"
            "b = s.encoder.batch(read_jsonl(sys.argv[3]))\nprint('ready', flush=True)\n"
            "while True:\n    s.train_step(b)\n    s.save_adapter()\n")
    rng = np.random.default_rng(3)
    seen, replay = [], None
    for _ in range(3):
        p = subprocess.Popen([sys.executable, "-c", code, str(bundle_int8.path), str(store), str(data)],
                             env=env, stdout=subprocess.PIPE, text=True)
        assert p.stdout.readline().strip() == "ready"
        time.sleep(0.3 + float(rng.uniform(0, 0.5)))
        p.kill()
        p.wait(30)
        s = Session.open(bundle_int8.path, adapter="alice", store=store, cache_dir=cache_dir, threads=1)
        try:
            steps = s.steps
            seen.append(steps)
            assert steps > (seen[-2] if len(seen) > 1 else 0), f"no step saved since the last kill: {seen}"
            if replay is None or len(replay) <= steps:
                batch = s.encoder.batch(read_jsonl(data))
                replay = _replay_session(bundle_int8.path, cache_dir, tmp_path / f"replay-{steps}", batch,
                                         steps + 50)
            stored = AdapterStore(store, bundle_int8.manifest)
            tensors, meta = stored.load("alice")
            assert meta["steps"] == steps
            _assert_state(f"stored after kill {len(seen)}", tensors, stored.load_optimizer("alice"), replay[steps])
            _assert_state(f"resumed after kill {len(seen)}", s.parameters(), s._cur.optimizer.state_dict(),
                          replay[steps])
            s.train_step(s.encoder.batch(read_jsonl(data)))  # training resumes from exactly there
            _assert_state(f"one step after kill {len(seen)}", s.parameters(), s._cur.optimizer.state_dict(),
                          replay[steps + 1])
        finally:
            s.close()
    print(f"\nreal session killed 3 times; steps found after each kill: {seen}")
    record(request, "real_session_kills", {"kills": len(seen), "steps_after_each_kill": seen, "failures": 0})


# -- numerical faults ---------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning",
                            "ignore:invalid value encountered:RuntimeWarning")
def test_exploding_learning_rate_never_reaches_the_saved_adapter(open_session, bundle_int8, tmp_path, train_examples,
                                                                   request):
    """Two good steps are saved; a session with lr=1e300 (every update overflows) has each
    step rejected, and what it saves is still the good adapter, from which training resumes."""
    store = tmp_path / "store"
    s = open_session(bundle_int8.path, store=store, optimizer=OptimizerSpec(lr=1e-2))
    b = s.encoder.batch(train_examples)
    s.train_step(b)
    s.train_step(b)
    s.save_adapter()
    good = s.parameters()
    s.close()
    boom = open_session(bundle_int8.path, store=store, optimizer=OptimizerSpec(lr=1e300))
    rejected = 0
    for _ in range(5):
        with pytest.raises(NumericalError):
            boom.train_step(b)
        rejected += 1
    assert boom.steps == 2
    boom.save_adapter()
    boom.close()
    again = open_session(bundle_int8.path, store=store, optimizer=OptimizerSpec(lr=1e-2))
    assert again.steps == 2
    for n, v in again.parameters().items():
        np.testing.assert_array_equal(v, good[n], err_msg=n)
    again.train_step(b)
    assert again.steps == 3 and all(np.all(np.isfinite(v)) for v in again.parameters().values())
    meta = json.loads((store / "alice" / names.ADAPTER_META).read_text())
    assert meta["steps"] == 2 and meta["optimizer_step"] == 2
    assert rejected == 5
    record(request, "exploding_lr", {"rejected_steps": rejected, "failures": 0})


@pytest.mark.parametrize("fault", ["nan-loss", "inf-loss", "nan-grad", "inf-grad"])
def test_non_finite_loss_or_gradient_is_rejected_and_nothing_changes(open_session, bundle_int8, train_examples,
                                                                     monkeypatch, fault):
    s = open_session(bundle_int8.path, optimizer=OptimizerSpec(lr=1e-2))
    b = s.encoder.batch(train_examples)
    s.train_step(b)
    before, opt_before = s.parameters(), s._cur.optimizer.state_dict()
    real = s.backend.forward_backward

    def faulty(batch):
        loss, grads = real(batch)
        if fault.endswith("loss"):
            return (float("nan") if fault == "nan-loss" else float("inf")), grads
        name = next(iter(grads))
        g = grads[name].copy()
        g.flat[0] = np.nan if fault == "nan-grad" else np.inf
        return loss, {**grads, name: g}

    monkeypatch.setattr(s.backend, "forward_backward", faulty)
    with pytest.raises(NumericalError) as exc:
        s.train_step(b)
    assert isinstance(exc.value, EdgePeftError) and "lower the learning rate" in str(exc.value)
    assert s.steps == 1
    for n, v in s.parameters().items():
        np.testing.assert_array_equal(v, before[n], err_msg=n)
    flat, t = s._cur.optimizer.state_dict()
    assert t == opt_before[1] and set(flat) == set(opt_before[0])
    for k in flat:
        np.testing.assert_array_equal(flat[k], opt_before[0][k], err_msg=k)
    monkeypatch.undo()
    s.train_step(b)  # a good step afterwards works
    assert s.steps == 2
