"""A backend is one record (edgepeft.backends.REGISTRY): every record has a loader, an export
builder and a place in the CLI's choices; the runtime, exporter, memory model and manifest read
it; a backend without a memory prediction is stated, never skipped; backend entries in the
manifest are typed records that still read the flat entries of older bundles."""
from __future__ import annotations

import ast
import dataclasses
import importlib.util
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import TRAIN, edit_manifest
from edgepeft import backends, memory_model, names
from edgepeft.backends import REGISTRY, BackendRecord, Capabilities, load
from edgepeft.errors import BackendError, ManifestError, MemoryBudgetError
from edgepeft.manifest import BackendEntry, Manifest

ROOT = Path(backends.__file__).resolve().parent.parent
PROTOCOL = ("forward_backward", "eval_step", "infer", "named_parameters", "load_parameters", "close")


# -- every record is complete ---------------------------------------------------------------------
@pytest.mark.parametrize("name", list(REGISTRY))
def test_loader_is_importable_where_its_dependencies_are(name):
    from edgepeft.runtime.backends import available

    r = REGISTRY[name]
    module = r.loader.partition(":")[0]
    assert importlib.util.find_spec(module) is not None, r.loader
    if not available(name):
        pytest.skip(f"{name} is not installed here")
    cls = load(r.loader)
    assert cls.name == name and all(callable(getattr(cls, verb, None)) for verb in PROTOCOL)


@pytest.mark.parametrize("name", list(REGISTRY))
def test_every_backend_has_an_export_builder(name):
    pytest.importorskip("torch")
    from edgepeft.exporters import targets

    builder = load(REGISTRY[name].export)
    assert callable(builder) and targets.BUILDERS[name] is builder
    assert list(targets.BUILDERS) == list(REGISTRY)
    assert targets.BEST_EFFORT == {n for n, r in REGISTRY.items() if r.best_effort}


def _backend_options(group, path=()):
    """(command path, option) for every --backend option of the CLI, subcommands included."""
    import click

    for cname, cmd in group.commands.items():
        if isinstance(cmd, click.Group):
            yield from _backend_options(cmd, path + (cname,))
        for p in cmd.params:
            if "--backend" in getattr(p, "opts", ()):
                yield " ".join(path + (cname,)), p


def test_every_backend_is_a_cli_choice():
    import click

    from edgepeft.cli import main

    found = dict(_backend_options(main))
    assert {"export", "train", "profile", "demo"} <= set(found)
    for cmd, opt in found.items():
        assert isinstance(opt.type, click.Choice), cmd
        assert [c for c in opt.type.choices if c != "auto"] == list(REGISTRY), cmd
        # "auto" where Session.open chooses (train, profile, the fleet's devices), never where a
        # graph is written.
        assert ("auto" in opt.type.choices) == (cmd in ("train", "profile", "fleet simulate")), cmd


def test_names_and_registry_agree():
    spelled = {getattr(names, a) for a in dir(names) if a.startswith("BACKEND_")}
    assert spelled == set(REGISTRY)
    assert names.EXPORT_BACKENDS == tuple(REGISTRY) == backends.EXPORT_BACKENDS
    assert names.DEFAULT_EXPORT_BACKENDS == (names.BACKEND_ORT, names.BACKEND_PORTABLE)
    # "auto"'s order.
    assert list(REGISTRY) == [names.BACKEND_ORT, names.BACKEND_PORTABLE, names.BACKEND_LEAN, names.BACKEND_EXECUTORCH,
                              names.BACKEND_EXECUTORCH_LEAN]


# The modules that used to spell backends' names and now read the registry.
READERS = ["edgepeft/memory_model.py", "edgepeft/manifest.py", "runtime/backends/__init__.py", "runtime/budget.py",
           "runtime/session.py", "exporters/targets.py", *sorted(str(p.relative_to(ROOT))
                                                                 for p in (ROOT / "edgepeft" / "cli").glob("*.py"))]


@pytest.mark.parametrize("rel", READERS)
def test_readers_spell_no_backend_name(rel):
    tree = ast.parse((ROOT / rel).read_text())
    spelled = [(n.lineno, n.value) for n in ast.walk(tree)
               if isinstance(n, ast.Constant) and isinstance(n.value, str) and n.value in REGISTRY]
    assert spelled == [], "use edgepeft.names / edgepeft.backends.REGISTRY"


