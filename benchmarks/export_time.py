"""Export time per backend: MiniLM-L6 + LoRA r8 (query, value) + head, int8 frozen base, one
bundle per training backend (ort-training, portable, executorch) and ort-training with an fp32
base; each export in its own fresh process, wall time and the process's peak RSS (from the OS).

    python -m benchmarks export_time [--reps 1] [--tiny]

The bundles stay in out/bench/ for the train_step and swap comparisons."""
from __future__ import annotations

import argparse
import json
import os
import resource
import time
import traceback
from pathlib import Path

from benchmarks.common import RESULTS, Run, bundle_path, lora_spec, md_table, median, model_name, plt, run_child

NAME = "export_time"
CONFIGS = (("ort-training", "int8"), ("portable", "int8"), ("lean", "int8"), ("executorch", "int8"),
           ("executorch-lean", "int8"), ("ort-training", "none"))


def child(backend: str, quant: str, tiny: bool) -> None:
    t0 = time.perf_counter()
    from edgepeft.exporters import export_bundle, load_model
    from edgepeft.exporters.zoo import BBC_TOPICS

    import_s = time.perf_counter() - t0
    path = bundle_path(backend, quant, tiny)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".partial")
    t1 = time.perf_counter()
    cpu0 = _cpu_s()
    load0 = os.getloadavg()[0]
    export_bundle(load_model(model_name(tiny), labels=BBC_TOPICS), methods=[lora_spec(tiny)], quant=quant, out=tmp,
                  backends=(backend,))
    seconds = time.perf_counter() - t1
    tmp.replace(path)
    # CPU seconds (this process and any children) say what the export costs on a shared machine,
    # where wall time mostly measures the other jobs; the load averages say how shared it was.
    print(json.dumps({"backend": backend, "quant": quant, "export_s": seconds, "import_s": import_s,
                      "cpu_s": _cpu_s() - cpu0, "loadavg": [load0, os.getloadavg()[0]],
                      "bundle_bytes": path.stat().st_size}))


def _cpu_s() -> float:
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(prog="python -m benchmarks export_time")
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--backends", nargs="+", default=sorted({b for b, _ in CONFIGS}))
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--child")
    ap.add_argument("--quant", default="int8")
    a = ap.parse_args(argv)
    if a.child:
        return child(a.child, a.quant, a.tiny)
    run = Run(NAME, argv)
    configs = [(b, q) for b, q in CONFIGS if b in a.backends]
    runs: dict[str, list[dict]] = {f"{b} ({q})": [] for b, q in configs}
    errors: dict[str, str] = {}
    for _ in range(a.reps):
        for b, q in configs:  # interleaved
            key = f"{b} ({q})"
            if key in errors:
                continue
            try:
                runs[key].append(run_child("benchmarks.export_time", ["--child", b, "--quant", q,
                                                                      *(["--tiny"] if a.tiny else [])], timeout=3600))
            except Exception as e:  # a backend still being built: report it as not run, with why
                errors[key] = str(e).strip().splitlines()[-1][:400] if str(e).strip() else type(e).__name__
                traceback.print_exc()
    rows = {}
    for key, rs in runs.items():
        if not rs:
            rows[key] = {"ran": False, "error": errors.get(key, "")}
            continue
        rows[key] = {"ran": True, "export_s": median([r["export_s"] for r in rs]),
                     "all_export_s": [r["export_s"] for r in rs],
                     "peak_rss_mib": median([r["os_peak_rss_mib"] for r in rs]),
                     "cpu_s": median([r.get("cpu_s", float("nan")) for r in rs]),
                     "loadavg": [r.get("loadavg") for r in rs],
                     "bundle_mb": rs[0]["bundle_bytes"] / 1e6, "reps": len(rs)}
    md = md_table(["backend (frozen base)", "export (s)", "CPU (s)", "load average (start / end)",
                   "peak RSS of the export (MiB)", "bundle (MB)"],
                  [[k, f"{r['export_s']:.1f}", f"{r['cpu_s']:.1f}",
                    ", ".join(f"{la[0]:.1f} / {la[1]:.1f}" for la in r["loadavg"] if la),
                    f"{r['peak_rss_mib']:.0f}", f"{r['bundle_mb']:.1f}"] if r["ran"]
                   else [k, "not run", r["error"][:200], "", "", ""] for k, r in rows.items()])
    md += (f"\n\n{model_name(a.tiny)} + LoRA r8 (query, value) + head; one bundle per backend, each export in a fresh "
           f"process, median of {a.reps} run(s); times exclude imports.")
    run.write({"model": model_name(a.tiny), "reps": a.reps, "rows": rows}, md, a.out)
    _plot(rows, a.out / f"{NAME}.png", model_name(a.tiny))
    print(md)
    return a.out / f"{NAME}.json"


def _plot(rows: dict, path: Path, model: str) -> None:
    pyplot = plt()
    ok = {k: r for k, r in rows.items() if r["ran"]}
    fig, ax = pyplot.subplots(figsize=(6.5, 3.2))
    ax.barh(list(ok), [r["export_s"] for r in ok.values()], color="tab:blue")
    for i, r in enumerate(ok.values()):
        ax.text(r["export_s"], i, f" {r['export_s']:.0f} s", va="center", fontsize=8)
    ax.set_xlabel("export time (s)")
    ax.set_title(f"Export time per backend, {model} + LoRA r8", fontsize=10)
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot.close(fig)


if __name__ == "__main__":
    main()
