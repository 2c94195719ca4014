"""Fuzzing bundles (hypothesis): mutated bytes, truncations, crafted manifests, crafted zip
entries and crafted members with matching hashes (graphs, checkpoint, tokenizer, adapter). Each
attempt goes as far as the bundle lets it: open_bundle, the initial adapter, then on each ONNX
backend (ort-training, portable) Session.open, a train step and an infer. Every attempt ends in
an EdgePeftError with a message, or in a session that trained and inferred; never another
exception, a hang (pytest-timeout) or a half-unpacked cache.

Byte edits and zip entries fuzz a small synthetic bundle (it has no graphs: what they break is
refused before any session); manifests and crafted members fuzz a real tiny-encoder bundle with
both ONNX backends. Examples per test are fixed (derandomized, reproducible);
EDGEPEFT_FUZZ_SCALE multiplies them (e.g. 10 for a long run). The counts per outcome class go
to benchmarks/results/guarantees/fuzz.json and, through tests/_figures.py, to CI's log."""
from __future__ import annotations

import fcntl
import io
import json
import os
import warnings
import stat
import struct
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir

# Hypothesis caches into ./.hypothesis by default: keep the working tree clean.
set_hypothesis_home_dir(tempfile.mkdtemp(prefix="edgepeft-hypothesis-"))

import _reliability as rel
from _figures import ROOT, record
from conftest import LABELS
from edgepeft import names
from edgepeft.adapters import AdapterStore
from edgepeft.bundle import open_bundle, write_bundle
from edgepeft.data import Example
from edgepeft.errors import EdgePeftError
from edgepeft.fsutil import sha256_bytes, sha256_file

pytestmark = [pytest.mark.filterwarnings("ignore:Duplicate name:UserWarning"),
              pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.filterwarnings("ignore::RuntimeWarning")]
SCALE = float(os.environ.get("EDGEPEFT_FUZZ_SCALE", "1"))
SHAPES = {"layer.q.lora_A": (2, 8), "layer.q.lora_B": (8, 2), "head.weight": (2, 8)}
TALLY: dict[str, dict[str, int]] = {}
RESULTS = ROOT / "benchmarks" / "results" / "guarantees" / "fuzz.json"
ONNX_BACKENDS = (names.BACKEND_ORT, names.BACKEND_PORTABLE)
BATCH = [Example("a wonderful, lovely film", "pos"), Example("dreadful and boring", "neg")]


def fuzz_settings(n: int):
    return settings(max_examples=int(n * SCALE), deadline=None, database=None, derandomize=SCALE == 1,
                    suppress_health_check=list(HealthCheck), print_blob=True)


def _build_base() -> bytes:
    """A small but complete bundle: manifest, tokenizer, a graph, the initial adapter."""
    manifest = rel.synthetic_manifest(SHAPES)
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        (d / "tokenizer.json").write_text(json.dumps({"model": {"vocab": {"[UNK]": 0, "a": 1}}}))
        (d / "inference.onnx").write_bytes(bytes(range(256)) * 8)
        folder = AdapterStore(d / "adapters", manifest).save(
            "initial", {n: np.linspace(-1, 1, int(np.prod(s)), dtype=np.float32).reshape(s) for n, s in SHAPES.items()},
            meta={"steps": 0})
        files = {names.TOKENIZER: d / "tokenizer.json", names.INFERENCE_MODEL: d / "inference.onnx"}
        files.update({f"{names.INITIAL_ADAPTER_DIR}/{f.name}": f for f in folder.iterdir()})
        write_bundle(d / "base.edgepeft", manifest, files)
        return (d / "base.edgepeft").read_bytes()


BASE = _build_base()
_REAL: list = []  # [bundle bytes, its zip entries]