def test_a_malformed_record_is_refused():
    caps = Capabilities("train", "any", "numpy")
    ok = dict(name="x", loader="m:C", requires=("m",), caps=caps, export="e:f", members=("graph",))
    BackendRecord(**ok)
    with pytest.raises(ValueError, match="import path"):
        BackendRecord(**{**ok, "loader": "m.C"})
    with pytest.raises(ValueError, match="both members and settings"):
        BackendRecord(**ok, settings={"graph": int})
    with pytest.raises(ValueError, match="predict"):
        BackendRecord(**ok, memory=object())
    with pytest.raises(ValueError, match="batch_setting"):
        Capabilities("train", "fixed", "numpy")
    with pytest.raises(BackendError, match="unknown backend 'nope'"):
        backends.record("nope")


# -- availability and "auto" ----------------------------------------------------------------------
def test_availability_reads_the_record(monkeypatch):
    from edgepeft.runtime.backends import available

    base = REGISTRY[names.BACKEND_PORTABLE]
    monkeypatch.setitem(REGISTRY, "missing", dataclasses.replace(base, name="missing",
                                                                 requires=("no_such_module_xyz",)))
    monkeypatch.setitem(REGISTRY, "checked", dataclasses.replace(base, name="checked", check="builtins:bool"))
    assert not available("missing") and not available("checked") and not available("nope")
    assert available(names.BACKEND_PORTABLE) == (importlib.util.find_spec("onnxruntime") is not None)


def _manifest_with(bundle, *backends_: str, memory=None) -> Manifest:
    """The tiny bundle's manifest claiming ``backends_`` (placeholder members)."""
    m = bundle.manifest
    entries = {b: BackendEntry({role: f"{b}/{role}" for role in REGISTRY[b].members},
                               {k: 1 for k in REGISTRY[b].settings}) for b in backends_}
    return dataclasses.replace(m, backends=entries, memory=m.memory if memory is None else memory)


def test_auto_keeps_the_registry_order_without_a_budget(bundle_int8, monkeypatch):
    import edgepeft.runtime.backends as rb

    monkeypatch.setattr(rb, "available", lambda name: True)
    m = _manifest_with(bundle_int8, names.BACKEND_EXECUTORCH, names.BACKEND_PORTABLE, names.BACKEND_ORT)
    assert rb.resolve("auto", m) == names.BACKEND_ORT
    monkeypatch.setattr(rb, "available", lambda name: name != names.BACKEND_ORT)
    assert rb.resolve("auto", m) == names.BACKEND_PORTABLE
    assert rb.resolve("auto", _manifest_with(bundle_int8, names.BACKEND_EXECUTORCH, names.BACKEND_LEAN)) == \
        names.BACKEND_LEAN
    monkeypatch.setattr(rb, "available", lambda name: False)
    with pytest.raises(BackendError, match="no runtime backend available here"):
        rb.resolve("auto", m)


def test_auto_under_a_budget_prefers_the_leanest_prediction(bundle_int8, monkeypatch):
    import edgepeft.runtime.backends as rb

    monkeypatch.setattr(rb, "available", lambda name: True)
    monkeypatch.setitem(REGISTRY, names.BACKEND_EXECUTORCH, dataclasses.replace(REGISTRY[names.BACKEND_EXECUTORCH],
                                                                                memory=None))  # the unpredicted one
    m = _manifest_with(bundle_int8, names.BACKEND_ORT, names.BACKEND_PORTABLE, names.BACKEND_EXECUTORCH)
    need = {b: memory_model.predict(m, backend=b, batch=4).session_peak()
            for b in (names.BACKEND_ORT, names.BACKEND_PORTABLE)}
    leanest = min(need, key=need.get)
    assert rb.resolve("auto", m, budget=max(need.values()) * 2, batch=4) == leanest
    # Only the other one fits: it wins whatever the order.
    other = ({names.BACKEND_ORT, names.BACKEND_PORTABLE} - {leanest}).pop()
    monkeypatch.setitem(REGISTRY, leanest, dataclasses.replace(REGISTRY[leanest], memory=dataclasses.replace(
        REGISTRY[leanest].memory, library=REGISTRY[leanest].memory.library + 10 * need[other])))
    assert rb.resolve("auto", m, budget=need[other], batch=4) == other
    # Nothing predicted fits: a backend without a prediction comes first (it may fit; it is measured).
    assert rb.resolve("auto", m, budget=1, batch=4) == names.BACKEND_EXECUTORCH
    # Without a memory card nothing is predicted: the registry's order.
    assert rb.resolve("auto", _manifest_with(bundle_int8, names.BACKEND_PORTABLE, names.BACKEND_ORT, memory={}),
                      budget=1) == names.BACKEND_ORT


