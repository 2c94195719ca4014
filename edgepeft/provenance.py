"""Where and when a figure was measured: the machine, package versions and load that every
results file records (benchmarks, examples, `edgepeft demo --results`, the test suite's
guarantee figures). Standard library only: it runs on the device side too."""
from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

PACKAGES = ("edgepeft", "torch", "onnxruntime-training-cpu", "onnxruntime", "onnx", "numpy", "transformers", "peft",
            "executorch", "tokenizers")


def versions(packages: tuple[str, ...] = PACKAGES) -> dict[str, str]:
    out = {}
    for p in packages:
        try:
            out[p] = importlib.metadata.version(p)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def mem_total_mib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def machine() -> dict[str, Any]:
    """Where and when: platform, CPU, cores, memory, Python, package versions, load, date."""
    return {"platform": platform.platform(), "machine": platform.machine(), "cpu": cpu_model(),
            "cpu_count": os.cpu_count(), "mem_total_mib": mem_total_mib(), "python": platform.python_version(),
            "packages": versions(), "loadavg": list(os.getloadavg()),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def write_results(path: str | Path, figures: dict[str, Any], *, command: str | None = None,
                  start: dict[str, Any] | None = None) -> Path:
    """Write ``figures`` as JSON to ``path`` with the command, the machine at ``start`` (taken
    now if not given) and the load average at the end."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"command": command or " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
           "machine": start or machine(), "loadavg_end": list(os.getloadavg()), **figures}
    path.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    return path