def real_base() -> bytes:
    """A real bundle, exported once per process: the tiny encoder, LoRA r2 on query/value +
    classifier, int8 base, both ONNX backends (ort-training and portable)."""
    if not _REAL:
        from edgepeft.exporters import export_bundle, load_model
        from edgepeft.specs import LoraSpec

        with tempfile.TemporaryDirectory() as d:
            out = Path(d) / "real.edgepeft"
            export_bundle(load_model("tiny-encoder", labels=LABELS), out=out, quant="int8", backends=ONNX_BACKENDS,
                          methods=[LoraSpec(rank=2, alpha=4.0, targets=("query", "value"),
                                            modules_to_save=("classifier",))])
            _REAL.append(out.read_bytes())
            _REAL.append(_entries(_REAL[0]))
    return _REAL[0]


def real_entries() -> list[tuple[zipfile.ZipInfo, bytes]]:
    """The real bundle's zip entries (read once)."""
    real_base()
    return _REAL[1]


def _entries(data: bytes) -> list[tuple[zipfile.ZipInfo, bytes]]:
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        return [(i, z.read(i)) for i in z.infolist()]


def _zip(entries: list[tuple[zipfile.ZipInfo | str, bytes]], *, stored: bool = False) -> bytes:
    """A zip of ``entries``; ``stored``: uncompressed (the real bundle's 1.5 MB would otherwise
    cost most of an attempt's time in deflate)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for info, data in entries:
            z.writestr(_stored(info) if stored else info, data)
    return buf.getvalue()


def _stored(info: zipfile.ZipInfo | str) -> zipfile.ZipInfo:
    out = zipfile.ZipInfo(info) if isinstance(info, str) else zipfile.ZipInfo(info.filename, info.date_time)
    if not isinstance(info, str):
        out.external_attr = info.external_attr
    out.compress_type = zipfile.ZIP_STORED
    return out


def attempt(data: bytes, test: str) -> str:
    """Open ``data`` as a bundle and load its initial adapter; if it opens, run a session on each
    ONNX backend it has (open, a train step, an infer). Checks the outcome and returns it: "ok"
    (every stage ran), or the error classes met, e.g. "BundleError" or
    "ort-training:BackendError|portable:ok"."""
    tally = TALLY.setdefault(test, {"tried": 0, "ok": 0, "refused": 0, "failures": 0, "outcomes": {}})
    tally["tried"] += 1
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        path, cache = d / "b.edgepeft", d / "cache"
        path.write_bytes(data)
        try:
            outcome = _stages(path, cache, d)
            tally["ok" if outcome == "ok" else "refused"] += 1
            tally["outcomes"][outcome] = tally["outcomes"].get(outcome, 0) + 1
            return outcome
        except BaseException:
            tally["failures"] += 1
            raise
        finally:
            leftovers = [p.name for p in cache.iterdir() if p.name.startswith(".")] if cache.exists() else []
            assert leftovers == [], leftovers  # nothing half-unpacked left behind
            outside = sorted(p.name for p in d.iterdir())
            assert set(outside) <= {"b.edgepeft", "cache", "store"}, outside  # nothing escaped the cache


def _refused(e: EdgePeftError) -> str:
    assert len(str(e)) > 20, repr(e)
    return type(e).__name__


def _stages(path: Path, cache: Path, d: Path) -> str:
    try:
        b = open_bundle(path, cache)
        AdapterStore(b.root / "adapters", b.manifest).load("initial")
    except EdgePeftError as e:
        return _refused(e)
    # Accepted: every member is there, whole, as the manifest says.
    for member, digest in b.manifest.members.items():
        assert sha256_file(b.root / member) == digest
    backends = [x for x in ONNX_BACKENDS if x in b.manifest.backends]
    if not backends:  # the synthetic bundle: no graphs to run
        return "ok"
    results = [_session(path, cache, d / "store", x) for x in backends]
    if all(r == "ok" for r in results):
        return "ok"
    return "|".join(f"{x}:{r}" for x, r in zip(backends, results))


def _session(path: Path, cache: Path, store: Path, backend: str) -> str:
    """Session.open on ``backend``, a train step and an infer: "ok" or the EdgePeftError's class."""
    from edgepeft.runtime import Session

    s = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            s = Session.open(path, backend=backend, cache_dir=cache, store=store, threads=1)
            s.train_step(BATCH)
            s.infer([BATCH[0].text])
        return "ok"
    except EdgePeftError as e:
        return _refused(e)
    finally:
        if s is not None:
            s.close()


