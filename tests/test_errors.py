"""Bad inputs raise a specific EdgePeftError subclass whose message says what is wrong (and
leave nothing half-done behind): bundles, adapters, data, targets, names, budgets and steps
that go non-finite."""
from __future__ import annotations

import json
import shutil
import stat
import zipfile
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from conftest import edit_manifest, export_tiny, rewrite_zip
from test_api_inputs import refused_unchanged
from edgepeft import names
from edgepeft.adapters import check_adapter_name
from edgepeft.bundle import open_bundle, read_manifest
from edgepeft.data import Batch, Example, read_jsonl
from edgepeft.errors import (AdapterError, BundleError, DataError, EdgePeftError, ManifestError,
                             MemoryBudgetError, SpecError, TargetError)
from edgepeft.fsutil import sha256_file
from edgepeft.optim import OptimizerSpec
from edgepeft.runtime import NumericalError, Session
from edgepeft.runtime.guard import UpdateGuard
from edgepeft.specs import LoraSpec


# -- bundles ------------------------------------------------------------------------------------------
def _flip(data: bytes, at: int | None = None) -> bytes:
    i = len(data) // 2 if at is None else at
    return data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1:]


def _symlink_entry(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info


def _replace_member(member: str, new: callable):
    return lambda good, out: rewrite_zip(good, out, lambda n, d: [(n, new(d) if n == member else d)])


def _add_entry(entry, data=b"x"):
    return lambda good, out: rewrite_zip(good, out, lambda n, d: [(n, d)] + ([(entry, data)] if n == names.MANIFEST else []))


def _drop_member(member: str):
    return lambda good, out: rewrite_zip(good, out, lambda n, d: [] if n == member else [(n, d)])


def _write(data: bytes):
    def build(good, out):
        out.write_bytes(data)
        return out
    return build


def _manifest(edit):
    return lambda good, out: edit_manifest(good, out, edit)


BAD_BUNDLES = [
    # (id, build(good_bundle, out_path) -> path, error type, message parts)
    ("missing", lambda good, out: out.with_name("missing.edgepeft"), BundleError, ["does not exist", "missing.edgepeft"]),
    ("not-a-zip", _write(b"this is not a zip file at all\n" * 10), BundleError, ["not a readable edgepeft bundle"]),
    ("empty-file", _write(b""), BundleError, ["not a readable edgepeft bundle"]),
    ("truncated-zip", lambda good, out: _write(good.read_bytes()[:4000])(good, out), BundleError, ["not a readable"]),
    ("no-manifest", _drop_member(names.MANIFEST), BundleError, ["no manifest.json", "not an edgepeft bundle"]),
    ("manifest-not-json", _replace_member(names.MANIFEST, lambda d: d[:-20]), ManifestError, ["not valid JSON", "re-export"]),
    ("manifest-not-object", _replace_member(names.MANIFEST, lambda d: b"[1, 2]"), ManifestError, ["JSON object"]),
    ("schema-99", _manifest(lambda m: m.update(schema_version=99)), ManifestError,
     ["schema version 99", f"reads version {names.SCHEMA_VERSION}"]),
    ("schema-missing", _manifest(lambda m: m.pop("schema_version")), ManifestError, ["schema version None"]),
    ("field-missing", _manifest(lambda m: m.pop("labels")), ManifestError, ["lacks", "labels"]),
    ("field-malformed", _manifest(lambda m: m["trainable"][0].update(shape="four")), ManifestError, ["malformed"]),
    ("max-length-negative", _manifest(lambda m: m.update(max_length=-5)), ManifestError,
     ["`max_length`", "[1, 1048576]", "-5", "re-export"]),
    ("max-length-zero", _manifest(lambda m: m.update(max_length=0)), ManifestError, ["`max_length`", "got 0"]),
    ("max-length-string", _manifest(lambda m: m.update(max_length="64")), ManifestError, ["`max_length`"]),
    ("unknown-task", _manifest(lambda m: m.update(task="regression")), ManifestError,
     ["`task`", '"classification", "causal-lm"', "regression"]),
    ("unknown-loss", _manifest(lambda m: m.update(loss="mse")), ManifestError, ["`loss`", "mse"]),
    ("loss-of-another-task", _manifest(lambda m: m.update(loss="causal_lm")), ManifestError,
     ["`loss`", '"cross_entropy"']),
    ("memory-card-not-numeric", _manifest(lambda m: m["memory"].update(frozen_bytes="lots")), ManifestError,
     ["`memory.frozen_bytes`", "finite number", "lots"]),
    ("memory-card-acts-short", _manifest(lambda m: m["memory"].update(activations_per_example=[1, 2])),
     ManifestError, ["`memory.activations_per_example`", "list of 3"]),
    ("labels-duplicate", _manifest(lambda m: m.update(labels=["neg", "neg"])), ManifestError,
     ["`labels`", "duplicates"]),
    ("labels-fewer-than-logits", _manifest(lambda m: m.update(labels=["neg"])), ManifestError,
     ["`labels`", "2 labels"]),
    ("backend-settings-bad", _manifest(lambda m: m["backends"]["ort-training"].update(settings={"x": -1})),
     ManifestError, ["`backends.ort-training.settings.x`"]),
    ("backend-member-unlisted", _manifest(
        lambda m: m["backends"]["ort-training"]["members"].update(checkpoint="ort/nothing")), ManifestError,
     ["'ort-training'", "ort/nothing"]),
    ("trainable-duplicate", _manifest(lambda m: m["trainable"].append(m["trainable"][0])), ManifestError,
     ["`trainable`", "duplicates"]),
    ("input-dtype-unknown", _manifest(lambda m: m["inputs"][0].update(dtype="complex128")), ManifestError,
     ["`inputs[0].dtype`", "complex128"]),
    ("unknown-method", _manifest(lambda m: m["methods"][0].update(method="ia3")), ManifestError, ["ia3"]),
    ("member-altered", _replace_member(names.TOKENIZER, lambda d: d.replace(b"[UNK]", b"[UNX]", 1)), BundleError,
     ["tokenizer.json", "sha256"]),
    ("checkpoint-flipped", _replace_member(names.ORT_CHECKPOINT, _flip), BundleError, ["ort/checkpoint", "sha256"]),
    ("member-missing", _drop_member(names.INFERENCE_MODEL), BundleError, ["missing: ['inference.onnx']"]),
    ("member-unlisted", _add_entry("extra.bin"), BundleError, ["unlisted: ['extra.bin']"]),
    ("dotdot-entry", _add_entry("../evil.txt"), BundleError, ["../evil.txt", "unsafe path"]),
    ("nested-dotdot-entry", _add_entry("ort/../../evil.txt"), BundleError, ["unsafe path"]),
    ("absolute-entry", _add_entry("/tmp/evil.txt"), BundleError, ["unsafe path"]),
    ("drive-entry", _add_entry("C:/evil.txt"), BundleError, ["unsafe path"]),
    ("symlink-entry", _add_entry(_symlink_entry("link"), b"/etc/passwd"), BundleError, ["symbolic link"]),
]


@pytest.mark.parametrize("build, error, parts", [c[1:] for c in BAD_BUNDLES], ids=[c[0] for c in BAD_BUNDLES])
def test_bad_bundles(bundle_int8, tmp_path, build, error, parts):
    bad = build(bundle_int8.path, tmp_path / "bad.edgepeft")
    cache = tmp_path / "cache"
    with pytest.raises(error) as exc:
        Session.open(bad, cache_dir=cache, store=tmp_path / "store")
    assert type(exc.value) is error
    msg = str(exc.value)
    assert all(p in msg for p in parts), msg
    # Nothing half-unpacked is left in the cache, and nothing escaped the cache folder.
    assert not cache.exists() or not [p for p in cache.rglob("*") if p.is_file()]
    assert not (tmp_path / "evil.txt").exists() and not Path("/tmp/evil.txt").exists()
    assert not (tmp_path / "store").exists()


@pytest.mark.parametrize("case", [c for c in BAD_BUNDLES if c[2] is ManifestError], ids=lambda c: c[0])
def test_read_manifest_reports_the_same_errors(bundle_int8, tmp_path, case):
    _, build, error, parts = case
    with pytest.raises(error) as exc:
        read_manifest(build(bundle_int8.path, tmp_path / "bad.edgepeft"))
    assert all(p in str(exc.value) for p in parts)


def test_unknown_manifest_keys_are_dropped_with_a_warning(bundle_int8, tmp_path):
    path = edit_manifest(bundle_int8.path, tmp_path / "newer.edgepeft", lambda m: m.update(future_key={"a": 1}))
    with pytest.warns(UserWarning, match="future_key"):
        m = read_manifest(path)
    assert m.trainable_names == bundle_int8.manifest.trainable_names


def test_a_tampered_cache_is_unpacked_again(bundle_int8, tmp_path):
    cache = tmp_path / "cache"
    first = open_bundle(bundle_int8.path, cache)
    tok = first.path(names.TOKENIZER)
    good = tok.read_bytes()
    tok.write_bytes(good.replace(b"[UNK]", b"[UNX]", 1))
    again = open_bundle(bundle_int8.path, cache)
    assert again.path(names.TOKENIZER).read_bytes() == good
    assert sha256_file(again.path(names.TOKENIZER)) == bundle_int8.manifest.members[names.TOKENIZER]


# -- adapters -----------------------------------------------------------------------------------------
def _fix_sha(folder: Path) -> None:
    meta = json.loads((folder / names.ADAPTER_META).read_text())
    meta["weights_sha256"] = sha256_file(folder / names.ADAPTER_WEIGHTS)
    if (folder / names.ADAPTER_OPTIM).exists():
        meta["optimizer_sha256"] = sha256_file(folder / names.ADAPTER_OPTIM)
    (folder / names.ADAPTER_META).write_text(json.dumps(meta))


def _edit_weights(edit, file=names.ADAPTER_WEIGHTS):
    def mutate(folder: Path, manifest) -> None:
        d = load_file(str(folder / file))
        edit(d, manifest)
        save_file(d, str(folder / file))
        _fix_sha(folder)  # consistent metadata: the content check itself must catch it
    return mutate


def _flip_file(file):
    def mutate(folder: Path, manifest) -> None:
        p = folder / file
        p.write_bytes(_flip(p.read_bytes(), at=len(p.read_bytes()) - 7))
    return mutate


def _truncate_without_meta(folder: Path, manifest) -> None:
    (folder / names.ADAPTER_META).unlink()
    p = folder / names.ADAPTER_WEIGHTS
    p.write_bytes(p.read_bytes()[:50])


def _first(manifest):
    return manifest.trainable[0]


BAD_ADAPTERS = [
    ("wrong-shape", _edit_weights(lambda d, m: d.update({_first(m).peft_key: np.zeros((5, 64), np.float32)})),
     ["shape (5, 64)", "(4, 64)"]),
    ("extra-key", _edit_weights(lambda d, m: d.update({"base_model.model.pooler.dense.weight": np.zeros((2, 2), np.float32)})),
     ["does not fit this bundle", "unknown tensors ['base_model.model.pooler.dense.weight']"]),
    ("missing-key", _edit_weights(lambda d, m: d.pop(_first(m).peft_key)),
     ["does not fit this bundle", "missing tensors", "lora_A"]),
    ("nan-values", _edit_weights(lambda d, m: d[_first(m).peft_key].__setitem__((0, 0), np.nan)), ["NaN"]),
    ("weights-flipped", _flip_file(names.ADAPTER_WEIGHTS), ["corrupted", "sha256"]),
    ("weights-truncated-no-meta", _truncate_without_meta, ["cannot be read"]),
    ("optimizer-flipped", _flip_file(names.ADAPTER_OPTIM), ["optimizer state is corrupted"]),
    ("optimizer-wrong-shape", _edit_weights(
        lambda d, m: d.update({k: np.zeros((3, 3), np.float32) for k in list(d)[:1]}), file=names.ADAPTER_OPTIM),
     ["optimizer state entry", "does not fit"]),
]


@pytest.fixture
def saved_alice(open_session, bundle_int8, tmp_path, train_examples):
    """A session with alice trained 2 steps and saved."""
    s = open_session(bundle_int8.path, store=tmp_path / "store", optimizer=OptimizerSpec(lr=1e-2))
    b = s.encoder.batch(train_examples)
    s.train_step(b)
    s.train_step(b)
    folder = s.save_adapter()
    return s, folder


@pytest.mark.parametrize("mutate, parts", [c[1:] for c in BAD_ADAPTERS], ids=[c[0] for c in BAD_ADAPTERS])
def test_bad_adapter_folders(saved_alice, open_session, bundle_int8, mutate, parts):
    s, alice = saved_alice
    alice_params = s.parameters()
    mallory = alice.with_name("mallory")
    shutil.copytree(alice, mallory)
    mutate(mallory, bundle_int8.manifest)

    with pytest.raises(AdapterError) as exc:
        s.swap_adapter("mallory")
    assert all(p in str(exc.value) for p in parts), str(exc.value)
    # The failed swap changed nothing.
    assert s.adapter == "alice" and s.steps == 2
    for n, v in s.parameters().items():
        np.testing.assert_array_equal(v, alice_params[n])

    with pytest.raises(AdapterError):
        open_session(bundle_int8.path, adapter="mallory", store=alice.parent)
    # The previously saved adapter is still there and loads as it was.
    again = open_session(bundle_int8.path, adapter="alice", store=alice.parent)
    assert again.steps == 2
    for n, v in again.parameters().items():
        np.testing.assert_array_equal(v, alice_params[n])


def test_adapter_folder_without_weights_is_refused_not_replaced(saved_alice, open_session, bundle_int8):
    s, alice = saved_alice
    mallory = alice.with_name("mallory")
    shutil.copytree(alice, mallory)
    (mallory / names.ADAPTER_WEIGHTS).unlink()
    assert s.store.exists("mallory") and "mallory" in s.adapters()
    with pytest.raises(AdapterError, match="incomplete"):
        s.swap_adapter("mallory")
    assert s.adapter == "alice"
    # Opening it does not silently start afresh (which a later save would write over it).
    with pytest.raises(AdapterError, match="incomplete"):
        open_session(bundle_int8.path, adapter="mallory", store=alice.parent)
    assert (mallory / names.ADAPTER_OPTIM).is_file()


# -- data ---------------------------------------------------------------------------------------------
GOOD_ROW = '{"text": "fine", "label": "pos"}\n'
BAD_JSONL = [
    ("missing-label", GOOD_ROW + '{"text": "no label"}\n', {}, [":2:", "'label'", "got keys ['text']"]),
    ("missing-text", '{"label": "pos"}\n', {}, [":1:", "'text'"]),
    ("invalid-json", GOOD_ROW + "\n" + '{"text": "x", "label": \n', {}, [":3:", "not valid JSON"]),
    ("not-an-object", '["fine", "pos"]\n', {}, [":1:", "got keys list"]),
    ("text-not-string", '{"text": 5, "label": "pos"}\n', {}, [":1:", "'text' must be a string"]),
    ("custom-field-missing", GOOD_ROW, {"text_field": "sentence"}, [":1:", "'sentence'"]),
    ("empty", "", {}, ["holds no examples"]),
    ("blank-lines-only", "\n  \n\n", {}, ["holds no examples"]),
]


@pytest.mark.parametrize("content, kwargs, parts", [c[1:] for c in BAD_JSONL], ids=[c[0] for c in BAD_JSONL])
def test_read_jsonl_errors(tmp_path, content, kwargs, parts):
    p = tmp_path / "data.jsonl"
    p.write_text(content)
    with pytest.raises(DataError) as exc:
        read_jsonl(p, **kwargs)
    msg = str(exc.value)
    assert str(p) in msg and all(x in msg for x in parts), msg


def test_read_jsonl_missing_file(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_jsonl(tmp_path / "nope.jsonl")


def test_read_jsonl_reads_good_rows(tmp_path):
    p = tmp_path / "data.jsonl"
    p.write_text(GOOD_ROW + "\n" + '{"text": "meh", "label": 0, "extra": true}\n')
    assert read_jsonl(p) == [Example("fine", "pos"), Example("meh", "0")]


@pytest.fixture
def session(open_session, bundle_int8):
    return open_session(bundle_int8.path)


BAD_CALLS = [
    pytest.param(lambda s: s.encoder.batch([Example("x", "pos"), Example("y", "maybe")]),
                 ["'maybe'", "['neg', 'pos']"], id="unknown-label-batch"),
    pytest.param(lambda s: next(s.encoder.batches([Example("x", "pos")] * 3 + [Example("y", "meh")], 2)),
                 ["'meh'"], id="unknown-label-batches"),
    pytest.param(lambda s: s.train_step([Example("y", "maybe")]), ["'maybe'"], id="unknown-label-train"),
    pytest.param(lambda s: s.evaluate([[Example("y", "maybe")]]), ["'maybe'"], id="unknown-label-eval"),
    pytest.param(lambda s: s.train_step([]), ["empty batch"], id="empty-train-batch"),
    pytest.param(lambda s: s.train_step(Batch(s.encoder.encode(["x"]))), ["need labels"], id="unlabelled-train-batch"),
    pytest.param(lambda s: s.evaluate([]), ["no batches"], id="no-eval-batches"),
    pytest.param(lambda s: s.train_step(Batch({"input_ids": s.encoder.encode(["x"])["input_ids"]}, np.array([0]))),
                 ["lacks model inputs", "attention_mask"], id="missing-model-input"),
    pytest.param(lambda s: s.infer([]), ["empty"], id="empty-infer"),
    pytest.param(lambda s: s.encoder.batch([]), ["empty"], id="empty-encoder-batch"),
]


@pytest.mark.parametrize("call, parts", BAD_CALLS)
def test_bad_data_calls(session, call, parts):
    refused_unchanged(session, call, parts)


# -- targets ------------------------------------------------------------------------------------------
BAD_TARGETS = [
    ("no-such-layer", LoraSpec(rank=4, targets=("qkv",)), ["['qkv']", "'query'", "'value'", "'dense'"]),
    ("substring-is-not-a-match", LoraSpec(rank=4, targets=("uery",)), ["['uery']", "'query'"]),
    ("pattern-matches-nothing", LoraSpec(rank=4, targets=(), target_pattern=r"^decoder\..*$"),
     ["'^decoder\\\\..*$'", "'query'"]),
    ("not-a-linear", LoraSpec(rank=4, targets=("LayerNorm",)), ["cannot wrap", "LayerNorm"]),
    ("modules-to-save-unknown", LoraSpec(rank=4, targets=("query",), modules_to_save=("head",)),
     ["modules_to_save", "['head']", "'classifier'"]),
]


@pytest.mark.parametrize("spec, parts", [c[1:] for c in BAD_TARGETS], ids=[c[0] for c in BAD_TARGETS])
def test_targets_matching_no_layer(tmp_path, spec, parts):
    out = tmp_path / "t.edgepeft"
    with pytest.raises(TargetError) as exc:
        export_tiny(out, "none", methods=[spec])
    assert all(p in str(exc.value) for p in parts), str(exc.value)
    assert not out.exists()


def test_dotted_suffix_target_is_a_match(tmp_path):
    r = export_tiny(tmp_path / "t.edgepeft", "none", methods=[LoraSpec(rank=2, targets=("layer.1.attention.self.query",))])
    assert [t.name for t in r.manifest.trainable] == ["encoder.layer.1.attention.self.query.lora_A",
                                                       "encoder.layer.1.attention.self.query.lora_B"]


# -- names, budgets -----------------------------------------------------------------------------------
BAD_NAMES = ["../x", "", "a/b", "a\\b", "..", ".hidden", "-x", "a b", "x" * 65, "é", None, 3]


@pytest.mark.parametrize("name", BAD_NAMES, ids=repr)
def test_bad_adapter_names(open_session, bundle_int8, tmp_path, name):
    with pytest.raises(AdapterError, match="not allowed"):
        check_adapter_name(name)
    with pytest.raises(AdapterError, match="not allowed"):
        open_session(bundle_int8.path, adapter=name, store=tmp_path / "store")
    s = open_session(bundle_int8.path, adapter="alice", store=tmp_path / "store")
    for create in (False, True):
        with pytest.raises(AdapterError, match="not allowed"):
            s.swap_adapter(name, create=create)
    assert s.adapter == "alice" and s.adapters() == ["alice"]
    if name:  # save_adapter("") is covered (as a known bug) below
        with pytest.raises(AdapterError, match="not allowed"):
            s.save_adapter(name)
    assert not (tmp_path / "store").exists() and not (tmp_path / "x").exists()


def test_save_adapter_refuses_the_empty_name(open_session, bundle_int8, tmp_path):
    s = open_session(bundle_int8.path, store=tmp_path / "store")
    with pytest.raises(AdapterError, match="not allowed"):
        s.save_adapter("")


def test_valid_adapter_names(open_session, bundle_int8, tmp_path):
    s = open_session(bundle_int8.path, adapter="a", store=tmp_path / "store")
    for name in ["user-42", "Alice_v2.1", "x" * 64, "0"]:
        assert check_adapter_name(name) == name
        s.swap_adapter(name, create=True)
        assert s.save_adapter().name == name
    assert s.store.names() == sorted(["user-42", "Alice_v2.1", "x" * 64, "0"])


@pytest.mark.parametrize("budget, error, parts", [
    ("1KB", MemoryBudgetError, ["over the memory budget of 1.0 KiB", "raise the budget"]),
    (1024, MemoryBudgetError, ["memory budget"]),
    ("abc", SpecError, ["'abc'", "512MB"]),
    ("0MB", SpecError, ["> 0"]),
    (0, SpecError, ["> 0"]),
    (-1, SpecError, ["> 0"]),
])
def test_memory_budget_errors(open_session, bundle_int8, budget, error, parts):
    with pytest.raises(error) as exc:
        open_session(bundle_int8.path, memory_budget=budget)
    assert all(p in str(exc.value) for p in parts), str(exc.value)


def test_a_generous_memory_budget_is_accepted(open_session, bundle_int8, train_examples):
    s = open_session(bundle_int8.path, memory_budget="4GB")
    s.train_step(train_examples)
    assert set(s.budget.peaks) >= {"open", "train_step"}


# -- non-finite steps ---------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning",
                            "ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("spec, good_steps, guard", [
    (OptimizerSpec(name="adamw", lr=1e30), 0, "default"),        # step 1: the update-size guard
    (OptimizerSpec(name="sgd", lr=1e30, momentum=0.9), 0, "default"),
    (OptimizerSpec(name="adamw", lr=1e30), 1, None),             # guard off: step 2's loss is NaN
    (OptimizerSpec(name="sgd", lr=1e30, momentum=0.9), 1, None),
    (OptimizerSpec(name="sgd", lr=1e300, momentum=0.9), 0, "default"),  # step 1: the update overflows float32
    (OptimizerSpec(name="adamw", lr=1e300), 0, "default"),
    (OptimizerSpec(name="adamw", lr=1e-2), 0, UpdateGuard(max_ratio=0.1, floor=0.01)),  # a tight policy trips
], ids=["adamw-1e30", "sgd-1e30", "adamw-1e30-unguarded", "sgd-1e30-unguarded", "sgd-1e300", "adamw-1e300",
        "adamw-tight-guard"])
