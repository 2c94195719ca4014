"""Issue 17's command lines: data that is not UTF-8, hand-edited manifests, members replaced with
their hash updated, unusable paths and duplicate labels each end in one "Error: ..." line that
says what to do (exit 1, no traceback), never a raw exception."""
from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import edit_manifest, rewrite_zip
from edgepeft import names
from edgepeft.cli import main


@pytest.fixture(scope="module")
def env(tmp_path_factory, bundle_int8):
    d = tmp_path_factory.mktemp("cli-errors")
    runner = CliRunner(env={"EDGEPEFT_CACHE": str(d / "cache")})
    data = d / "ok.jsonl"
    data.write_text("".join(json.dumps({"text": t, "label": lab}) + "\n"
                            for t, lab in [("good film", "pos"), ("bad film", "neg")] * 2))
    (d / "afile").write_text("a file, not a folder\n")
    return runner, d, bundle_int8.path, data


def _replaced(member: str, new: bytes):
    """The bundle with ``member`` replaced by ``new`` and its sha256 updated (an unsigned bundle)."""
    def build(good: Path, out: Path) -> Path:
        def transform(name, data):
            if name == member:
                return [(name, new)]
            if name == names.MANIFEST:
                m = json.loads(data)
                m["members"][member] = hashlib.sha256(new).hexdigest()
                return [(name, json.dumps(m).encode())]
            return [(name, data)]
        return rewrite_zip(good, out, transform)
    return build


def _member(bundle: Path, name: str) -> bytes:
    with zipfile.ZipFile(bundle) as z:
        return z.read(name)


def _manifest(edit):
    return lambda good, out: edit_manifest(good, out, edit)


def _train(extra=()):
    return lambda b, data: ["train", str(b), "--data", str(data), "--adapter", "a", "--steps", "1", *extra]


CASES = [
    # (id, bundle builder or None, args(bundle, data), message parts)
    ("manifest-max-length-negative", _manifest(lambda m: m.update(max_length=-5)), _train(),
     ["`max_length`", "got -5", "re-export"]),
    ("manifest-max-length-zero", _manifest(lambda m: m.update(max_length=0)), _train(), ["`max_length`"]),
    ("manifest-unknown-task", _manifest(lambda m: m.update(task="regression")), _train(), ["`task`", "regression"]),
    ("manifest-unknown-loss", _manifest(lambda m: m.update(loss="mse")), _train(), ["`loss`", "mse"]),
    ("memory-card-not-numeric-budget", _manifest(lambda m: m["memory"].update(frozen_bytes="lots")),
     _train(["--budget", "1GB"]), ["`memory.frozen_bytes`", "lots"]),
    ("memory-card-not-numeric-profile", _manifest(lambda m: m["memory"].update(dequant_fp32_bytes=None)),
     lambda b, data: ["profile", str(b), "--device", "rpi4-2gb", "--predict-only", "--backend", "ort-training"],
     ["`memory.dequant_fp32_bytes`"]),
    ("ort-checkpoint-replaced", _replaced(names.ORT_CHECKPOINT, b"\x00" * 64), _train(),
     ["'ort/checkpoint'", "re-export"]),
    ("ort-training-graph-replaced", _replaced(names.ORT_TRAINING_MODEL, b"not an onnx graph"), _train(),
     ["'ort/training_model.onnx'", "re-export"]),
    ("ort-eval-graph-replaced", lambda good, out: _replaced(names.ORT_EVAL_MODEL, _member(
        good, names.ORT_EVAL_MODEL)[:5000])(good, out), _train(), ["'ort/eval_model.onnx'"]),
    ("tokenizer-replaced", _replaced(names.TOKENIZER, b'{"model": 5}'), _train(), ["tokenizer.json", "re-export"]),
    ("data-not-utf8", None, lambda b, data: ["train", str(b), "--data", str(data.with_name("bad.jsonl")),
                                             "--adapter", "a", "--steps", "1"], ["bad.jsonl:1", "not UTF-8", "0xff"]),
    ("cache-is-a-file", None, "cache", ["afile' is a file", "EDGEPEFT_CACHE"]),
    ("inspect-a-folder", None, lambda b, data: ["inspect", str(data.parent)], ["is a folder, not a bundle file"]),
    ("keygen-parent-is-a-file", None, lambda b, data: ["keygen", "--out", str(data.with_name("afile") / "k")],
     ["is a file, not a folder"]),
    ("export-parent-is-a-file", None,
     lambda b, data: ["export", "--model", "tiny-encoder", "--out", str(data.with_name("afile") / "x.edgepeft")],
     ["is a file, not a folder"]),
    ("export-missing-folder", None,
     lambda b, data: ["export", "--model", "tiny-encoder", "--out", str(data.parent / "nodir" / "x.edgepeft")],
     ["does not exist", "mkdir -p"]),
    ("export-duplicate-labels", None,
     lambda b, data: ["export", "--model", "tiny-encoder", "--labels", "a,b,a", "--out", str(data.parent / "d.edgepeft")],
     ["--labels has duplicates ['a']"]),
]


@pytest.mark.parametrize("build, args, parts", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_cli_refuses_with_one_line(env, tmp_path, build, args, parts):
    runner, d, bundle, data = env
    (d / "bad.jsonl").write_bytes(b"\xff\xfe\x00garbage\n")
    if build is not None:
        bundle = build(bundle, tmp_path / "edited.edgepeft")
    if args == "cache":
        r = CliRunner(env={"EDGEPEFT_CACHE": str(d / "afile")}).invoke(main, _train()(bundle, data))
    else:
        r = runner.invoke(main, args(bundle, data))
    assert r.exit_code == 1, r.output
    assert r.output.startswith("Error: ") and "Traceback" not in r.output, r.output
    assert all(p in r.output for p in parts), r.output
    # A ClickException ends in SystemExit(1); any other exception would be a bug escaping the CLI.
    assert isinstance(r.exception, SystemExit), repr(r.exception)
    assert not (d / "nodir").exists() and not (d / "d.edgepeft").exists()


def test_the_python_api_makes_missing_folders(tmp_path, bundle_int8):
    """write_bundle (export_bundle's last stage) makes missing parents, as documented; a parent
    that is a file is a PathError."""
    from edgepeft.bundle import read_manifest, write_bundle
    from edgepeft.errors import PathError

    m = read_manifest(bundle_int8.path)
    src = tmp_path / "tok.json"
    src.write_text("{}")
    out = write_bundle(tmp_path / "a" / "b" / "x.edgepeft", m, {names.TOKENIZER: src})
    assert (tmp_path / "a" / "b" / "x.edgepeft").is_file() and out.members
    (tmp_path / "f").write_text("x")
    with pytest.raises(PathError, match="is a file"):
        write_bundle(tmp_path / "f" / "x.edgepeft", m, {names.TOKENIZER: src})
