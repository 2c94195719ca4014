"""The device scenario: the runtime's whole cycle once, on whatever Python runs it (a board,
an emulated ARM64, a capped host), reported as one JSON object that compares across machines.

Open the bundle -> N training steps on a synthetic batch (deterministic by seed) -> save ->
swap to a second adapter and evaluate -> swap back and evaluate -> infer a fixed batch.
Needs only the installed edgepeft wheel and its device dependencies:

    python -m edgepeft.runtime.scenario BUNDLE --steps 3 --seed 0 --json

Exit status: 0 done, 2 refused with an EdgePeftError (reported as {"error", "type"})."""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgepeft.data import Batch
from edgepeft.errors import EdgePeftError
from edgepeft.fsutil import sha256_file
from edgepeft.memory import MiB
from edgepeft.optim import OptimizerSpec
from edgepeft.runtime.budget import MemoryBudget
from edgepeft.runtime.profiling import synthetic_batch
from edgepeft.runtime.session import Session

SECOND_ADAPTER = "scenario-b"


def _platform() -> dict:
    """What the scenario ran on; the CPU model comes from /proc/cpuinfo where there is one
    (under qemu that is the emulated core's, which is the point)."""
    import onnxruntime

    info: dict = {"machine": platform.machine(), "system": platform.system(), "release": platform.release(),
                  "python": platform.python_version(), "implementation": platform.python_implementation(),
                  "onnxruntime": onnxruntime.__version__, "numpy": np.__version__,
                  "cpus": os.cpu_count(), "byteorder": sys.byteorder}
    if hasattr(os, "sched_getaffinity"):
        info["cpus_usable"] = len(os.sched_getaffinity(0))
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    for key in ("model name", "CPU part", "CPU implementer", "Features", "Hardware", "Model"):
        val = next((ln.split(":", 1)[1].strip() for ln in lines if ln.split(":")[0].strip() == key), None)
        if val is not None:
            info[key.lower().replace(" ", "_")] = val
    return info


def run(bundle: str | Path, *, steps: int = 3, seed: int = 0, batch: int = 4, seq: int | None = None,
        threads: int | None = 1, lr: float = 1e-2, backend: str = "portable", adapter: str = "scenario",
        store: str | Path | None = None, cache_dir: str | Path | None = None,
        memory_budget: int | str | None = None) -> dict:
    """Run the scenario; returns the report (raises EdgePeftError when refused)."""
    if steps < 1 or batch < 1:
        raise EdgePeftError(f"`steps` and `batch` must be >= 1, got steps={steps}, batch={batch}")
    meter = MemoryBudget(None)  # absolute peaks, no limit: the session enforces ``memory_budget`` itself
    with tempfile.TemporaryDirectory(prefix="edgepeft-scenario-") as tmp:
        store = Path(store) if store else Path(tmp) / "adapters"
        cache = Path(cache_dir) if cache_dir else Path(tmp) / "cache"
        with meter.phase("open"):
            s = Session.open(bundle, adapter=adapter, store=store, cache_dir=cache, backend=backend,
                             threads=threads, memory_budget=memory_budget, batch_size=batch,
                             optimizer=OptimizerSpec(lr=lr))
        try:
            m, used, start_steps = s.manifest, s.backend.name, s.steps
            seq = seq or m.max_length
            train = synthetic_batch(m, batch, seq, seed)
            probe = synthetic_batch(m, batch, seq, seed + 1)  # the fixed batch inferred at the end
            c = _cycle(s, meter, adapter, steps, train, probe)
        finally:
            s.close()
        weights_sha = sha256_file(c.saved / "adapter_model.safetensors")
    out = c.outputs
    return {
        "bundle": Path(bundle).name, "model": m.model_name, "model_sha256": m.model_sha256,
        "backend": used, "adapter": adapter, "steps": steps, "steps_before": start_steps, "seed": seed,
        "batch": batch, "seq": seq, "threads": threads, "lr": lr,
        "losses": c.losses,
        "eval": c.evals,
        # Swapping back must restore the adapter exactly: compared bit for bit, on every target.
        "swap_restored": c.evals["back"] == c.evals["trained"],
        "outputs": {"shape": list(out.shape), "sha256": hashlib.sha256(out.tobytes()).hexdigest(),
                    "sum": float(out.sum(dtype=np.float64)), "values": out.tolist()},
        "saved": {"path": str(c.saved), "weights_sha256": weights_sha},
        "seconds": {**meter.seconds, "train_step": c.step_seconds},
        "peaks": meter.peak_rss, "peak_rss": max(meter.peak_rss.values()),
        "platform": _platform(),
    }


@dataclass(frozen=True)
class _Cycle:
    losses: list[float]
    step_seconds: list[float]
    saved: Path
    evals: dict[str, float]  # the loss on the training batch: trained, second adapter, back
    outputs: np.ndarray      # float32 logits of the probe batch


def _cycle(s: Session, meter: MemoryBudget, adapter: str, steps: int, train: Batch, probe: Batch) -> _Cycle:
    """Train, save, swap away and back, infer, each metered as a phase; the evaluations in
    between are not (the session meters them as its own "evaluate")."""
    losses, step_seconds = [], []
    for _ in range(steps):
        with meter.phase("train_step"):
            loss = s.train_step(train)
        losses.append(float(loss))
        step_seconds.append(meter.last.seconds)
    with meter.phase("save"):
        saved = s.save_adapter()
    trained = s.evaluate([train]).loss
    with meter.phase("swap"):
        s.swap_adapter(SECOND_ADAPTER, create=True)
    second = s.evaluate([train]).loss
    with meter.phase("swap_back"):
        s.swap_adapter(adapter)
    back = s.evaluate([train]).loss
    with meter.phase("infer"):
        logits = s.infer(probe.feeds)
    evals = {"trained": float(trained), "second": float(second), "back": float(back)}
    return _Cycle(losses, step_seconds, saved, evals, np.ascontiguousarray(logits, dtype=np.float32))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m edgepeft.runtime.scenario", description=__doc__.splitlines()[0])
    p.add_argument("bundle")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=None, help="positions per example (default: the bundle's max)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--backend", default="portable")
    p.add_argument("--adapter", default="scenario")
    p.add_argument("--store", default=None, help="adapter store to keep (default: a temporary one)")
    p.add_argument("--cache", default=None, help="bundle cache (default: a temporary one)")
    p.add_argument("--memory-budget", default=None, help="Session.open's budget, e.g. 300MB")
    p.add_argument("--json", action="store_true", help="print one JSON line (the default prints a summary)")
    a = p.parse_args(argv)
    try:
        report = run(a.bundle, steps=a.steps, seed=a.seed, batch=a.batch, seq=a.seq, threads=a.threads, lr=a.lr,
                     backend=a.backend, adapter=a.adapter, store=a.store, cache_dir=a.cache,
                     memory_budget=a.memory_budget)
    except EdgePeftError as e:
        print(json.dumps({"error": str(e), "type": type(e).__name__}) if a.json else f"refused: {e}")
        return 2
    if a.json:
        print(json.dumps(report))
    else:
        print(f"{report['model']} on {report['platform']['machine']} ({report['backend']}): losses "
              f"{', '.join(f'{x:.6f}' for x in report['losses'])}; outputs sha256 {report['outputs']['sha256'][:16]}; "
              f"peak RSS {report['peak_rss'] / MiB:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
