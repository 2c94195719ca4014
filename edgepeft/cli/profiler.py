"""`edgepeft profile`: a bundle's memory per phase, predicted from the manifest and measured
for real in a fresh process, checked against device profiles; the largest batch, sequence
length and LoRA rank that fit each device; optionally re-run under each device's hard cap.

The JSON report (``--json``) has the schema ``edgepeft.profile/1``, documented in
docs/profile-schema.md."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from edgepeft import memory_model
from edgepeft.cli import caps
from edgepeft.devices import Device
from edgepeft.errors import EdgePeftError, SpecError
from edgepeft.manifest import Manifest
from edgepeft.memory_model import Prediction, largest, predict

SCHEMA = "edgepeft.profile/1"
MAX_BATCH, MAX_RANK = 4096, 1024


def measure(bundle: Path, *, backend: str, batch: int, seq: int | None, threads: int | None = None,
            cap: Device | None = None, timeout: float = 1800) -> dict:
    """Run the phases in a fresh process (torch-free; capped at ``cap``'s budget and cores if
    given) and return its report (see edgepeft.runtime.profiling)."""
    cmd = [sys.executable, "-m", "edgepeft.runtime.profiling", str(bundle), "--backend", backend,
           "--batch", str(batch)] + (["--seq", str(seq)] if seq else []) + (
           ["--threads", str(threads)] if threads else [])
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    if cap is None:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        if r.returncode not in (0, 2):
            raise EdgePeftError(f"the measuring process failed (exit {r.returncode}): {r.stderr.strip()[-800:]}")
        return _report(r.stdout, r.stderr)
    run = caps.run_capped(cmd, memory=cap.budget, cores=min(cap.cores, os.cpu_count() or 1), timeout=timeout,
                          env=env)
    out = {"survived": run.survived, "method": run.method, "limit": run.limit, "max_usage": run.max_usage,
           "returncode": run.returncode, "oom_killed": run.oom_killed}
    if run.survived:
        out["report"] = _report(run.stdout, run.stderr)
    return out


def _report(stdout: str, stderr: str) -> dict:
    try:
        rep = json.loads(stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise EdgePeftError(f"the measuring process printed no report: {stderr.strip()[-800:]}") from None
    if "error" in rep:
        raise EdgePeftError(rep["error"])
    return rep


def lora_rank(manifest: Manifest) -> tuple[int, int, int] | None:
    """(rank, LoRA parameters, the largest useful rank) of the bundle's LoRA method, if any:
    a rank above a target's smaller dimension adds parameters but no expressiveness."""
    for spec in manifest.methods:
        if spec.method == "lora":
            lora = [t for t in manifest.trainable if t.method == "lora"]
            n = sum(t.numel for t in lora)
            dims = [d for t in lora for d in t.shape if d != spec.rank]
            return int(spec.rank), n, min(dims + [MAX_RANK])
    return None


@dataclass(frozen=True)
class DeviceFit:
    device: Device
    peak: int           # the figure checked: max of predicted and measured (when measured)
    source: str
    max_batch: int
    max_seq: int | None
    max_lora_rank: int | None

    @property
    def fits(self) -> bool:
        return self.peak <= self.device.budget

    @property
    def headroom(self) -> int:
        return self.device.budget - self.peak

    def to_dict(self) -> dict:
        d = self.device
        return {"name": d.name, "title": d.title, "ram": d.ram, "budget": d.budget, "cores": d.cores, "arch": d.arch,
                "fits": self.fits, "peak": self.peak, "peak_source": self.source, "headroom": self.headroom,
                "max_batch": self.max_batch, "max_seq": self.max_seq, "max_lora_rank": self.max_lora_rank}


def fit_device(manifest: Manifest, device: Device, pred: Prediction, measured_peak: int | None) -> DeviceFit:
    backend, batch, seq = pred.backend, pred.batch, pred.seq
    # Measured figures include what prediction misses on this host; scale searches by it.
    ratio = max(1.0, measured_peak / pred.peak) if measured_peak else 1.0
    budget = device.budget

    def ok(**kw) -> bool:
        args = dict(backend=backend, batch=batch, seq=seq) | kw
        return predict(manifest, **args).peak * ratio <= budget

    max_batch = largest(lambda b: ok(batch=b), MAX_BATCH)
    max_seq = largest(lambda s: ok(seq=s), manifest.max_length) if memory_model.has_seq(manifest) else None
    lr = lora_rank(manifest)
    max_rank = None
    if lr:
        rank, n, useful = lr
        other = manifest.trainable_params - n
        max_rank = largest(lambda r: ok(trainable_params=other + n * r // rank), useful)
    peak = max(pred.peak, measured_peak or 0)
    return DeviceFit(device, peak, "measured" if measured_peak and measured_peak >= pred.peak else "predicted",
                     max_batch, max_seq, max_rank)


def error_pct(pred: Prediction, measured: dict) -> dict[str, float]:
    return {p: round(100.0 * (pred.phases[p] - v) / v, 1) for p, v in measured["peaks"].items() if p in pred.phases}


def build_report(bundle: Path, manifest: Manifest, pred: Prediction, measured: dict | None,
                 fits: list[DeviceFit], enforced: dict[str, dict]) -> dict:
    return {
        "schema": SCHEMA, "bundle": str(bundle), "model": manifest.model_name, "backend": pred.backend,
        "batch": pred.batch, "seq": pred.seq,
        "predicted": {"phases": pred.phases, "parts": pred.parts},
        "measured": None if measured is None else {
            "phases": measured["peaks"], "baseline": measured["baseline"], "seconds": measured["seconds"],
            "platform": measured["platform"], "exact": measured["exact"]},
        "error_pct": None if measured is None else error_pct(pred, measured),
        "devices": [f.to_dict() | {"enforce": enforced.get(f.device.name)} for f in fits],
    }


def validate_args(batch: int, seq: int | None) -> None:
    if batch < 1:
        raise SpecError(f"--batch must be >= 1, got {batch}")
    if seq is not None and seq < 1:
        raise SpecError(f"--seq must be >= 1, got {seq}")