def test_non_finite_step_raises_and_changes_nothing(open_session, bundle_int8, train_examples, spec, good_steps,
                                                    guard):
    kw = {} if guard == "default" else {"update_guard": guard}
    s = open_session(bundle_int8.path, optimizer=spec, **kw)
    b = s.encoder.batch(train_examples)
    for _ in range(good_steps):
        s.train_step(b)
    before = s.parameters()
    s.save_adapter("before")  # the active adapter (and its optimizer state) as of now
    with pytest.raises(NumericalError) as exc:
        s.train_step(b)
    assert isinstance(exc.value, EdgePeftError)
    assert "nothing was changed" in str(exc.value) and "'alice'" in str(exc.value)
    assert s.steps == good_steps
    for n, v in s.parameters().items():
        np.testing.assert_array_equal(v, before[n], err_msg=n)
    # The optimizer state was rolled back too: the saved adapter holds the last good step.
    folder = s.save_adapter()
    meta = json.loads((folder / names.ADAPTER_META).read_text())
    assert meta["steps"] == good_steps
    if good_steps:
        assert meta["optimizer_step"] == good_steps
        saved = load_file(str(folder / names.ADAPTER_OPTIM))
        before_opt = load_file(str(folder.with_name("before") / names.ADAPTER_OPTIM))
        assert set(saved) == set(before_opt) and saved
        for k, v in saved.items():
            np.testing.assert_array_equal(v, before_opt[k], err_msg=k)
    else:
        assert not (folder / names.ADAPTER_OPTIM).exists() and "optimizer_step" not in meta
    # And the failure repeats the same way instead of compounding.
    with pytest.raises(NumericalError):
        s.train_step(b)
    assert s.steps == good_steps


