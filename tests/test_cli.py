"""The CLI end to end on the tiny model: export, inspect, train, adapters list, and user errors
shown as one line without a traceback; every command listed (also by `python -m edgepeft.cli`)
and `-o` wherever there is `--out`."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import click
import pytest
from click.testing import CliRunner

from edgepeft.cli import main

TEXTS = [("a wonderful, lovely film", "pos"), ("dreadful and boring", "neg"),
         ("great acting, great story", "pos"), ("awful plot, bad acting", "neg")]


@pytest.fixture(scope="module")
def cli_env(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    env = {"EDGEPEFT_CACHE": str(d / "cache")}
    runner = CliRunner(env=env)
    bundle = d / "tiny.edgepeft"
    r = runner.invoke(main, ["export", "--model", "tiny-encoder", "--out", str(bundle), "--rank", "4",
                             "--backend", "ort-training"])
    assert r.exit_code == 0, r.output
    data = d / "train.jsonl"
    data.write_text("\n".join(json.dumps({"text": t, "label": lab}) for t, lab in TEXTS * 4) + "\n")
    return runner, d, bundle, data


def test_export_reports_trainable_share(cli_env):
    runner, d, bundle, _ = cli_env
    assert bundle.is_file()
    r = runner.invoke(main, ["export", "--model", "tiny-encoder", "--out", str(d / "x.edgepeft"), "--rank", "2",
                             "--quant", "none", "--modules-to-save", "", "--backend", "ort-training"])
    assert r.exit_code == 0, r.output
    assert "trainable of" in r.output and "base none" in r.output


def test_inspect_text_and_json(cli_env):
    runner, _, bundle, _ = cli_env
    r = runner.invoke(main, ["inspect", str(bundle)])
    assert r.exit_code == 0, r.output
    assert "tiny-encoder" in r.output and "lora" in r.output and "int8" in r.output
    r = runner.invoke(main, ["inspect", str(bundle), "--json"])
    m = json.loads(r.output)
    assert m["schema_version"] == 1 and m["labels"] == ["neg", "pos"]
    assert {t["method"] for t in m["trainable"]} == {"lora", "modules_to_save"}
    assert all(len(v) == 64 for v in m["members"].values())


def test_train_then_list(cli_env):
    runner, d, bundle, data = cli_env
    store = d / "store"
    r = runner.invoke(main, ["train", str(bundle), "--data", str(data), "--adapter", "alice", "--steps", "6",
                             "--batch-size", "4", "--lr", "1e-2", "--eval-data", str(data), "--store", str(store)])
    assert r.exit_code == 0, r.output
    assert "saved to" in r.output and "before:" in r.output and "after:" in r.output
    assert (store / "alice" / "adapter_model.safetensors").is_file()
    r = runner.invoke(main, ["adapters", "list", str(bundle), "--store", str(store), "--json"])
    rows = json.loads(r.output)
    assert [(x["name"], x["steps"], x["fits_bundle"]) for x in rows] == [("alice", 6, True)]
    # Training continues from the saved adapter: the step count adds up.
    r = runner.invoke(main, ["train", str(bundle), "--data", str(data), "--adapter", "alice", "--steps", "2",
                             "--store", str(store)])
    assert r.exit_code == 0, r.output
    assert "(8 steps in all, ort-training)" in r.output


@pytest.mark.parametrize("args_fn, needle", [
    (lambda d, b, data: ["inspect", str(d / "missing.edgepeft")], "does not exist"),
    (lambda d, b, data: ["train", str(b), "--data", str(d / "bad.jsonl"), "--adapter", "a"], "bad.jsonl:1"),
    (lambda d, b, data: ["train", str(b), "--data", str(d / "unknown.jsonl"), "--adapter", "a"], "not in the bundle's label set"),
    (lambda d, b, data: ["train", str(b), "--data", str(data), "--adapter", "../evil"], "not allowed"),
    (lambda d, b, data: ["train", str(b), "--data", str(data), "--adapter", "a", "--budget", "1KB"], "memory budget"),
    (lambda d, b, data: ["train", str(b), "--data", str(data), "--adapter", "a", "--backend", "portable"],
     "no portable gradient graph"),
    (lambda d, b, data: ["export", "--model", "tiny-encoder", "--out", str(d / "y.edgepeft"), "--targets", "qkv"],
     "query"),
    (lambda d, b, data: ["export", "--model", "nosuchmodel", "--out", str(d / "y.edgepeft")], "tiny-encoder"),
])
def test_user_errors_are_one_line(cli_env, args_fn, needle):
    runner, d, bundle, data = cli_env
    (d / "bad.jsonl").write_text('{"text": "no label here"}\n')
    (d / "unknown.jsonl").write_text('{"text": "x", "label": "maybe"}\n')
    r = runner.invoke(main, args_fn(d, bundle, data))
    assert r.exit_code == 1, r.output
    assert r.output.startswith("Error: ") and needle in r.output
    assert "Traceback" not in r.output
    # A ClickException ends in SystemExit(1); any other exception would be a bug escaping the CLI.
    assert isinstance(r.exception, SystemExit), repr(r.exception)


def test_user_model_factory(cli_env, tmp_path, monkeypatch):
    runner, *_ = cli_env
    (tmp_path / "mymodels.py").write_text(textwrap.dedent("""
        from edgepeft.exporters.zoo import tiny_encoder

        def sentiment(labels=("bad", "ok", "good")):
            src = tiny_encoder(labels=labels, seed=3)
            src.name = "my-sentiment"
            return src
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "mine.edgepeft"
    r = runner.invoke(main, ["export", "--model", "mymodels:sentiment", "--out", str(out), "--backend", "ort-training"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(main, ["inspect", str(out), "--json"])
    m = json.loads(r.output)
    assert m["model_name"] == "my-sentiment" and m["labels"] == ["bad", "ok", "good"]


def test_export_with_method_specs(cli_env):
    runner, d, *_ = cli_env
    out = d / "hybrid.edgepeft"
    r = runner.invoke(main, ["export", "--model", "tiny-encoder", "--out", str(out),
                             "--method", "prompt:n_tokens=3", "--method", "lora:rank=2,targets=query|value",
                             "--method", "selective:modules=classifier", "--backend", "ort-training"])
    assert r.exit_code == 0, r.output
    m = json.loads(runner.invoke(main, ["inspect", str(out), "--json"]).output)
    assert [x["method"] for x in m["methods"]] == ["prompt", "lora", "selective"]
    assert m["methods"][1]["rank"] == 2 and m["methods"][1]["targets"] == ["query", "value"]
    r = runner.invoke(main, ["export", "--model", "tiny-encoder", "--out", str(out), "--method", "lora:bogus=1"])
    assert r.exit_code == 1 and "bogus" in r.output


COMMANDS = {"adapters", "demo", "devices", "export", "fleet", "inspect", "keygen", "profile", "train"}


def _listed(help_text: str) -> set[str]:
    lines = help_text.split("Commands:", 1)[1].splitlines()
    return {line.split()[0] for line in lines if line.strip()}


def test_help_lists_every_command():
    r = CliRunner().invoke(main, ["--help"])
    assert r.exit_code == 0, r.output
    assert _listed(r.output) == COMMANDS


def test_python_m_edgepeft_cli_lists_every_command():
    # `python -m edgepeft.cli` once missed `profile` and `devices` (registered after a __main__ guard).
    r = subprocess.run([sys.executable, "-m", "edgepeft.cli", "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert _listed(r.stdout) == COMMANDS


def _commands(group: click.Group, prefix: str = ""):
    for name, cmd in group.commands.items():
        yield f"{prefix}{name}", cmd
        if isinstance(cmd, click.Group):
            yield from _commands(cmd, f"{prefix}{name} ")


def test_every_out_option_has_short_form():
    with_out = {name: p.opts for name, cmd in _commands(main) for p in cmd.params if "--out" in p.opts}
    assert set(with_out) >= {"export", "keygen", "demo"}
    assert {name: opts for name, opts in with_out.items() if "-o" not in opts} == {}


def test_short_out_writes_there(tmp_path):
    r = CliRunner().invoke(main, ["keygen", "-o", str(tmp_path / "k")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "k").is_file() and (tmp_path / "k.pub").is_file()


def test_bbc_topics_match_the_minilm_head():
    # The topic names are spelled by the data helper (torch-free) and by the zoo's MiniLM head.
    from edgepeft.cli import datasets
    from edgepeft.exporters.zoo import BBC_TOPICS

    assert tuple(datasets._BBC_DIRS) == BBC_TOPICS
