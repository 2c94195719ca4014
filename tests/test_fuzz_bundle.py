"""Fuzzing bundle opening (hypothesis): mutated bytes, truncations, crafted manifests, crafted
zip entries and crafted members with matching hashes. Every attempt ends in an EdgePeftError
with a message, or in a complete verified bundle whose initial adapter loads; never another
exception, a hang (pytest-timeout) or a half-unpacked cache.

Examples per test are fixed (derandomized, reproducible); EDGEPEFT_FUZZ_SCALE multiplies them
(e.g. 10 for a long run)."""
from __future__ import annotations

import io
import json
import os
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
from edgepeft import names
from edgepeft.adapters import AdapterStore
from edgepeft.bundle import open_bundle, write_bundle
from edgepeft.errors import EdgePeftError
from edgepeft.fsutil import sha256_bytes, sha256_file

pytestmark = pytest.mark.filterwarnings("ignore:Duplicate name:UserWarning")
SCALE = float(os.environ.get("EDGEPEFT_FUZZ_SCALE", "1"))
SHAPES = {"layer.q.lora_A": (2, 8), "layer.q.lora_B": (8, 2), "head.weight": (2, 8)}
TALLY: dict[str, dict[str, int]] = {}


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


def _entries(data: bytes) -> list[tuple[zipfile.ZipInfo, bytes]]:
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        return [(i, z.read(i)) for i in z.infolist()]


def _zip(entries: list[tuple[zipfile.ZipInfo | str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for info, data in entries:
            z.writestr(info, data)
    return buf.getvalue()


def attempt(data: bytes, test: str) -> str:
    """Open ``data`` as a bundle and load its initial adapter, as Session.open does; check the
    outcome and return it ("ok" or the error class)."""
    tally = TALLY.setdefault(test, {"tried": 0, "ok": 0, "refused": 0, "failures": 0})
    tally["tried"] += 1
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        path, cache = d / "b.edgepeft", d / "cache"
        path.write_bytes(data)
        try:
            try:
                b = open_bundle(path, cache)
                AdapterStore(b.root / "adapters", b.manifest).load("initial")
            except EdgePeftError as e:
                assert len(str(e)) > 20, repr(e)
                tally["refused"] += 1
                return type(e).__name__
            # Accepted: every member is there, whole, as the manifest says.
            for member, digest in b.manifest.members.items():
                assert sha256_file(b.root / member) == digest
            tally["ok"] += 1
            return "ok"
        except BaseException:
            tally["failures"] += 1
            raise
        finally:
            leftovers = [p.name for p in cache.iterdir() if p.name.startswith(".")] if cache.exists() else []
            assert leftovers == [], leftovers  # nothing half-unpacked left behind
            outside = sorted(p.name for p in d.iterdir())
            assert set(outside) <= {"b.edgepeft", "cache"}, outside  # nothing escaped the cache


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


@pytest.mark.timeout(300)
@fuzz_settings(400)
@given(st.lists(byte_edit, min_size=1, max_size=4))
def test_fuzz_bytes(edits):
    data = BASE
    for e in edits:
        data = _apply(data, e)
    attempt(data, "bytes")


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


BASE_MANIFEST = json.loads(dict((i.filename, d) for i, d in _entries(BASE))[names.MANIFEST])
MANIFEST_PATHS = list(_paths(BASE_MANIFEST))


@st.composite
def manifests(draw) -> bytes:
    kind = draw(st.sampled_from(["edit", "edit", "edit", "raw", "deep", "hash"]))
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
        paths = list(_paths(m))
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


@pytest.mark.timeout(300)
@fuzz_settings(300)
@given(manifests())
def test_fuzz_manifest(manifest_bytes):
    entries = [(i, manifest_bytes if i.filename == names.MANIFEST else d) for i, d in _entries(BASE)]
    attempt(_zip(entries), "manifest")


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


@pytest.mark.timeout(300)
@fuzz_settings(200)
@given(crafted_entries())
def test_fuzz_entries(data):
    attempt(data, "entries")


# -- 4. crafted members with matching hashes (what an attacker without the signing key can do) ---------
ADAPTER_FILES = [f"{names.INITIAL_ADAPTER_DIR}/{n}" for n in (names.ADAPTER_WEIGHTS, names.ADAPTER_META,
                                                                 names.ADAPTER_CONFIG)]


@st.composite
def crafted_members(draw) -> bytes:
    entries = _entries(BASE)
    contents = {i.filename: d for i, d in entries}
    member = draw(st.sampled_from(ADAPTER_FILES))
    old = contents[member]
    kind = draw(st.sampled_from(["bytes", "header", "json", "truncate"]))
    if kind == "truncate":
        new = old[:draw(st.integers(0, len(old)))]
    elif kind == "header" and member.endswith(".safetensors"):
        # A safetensors file with a fuzzed JSON header (dtypes, shapes, offsets).
        header = json.loads(old[8:8 + struct.unpack("<Q", old[:8])[0]])
        key = draw(st.sampled_from(sorted(header)))
        field = draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
        if isinstance(header[key], dict):
            header[key][field] = draw(json_values | st.sampled_from(["F64", "I8", "BOOL", "F16"])
                                      | st.lists(st.integers(-5, 2**40), max_size=3))
        blob = json.dumps(header).encode()
        body = old[8 + struct.unpack("<Q", old[:8])[0]:]
        new = struct.pack("<Q", len(blob) if draw(st.booleans()) else draw(st.integers(0, 2**64 - 1))) + blob + body
    elif kind == "json" and member.endswith(".json"):
        doc = json.loads(old)
        path = draw(st.sampled_from(list(_paths(doc))))
        new = json.dumps(_set(doc, path, draw(json_values))).encode()
    else:
        at = draw(st.integers(0, len(old) - 1))
        new = old[:at] + draw(st.binary(min_size=1, max_size=16)) + old[at + 1:]
    manifest = json.loads(contents[names.MANIFEST])
    manifest["members"][member] = sha256_bytes(new)
    contents[member], contents[names.MANIFEST] = new, json.dumps(manifest).encode()
    return _zip([(i, contents[i.filename]) for i, _ in entries])


@pytest.mark.timeout(300)
@fuzz_settings(200)
@given(crafted_members())
def test_fuzz_crafted_members(data):
    attempt(data, "crafted-members")


def test_fuzz_figures():
    """Runs last in this module: report what was tried (the figures the README quotes)."""
    done = {k: v for k, v in TALLY.items() if k != "base"}
    if len(done) < 4:
        pytest.skip("run the whole module to get the figures")
    total = {f: sum(v[f] for v in done.values()) for f in ("tried", "ok", "refused", "failures")}
    print(f"\nfuzz figures: {json.dumps(done)} total {json.dumps(total)}")
    assert total["failures"] == 0 and total["tried"] >= int(1100 * SCALE)