@pytest.mark.parametrize("spec", [OptimizerSpec(name="adamw", lr=1e-2), OptimizerSpec(name="sgd", lr=0.1, momentum=0.9)],
                         ids=["adamw-1e-2", "sgd-0.1-momentum"])
def test_the_default_update_guard_lets_normal_training_through(open_session, bundle_int8, train_examples, spec):
    """The highest learning rates the examples, demo and tests use: 30 steps, none refused."""
    s = open_session(bundle_int8.path, optimizer=spec)
    b = s.encoder.batch(train_examples)
    losses = [s.train_step(b) for _ in range(30)]  # would raise NumericalError if the guard tripped
    assert s.steps == 30 and all(np.isfinite(losses))


def test_update_guard_policy_is_validated():
    from edgepeft.errors import SpecError

    for bad in (dict(max_ratio=0), dict(floor=-1), dict(max_ratio=float("inf")), dict(max_ratio=True)):
        with pytest.raises(SpecError, match="UpdateGuard"):
            UpdateGuard(**bad)
    g = UpdateGuard()
    assert (g.max_ratio, g.floor) == (10.0, 0.1)
    z = np.zeros((4, 4), np.float32)
    assert g.violations({"b": z}, {"b": z + 0.99}) == []          # RMS 0.99 < 10 * max(0, 0.1)
    assert g.violations({"b": z}, {"b": z + 1.01}) != []
    w = np.full((4, 4), 2.0, np.float32)
    assert g.violations({"w": w}, {"w": w + 19.9}) == [] and g.violations({"w": w}, {"w": w + 20.1}) != []