# -- the memory model, per record --------------------------------------------------------------------
def test_the_memory_model_dispatches_per_record(bundle_int8, monkeypatch):
    assert memory_model.model(names.BACKEND_ORT) is memory_model.ORT_TRAINING_COSTS
    assert memory_model.model(names.BACKEND_PORTABLE) is memory_model.PORTABLE_COSTS
    assert memory_model.model(names.BACKEND_EXECUTORCH).costs is memory_model.EXECUTORCH_COSTS

    class Flat:
        """A backend's own predictor: 1 MiB a phase per example."""

        def predict(self, manifest, *, batch, seq, trainable_params):
            phases = dict.fromkeys(memory_model.PHASES, batch << 20)
            return memory_model.Prediction("whatever", batch, seq, phases, {"interpreter": 0})

    monkeypatch.setitem(REGISTRY, names.BACKEND_EXECUTORCH,
                        dataclasses.replace(REGISTRY[names.BACKEND_EXECUTORCH], memory=Flat()))
    p = memory_model.predict(bundle_int8.manifest, backend=names.BACKEND_EXECUTORCH, batch=3)
    assert p.backend == names.BACKEND_EXECUTORCH and p.peak == 3 << 20
    assert memory_model.no_prediction(names.BACKEND_EXECUTORCH) is None


def test_backends_without_a_prediction_are_named_not_keyerrors(bundle_int8, monkeypatch):
    b = names.BACKEND_EXECUTORCH
    monkeypatch.setitem(REGISTRY, b, dataclasses.replace(REGISTRY[b], memory=None))  # every backend has one now
    assert memory_model.no_prediction(b) == f"no prediction for backend {b!r}; measured only"
    with pytest.raises(memory_model.SpecError, match=f"no memory prediction for backend '{b}'"):
        memory_model.predict(bundle_int8.manifest, backend=b, batch=1)
    note = memory_model.check(bundle_int8.manifest, backend=b, batch=8, seq=None, budget=1, what="x")
    assert note == memory_model.no_prediction(b)
    # lean has a model, which needs the lean memory card this bundle (no lean graphs) lacks.
    with pytest.raises(memory_model.SpecError, match="no lean memory card"):
        memory_model.predict(bundle_int8.manifest, backend=names.BACKEND_LEAN, batch=1)
    with pytest.raises(BackendError, match="unknown backend"):
        memory_model.predict(bundle_int8.manifest, backend="nope", batch=1)


# -- the precheck states "no prediction" -------------------------------------------------------------
@pytest.fixture
def unpredicted_ort(monkeypatch):
    """ort-training as a backend the memory model has no prediction for."""
    monkeypatch.setitem(REGISTRY, names.BACKEND_ORT, dataclasses.replace(REGISTRY[names.BACKEND_ORT], memory=None))
    return f"no prediction for backend {names.BACKEND_ORT!r}; measured only"


def test_a_budget_on_an_unpredicted_backend_is_measured_only(open_session, bundle_int8, unpredicted_ort):
    with pytest.warns(UserWarning, match=unpredicted_ort):
        s = open_session(bundle_int8.path, adapter="m", memory_budget="2GB", batch_size=8)
    assert s.backend.name == names.BACKEND_ORT and s.budget.notes == [unpredicted_ort]
    s.train_step(TRAIN)  # the batch precheck states it too (once)
    assert s.budget.notes == [unpredicted_ort] and "train_step" in s.budget.peaks
    # The measured watchdog still applies.
    s.budget.limit = 1
    with pytest.raises(MemoryBudgetError, match="adapter 'm' was saved"):
        s.train_step(TRAIN)


def test_micro_batches_on_an_unpredicted_backend_run_whole(open_session, bundle_int8, unpredicted_ort):
    with pytest.warns(UserWarning, match=unpredicted_ort):
        s = open_session(bundle_int8.path, memory_budget="2GB", micro_batch=True)
        assert np.isfinite(s.train_step(TRAIN))
    assert s.budget.notes == [unpredicted_ort]


def test_no_budget_no_note(open_session, bundle_int8, unpredicted_ort, recwarn):
    s = open_session(bundle_int8.path)
    s.train_step(TRAIN)
    assert s.budget.notes == [] and not [w for w in recwarn if "no prediction" in str(w.message)]


