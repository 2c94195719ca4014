"""Measure a bundle's memory phase by phase, for real, in this process: open, train step
(first steps, which allocate the optimizer state), evaluate, adapter swap, infer. Each
phase's peak is the resident high-water mark reset at the phase's start (Linux
``/proc/self/clear_refs``), reported as absolute process RSS so it compares with a device's
budget. Run it in a fresh process (``python -m edgepeft.runtime.profiling``): whatever the
process imported before (torch, say) would count against the bundle.

Inputs are synthetic (random token ids, random images) with the bundle's exact shapes:
memory depends on shapes, not values."""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np

from edgepeft.data import Batch
from edgepeft.manifest import Manifest
from edgepeft.memory import reset_peak
from edgepeft.memory_model import PHASES
from edgepeft.runtime.budget import MemoryBudget
from edgepeft.runtime.session import Session

__all__ = ["PHASES", "profile_phases", "synthetic_batch"]


def synthetic_batch(manifest: Manifest, batch: int, seq: int, seed: int = 0) -> Batch:
    """Random inputs of the bundle's signature with ``batch`` rows and ``seq`` positions."""
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    for io in manifest.inputs:
        shape = tuple(batch if d == "batch" else seq if isinstance(d, str) else int(d) for d in io.shape)
        if io.dtype.startswith("int"):
            arr = np.ones(shape, np.int64) if "mask" in io.name else rng.integers(1, 100, size=shape)
            feeds[io.name] = arr.astype(io.dtype)
        else:
            feeds[io.name] = rng.standard_normal(shape).astype(io.dtype)
    if manifest.task == "causal-lm":
        labels = rng.integers(1, 100, size=(batch, seq)).astype(np.int64)
    else:
        labels = rng.integers(0, len(manifest.labels), size=(batch,)).astype(np.int64)
    return Batch(feeds, labels)


def profile_phases(bundle: str | Path, *, backend: str = "auto", batch: int = 8, seq: int | None = None,
                   steps: int = 2, threads: int | None = None, workdir: str | Path | None = None) -> dict:
    """Run every phase of PHASES once (train ``steps`` times) and return their peaks (bytes,
    absolute RSS) and wall times, as ``python -m edgepeft.runtime.profiling`` prints them."""
    meter = MemoryBudget(None)
    meter.start()
    with tempfile.TemporaryDirectory(prefix="edgepeft-profile-") as tmp:
        root = Path(workdir or tmp)
        with meter.phase("open"):
            s = Session.open(bundle, backend=backend, threads=threads, store=root / "adapters",
                             cache_dir=root / "cache")
        try:
            seq = seq or s.manifest.max_length
            b = synthetic_batch(s.manifest, batch, seq)
            losses = []
            for _ in range(steps):
                with meter.phase("train_step"):
                    losses.append(s.train_step(b))
            with meter.phase("evaluate"):
                s.evaluate([b])
            with meter.phase("swap"):
                s.swap_adapter("profile-b", create=True)
                s.swap_adapter("default")
            with meter.phase("infer"):
                s.infer(b.feeds)
            used = s.backend.name
        finally:
            s.close()
    return {
        "bundle": str(bundle), "backend": used, "batch": batch, "seq": seq, "steps": steps,
        "threads": threads, "baseline": meter.baseline, "peaks": meter.peak_rss, "seconds": meter.seconds,
        "losses": [float(x) for x in losses], "exact": reset_peak(),
        "platform": {"machine": platform.machine(), "python": platform.python_version(),
                     "pid": os.getpid()},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m edgepeft.runtime.profiling", description=__doc__.splitlines()[0])
    p.add_argument("bundle")
    p.add_argument("--backend", default="auto")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=None)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args(argv)
    from edgepeft.errors import EdgePeftError

    try:
        report = profile_phases(a.bundle, backend=a.backend, batch=a.batch, seq=a.seq, steps=a.steps, threads=a.threads)
    except EdgePeftError as e:
        print(json.dumps({"error": str(e), "type": type(e).__name__}))
        return 2
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
