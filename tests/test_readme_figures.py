"""The README's figures come from committed results files written by a command.

The convention (one line, directly above a table that holds figures):

    <!-- results: benchmarks/results/swap.json benchmarks/results/swap.md -->

names one or more repo-relative results files. This test checks, for every markdown table in
README.md:
- a table holding figures has such a marker, every file it names exists, and the prose between
  the previous table or heading and the table names the command that writes them (a backticked
  `make ...`, `python -m ...` or `edgepeft ...`; two tables in a row share the prose above them);
- every number in the table (header and cells; code spans, tolerances such as 1e-5, versions
  and names such as int8 or r8 aside) appears in one of the named files with the same rounding:
  a JSON file's numbers (values, and numbers inside its strings), a text file's numbers; sign
  and thousands separators are ignored, ratios (0.09x) and percentages (0.34 %) must be in the
  file as such (the harness computes them, not the reader);
- a JSON results file records its command and its machine, package versions and load average
  (``edgepeft.provenance.machine()``), except the files listed in LEGACY, written before that was
  recorded;
- the guarantee figures that `make test` writes (benchmarks/results/guarantees/tests.json) record
  no failed or skipped test, and the tolerances and counts the README quotes are the tests'.
The matching is per table, not per cell: a figure passes if any of the table's files holds it.
"""
from __future__ import annotations

import ast
import json
import re
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
MARKER = re.compile(r"^<!--\s*results:\s*(?P<paths>[^>]*?)\s*-->\s*$")
COMMAND = re.compile(r"`(?:make \w|\.venv/bin/python -m |python -m |edgepeft )[^`]*`")
# A number as a figure: not glued to a name on its left (int8, r8, Q4_K, top-1), not followed by
# a letter (270M, 262k, 1e-5, 2x2) except a ratio's x; a version (1.19.2) is not a figure.
NUMBER = re.compile(r"(?<![\w.])(?<![A-Za-z]-)(?P<n>\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?)(?=x\b|(?![\w.]|\.\d))")
SEPARATOR = re.compile(r"^\|[-:| ]+\|$")
NUMBER_LOOSE = re.compile(r"\d+(?:\.\d+)?")
# Names that hold a number (models, devices, papers' tables) and references such as (4): not figures.
NAMES = re.compile(r"Gemma 3|Table 2|Pi [45]|Pi Zero 2 W|Python 3\b|\(\d\)")
# Results files written before benchmarks.common.machine() recorded versions and load; each
# entry says what the file lacks. Re-running the command that writes it removes it from here
# (test_legacy_list_is_current fails until then).
LEGACY: dict[str, str] = {
    "benchmarks/results/memory_model.json": "versions and load average",
    "benchmarks/results/memory_model_lean.json": "versions and load average",
    "benchmarks/results/examples/keyboard.json": "machine, versions and load average",
    "benchmarks/results/lean/smollm2_profile_enforce.json": "versions and load average",
    "benchmarks/results/portable_vs_ort.json": "machine, versions, load average and command",
}


def tables(text: str) -> list[dict]:
    """Every markdown table outside code blocks: its first line number, lines, marker paths (or
    None) and the prose since the previous table or heading."""
    lines = text.splitlines()
    found, i, prose_start, in_code = [], 0, 0, False
    while i < len(lines):
        line = lines[i]
        in_code ^= line.startswith("```")
        if in_code:
            i += 1
            continue
        if line.startswith("#"):
            prose_start, i = i + 1, i + 1
            continue
        if not (line.startswith("|") and i + 1 < len(lines) and SEPARATOR.match(lines[i + 1])):
            i += 1
            continue
        j = i
        while j < len(lines) and lines[j].startswith("|"):
            j += 1
        m = MARKER.match(lines[i - 1]) if i else None
        prose = "\n".join(lines[prose_start:i - 1 if m else i])
        if not prose.strip() and found and found[-1]["line"] + len(found[-1]["rows"]) >= prose_start - 1:
            prose = found[-1]["prose"]  # two tables in a row share the prose above the first
        found.append({"line": i + 1, "rows": lines[i:j], "paths": m.group("paths").split() if m else None,
                      "prose": prose})
        prose_start, i = j, j
    return found


def figures(row: str) -> list[str]:
    """The figures of one table row: its numbers outside code spans and link targets."""
    row = re.sub(r"`[^`]*`", " ", row)
    row = re.sub(r"\]\([^)]*\)", "]", row)
    row = NAMES.sub(" ", row.replace("**", " "))
    return [m.group("n") for m in NUMBER.finditer(row) if not re.match(r"\d+\.\d+\.\d", row[m.start():])]


def _numbers_of(obj, out: list) -> None:
    if isinstance(obj, bool):
        return
    if isinstance(obj, (int, float)):
        out.append(obj)
    elif isinstance(obj, str):
        out.extend(float(x) for x in NUMBER_LOOSE.findall(obj.replace(",", "")))
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _numbers_of(k, out)
            _numbers_of(v, out)
    elif isinstance(obj, list):
        for v in obj:
            _numbers_of(v, out)


def numbers_in(path: Path) -> set[str]:
    """Every number the results file holds, as text at 0 to 8 decimals (both roundings of a
    half), so that a figure matches if the file holds it at the figure's precision."""
    if path.suffix == ".json":
        raw: list = []
        _numbers_of(json.loads(path.read_text()), raw)
    else:
        raw = [float(x) for x in NUMBER_LOOSE.findall(path.read_text().replace(",", ""))]
    out = set()
    for v in raw:
        v = abs(v)
        for d in range(9):
            out.add(f"{v:.{d}f}")
            q = Decimal(repr(float(v))).quantize(Decimal(1).scaleb(-d), rounding=ROUND_HALF_UP)
            out.add(f"{q:.{d}f}")
    return out


