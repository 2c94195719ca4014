"""Training step on MiniLM-L6 (LoRA r8 q/v + head, int8 base, batch 8, 128 tokens, 2 threads):
the portable backend (standard ONNX gradient graph on onnxruntime) against ort-training.

Each backend runs in its own torch-free process, interleaved, several repetitions; peak RSS
comes from the OS (VmHWM). Usage: python -m benchmarks.portable_vs_ort [--reps 3 --steps 12]"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

OUT = Path(__file__).parent / "results"
BUNDLE = Path("out/bench/minilm-both.edgepeft")
BACKENDS = ("ort-training", "portable")


def child(backend: str, steps: int) -> None:
    from edgepeft.cli.datasets import bbc_news, user_split
    from edgepeft.memory import peak_rss_bytes, rss_bytes
    from edgepeft.runtime import OptimizerSpec, Session

    start = rss_bytes()
    train, _ = user_split(bbc_news(("business", "politics", "tech")), n_train=8 * steps, n_test=0, seed=1)
    s = Session.open(BUNDLE, adapter=f"bench-{backend}", store="out/bench/store", threads=2, backend=backend,
                     optimizer=OptimizerSpec(lr=3e-3))
    batches = list(s.encoder.batches(train, 8))
    times, losses = [], []
    for b in batches:
        t = time.perf_counter()
        losses.append(s.train_step(b))
        times.append(time.perf_counter() - t)
    print(json.dumps({"backend": backend, "step_s": times, "losses": losses, "seq": int(batches[0].feeds["input_ids"].shape[1]),
                      "peak_rss_mb": peak_rss_bytes() / 2**20, "start_rss_mb": start / 2**20,
                      "torch_loaded": "torch" in sys.modules, "phase_peaks_mb": {k: v / 2**20 for k, v in s.budget.peaks.items()}}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--child")
    a = ap.parse_args()
    if a.child:
        return child(a.child, a.steps)
    from edgepeft.provenance import machine

    start = machine()
    if not BUNDLE.exists():
        from edgepeft.exporters import export_bundle, load_model
        from edgepeft.specs import LoraSpec

        t = time.time()
        export_bundle(load_model("minilm"), out=BUNDLE, quant="int8",
                      methods=[LoraSpec(rank=8, targets=("query", "value"), modules_to_save=("classifier",))])
        print(f"exported {BUNDLE} in {time.time() - t:.0f} s")
    runs: dict[str, list[dict]] = {b: [] for b in BACKENDS}
    for rep in range(a.reps):
        for b in BACKENDS:  # interleaved, so machine noise hits both alike
            p = subprocess.run([sys.executable, "-m", "benchmarks.portable_vs_ort", "--child", b, "--steps", str(a.steps)],
                               capture_output=True, text=True, check=True)
            runs[b].append(json.loads(p.stdout.strip().splitlines()[-1]))
    rows = {}
    for b, rs in runs.items():
        steps = [t for r in rs for t in r["step_s"][2:]]  # first two steps warm up
        rows[b] = {"median_step_s": statistics.median(steps), "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in rs),
                   "train_peak_above_start_mb": statistics.median(r["phase_peaks_mb"]["train_step"] for r in rs),
                   "seq": rs[0]["seq"], "torch_loaded": any(r["torch_loaded"] for r in rs), "runs": len(rs),
                   "final_loss": rs[0]["losses"][-1]}
    p, o = rows["portable"], rows["ort-training"]
    ratios = {"step_time_portable_over_ort": p["median_step_s"] / o["median_step_s"],
              "peak_rss_portable_over_ort": p["peak_rss_mb"] / o["peak_rss_mb"]}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "portable_vs_ort.json").write_text(json.dumps({
        "command": " ".join(["python -m benchmarks.portable_vs_ort", *sys.argv[1:]]), "machine": start,
        "loadavg_end": list(os.getloadavg()), "rows": rows, "ratios": ratios, "reps": a.reps,
        "steps": a.steps}, indent=2))
    md = ["| backend | median step (s) | peak RSS (MiB, process) | train peak above start (MiB) | final loss |",
          "|---|---|---|---|---|"]
    for b, r in rows.items():
        md.append(f"| {b} | {r['median_step_s']:.3f} | {r['peak_rss_mb']:.0f} | {r['train_peak_above_start_mb']:.0f} | "
                  f"{r['final_loss']:.4f} |")
    md.append(f"\nportable / ort-training: step time {ratios['step_time_portable_over_ort']:.2f}x, "
              f"peak RSS {ratios['peak_rss_portable_over_ort']:.2f}x "
              f"({a.reps} interleaved runs x {a.steps} steps, batch 8, seq {o['seq']}, 2 threads)")
    (OUT / "portable_vs_ort.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
