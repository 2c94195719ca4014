"""What every benchmark module shares: machine details, child processes measured by the OS,
and writing results (JSON + markdown + PNG) to benchmarks/results/."""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

from edgepeft.provenance import machine

RESULTS = Path(__file__).parent / "results"
THREADS = 2


def work() -> Path:
    """Where bundles, adapter stores and caches go (``EDGEPEFT_BENCH_WORK``, default out/bench)."""
    return Path(os.environ.get("EDGEPEFT_BENCH_WORK", "out/bench"))


class Run:
    """One benchmark run: records the machine at start and end, and the command line."""

    def __init__(self, name: str, args: Sequence[str] | None = None):
        self.name = name
        self.t0 = time.time()
        self.start = machine()
        self.command = "python -m benchmarks " + " ".join([name, *(args if args is not None else sys.argv[2:])])

    def write(self, data: dict[str, Any], md: str, out: Path | None = None) -> Path:
        out = Path(out) if out else RESULTS
        out.mkdir(parents=True, exist_ok=True)
        doc = {"benchmark": self.name, "command": self.command.strip(), "seconds": round(time.time() - self.t0, 1),
               "machine": self.start, "loadavg_end": list(os.getloadavg()), **data}
        path = out / f"{self.name}.json"
        path.write_text(json.dumps(doc, indent=1, default=_jsonable) + "\n")
        la0, la1 = self.start["loadavg"][0], doc["loadavg_end"][0]
        header = (f"`{doc['command']}`: {self.start['date']}, {self.start['cpu_count']} cores "
                  f"({self.start['cpu']}), load average {la0:.1f} at start, {la1:.1f} at end, "
                  f"{doc['seconds']:.0f} s\n\n")
        (out / f"{self.name}.md").write_text(header + md.rstrip() + "\n")
        return path


def _jsonable(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    return str(o)


def run_child(module: str, args: Sequence[str], *, timeout: float = 1800) -> dict[str, Any]:
    """Run ``python -m module *args`` in a fresh process; return the JSON object its last stdout
    line holds, plus ``os_peak_rss_mib``: the child's peak resident memory as the kernel
    accounted it (wait4's ru_maxrss)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        p = subprocess.Popen([sys.executable, "-m", module, *args], stdout=out, stderr=err, text=True,
                             env={**os.environ, "PYTHONWARNINGS": "ignore"})
        deadline = time.time() + timeout
        while True:
            pid, status, ru = os.wait4(p.pid, os.WNOHANG)
            if pid:
                break
            if time.time() > deadline:
                p.kill()
                _, status, ru = os.wait4(p.pid, 0)
                break
            time.sleep(0.05)
        p.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if p.returncode != 0:
        raise RuntimeError(f"{module} {' '.join(args)} exited with {p.returncode}:\n{stderr[-3000:]}")
    lines = [ln for ln in stdout.strip().splitlines() if ln.startswith("{")]
    if not lines:
        raise RuntimeError(f"{module} {' '.join(args)} printed no JSON:\n{stdout[-2000:]}\n{stderr[-2000:]}")
    res = json.loads(lines[-1])
    res["os_peak_rss_mib"] = ru.ru_maxrss / 1024  # Linux: KiB
    return res


def percentile(xs: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100)."""
    s = sorted(xs)
    if len(s) == 1:
        return s[0]
    k = (len(s) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def plt():
    """matplotlib's pyplot on the Agg backend (no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as pyplot

    return pyplot


def set_threads() -> None:
    """Eager PyTorch baselines use the same 2 threads as the edgepeft sessions."""
    import torch

    torch.set_num_threads(THREADS)


# -- the MiniLM LoRA bundles the timing comparisons share --------------------------------------

def lora_spec(tiny: bool = False):
    """LoRA rank 8 on the attention query/value projections + the classification head."""
    from edgepeft.specs import LoraSpec

    return LoraSpec(rank=8, alpha=16, targets=("query", "value"), modules_to_save=("classifier",))


def model_name(tiny: bool) -> str:
    return "tiny-encoder" if tiny else "minilm"


def bundle_path(backend: str, quant: str = "int8", tiny: bool = False) -> Path:
    return work() / f"{model_name(tiny)}-lora-{quant}-{backend}.edgepeft"


def ensure_bundle(backend: str, quant: str = "int8", tiny: bool = False) -> Path:
    """The bundle for ``backend`` (exported in a child process by export_time if missing)."""
    path = bundle_path(backend, quant, tiny)
    if not path.exists():
        run_child("benchmarks.export_time", ["--child", backend, "--quant", quant, *(["--tiny"] if tiny else [])],
                  timeout=3600)
    return path