def test_profile_predict_only_on_an_unpredicted_backend_says_so(bundle_int8, tmp_path, monkeypatch):
    from edgepeft.cli import main

    runner = CliRunner(env={"EDGEPEFT_CACHE": str(tmp_path / "cache")})
    backend = names.BACKEND_EXECUTORCH
    monkeypatch.setitem(REGISTRY, backend, dataclasses.replace(REGISTRY[backend], memory=None))  # the unpredicted one
    r = runner.invoke(main, ["profile", str(bundle_int8.path), "--device", "host", "--predict-only",
                             "--backend", backend])
    assert r.exit_code == 1 and isinstance(r.exception, SystemExit), r.output
    assert f"no prediction for backend '{backend}'" in r.output and "--backend ort-training" in r.output
    r = runner.invoke(main, ["profile", str(bundle_int8.path), "--device", "host", "--predict-only",
                             "--backend", names.BACKEND_LEAN])
    assert r.exit_code == 1 and "no lean memory card" in r.output and "re-export" in r.output, r.output
    monkeypatch.setitem(REGISTRY, names.BACKEND_ORT, dataclasses.replace(REGISTRY[names.BACKEND_ORT], memory=None))
    r = runner.invoke(main, ["profile", str(bundle_int8.path), "--device", "host", "--predict-only"])
    assert r.exit_code == 1 and "no prediction for backend 'ort-training'" in r.output, r.output


# -- typed manifest entries ---------------------------------------------------------------------------
ET_FLAT = {"training_program": names.EXECUTORCH_TRAINING_PROGRAM,
           "inference_program": names.EXECUTORCH_INFERENCE_PROGRAM, names.EXECUTORCH_BATCH_SIZE: "8"}


def test_new_shape_round_trips(bundle_int8):
    m = bundle_int8.manifest
    entry = m.backends[names.BACKEND_ORT]
    assert isinstance(entry, BackendEntry) and entry.settings == {}
    assert set(entry.members) == set(REGISTRY[names.BACKEND_ORT].members)
    d = json.loads(m.to_json())
    assert d["backends"][names.BACKEND_ORT] == {"members": entry.members, "settings": {}}
    assert Manifest.from_json(m.to_json()) == m


def test_old_shape_entries_read_as_typed_records(bundle_int8):
    d = json.loads(bundle_int8.manifest.to_json())
    d["backends"] = {"onnx-inference": {"inference_model": names.INFERENCE_MODEL},
                     names.BACKEND_ORT: d["backends"][names.BACKEND_ORT]["members"],
                     names.BACKEND_EXECUTORCH: dict(ET_FLAT), "from-the-future": {"graph": "future/g.bin"}}
    m = Manifest.from_dict(d)
    et = m.backends[names.BACKEND_EXECUTORCH]
    assert et.settings == {names.EXECUTORCH_BATCH_SIZE: 8}
    assert et.members == {k: v for k, v in ET_FLAT.items() if k != names.EXECUTORCH_BATCH_SIZE}
    assert m.backends[names.BACKEND_ORT] == bundle_int8.manifest.backends[names.BACKEND_ORT]
    assert m.backends["from-the-future"].members == {"graph": "future/g.bin"}
    # Written back in the typed form, which reads back the same.
    typed = json.loads(m.to_json())["backends"]
    assert typed[names.BACKEND_EXECUTORCH]["settings"] == {names.EXECUTORCH_BATCH_SIZE: 8}
    assert Manifest.from_json(m.to_json()) == m


@pytest.mark.parametrize("entry, match", [
    ({"training_program": "a.pte", names.EXECUTORCH_BATCH_SIZE: "8"}, "lacks \\['inference_program'\\]"),
    ({**ET_FLAT, names.EXECUTORCH_BATCH_SIZE: "eight"}, "malformed"),
    ({"members": {"training_program": "a", "inference_program": "b"}, "settings": {}}, "lacks \\['batch_size'\\]"),
    ({"members": dict(ET_FLAT), "settings": {names.EXECUTORCH_BATCH_SIZE: True}}, "strings or integers"),
    (["training_program"], "JSON object"),
])
def test_malformed_entries_are_manifest_errors(bundle_int8, entry, match):
    d = json.loads(bundle_int8.manifest.to_json())
    d["backends"][names.BACKEND_EXECUTORCH] = entry
    with pytest.raises(ManifestError, match=match):
        Manifest.from_dict(d)


def test_a_bundle_with_old_shape_entries_still_opens_and_trains(bundle_int8, open_session, tmp_path):
    def flatten(m: dict) -> None:
        m["backends"] = {k: {**v["members"], **{s: str(x) for s, x in v["settings"].items()}}
                         for k, v in m["backends"].items()}

    old = edit_manifest(bundle_int8.path, tmp_path / "old.edgepeft", flatten)
    from edgepeft.bundle import read_manifest

    raw = json.loads(zipfile.ZipFile(old).read(names.MANIFEST))
    assert all("members" not in v for v in raw["backends"].values())  # really the old shape
    assert read_manifest(old).backends == bundle_int8.manifest.backends
    s = open_session(old)
    assert np.isfinite(s.train_step(TRAIN))