def test_the_base_bundle_opens():
    assert attempt(BASE, "base") == "ok"


# -- 1. raw bytes ------------------------------------------------------------------------------------
byte_edit = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, len(BASE) - 1), st.integers(1, 255)),
    st.tuples(st.just("truncate"), st.integers(0, len(BASE) - 1), st.just(0)),
    st.tuples(st.just("insert"), st.integers(0, len(BASE)), st.binary(min_size=1, max_size=64)),
    st.tuples(st.just("delete"), st.integers(0, len(BASE) - 1), st.integers(1, 512)),
    st.tuples(st.just("overwrite"), st.integers(0, len(BASE) - 1), st.binary(min_size=1, max_size=32)),
)


def _apply(data: bytes, edit) -> bytes:
    kind, at, arg = edit
    at = min(at, len(data))
    if kind == "flip":
        return data[:at] + bytes([data[at] ^ arg]) + data[at + 1:] if at < len(data) else data
    if kind == "truncate":
        return data[:at]
    if kind == "insert":
        return data[:at] + arg + data[at:]
    if kind == "delete":
        return data[:at] + data[at + arg:]
    return data[:at] + arg + data[at + len(arg):]


@fuzz_settings(400)
@given(st.lists(byte_edit, min_size=1, max_size=4))
def _fuzz_bytes(edits):
    data = BASE
    for e in edits:
        data = _apply(data, e)
    attempt(data, "bytes")


@pytest.mark.timeout(300)
def test_fuzz_bytes(request):
    _fuzz_bytes()
    finish(request, "bytes", 400)


# -- 2. manifests ------------------------------------------------------------------------------------
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=10), kids, max_size=4),
    max_leaves=12)


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, prefix + (i,))


def _set(obj, path, value, delete=False):
    if not path:
        return value
    parent = obj
    for k in path[:-1]:
        parent = parent[k]
    if delete:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return obj


@st.composite
def manifests(draw) -> bytes:
    """A manifest.json for the real bundle: edited fields (values, deletions), raw bytes, deep
    nesting, or rewritten member hashes."""
    BASE_MANIFEST = json.loads(dict((i.filename, d) for i, d in real_entries())[names.MANIFEST])
    kind = draw(st.sampled_from(["edit", "edit", "edit", "edit", "raw", "deep", "hash"]))
    if kind == "raw":
        return draw(st.binary(max_size=256) | st.text(max_size=256).map(str.encode))
    if kind == "deep":  # nested far deeper than any manifest
        n = draw(st.integers(100, 100_000))
        return b"[" * n + b"]" * n if draw(st.booleans()) else b'{"a":' * n + b"1" + b"}" * n
    m = json.loads(json.dumps(BASE_MANIFEST))
    if kind == "hash":  # a member's hash, or the member list itself, rewritten
        member = draw(st.sampled_from(sorted(m["members"])))
        m["members"][member] = draw(st.text(max_size=70) | st.just("0" * 64) | st.just(sha256_bytes(b"x")))
        if draw(st.booleans()):
            m["members"][draw(st.sampled_from(["../x", "/etc/passwd", "a/../../b", "ok/file", "inference.onnx/x"]))] = "0" * 64
        return json.dumps(m).encode()
    for _ in range(draw(st.integers(1, 3))):
        # Leaves the runtime reads, more often than the long lists' (trainable, quantization).
        paths = [p for p in _paths(m) if not (len(p) > 2 and p[0] in ("quantization", "trainable")) or
                 draw(st.booleans())]
        path = draw(st.sampled_from(paths))
        if path and draw(st.booleans()) and isinstance(_get(m, path[:-1]), (dict, list)):
            m = _set(m, path, None, delete=True)
        else:
            m = _set(m, path, draw(json_values))
    return json.dumps(m).encode()


