"""What the examples share: flags, the host-side export, feeding a user's samples to a
Personalizer as they arrive, and printing rounds and before/after figures."""
from __future__ import annotations

import argparse
import gc
import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from edgepeft.memory import fmt_bytes, rss_bytes
from edgepeft.provenance import machine, write_results

RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "examples"
_RESULTS: dict[Path, tuple[Path | None, str]] = {}
_START = machine()  # the machine and load when the example started


@dataclass(frozen=True)
class Sizes:
    """An example's knobs, full run or smoke run. Fixed in advance, never tuned on the test slice."""

    n_train: int           # samples the user produces on the device (the Personalizer sees these only)
    n_test: int            # the user's held-out test slice, reported before/after, never trained on
    every: int             # Personalizer trigger: a round per this many new samples
    steps: int             # optimizer steps per round
    batch: int = 8
    max_length: int = 64
    min_holdout: int = 4   # the guardrail's smallest held-out slice (smoke runs have few samples)


def parse_args(name: str, doc: str, argv: Sequence[str] | None, *, budget: str = "2GB",
               backend: str = "ort-training") -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog=f"python -m examples.{name}", description=doc.strip().splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="a tiny run (few samples and steps) to check it works")
    ap.add_argument("--out", type=Path, default=Path("out/examples") / name, help="bundle, adapters and logs go here")
    ap.add_argument("--threads", type=int, default=2, help="ONNX Runtime threads")
    ap.add_argument("--budget", default=budget, help="the session's memory budget")
    ap.add_argument("--backend", default=backend, choices=("ort-training", "portable", "lean"))
    ap.add_argument("--results", type=Path, default=None,
                    help=f"the figures as JSON, with machine, versions and load (default for a full run: "
                         f"{RESULTS}/{name}.json; a smoke run writes none)")
    args = ap.parse_args(argv)
    if args.results is None and not args.smoke:
        args.results = RESULTS / f"{name}.json"
    # report() gets the output folder only: remember where this run's figures go (keyed by it).
    _RESULTS[args.out.resolve()] = (args.results, f"python -m examples.{name} " + " ".join(argv or sys.argv[1:]))
    return args


def fresh_dir(out: Path) -> Path:
    """The output folder, emptied of a previous run's adapters and logs (the bundle stays)."""
    out.mkdir(parents=True, exist_ok=True)
    for sub in ("adapters", "loop"):
        shutil.rmtree(out / sub, ignore_errors=True)
    return out


def export(out: Path, model: str, methods: list, *, backend: str, isolated: bool = False, **model_kw: Any) -> Path:
    """Export ``model`` from the zoo with ``methods`` (host side: needs torch). The bundle is
    remade on every run: exporting takes seconds and keeps the example honest. ``isolated``:
    in a child process, so that this process stays a device-side one (no torch) and its
    memory is the device's."""
    if isolated:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            return pool.submit(export, out, model, methods, backend=backend, **model_kw).result()
    from edgepeft.exporters import export_bundle, load_model

    t = time.perf_counter()
    path = out / f"{model}.edgepeft"
    res = export_bundle(load_model(model, **model_kw), methods=methods, out=path, backends=(backend,))
    m = res.manifest
    say(f"exported {model}: {m.trainable_params:,} trainable of {m.base_params:,} params, "
        f"{path.stat().st_size / 1e6:.1f} MB, in {time.perf_counter() - t:.1f} s")
    del res
    gc.collect()  # the eager model is not needed on the device side
    return path


def feed(p, user: str, samples: Sequence, chunk: int, *, final_round: bool = True) -> list:
    """Give ``user``'s samples to the Personalizer ``chunk`` at a time, as a device collects
    them; rounds run when its trigger fires (and once more on demand at the end, for samples
    that came in after the last trigger)."""
    rounds = []
    for i in range(0, len(samples), chunk):
        r = p.add(user, samples[i:i + chunk])
        if r is not None:
            rounds.append(r)
            show_round(r)
    if final_round and (not rounds or rounds[-1].last_seq < p.buffer(user).last_seq):
        rounds.append(p.personalize(user))
        show_round(rounds[-1])
    return rounds


def show_round(r) -> None:
    say(f"  {r.user} round {r.round} ({r.trigger}): {r.status}, {r.steps} steps on {r.n_train} samples, "
        f"{r.n_holdout} held out ({r.extra.get('holdout_slice', '-')}): {r.reason} [{r.seconds:.1f} s]")


def say(msg: str) -> None:
    print(msg, flush=True)


def rss() -> int:
    gc.collect()
    return rss_bytes()


def report(name: str, rows: list[tuple[str, str, str]], result: dict, out: Path, t0: float) -> dict:
    """Print the before/after table and write it as JSON beside the bundle."""
    w = max(len(r[0]) for r in rows)
    say(f"\n== {name}: before / after on the user's held-out test slice ==")
    for label, before, after in rows:
        say(f"  {label:<{w}}  {before:>10} -> {after}")
    result["seconds"] = round(time.perf_counter() - t0, 1)
    say(f"total {result['seconds']:.0f} s; memory now {fmt_bytes(rss())}")
    (out / "result.json").write_text(json.dumps(result, indent=2, default=str))
    results, command = _RESULTS.get(Path(out).resolve(), (None, ""))
    if results:
        figures = {"example": name, "printed": [list(r) for r in rows], **result, **_display_units(result)}
        say(f"figures written to {write_results(results, figures, command=command.strip(), start=_START)}")
    return result


def _display_units(result: dict) -> dict:
    """The figures as the README prints them, computed here rather than by the reader: memory
    in MiB (keys naming rss or peak, in bytes) and durations in ms (keys ending in _s)."""
    def mib(v):
        if isinstance(v, dict):
            return {k: mib(x) for k, x in v.items()}
        if isinstance(v, list):
            return [mib(x) for x in v]
        return round(v / 2**20, 1) if isinstance(v, (int, float)) else v

    out = {}
    for k, v in result.items():
        if ("rss" in k or "peak" in k) and not isinstance(v, (str, bool)):
            out[f"{k}_mib"] = mib(v)
        elif k.endswith("_s") and isinstance(v, list) and v:
            out[f"{k[:-2]}_mean_ms"] = round(1e3 * sum(v) / len(v), 1)
    return out


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t = time.perf_counter()
    v = fn()
    return v, time.perf_counter() - t
