"""Hot-swapping adapters in one session: each adapter comes back exactly as it was (tensors and
optimizer state, saved or not), the frozen base is never reloaded, and a failed swap changes
nothing. Optimizer state also survives save / reopen."""
from __future__ import annotations

import numpy as np
import pytest

from edgepeft import names
from edgepeft.errors import AdapterError, BackendError
from edgepeft.optim import OptimizerSpec

ADAMW = OptimizerSpec(name="adamw", lr=1e-2)


@pytest.fixture
def data(open_session, bundle_int8, train_examples, heldout_examples):
    enc = open_session(bundle_int8.path, adapter="encoder-only").encoder
    return {"train": [enc.batch(train_examples[:4]), enc.batch(train_examples[4:])],
            "eval": [enc.batch(heldout_examples)]}


def train(s, batches, n):
    return [s.train_step(batches[i % len(batches)]) for i in range(n)]


def assert_same_tensors(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for n in a:
        np.testing.assert_array_equal(a[n], b[n], err_msg=n)


def differ(a: dict, b: dict) -> bool:
    return any(not np.array_equal(a[n], b[n]) for n in a)


def test_swap_restores_each_adapter_exactly(open_session, bundle_int8, data):
    s = open_session(bundle_int8.path, optimizer=ADAMW)
    initial = s.parameters()
    initial_eval = s.evaluate(data["eval"])
    train(s, data["train"], 3)
    alice = s.parameters()
    alice_eval = s.evaluate(data["eval"])
    alice_logits = s.infer(data["eval"][0].feeds)
    assert differ(alice, initial) and alice_eval != initial_eval

    s.swap_adapter("bob", create=True)
    assert s.adapter == "bob" and s.steps == 0
    # A new adapter starts from the bundle's initial adapter, not from alice.
    assert_same_tensors(s.parameters(), initial)
    assert s.evaluate(data["eval"]) == initial_eval
    train(s, data["train"], 2)
    bob = s.parameters()
    bob_eval = s.evaluate(data["eval"])
    assert differ(bob, alice) and differ(bob, initial)

    s.swap_adapter("alice")
    assert s.adapter == "alice" and s.steps == 3
    assert_same_tensors(s.parameters(), alice)
    assert s.evaluate(data["eval"]) == alice_eval                          # bit for bit
    np.testing.assert_array_equal(s.infer(data["eval"][0].feeds), alice_logits)

    s.swap_adapter("bob")
    assert s.steps == 2
    assert_same_tensors(s.parameters(), bob)
    assert s.evaluate(data["eval"]) == bob_eval


def test_swap_to_the_active_adapter_is_a_no_op(open_session, bundle_int8, data):
    s = open_session(bundle_int8.path, optimizer=ADAMW)
    train(s, data["train"], 2)
    before = s.parameters()
    s.swap_adapter("alice")
    s.swap_adapter("alice", create=True)
    assert s.adapter == "alice" and s.steps == 2
    assert_same_tensors(s.parameters(), before)


def test_swap_to_unknown_adapter_raises_and_changes_nothing(open_session, bundle_int8, data):
    s = open_session(bundle_int8.path, optimizer=ADAMW)
    train(s, data["train"], 2)
    before, before_eval = s.parameters(), s.evaluate(data["eval"])
    with pytest.raises(AdapterError) as exc:
        s.swap_adapter("carol")
    assert "carol" in str(exc.value) and "create=True" in str(exc.value)
    assert s.adapter == "alice" and s.steps == 2
    assert_same_tensors(s.parameters(), before)
    assert s.evaluate(data["eval"]) == before_eval
    assert "carol" not in s.adapters()
    # Training continues on alice as if nothing happened.
    train(s, data["train"], 1)
    assert s.steps == 3


def test_adapters_lists_unsaved_ones(open_session, bundle_int8, tmp_path):
    s = open_session(bundle_int8.path, store=tmp_path / "store")
    assert s.adapters() == ["alice"]
    s.swap_adapter("bob", create=True)
    s.swap_adapter("carol", create=True)
    assert s.adapters() == ["alice", "bob", "carol"]
    assert s.store.names() == []                                           # nothing was written
    s.save_adapter()
    assert s.store.names() == ["carol"]
    assert s.adapters() == ["alice", "bob", "carol"]


def test_swap_loads_a_stored_adapter_from_disk(open_session, bundle_int8, tmp_path, data):
    store = tmp_path / "shared-store"
    s1 = open_session(bundle_int8.path, adapter="dave", store=store, optimizer=ADAMW)
    train(s1, data["train"], 2)
    s1.save_adapter()
    dave = s1.parameters()
    s2 = open_session(bundle_int8.path, adapter="alice", store=store, optimizer=ADAMW)
    assert s2.adapters() == ["alice", "dave"]
    s2.swap_adapter("dave")
    assert s2.steps == 2
    assert_same_tensors(s2.parameters(), dave)
    assert s2.evaluate(data["eval"]) == s1.evaluate(data["eval"])


def test_swap_does_not_reopen_the_bundle(open_session, bundle_int8, monkeypatch, data):
    s = open_session(bundle_int8.path, optimizer=ADAMW)
    backend = s.backend

    def refuse(*a, **k):
        raise AssertionError("the bundle or the backend was loaded again")

    import edgepeft.bundle
    import edgepeft.runtime.session as session_mod
    from edgepeft.runtime.backends.ort_training import OrtTrainingBackend

    monkeypatch.setattr(session_mod, "open_bundle", refuse)
    monkeypatch.setattr(session_mod, "make_backend", refuse)
    monkeypatch.setattr(edgepeft.bundle, "open_bundle", refuse)
    monkeypatch.setattr(OrtTrainingBackend, "__init__", refuse)
    monkeypatch.setattr(edgepeft.bundle, "_open_zip", refuse)  # not even the zip is read

    train(s, data["train"], 1)
    s.swap_adapter("bob", create=True)
    train(s, data["train"], 1)
    s.save_adapter()
    s.swap_adapter("alice")
    s.swap_adapter("bob")
    assert s.backend is backend and s.adapter == "bob" and s.steps == 1
    assert np.isfinite(s.evaluate(data["eval"]).loss)


def test_optimizer_state_is_per_adapter(open_session, bundle_int8, tmp_path, data):
    """alice 3 steps, bob 2 steps, alice 2 more == alice 5 steps alone."""
    s = open_session(bundle_int8.path, store=tmp_path / "a", optimizer=ADAMW)
    losses = train(s, data["train"], 3)
    s.swap_adapter("bob", create=True)
    train(s, data["train"][::-1], 2)
    s.swap_adapter("alice")
    losses += [s.train_step(data["train"][(3 + i) % 2]) for i in range(2)]
    assert s.steps == 5

    ref = open_session(bundle_int8.path, store=tmp_path / "b", optimizer=ADAMW)
    ref_losses = train(ref, data["train"], 5)
    np.testing.assert_allclose(losses, ref_losses, rtol=0, atol=1e-6)
    for n, v in ref.parameters().items():
        np.testing.assert_allclose(s.parameters()[n], v, rtol=0, atol=1e-6, err_msg=n)


def resume(open_session, bundle, store, data, n_first, n_then, spec, drop_optimizer=False):
    s = open_session(bundle.path, store=store, optimizer=spec)
    train(s, data["train"], n_first)
    folder = s.save_adapter()
    s.close()
    if drop_optimizer:
        (folder / names.ADAPTER_OPTIM).unlink()
    s2 = open_session(bundle.path, store=store, optimizer=spec)
    assert s2.steps == n_first
    losses = [s2.train_step(data["train"][(n_first + i) % 2]) for i in range(n_then)]
    return s2, losses


@pytest.mark.parametrize("spec", [ADAMW, OptimizerSpec(name="sgd", lr=0.1, momentum=0.9)], ids=["adamw", "sgd"])
def test_optimizer_state_survives_save_and_reopen(open_session, bundle_int8, tmp_path, data, spec):
    """3 steps, save, reopen, 2 steps == 5 steps in one session."""
    s2, losses = resume(open_session, bundle_int8, tmp_path / "a", data, 3, 2, spec)
    assert s2.steps == 5

    ref = open_session(bundle_int8.path, store=tmp_path / "b", optimizer=spec)
    ref_losses = train(ref, data["train"], 5)
    np.testing.assert_allclose(losses, ref_losses[3:], rtol=0, atol=1e-6)
    want = ref.parameters()
    for n, v in s2.parameters().items():
        np.testing.assert_allclose(v, want[n], rtol=0, atol=1e-6, err_msg=n)

    # Without the saved optimizer state the run diverges: the check above is sensitive to it.
    s3, _ = resume(open_session, bundle_int8, tmp_path / "c", data, 3, 2, spec, drop_optimizer=True)
    assert max(float(np.abs(s3.parameters()[n] - want[n]).max()) for n in want) > 1e-4


def test_new_adapter_saves_no_optimizer_state_until_trained(open_session, bundle_int8, data):
    s = open_session(bundle_int8.path, optimizer=ADAMW)
    folder = s.save_adapter()
    assert not (folder / names.ADAPTER_OPTIM).exists()
    train(s, data["train"], 1)
    folder = s.save_adapter()
    assert (folder / names.ADAPTER_OPTIM).is_file()


def test_unknown_backend(open_session, bundle_int8):
    with pytest.raises(BackendError, match="ort-training"):
        open_session(bundle_int8.path, backend="coreml")


def test_revert_brings_back_the_saved_version(open_session, bundle_int8, data):
    s = open_session(bundle_int8.path, optimizer=ADAMW)
    with pytest.raises(AdapterError, match="never saved"):
        s.revert_adapter()
    train(s, data["train"], 2)
    s.save_adapter()
    saved, saved_eval = s.parameters(), s.evaluate(data["eval"])
    train(s, data["train"], 3)
    assert differ(s.parameters(), saved) and s.steps == 5
    s.revert_adapter()
    assert s.steps == 2 and s.evaluate(data["eval"]) == saved_eval
    assert_same_tensors(s.parameters(), saved)
    train(s, data["train"], 1)  # the optimizer state came back too: training goes on from step 2
    assert s.steps == 3


def test_unload_drops_the_unsaved_copy(open_session, bundle_int8, data):
    s = open_session(bundle_int8.path, optimizer=ADAMW)
    s.save_adapter()
    stored = s.parameters()
    train(s, data["train"], 2)
    s.swap_adapter("bob", create=True)
    with pytest.raises(AdapterError, match="is active"):
        s.unload_adapter("bob")
    s.unload_adapter("alice")
    s.swap_adapter("alice")  # loads the stored version: the 2 unsaved steps are gone
    assert s.steps == 0
    assert_same_tensors(s.parameters(), stored)
