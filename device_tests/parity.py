"""Parity: a target's scenario report against the host's for the same bundle, scenario and
seed. Losses and outputs must agree within tolerances (ARM and x86 kernels, and onnxruntime
releases, round differently); anything else that differs is listed, one line per value."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Measured: emulated Cortex-A72/A76 (onnxruntime 1.32) vs this host (1.19.2) on the tiny
# encoder: losses equal, outputs within 1e-7. The margins leave room for other releases
# and thread counts without hiding a wrong gradient (which moves losses by >1e-3 in 3 steps).
LOSS_RTOL, LOSS_ATOL = 1e-4, 1e-5
OUT_ATOL = 1e-4


@dataclass(frozen=True)
class Parity:
    ok: bool
    diffs: tuple[str, ...]
    max_loss_diff: float
    max_output_diff: float

    def to_json(self) -> dict:
        return {"ok": self.ok, "diffs": list(self.diffs), "max_loss_diff": self.max_loss_diff,
                "max_output_diff": self.max_output_diff,
                "tolerances": {"loss_rtol": LOSS_RTOL, "loss_atol": LOSS_ATOL, "output_atol": OUT_ATOL}}


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= LOSS_ATOL + LOSS_RTOL * abs(b)


def compare(target: dict, host: dict) -> Parity:
    diffs: list[str] = []
    for key in ("model_sha256", "steps", "seed", "batch", "seq", "backend"):
        if target.get(key) != host.get(key):
            diffs.append(f"{key}: target {target.get(key)!r} != host {host.get(key)!r}")
    tl, hl = target.get("losses", []), host.get("losses", [])
    if len(tl) != len(hl):
        diffs.append(f"losses: target has {len(tl)}, host {len(hl)}")
    loss_diff = max((abs(a - b) for a, b in zip(tl, hl)), default=0.0)
    for i, (a, b) in enumerate(zip(tl, hl)):
        if not _close(a, b):
            diffs.append(f"loss[{i}]: target {a:.8g} vs host {b:.8g} (diff {a - b:+.3g})")
    for k in ("trained", "second", "back"):
        a, b = target["eval"][k], host["eval"][k]
        if not _close(a, b):
            diffs.append(f"eval.{k}: target {a:.8g} vs host {b:.8g} (diff {a - b:+.3g})")
    if not target.get("swap_restored"):
        diffs.append("swap: the target's adapter was not restored exactly after swapping back")
    to, ho = np.asarray(target["outputs"]["values"]), np.asarray(host["outputs"]["values"])
    out_diff = float("inf")
    if to.shape != ho.shape:
        diffs.append(f"outputs: shape {list(to.shape)} vs host {list(ho.shape)}")
    else:
        out_diff = float(np.abs(to - ho).max()) if to.size else 0.0
        if out_diff > OUT_ATOL:
            i = np.unravel_index(int(np.abs(to - ho).argmax()), to.shape)
            diffs.append(f"outputs: max diff {out_diff:.3g} > {OUT_ATOL} at {list(map(int, i))} "
                         f"(target {to[i]:.8g}, host {ho[i]:.8g})")
    return Parity(not diffs, tuple(diffs), float(loss_diff), out_diff)