def test_the_documented_schema_is_the_checked_one():
    """docs/bundle-format.md shows the schema the runtime checks (regenerate the table with
    `python -m edgepeft.manifest_schema`)."""
    from pathlib import Path

    from edgepeft.manifest_schema import describe

    doc = (Path(__file__).resolve().parent.parent / "docs" / "bundle-format.md").read_text()
    table = doc.split("<!-- schema: generated by `python -m edgepeft.manifest_schema` -->\n")[1].split(
        "\n<!-- /schema -->")[0]
    assert table == describe()


def test_engine_errors_translates_engine_exceptions():
    """The wrapper every runtime backend uses (runtime/backends/base.engine_errors): a load names
    the member(s), a run names the phase, the engine's exception is chained, ours pass through."""
    from edgepeft.errors import BackendError
    from edgepeft.runtime.backends.base import engine_errors

    with pytest.raises(BundleError, match="x: bundle member 'a/g.onnx' failed to load in loading") as exc:
        with engine_errors("x", "loading", members=["a/g.onnx", "a/ckpt"]):
            raise RuntimeError("Load model from /cache/a/g.onnx failed: bad graph")
    assert isinstance(exc.value.__cause__, RuntimeError)

    @engine_errors("x", "the train step")
    def step():
        raise ValueError("shape mismatch")
    with pytest.raises(BackendError, match="x: the train step failed .ValueError: shape mismatch"):
        step()
    with pytest.raises(DataError):
        with engine_errors("x", "inference"):
            raise DataError("ours, unchanged")
