"""Smoke runs of every example (tiny sizes, real models and data, offline): each runs end to
end through export, the Personalizer's rounds and the before/after report. The full runs and
their figures are in the README."""
from __future__ import annotations

import importlib
import json
import math

import pytest

SMOKES = [
    "topic",
    "sentiment",
    "multiuser",
    pytest.param("keyboard", marks=pytest.mark.slow),  # SmolLM2-135M: ~1 min to export and step
    pytest.param("vision", marks=pytest.mark.slow),    # EfficientNet-Lite0 at 224x224
    pytest.param("fleet", marks=pytest.mark.slow),     # MiniLM, 3 Flower simulations of 3 users: ~2 min
]


@pytest.mark.parametrize("name", SMOKES)
def test_example_smoke(name, tmp_path, capsys):
    mod = importlib.import_module(f"examples.{name}")
    res = mod.main(["--smoke", "--out", str(tmp_path / name), "--threads", "1"])
    printed = capsys.readouterr().out
    assert "before / after" in printed and "round 1" in printed
    assert json.loads((tmp_path / name / "result.json").read_text())["seconds"] > 0
    assert (tmp_path / name / "loop").is_dir()  # the sample buffers and metrics logs
    figures = [res["after"]] if "after" in res and "loss" in res["after"] else list(res["after"].values())
    assert figures and all(math.isfinite(f["loss"]) for f in figures)


def test_every_example_is_in_the_smoke_set():
    from pathlib import Path

    import examples

    # byom is no Personalizer loop: tests/test_user_models.py runs it.
    found = {p.stem for p in Path(examples.__file__).parent.glob("*.py") if not p.stem.startswith("_")} - {"byom"}
    listed = {s if isinstance(s, str) else s.values[0] for s in SMOKES}
    assert found == listed
