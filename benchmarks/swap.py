"""Adapter swap latency on MiniLM-L6 (LoRA r8 query/value + head, 75,653 trainable tensors'
values): edgepeft's in-place ``swap_adapter`` on each backend, against reopening the session
with the other adapter, and against Hugging Face PEFT's ``set_adapter`` (both adapters in
memory) and ``load_adapter`` (from disk). Each configuration in its own process.

    python -m benchmarks swap [--swaps 200 --reopens 8 --loads 20] [--tiny]"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
import traceback
from pathlib import Path

from benchmarks.common import (RESULTS, THREADS, work, Run, ensure_bundle, md_table, median, model_name, percentile,
                               plt, run_child)

NAME = "swap"
BACKENDS = ("ort-training", "portable", "executorch")


def _batch(s, n: int = 8):
    from edgepeft.cli.datasets import bbc_news, user_split

    train, _ = user_split(bbc_news(s.manifest.labels), n_train=n, n_test=0, seed=3)
    return s.encoder.batch(train)


def child_edgepeft(backend: str, tiny: bool, swaps: int, reopens: int) -> dict:
    from edgepeft.runtime import OptimizerSpec, Session

    bundle = ensure_bundle(backend, "int8", tiny)
    store = work() / f"swap-store-{backend}{'-tiny' if tiny else ''}"
    shutil.rmtree(store, ignore_errors=True)
    kw = dict(store=store, cache_dir=work() / "cache", threads=THREADS, backend=backend, optimizer=OptimizerSpec(lr=3e-3))
    s = Session.open(bundle, adapter="a", **kw)
    b = _batch(s)
    s.train_step(b)  # non-trivial adapters, each with optimizer state
    s.save_adapter()
    s.swap_adapter("b", create=True)
    s.train_step(b)
    s.save_adapter()
    names = ["a", "b"]
    times = []
    for i in range(swaps):
        t = time.perf_counter()
        s.swap_adapter(names[i % 2])
        times.append(time.perf_counter() - t)
    s.close()
    reopen = []
    for i in range(reopens):  # the alternative without hot swap: a new session per adapter
        t = time.perf_counter()
        s = Session.open(bundle, adapter=names[i % 2], **kw)
        reopen.append(time.perf_counter() - t)
        s.close()
    return {"swap_s": times, "reopen_s": reopen, "torch_loaded": "torch" in sys.modules}


def child_peft(tiny: bool, swaps: int, loads: int) -> dict:
    import torch

    torch.set_num_threads(THREADS)
    import peft

    from benchmarks.hf import hf_model, lora_config

    folder = work() / f"swap-peft{'-tiny' if tiny else ''}"
    shutil.rmtree(folder, ignore_errors=True)
    pm = peft.get_peft_model(hf_model(tiny), lora_config(), adapter_name="a")
    pm.add_adapter("b", lora_config())
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # non-trivial values in both adapters
        for n, p in pm.named_parameters():
            if ".a." in n or ".b." in n or n.endswith((".a", ".b")):
                p.add_(torch.randn(p.shape, generator=g) * 0.01)
    pm.save_pretrained(folder)  # adapter "a" at folder/, "b" at folder/b/
    names = ["a", "b"]
    times = []
    for i in range(swaps):
        t = time.perf_counter()
        pm.set_adapter(names[i % 2])
        times.append(time.perf_counter() - t)
    load = []
    src = folder / "b" if (folder / "b").is_dir() else folder
    for i in range(loads):
        t = time.perf_counter()
        pm.load_adapter(str(src), adapter_name=f"x{i}")
        pm.set_adapter(f"x{i}")
        load.append(time.perf_counter() - t)
        pm.set_adapter("a")
        pm.delete_adapter(f"x{i}")
    return {"set_adapter_s": times, "load_adapter_s": load, "torch_loaded": True}


def _stats(xs: list[float]) -> dict:
    ms = [1e3 * x for x in xs]
    return {"p50_ms": percentile(ms, 50), "p99_ms": percentile(ms, 99), "n": len(ms), "max_ms": max(ms)}


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(prog="python -m benchmarks swap")
    ap.add_argument("--swaps", type=int, default=200)
    ap.add_argument("--reopens", type=int, default=8)
    ap.add_argument("--loads", type=int, default=20)
    ap.add_argument("--reps", type=int, default=1, help="processes per configuration (interleaved)")
    ap.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--child")
    a = ap.parse_args(argv)
    if a.child:
        r = (child_peft(a.tiny, a.swaps, a.loads) if a.child == "peft"
             else child_edgepeft(a.child, a.tiny, a.swaps, a.reopens))
        print(json.dumps(r))
        return
    run = Run(NAME, argv)
    configs = [*a.backends, "peft"]
    raw: dict[str, list[dict]] = {c: [] for c in configs}
    errors: dict[str, str] = {}
    for _ in range(a.reps):
        for c in configs:
            if c in errors:
                continue
            try:
                raw[c].append(run_child("benchmarks.swap", ["--child", c, "--swaps", str(a.swaps), "--reopens",
                                                            str(a.reopens), "--loads", str(a.loads),
                                                            *(["--tiny"] if a.tiny else [])], timeout=3600))
            except Exception as e:
                errors[c] = (str(e).strip().splitlines() or [type(e).__name__])[-1][:400]
                traceback.print_exc()
    rows: dict[str, dict] = {}
    for c in a.backends:
        if not raw[c]:
            rows[f"edgepeft swap_adapter ({c})"] = {"ran": False, "error": errors.get(c, "")}
            continue
        rows[f"edgepeft swap_adapter ({c})"] = {"ran": True, **_stats([x for r in raw[c] for x in r["swap_s"]])}
        rows[f"reopen Session with the other adapter ({c})"] = {"ran": True, **_stats([x for r in raw[c] for x in r["reopen_s"]])}
    if raw["peft"]:
        rows["HF PEFT set_adapter (both in memory)"] = {"ran": True, **_stats([x for r in raw["peft"] for x in r["set_adapter_s"]])}
        rows["HF PEFT load_adapter from disk + set_adapter"] = {"ran": True, **_stats([x for r in raw["peft"] for x in r["load_adapter_s"]])}
    else:
        rows["HF PEFT"] = {"ran": False, "error": errors.get("peft", "")}
    targets = {}
    for c in a.backends:
        sw, ro = rows.get(f"edgepeft swap_adapter ({c})"), rows.get(f"reopen Session with the other adapter ({c})")
        if sw and sw["ran"]:
            targets[c] = {"swap_p50_ms": sw["p50_ms"], "p50_under_1ms": sw["p50_ms"] < 1.0,
                          "reopen_over_swap": ro["p50_ms"] / sw["p50_ms"], "at_least_100x": ro["p50_ms"] / sw["p50_ms"] >= 100}
    md = md_table(["method", "p50 (ms)", "p99 (ms)", "n"],
                  [[k, f"{r['p50_ms']:.3f}", f"{r['p99_ms']:.3f}", r["n"]] if r["ran"] else [k, "not run", r["error"][:200], ""]
                   for k, r in rows.items()])
    md += "\n\n" + md_table(["backend", "swap p50 < 1 ms", "reopen / swap (p50), target >= 100x"],
                            [[c, f"{'yes' if t['p50_under_1ms'] else 'NO'} ({t['swap_p50_ms']:.3f} ms)",
                              f"{t['reopen_over_swap']:.0f}x ({'met' if t['at_least_100x'] else 'NOT met'})"]
                             for c, t in targets.items()])
    md += (f"\n\n{model_name(a.tiny)}, LoRA r8 (query, value) + head, int8 base, {THREADS} threads; "
           f"{a.swaps} swaps alternating between two trained adapters, {a.reopens} reopens, {a.loads} PEFT loads, "
           f"{a.reps} process(es) per configuration.")
    run.write({"model": model_name(a.tiny), "rows": rows, "targets": targets, "raw": raw}, md, a.out)
    _plot(rows, a.out / f"{NAME}.png")
    print(md)
    return a.out / f"{NAME}.json"


def _plot(rows: dict, path: Path) -> None:
    pyplot = plt()
    ok = {k: r for k, r in rows.items() if r["ran"]}
    fig, ax = pyplot.subplots(figsize=(8, 0.45 * len(ok) + 1.4))
    ys = range(len(ok))
    ax.barh([y - 0.2 for y in ys], [r["p50_ms"] for r in ok.values()], 0.4, label="p50")
    ax.barh([y + 0.2 for y in ys], [r["p99_ms"] for r in ok.values()], 0.4, label="p99")
    ax.set_yticks(list(ys))
    ax.set_yticklabels(list(ok), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("latency (ms, log scale)")
    ax.axvline(1.0, color="black", lw=0.8, ls="--")
    ax.invert_yaxis()
    ax.legend(fontsize=8)
    ax.set_title("Adapter swap latency", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot.close(fig)


if __name__ == "__main__":
    main()