def _get(obj, path):
    for k in path:
        obj = obj[k]
    return obj


@fuzz_settings(300)
@given(manifests())
def _fuzz_manifest(manifest_bytes):
    entries = [(i, manifest_bytes if i.filename == names.MANIFEST else d) for i, d in real_entries()]
    attempt(_zip(entries, stored=True), "manifest")


@pytest.mark.timeout(600)
def test_fuzz_manifest(request):
    _fuzz_manifest()
    finish(request, "manifest", 300)


# -- 3. crafted zip entries --------------------------------------------------------------------------
NASTY_NAMES = ["../evil", "/abs/evil", "a/../../evil", "C:/evil", "C:\\evil", "..\\evil", "a\\..\\..\\evil",
               "./x", "a//b", "", "/", "x\x00y", "manifest.json", names.TOKENIZER, "adapters/initial",
               "tokenizer.json/inner", " " * 3, "é", "a" * 300]
MODES = [0, stat.S_IFREG | 0o644, stat.S_IFLNK | 0o777, stat.S_IFDIR | 0o755, stat.S_IFIFO | 0o644,
         stat.S_IFCHR | 0o644, stat.S_IFBLK | 0o644, stat.S_IFSOCK | 0o644]


@st.composite
def crafted_entries(draw) -> bytes:
    entries = [(i, d) for i, d in _entries(BASE)]
    for _ in range(draw(st.integers(1, 3))):
        name = draw(st.sampled_from(NASTY_NAMES) | st.text(max_size=30))
        info = zipfile.ZipInfo(name or "x")
        info.external_attr = draw(st.sampled_from(MODES)) << 16
        info.compress_type = zipfile.ZIP_DEFLATED
        entries.insert(draw(st.integers(0, len(entries))), (info, draw(st.binary(max_size=64))))
    data = _zip(entries)
    # Then rewrite fields of central-directory records: sizes, flags, compression, offsets.
    for _ in range(draw(st.integers(0, 3))):
        data = _patch_central(data, draw(st.integers(0, 50)), draw(st.sampled_from(list(CD_FIELDS))),
                              draw(st.integers(0, 2**32 - 1)))
    return data


# field -> (offset in the central directory record, struct format)
CD_FIELDS = {"flags": (8, "<H"), "method": (10, "<H"), "crc": (16, "<I"), "csize": (20, "<I"), "usize": (24, "<I"),
             "extra_len": (30, "<H"), "attr": (38, "<I"), "offset": (42, "<I")}


def _patch_central(data: bytes, which: int, field: str, value: int) -> bytes:
    starts = [i for i in range(len(data) - 4) if data[i:i + 4] == b"PK\x01\x02"]
    if not starts:
        return data
    at = starts[which % len(starts)]
    off, fmt = CD_FIELDS[field]
    value %= 2 ** (8 * struct.calcsize(fmt))
    return data[:at + off] + struct.pack(fmt, value) + data[at + off + struct.calcsize(fmt):]


@fuzz_settings(200)
@given(crafted_entries())
def _fuzz_entries(data):
    attempt(data, "entries")


@pytest.mark.timeout(300)
def test_fuzz_entries(request):
    _fuzz_entries()
    finish(request, "entries", 200)


# -- 4. crafted members with matching hashes (what an attacker without the signing key can do) ---------
CRAFTED = [names.ORT_TRAINING_MODEL, names.ORT_EVAL_MODEL, names.ORT_CHECKPOINT, names.PORTABLE_GRADIENT_MODEL,
           names.INFERENCE_MODEL, names.TOKENIZER] + [f"{names.INITIAL_ADAPTER_DIR}/{n}" for n in (
               names.ADAPTER_WEIGHTS, names.ADAPTER_META, names.ADAPTER_CONFIG)]


