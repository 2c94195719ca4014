"""Smoke run of the benchmark harness (benchmarks/): every comparison in its tiny mode (the tiny
encoder / CNN, a few steps, one process per configuration), checking the JSON it writes: machine
details, and finite, positive figures. The real runs and their figures: `make bench`,
benchmarks/results/."""
from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("matplotlib")


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("EDGEPEFT_BENCH_WORK", str(tmp_path_factory.mktemp("bench-work")))  # bundles, stores, caches
    yield tmp_path_factory.mktemp("bench-results")
    mp.undo()


def _load(out, name):
    doc = json.loads((out / f"{name}.json").read_text())
    m = doc["machine"]
    assert m["cpu_count"] >= 1 and m["python"] and "numpy" in m["packages"] and len(m["loadavg"]) == 3
    assert doc["command"].startswith(f"python -m benchmarks {name}") and len(doc["loadavg_end"]) == 3
    assert (out / f"{name}.md").read_text().count("|") > 10
    assert (out / f"{name}.png").stat().st_size > 1000
    return doc


def _pos(*xs):
    for x in xs:
        assert isinstance(x, (int, float)) and math.isfinite(x) and x > 0, xs


def test_export_time(out):
    from benchmarks import export_time

    export_time.main(["--tiny", "--backends", "ort-training", "--out", str(out)])
    rows = _load(out, "export_time")["rows"]
    assert set(rows) == {"ort-training (int8)", "ort-training (none)"}
    for r in rows.values():
        assert r["ran"], r
        _pos(r["export_s"], r["peak_rss_mib"], r["bundle_mb"])


def test_train_step(out):
    from benchmarks import train_step

    train_step.main(["--tiny", "--reps", "1", "--steps", "3", "--only", "ort-training (int8", "HF PEFT",
                     "--out", str(out)])
    doc = _load(out, "train_step")
    rows = doc["rows"]
    ours, ref = rows["edgepeft ort-training (int8 base)"], rows[train_step.REFERENCE]
    for r in (ours, ref):
        _pos(r["median_step_s"], r["peak_rss_mib"], r["seq"])
    assert ref["rss_vs_peft"] == 1.0 and not ours["torch_loaded"] and ref["torch_loaded"]
    _pos(ours["rss_vs_peft"], ours["time_vs_peft"])
    assert set(ours["targets"]) == {"rss_le_0.35x", "time_le_1.0x"}


def test_swap(out):
    from benchmarks import swap

    swap.main(["--tiny", "--backends", "ort-training", "--swaps", "20", "--reopens", "2", "--loads", "2",
               "--out", str(out)])
    doc = _load(out, "swap")
    for r in doc["rows"].values():
        assert r["ran"], r
        _pos(r["p50_ms"], r["p99_ms"], r["n"])
        assert r["p99_ms"] >= r["p50_ms"]
    t = doc["targets"]["ort-training"]
    _pos(t["reopen_over_swap"])


def test_sizes(out):
    from benchmarks import sizes

    sizes.main(["--tiny", "--methods", "lora", "--no-image", "--out", str(out)])
    doc = _load(out, "sizes")
    assert [(r["method"], r["base"]) for r in doc["rows"]] == [("lora", "int8"), ("lora", "fp32")]
    for r in doc["rows"]:
        _pos(r["bundle_bytes"], r["frozen_bytes"], r["adapter_file_bytes"], r["trainable_params"])
    ratio = doc["ratios"]["tiny-encoder"]["frozen_int8_over_fp32"]
    assert 0 < ratio < 1


def test_table2(out):
    from benchmarks import table2

    table2.main(["--tiny", "--only", "bbc", "--methods", "full", "lora", "--out", str(out)])
    doc = _load(out, "table2")
    summ = doc["tasks"]["bbc"]["summary"]
    assert set(summ) == {"full", "lora"}
    for r in summ.values():
        assert r["supported"] and 0 <= r["test_acc"] <= 1
        _pos(r["pct_params_method"], r["relative_pct"] if r["test_acc"] > 0 else 1.0)
    assert summ["full"]["pct_params_method"] == 100 and summ["lora"]["pct_params_method"] < 100