README_TABLES = tables(README.read_text())


def _id(t: dict) -> str:
    return f"line{t['line']}"


@pytest.mark.parametrize("table", README_TABLES, ids=_id)
def test_table_figures_come_from_its_results_files(table):
    found = [f for row in table["rows"] for f in figures(row)]
    if not found:
        return  # no figures: nothing to source
    head = table["rows"][0][:80]
    assert table["paths"], (f"README.md:{table['line']}: a table with figures ({found[:6]} ...) needs a "
                            f"`<!-- results: PATH ... -->` line directly above it: {head}")
    files = [ROOT / p for p in table["paths"]]
    missing = [str(p.relative_to(ROOT)) for p in files if not p.is_file()]
    assert not missing, f"README.md:{table['line']}: results files not committed: {missing}"
    assert COMMAND.search(table["prose"]), (f"README.md:{table['line']}: name the command that writes "
                                            f"{table['paths']} (`make ...` or `python -m ...`) above the table")
    have = set().union(*(numbers_in(p) for p in files))
    absent = sorted({f for f in found if f.replace(",", "") not in have}, key=found.index)
    assert not absent, (f"README.md:{table['line']} ({head}): figures not in {table['paths']}: {absent}")


def _named_results() -> list[str]:
    return sorted({p for t in README_TABLES for p in (t["paths"] or []) if p.endswith(".json")})


@pytest.mark.parametrize("path", _named_results())
def test_results_record_machine_versions_and_load(path):
    if path in LEGACY:
        pytest.skip(f"{path} predates the record of {LEGACY[path]}; re-run its command")
    doc = json.loads((ROOT / path).read_text())
    machine = doc.get("machine") or doc.get("summary", {}).get("machine") or {}
    assert machine.get("packages") and machine.get("loadavg") is not None and machine.get("cpu"), (
        f"{path} does not record its machine, package versions and load average (benchmarks.common.machine())")
    assert doc.get("command"), f"{path} does not record the command that wrote it"


def test_legacy_list_is_current():
    """Every LEGACY file exists and really lacks what it is excused for."""
    for path in LEGACY:
        doc = json.loads((ROOT / path).read_text())
        machine = doc.get("machine") or doc.get("summary", {}).get("machine") or {}
        assert not (machine.get("packages") and machine.get("loadavg") is not None), (
            f"{path} records its versions and load now: drop it from LEGACY")


# -- the checker itself: it must be able to fail ------------------------------------------------
def test_the_checker_finds_unsourced_figures(tmp_path):
    res = tmp_path / "r.json"
    res.write_text(json.dumps({"acc": 0.9504, "n": 60, "ratio": 0.0912, "cmd": "took 1,234.5 s"}))
    ok = (f"`python -m x`\n\n<!-- results: {res} -->\n| a (60) | b |\n|---|---|\n"
          "| **0.950** | 0.09x, 1,234.5 s, r8, `7` |\n")
    bad = ok.replace("0.09x", "0.10x")
    bare = "| a | b |\n|---|---|\n| 1 | 2 |\n"
    (t_ok,), (t_bad,), (t_bare,) = tables(ok), tables(bad), tables(bare)
    assert t_ok["paths"] == [str(res)] and figures(t_ok["rows"][2]) == ["0.950", "0.09", "1,234.5"]
    have = numbers_in(res)
    assert all(f.replace(",", "") in have for r in t_ok["rows"] for f in figures(r))
    assert "0.10" not in have and t_bad["paths"] and t_bare["paths"] is None
    assert figures("| int8 r8 top-1 Q4_K 1e-5 1.19.2 270M 262k-token | -0.04% +7.17% 0.17-0.40 |") == [
        "0.04", "7.17", "0.17", "0.40"]
    # A table inside a code block is not a README table; one after it still needs its marker.
    assert tables("```\n| 1 | 2 |\n|---|---|\n```\n") == [] and len(tables("```\n# x\n```\n" + bare)) == 1


# -- tolerances the README quotes are the ones the tests assert -----------------------------------
def _source(name: str) -> str:
    return (ROOT / "tests" / name).read_text()


def _dict_len(source: str, name: str) -> int:
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id == name for t in targets) and isinstance(node.value, ast.Dict):
                return len(node.value.keys)
    raise AssertionError(f"no dict {name}")


def test_readme_tolerances_and_counts_are_the_tests():
    readme = README.read_text()
    methods = _source("test_methods.py")
    n_models, n_methods = _dict_len(methods, "MODELS"), _dict_len(methods, "METHODS")
    assert f"{n_models} models x {n_methods} method cases" in readme, (n_models, n_methods)
    assert "atol: float = 1e-5" in methods and "parity with eager PyTorch to 1e-5" in readme
    assert "assert diff < 1e-4" in _source("test_zoo_llama.py") and "GGUF loader to < 1e-4" in readme
    interop = _source("test_peft_interop.py")
    assert 'INTEROP_ATOL = {"none": 1e-5, "int8": 3e-3}' in interop
    assert "to 1e-5 over an fp32 base and to 3e-3 over the int8 base" in readme
    assert "\nBOUND = 0.20\n" in _source("test_memory.py") and "phase within 20% until" in readme


def test_guarantee_figures_record_no_failures():
    """The README's guarantees say "failures: 0": the committed test figures must not record a
    failed or skipped test of the guarantee files (a run that failed one is not quoted)."""
    doc = json.loads((ROOT / "benchmarks" / "results" / "guarantees" / "tests.json").read_text())
    bad = {fn: e for fn, e in doc["tests"].items() if e["failed"] or e["skipped"] or not e["passed"]}
    assert not bad, f"benchmarks/results/guarantees/tests.json records failures or skips: {sorted(bad)}"