def _craft(draw, member: str, old: bytes, contents: dict[str, bytes]) -> bytes:
    kind = draw(st.sampled_from(["bytes", "bytes", "span", "truncate", "json", "header", "swap"]))
    at = draw(st.integers(0, 2**31)) % max(1, len(old))
    if kind == "truncate":
        return old[:at]
    if kind == "span":  # a run of zeros or 0xff: lengths, counts and offsets go to extremes
        fill = draw(st.sampled_from([b"\x00", b"\xff"])) * draw(st.integers(1, 64))
        return old[:at] + fill + old[at + len(fill):]
    if kind == "swap":  # another member's bytes under this name (a valid file of the wrong kind)
        return contents[draw(st.sampled_from(sorted(m for m in CRAFTED if m != member)))]
    if kind == "header" and member.endswith(".safetensors"):
        # A safetensors file with a fuzzed JSON header (dtypes, shapes, offsets).
        header = json.loads(old[8:8 + struct.unpack("<Q", old[:8])[0]])
        key = draw(st.sampled_from(sorted(header)))
        field = draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
        if isinstance(header[key], dict):
            header[key][field] = draw(json_values | st.sampled_from(["F64", "I8", "BOOL", "F16"])
                                      | st.lists(st.integers(-5, 2**40), max_size=3))
        blob = json.dumps(header).encode()
        body = old[8 + struct.unpack("<Q", old[:8])[0]:]
        return struct.pack("<Q", len(blob) if draw(st.booleans()) else draw(st.integers(0, 2**64 - 1))) + blob + body
    if kind == "json" and member.endswith(".json"):
        doc = json.loads(old)
        path = draw(st.sampled_from(list(_paths(doc))[:400]))
        return json.dumps(_set(doc, path, draw(json_values))).encode()
    return old[:at] + draw(st.binary(min_size=1, max_size=16)) + old[at + 1:]


@st.composite
def crafted_members(draw) -> bytes:
    """The real bundle with one or two members rewritten and their sha256 updated in the manifest."""
    entries = real_entries()
    contents = {i.filename: d for i, d in entries}
    manifest = json.loads(contents[names.MANIFEST])
    for member in draw(st.lists(st.sampled_from(CRAFTED), min_size=1, max_size=2, unique=True)):
        new = _craft(draw, member, contents[member], contents)
        manifest["members"][member] = sha256_bytes(new)
        contents[member] = new
    contents[names.MANIFEST] = json.dumps(manifest).encode()
    return _zip([(i, contents[i.filename]) for i, _ in entries], stored=True)


@fuzz_settings(200)
@given(crafted_members())
def _fuzz_crafted_members(data):
    attempt(data, "crafted-members")


@pytest.mark.timeout(600)
def test_fuzz_crafted_members(request):
    _fuzz_crafted_members()
    finish(request, "crafted-members", 200)


def finish(request, name: str, asked: int) -> None:
    """After a campaign: its counts (per outcome class) into benchmarks/results/guarantees/fuzz.json
    and, through tests/_figures.py, CI's log; it must have run (nearly) every example asked for."""
    tally = TALLY[name]
    _save({name: tally})
    record(request, f"fuzz-{name}", tally)
    assert tally["failures"] == 0, tally
    assert tally["tried"] >= int(0.9 * asked * SCALE), tally


def _save(done: dict) -> None:
    """Merge these campaigns' counts into the results file (a lock: xdist workers write it too)."""
    import sys

    sys.path.insert(0, str(ROOT))
    from benchmarks.common import machine

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with open(RESULTS, "a+") as f:  # the file itself is the lock
        fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        try:
            doc = json.loads(f.read())
        except ValueError:
            doc = {}
        doc.update(command="make test (tests/test_fuzz_bundle.py)", scale=SCALE, derandomized=SCALE == 1,
                   backends=list(ONNX_BACKENDS), machine=machine())
        doc.setdefault("campaigns", {}).update(done)
        c = doc["campaigns"].values()
        doc["total"] = {k: sum(v[k] for v in c) for k in ("tried", "ok", "refused", "failures")}
        f.seek(0)
        f.truncate()
        f.write(json.dumps(doc, indent=1, sort_keys=True) + "\n")
