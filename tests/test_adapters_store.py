"""The adapter store: atomic replacement of a folder (a crash or a failed write leaves the old
or the new complete version, never a mix), and Hugging Face PEFT's folder format."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file

import edgepeft.adapters
from edgepeft import names
from edgepeft.adapters import AdapterStore
from edgepeft.errors import AdapterError
from edgepeft.fsutil import sha256_file
from edgepeft.optim import OptimizerSpec

from conftest import LORA


@pytest.fixture
def manifest(bundle_int8):
    return bundle_int8.manifest


def tensors_like(manifest, value: float) -> dict[str, np.ndarray]:
    return {t.name: np.full(t.shape, value, np.float32) for t in manifest.trainable}


def assert_tensors(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for n in want:
        np.testing.assert_array_equal(got[n], want[n], err_msg=n)


def raise_oserror(message: str):
    def fail(*args, **kwargs):
        raise OSError(message)
    return fail


def leftovers(root) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith("."))


@pytest.fixture
def store(tmp_path, manifest):
    s = AdapterStore(tmp_path / "store", manifest)
    s.save("alice", tensors_like(manifest, 1.0), meta={"steps": 1})
    return s


# -- crashes ------------------------------------------------------------------------------------------
def test_crash_between_the_renames_is_recovered_on_load(store, manifest):
    """Crash after `alice -> .old-alice`, before `.tmp -> alice`: the old version comes back."""
    os.replace(store.root / "alice", store.root / ".old-alice")
    assert not (store.root / "alice").exists()
    tensors, meta = store.load("alice")
    assert_tensors(tensors, tensors_like(manifest, 1.0))
    assert meta["steps"] == 1
    assert (store.root / "alice" / names.ADAPTER_WEIGHTS).is_file()
    assert leftovers(store.root) == []


@pytest.mark.parametrize("entry", ["names", "exists", "session"])
def test_crash_recovery_from_every_entry_point(store, manifest, open_session, bundle_int8, entry):
    os.replace(store.root / "alice", store.root / ".old-alice")
    fresh = AdapterStore(store.root, manifest)  # e.g. a new process after the crash
    if entry == "names":
        assert fresh.names() == ["alice"]
    elif entry == "exists":
        assert fresh.exists("alice")
    else:
        s = open_session(bundle_int8.path, adapter="alice", store=store.root)
        assert s.steps == 1
        assert_tensors(s.parameters(), tensors_like(manifest, 1.0))
    assert leftovers(store.root) == []
    assert_tensors(fresh.load("alice")[0], tensors_like(manifest, 1.0))


def test_crash_after_the_second_rename_keeps_the_new_version(store, manifest):
    """Crash after `.tmp -> alice`, before removing `.old-alice`: the new one wins."""
    store.save("alice", tensors_like(manifest, 2.0))   # the new version, in place
    store.save("stale", tensors_like(manifest, 1.0))
    os.replace(store.root / "stale", store.root / ".old-alice")  # the old one, not removed yet
    assert_tensors(store.load("alice")[0], tensors_like(manifest, 2.0))
    assert leftovers(store.root) == []


def test_a_stale_temp_folder_is_not_an_adapter(store, manifest):
    tmp = store.root / ".tmp-bob-12345"
    tmp.mkdir()
    (tmp / names.ADAPTER_WEIGHTS).write_bytes(b"half written")
    assert store.names() == ["alice"]
    assert not store.exists("bob")


# -- failed saves -------------------------------------------------------------------------------------
def test_failed_write_keeps_the_previous_version(store, manifest, monkeypatch):
    monkeypatch.setattr(edgepeft.adapters, "save_file", raise_oserror("No space left on device"))
    with pytest.raises(AdapterError) as exc:
        store.save("alice", tensors_like(manifest, 2.0), meta={"steps": 2})
    msg = str(exc.value)
    assert "'alice'" in msg and "No space left on device" in msg and "previous version is kept" in msg
    monkeypatch.undo()
    tensors, meta = store.load("alice")
    assert_tensors(tensors, tensors_like(manifest, 1.0))
    assert meta["steps"] == 1
    assert leftovers(store.root) == []


def test_failed_first_save_leaves_no_adapter(tmp_path, manifest, monkeypatch):
    s = AdapterStore(tmp_path / "store", manifest)
    monkeypatch.setattr(edgepeft.adapters, "save_file", raise_oserror("boom"))
    with pytest.raises(AdapterError, match="boom"):
        s.save("bob", tensors_like(manifest, 1.0))
    assert s.names() == [] and not s.exists("bob") and leftovers(s.root) == []


def test_failed_rename_in_keeps_the_previous_version(store, manifest, monkeypatch):
    """The old folder is already renamed aside when moving the new one in fails."""
    real_replace = os.replace
    calls = []

    def replace(src, dst):
        calls.append((str(src), str(dst)))
        if len(calls) == 2:
            raise OSError("rename failed")
        return real_replace(src, dst)

    monkeypatch.setattr(edgepeft.adapters.os, "replace", replace)
    with pytest.raises(AdapterError, match="previous version is kept"):
        store.save("alice", tensors_like(manifest, 2.0))
    monkeypatch.undo()
    assert calls[0][1].endswith(".old-alice") and ".tmp-alice" in calls[1][0]
    assert_tensors(store.load("alice")[0], tensors_like(manifest, 1.0))
    assert leftovers(store.root) == []


def test_session_save_failure_keeps_the_previous_version(open_session, bundle_int8, tmp_path, monkeypatch,
                                                         train_examples):
    s = open_session(bundle_int8.path, store=tmp_path / "store", optimizer=OptimizerSpec(lr=1e-2))
    s.train_step(train_examples)
    s.save_adapter()
    saved = s.parameters()
    s.train_step(train_examples)
    monkeypatch.setattr(edgepeft.adapters, "save_file", raise_oserror("EIO"))
    with pytest.raises(AdapterError):
        s.save_adapter()
    monkeypatch.undo()
    again = open_session(bundle_int8.path, store=tmp_path / "store")
    assert again.steps == 1
    assert_tensors(again.parameters(), saved)


@pytest.mark.parametrize("bad, part", [
    (lambda m: {**tensors_like(m, 2.0), m.trainable[0].name: np.zeros((3, 3), np.float32)}, "has shape (3, 3)"),
    (lambda m: {**tensors_like(m, 2.0), "extra": np.zeros(2, np.float32)}, "unknown ['extra']"),
    (lambda m: {k: v for k, v in list(tensors_like(m, 2.0).items())[1:]}, "missing ["),
    (lambda m: {**tensors_like(m, 2.0), m.trainable[1].name: np.full(m.trainable[1].shape, np.inf, np.float32)},
     "NaN or infinite"),
], ids=["wrong-shape", "extra", "missing", "inf"])
def test_saving_bad_tensors_is_refused_and_the_previous_version_kept(store, manifest, bad, part):
    before = sha256_file(store.root / "alice" / names.ADAPTER_WEIGHTS)
    with pytest.raises(AdapterError) as exc:
        store.save("alice", bad(manifest))
    assert part in str(exc.value)
    assert sha256_file(store.root / "alice" / names.ADAPTER_WEIGHTS) == before
    assert_tensors(store.load("alice")[0], tensors_like(manifest, 1.0))


def test_save_replaces_the_whole_folder(store, manifest):
    (store.root / "alice" / "stray.txt").write_text("from an older version")
    store.save("alice", tensors_like(manifest, 3.0), meta={"steps": 9})
    assert not (store.root / "alice" / "stray.txt").exists()
    tensors, meta = store.load("alice")
    assert_tensors(tensors, tensors_like(manifest, 3.0))
    assert meta["steps"] == 9
    assert leftovers(store.root) == []


# -- PEFT format --------------------------------------------------------------------------------------
def test_peft_folder_format(open_session, bundle_int8, tmp_path, train_examples):
    s = open_session(bundle_int8.path, store=tmp_path / "store", optimizer=OptimizerSpec(lr=1e-2))
    s.train_step(train_examples)
    folder = s.save_adapter()
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [names.ADAPTER_CONFIG, names.ADAPTER_WEIGHTS, names.ADAPTER_META, names.ADAPTER_OPTIM])

    cfg = json.loads((folder / names.ADAPTER_CONFIG).read_text())
    assert cfg["peft_type"] == "LORA"
    assert cfg["r"] == LORA.rank == 4
    assert cfg["lora_alpha"] == LORA.alpha == 8.0
    assert cfg["target_modules"] == ["query", "value"]
    assert cfg["modules_to_save"] == ["classifier"]
    assert cfg["task_type"] == "SEQ_CLS"
    assert cfg["base_model_name_or_path"] == "tiny-encoder"
    assert cfg["lora_dropout"] == 0.0 and cfg["bias"] == "none" and cfg["fan_in_fan_out"] is False

    manifest = bundle_int8.manifest
    with safe_open(str(folder / names.ADAPTER_WEIGHTS), framework="numpy") as f:
        assert f.metadata() == {"format": "pt"}
        keys = set(f.keys())
    assert keys == {t.peft_key for t in manifest.trainable}
    assert all(k.startswith(names.PEFT_PREFIX) for k in keys)
    lora_keys = {t.peft_key for t in manifest.trainable if t.method == "lora"}
    assert lora_keys == {f"{names.PEFT_PREFIX}encoder.layer.{i}.attention.self.{m}.lora_{ab}.weight"
                         for i in (0, 1) for m in ("query", "value") for ab in "AB"}
    by_key = load_file(str(folder / names.ADAPTER_WEIGHTS))
    for t in manifest.trainable:
        assert by_key[t.peft_key].shape == t.shape and by_key[t.peft_key].dtype == np.float32
    # PEFT's shapes: lora_A (r, in), lora_B (out, r).
    assert by_key[f"{names.PEFT_PREFIX}encoder.layer.0.attention.self.query.lora_A.weight"].shape == (4, 64)
    assert by_key[f"{names.PEFT_PREFIX}encoder.layer.0.attention.self.query.lora_B.weight"].shape == (64, 4)

    meta = json.loads((folder / names.ADAPTER_META).read_text())
    assert meta["weights_sha256"] == sha256_file(folder / names.ADAPTER_WEIGHTS)
    assert meta["optimizer_sha256"] == sha256_file(folder / names.ADAPTER_OPTIM)
    assert meta["model_sha256"] == manifest.model_sha256 and meta["sdk_version"] == manifest.sdk_version
    assert meta["steps"] == 1 and meta["optimizer_step"] == 1 and meta["backend"] == "ort-training"


def test_target_pattern_is_written_as_peft_target_modules(tmp_path):
    from conftest import export_tiny
    from edgepeft.adapters import peft_config
    from edgepeft.specs import LoraSpec

    pattern = r"^encoder\.layer\.1\.attention\.self\.query$"
    r = export_tiny(tmp_path / "p.edgepeft", "none", methods=[LoraSpec(rank=2, alpha=4, targets=(), target_pattern=pattern)])
    cfg = peft_config(r.manifest)
    assert cfg["target_modules"] == pattern and cfg["r"] == 2 and cfg["lora_alpha"] == 4.0
    assert cfg["modules_to_save"] is None


def test_initial_adapter_in_the_bundle_is_a_peft_folder(bundle_int8, cache_dir):
    from edgepeft.bundle import open_bundle

    b = open_bundle(bundle_int8.path, cache_dir)
    initial = AdapterStore(b.root / "adapters", b.manifest)
    assert initial.names() == ["initial"]
    tensors, meta = initial.load("initial")
    assert meta["steps"] == 0
    want = {t.name: t.param.detach().numpy() for t in bundle_int8.trainables}
    assert_tensors(tensors, want)
    # LoRA's B starts at zero, so the injected model equals the base model.
    assert all(not tensors[n].any() for n in tensors if n.endswith("lora_B"))
    assert all(tensors[n].any() for n in tensors if n.endswith("lora_A"))
