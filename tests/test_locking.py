"""Two processes and one adapter: a file lock makes the second fail clearly (a session, at
open) or wait (a save), writes never interleave, and a killed holder frees the lock."""
from __future__ import annotations

import time

import numpy as np
import pytest
from click.testing import CliRunner

import _reliability as rel
from _figures import record
from edgepeft.adapters import AdapterStore
from edgepeft.errors import LockError


@pytest.fixture(scope="module")
def ctx():
    return rel.context()


@pytest.fixture
def held(ctx, tmp_path):
    """Another process holding alice's lock (as a training session does) until the test ends."""
    root = tmp_path / "store"
    AdapterStore(root, rel.synthetic_manifest()).save(rel.ADAPTER, rel.initial_tensors(), meta={"steps": 1})
    ready, release = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=rel.hold_lock, args=(str(root), ready, release))
    proc.start()
    assert ready.wait(30)
    yield root, proc
    release.set()
    rel.wait_dead(proc)


def test_second_holder_fails_at_once_naming_the_first(held):
    root, proc = held
    store = AdapterStore(root, rel.synthetic_manifest())
    t0 = time.monotonic()
    with pytest.raises(LockError) as exc:
        store.hold(rel.ADAPTER)
    assert time.monotonic() - t0 < 1.0
    msg = str(exc.value)
    assert "'alice'" in msg and "in use by another process" in msg and f"pid {proc.pid}" in msg and "retry" in msg
    store.hold("bob")  # other adapters of the store are free
    store.release_all()


def test_a_save_waits_then_fails_and_writes_nothing(held):
    root, _ = held
    store = AdapterStore(root, rel.synthetic_manifest(), lock_wait=0.5)
    t0 = time.monotonic()
    with pytest.raises(LockError, match="after waiting 0.5 s"):
        store.save(rel.ADAPTER, {n: np.full(s, 9.0, np.float32) for n, s in rel.SHAPES.items()}, meta={"steps": 9})
    assert time.monotonic() - t0 >= 0.5
    assert store.load(rel.ADAPTER)[1]["steps"] == 1
    assert not [p for p in root.iterdir() if p.name.startswith(".")]


def test_a_save_waits_for_the_holder_to_finish(ctx, tmp_path):
    root = tmp_path / "store"
    AdapterStore(root, rel.synthetic_manifest()).save(rel.ADAPTER, rel.initial_tensors(), meta={"steps": 1})
    ready, release = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=rel.hold_lock, args=(str(root), ready, release, 0.6))
    proc.start()
    assert ready.wait(30)
    t0 = time.monotonic()
    AdapterStore(root, rel.synthetic_manifest(), lock_wait=20).save(
        rel.ADAPTER, rel.initial_tensors(), meta={"steps": 2})
    waited = time.monotonic() - t0
    rel.wait_dead(proc)
    assert waited > 0.3
    assert AdapterStore(root, rel.synthetic_manifest()).load(rel.ADAPTER)[1]["steps"] == 2


def test_a_killed_holder_frees_the_lock(ctx, tmp_path):
    root = tmp_path / "store"
    AdapterStore(root, rel.synthetic_manifest()).save(rel.ADAPTER, rel.initial_tensors(), meta={"steps": 1})
    ready, release = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=rel.hold_lock, args=(str(root), ready, release))
    proc.start()
    assert ready.wait(30)
    store = AdapterStore(root, rel.synthetic_manifest())
    with pytest.raises(LockError):
        store.hold(rel.ADAPTER)
    proc.kill()
    rel.wait_dead(proc)
    store.hold(rel.ADAPTER)
    store.release_all()


def test_concurrent_writers_never_interleave(ctx, tmp_path, request):
    """Two processes save alice 15 times each while this one reads it: every version read
    is whole (its tensors carry the value its metadata names), and no save fails."""
    root = tmp_path / "store"
    n = 15
    start, errors = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=rel.save_many, args=(str(root), w, n, start, errors)) for w in (1, 2)]
    for p in procs:
        p.start()
    start.set()
    reader = AdapterStore(root, rel.synthetic_manifest(), lock_wait=30)
    reads, versions = 0, set()
    while any(p.is_alive() for p in procs):
        if reader.exists(rel.ADAPTER):
            with reader._locked(rel.ADAPTER, 30):  # a reader that wants a stable view takes the lock
                tensors, meta = reader.load(rel.ADAPTER)
            for k, v in tensors.items():
                np.testing.assert_array_equal(v, np.full(rel.SHAPES[k], meta["value"], np.float32), err_msg=k)
            reads += 1
            versions.add(meta["value"])
        time.sleep(0.01)
    for p in procs:
        rel.wait_dead(p)
        assert p.exitcode == 0
    assert errors.empty()
    tensors, meta = reader.load(rel.ADAPTER)
    assert meta["steps"] == n - 1
    assert sorted(p.name for p in root.iterdir()) == ["_locks", rel.ADAPTER]
    # The reads must have happened while the writers ran, or nothing above was checked.
    assert reads >= 2 and len(versions) >= 2, f"{reads} reads of {len(versions)} versions while the writers ran"
    print(f"\nconcurrent writers: 2 x {n} saves, {reads} consistent reads, 0 failures")
    record(request, "concurrent_writers", {"writers": 2, "saves_each": n, "reads": reads, "versions_read": len(versions), "failures": 0})


def test_two_sessions_on_one_adapter_across_processes(ctx, bundle_int8, tmp_path, cache_dir, open_session):
    """A session on alice in another process: Session.open and `edgepeft train` here fail
    with a LockError that names it, and nothing is written."""
    from edgepeft.cli import main
    from edgepeft.data import write_jsonl
    from conftest import TRAIN

    store = tmp_path / "store"
    first = open_session(bundle_int8.path, store=store)
    first.save_adapter()
    first.close()  # this process lets go of alice
    # The other process holds alice through an AdapterStore on the same folder (what its
    # session does on open).
    ready, release = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=rel.hold_lock, args=(str(store), ready, release))
    # (hold_lock's store has the synthetic manifest: a lock is about the folder, not its content)
    proc.start()
    assert ready.wait(30)
    try:
        from edgepeft.runtime import Session

        with pytest.raises(LockError, match=f"pid {proc.pid}"):
            Session.open(bundle_int8.path, adapter="alice", store=store, cache_dir=cache_dir, threads=1)
        data = tmp_path / "d.jsonl"
        write_jsonl(data, TRAIN)
        r = CliRunner().invoke(main, ["train", str(bundle_int8.path), "--data", str(data), "--adapter", "alice",
                                      "--store", str(store), "--steps", "1"], env={"EDGEPEFT_CACHE": str(cache_dir)})
        assert r.exit_code == 1 and "in use by another process" in r.output and "Traceback" not in r.output
        # A different adapter trains meanwhile.
        s = Session.open(bundle_int8.path, adapter="bob", store=store, cache_dir=cache_dir, threads=1)
        s.save_adapter()
        s.close()
    finally:
        release.set()
        rel.wait_dead(proc)
    s = Session.open(bundle_int8.path, adapter="alice", store=store, cache_dir=cache_dir, threads=1)
    assert s.steps == 0
    s.close()
