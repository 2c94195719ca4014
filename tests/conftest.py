"""Shared fixtures: tiny-encoder bundles (int8 and fp32, exported once per test module), small
labelled data for the labels ("neg", "pos"), and sessions whose cache and adapter store live
under tmp paths (nothing touches ~/.cache)."""
from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Callable, Iterator

import pytest

from _figures import pytest_runtest_logreport, pytest_terminal_summary  # noqa: F401  (figures for CI's log)
from edgepeft.data import Example
from edgepeft.specs import LoraSpec

LABELS = ("neg", "pos")
# Most tests exercise one backend; the portable gradient graph takes ~15 s to build even for a
# tiny model, so only the tests about it (test_portable.py, the method table's portable
# column) ask for it.
ORT_ONLY = ("ort-training",)
LORA = LoraSpec(rank=4, alpha=8.0, targets=("query", "value"), modules_to_save=("classifier",))

TRAIN = [
    Example("a wonderful, lovely film", "pos"),
    Example("dreadful and boring", "neg"),
    Example("great acting, great story, would watch again", "pos"),
    Example("awful plot", "neg"),
    Example("i loved every minute of it!", "pos"),
    Example("a waste of two hours; the dialogue is painful", "neg"),
    Example("superb", "pos"),
    Example("bad", "neg"),
]
HELDOUT = [
    Example("lovely story and great music", "pos"),
    Example("boring, painful, awful", "neg"),
    Example("good fun", "pos"),
    Example("the worst film this year", "neg"),
]


@pytest.fixture(autouse=True)
def _no_home_cache(tmp_path_factory, monkeypatch):
    """Belt and braces: anything that falls back to the default bundle cache lands in a tmp
    folder, never in ~/.cache."""
    monkeypatch.setenv("EDGEPEFT_CACHE", str(tmp_path_factory.getbasetemp() / "default-cache"))


def export_tiny(out: Path, quant: str, methods=(LORA,)):
    from edgepeft.exporters import export_bundle, load_model

    return export_bundle(load_model("tiny-encoder", labels=LABELS), methods=list(methods), out=out, quant=quant,
                         backends=ORT_ONLY)


@pytest.fixture(scope="module")
def bundle_int8(tmp_path_factory):
    """ExportResult of the tiny encoder, LoRA r=4 on query/value + classifier, int8 base."""
    return export_tiny(tmp_path_factory.mktemp("bundle-int8") / "tiny-int8.edgepeft", "int8")


@pytest.fixture(scope="module")
def bundle_fp32(tmp_path_factory):
    """The same export with an fp32 base (quant="none")."""
    return export_tiny(tmp_path_factory.mktemp("bundle-fp32") / "tiny-fp32.edgepeft", "none")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    """One bundle cache per module (a bundle is unpacked once)."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def train_examples() -> list[Example]:
    return list(TRAIN)


@pytest.fixture
def heldout_examples() -> list[Example]:
    return list(HELDOUT)


@pytest.fixture
def open_session(tmp_path, cache_dir) -> Iterator[Callable]:
    """``open_session(bundle_path, adapter="alice", store=None, **kw)``: a Session with its
    store under this test's tmp_path (unless given) and the module's cache; closed at teardown."""
    from edgepeft.runtime import Session

    opened = []

    def _open(path, *, adapter: str = "alice", store: Path | None = None, **kw):
        kw.setdefault("cache_dir", cache_dir)
        # One ORT thread: ORT's spinning intra-op pool otherwise starves the eager torch
        # reference running in the same process (a 2-core run gets ~20x slower).
        kw.setdefault("threads", 1)
        s = Session.open(path, adapter=adapter, store=store or tmp_path / "store", **kw)
        opened.append(s)
        return s

    yield _open
    for s in opened:
        s.close()


def rewrite_zip(src: Path, dst: Path, transform: Callable[[str, bytes], list[tuple[str | zipfile.ZipInfo, bytes]]]) -> Path:
    """Copy zip ``src`` to ``dst`` passing each entry through ``transform(name, data)``, which
    returns the entries to write instead (empty list: drop it)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", compression=zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            for name, data in transform(info.filename, zin.read(info)):
                zout.writestr(name, data)
    return dst


def edit_manifest(src: Path, dst: Path, edit: Callable[[dict], None]) -> Path:
    """Copy bundle ``src`` to ``dst`` with ``edit`` applied to its manifest.json (in place)."""
    def transform(name: str, data: bytes):
        if name != "manifest.json":
            return [(name, data)]
        m = json.loads(data)
        edit(m)
        return [(name, json.dumps(m).encode())]
    return rewrite_zip(src, dst, transform)
