"""The figures the guarantees table quotes, gathered where pytest-xdist cannot hide them.

A test records what it proved with ``record(request, key, {...})`` (kill trials, refusals,
...). Every report reaches the controlling process (xdist ships ``user_properties`` with it), so
at the end of a run the controller prints the figures in the terminal summary (CI's log) and
merges them, with the passed / failed / skipped count of every test function of the guarantee
files, into ``benchmarks/results/guarantees/tests.json`` with the machine, package versions and
load. The README's guarantees table quotes that file (tests/test_readme_figures.py checks it).
Only the functions that ran are updated, so running one file keeps the others' figures."""
from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "guarantees" / "tests.json"
# The test files that prove the README's guarantees.
FILES = ("test_crash_safety.py", "test_adapters_store.py", "test_fuzz_bundle.py", "test_errors.py",
         "test_signing.py", "test_no_pickle.py", "test_locking.py")
_runs: dict[str, dict] = {}
_PARAMS = re.compile(r"\[.*\]$")


def record(request, key: str, figures: dict) -> None:
    """Attach ``figures`` (JSON-able) to this test's report under ``key``."""
    request.node.user_properties.append(("figures", {"key": key, **figures}))


def _function(nodeid: str) -> str | None:
    path, _, name = nodeid.partition("::")
    if Path(path).name not in FILES:
        return None
    return f"{Path(path).name}::{_PARAMS.sub('', name)}"


def pytest_runtest_logreport(report) -> None:
    fn = _function(report.nodeid)
    if fn is None or (report.when != "call" and not (report.failed or report.skipped)):
        return
    entry = _runs.setdefault(fn, {"passed": 0, "failed": 0, "skipped": 0, "figures": {}})
    entry["passed" if report.passed else "failed" if report.failed else "skipped"] += 1
    for name, value in report.user_properties:
        if name == "figures":
            value = dict(value)
            entry["figures"][value.pop("key")] = value


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    if hasattr(config, "workerinput") or not _runs:
        return
    tr = terminalreporter
    tr.section("figures proved by this run (benchmarks/results/guarantees/tests.json)")
    for fn, entry in sorted(_runs.items()):
        figures = "; ".join(f"{k}: {json.dumps(v)}" for k, v in entry["figures"].items())
        tr.write_line(f"{fn}: passed {entry['passed']}, failed {entry['failed']}, skipped {entry['skipped']}"
                      + (f"; {figures}" if figures else ""))
    _write(config)


def _write(config) -> None:
    """Merge this run's functions into the results file (machine, versions and load with it)."""
    from edgepeft.provenance import machine

    try:
        doc = json.loads(RESULTS.read_text())
    except (OSError, ValueError):
        doc = {"tests": {}}
    doc["command"] = "make test"
    doc["machine"] = machine()
    doc["pytest_args"] = list(config.invocation_params.args)
    doc["tests"].update(_runs)
    doc["tests"] = dict(sorted(doc["tests"].items()))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(doc, indent=1) + "\n")
