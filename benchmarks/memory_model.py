"""The memory model against real measurements: for each model x backend x (batch, seq), the
predicted and measured peak of every phase and the error in %.

    python -m benchmarks.memory_model                # measure, report (JSON + markdown)
    python -m benchmarks.memory_model --fit          # also fit the backend constants

``--fit`` solves the per-backend constants of edgepeft/memory_model.py by least squares on the
CALIBRATION rows only (the tiny encoder, and MiniLM at two shapes) and prints them; every other
row (the tiny decoder, MiniLM's other shapes) is held out, and the report marks which is which.
``--backends lean``, ``executorch`` and ``executorch-lean`` fit their own models on calibration
sets of their own (LEAN_CALIBRATION, ET_CALIBRATION, ET_LEAN_CALIBRATION) and write
memory_model_<backends>.{json,md}. Each configuration is measured in its own fresh, torch-free
process; the results record the command, the machine, package versions and load average
(edgepeft.provenance) and the constants the fit solved."""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

from edgepeft import memory_model, provenance
from edgepeft.cli import profiler
from edgepeft.bundle import open_bundle

MODELS = {"tiny-encoder": ("query", "value"), "tiny-decoder": ("q_proj", "v_proj"), "minilm": ("query", "value"),
          "smollm2-135m": ("q_proj", "v_proj"), "gemma3-270m": ("q_proj", "v_proj")}
GRID = [(8, 128), (4, 128), (8, 64), (16, 64), (2, 128), (1, 32)]
# The LLMs are measured at the shapes issue 15 names and two smaller ones (each row costs a minute).
LLM_GRID = [(4, 128), (2, 64), (4, 64)]
LLMS = {"smollm2-135m", "gemma3-270m"}
CALIBRATION = {("tiny-encoder", b, s) for b, s in GRID} | {("minilm", 8, 128), ("minilm", 4, 128)}
# The lean backend's constants: one or two shapes of each kind of model (a tiny encoder, MiniLM,
# both LLMs at their smallest shape); every other row, the tiny decoder's included, is held out.
LEAN_CALIBRATION = {("tiny-encoder", 8, 64), ("tiny-encoder", 1, 32), ("minilm", 8, 64), ("smollm2-135m", 2, 64),
                    ("gemma3-270m", 2, 64)}
# ExecuTorch's batch is fixed at export, so its calibration takes MiniLM at two sequence
# lengths instead of two batches (its arena pages grow with the sequence, not the batch).
ET_CALIBRATION = {("tiny-encoder", b, s) for b, s in GRID} | {("minilm", 8, 128), ("minilm", 8, 64)}
# executorch-lean: the lean calibration's kinds of model at the programs' batch (8) or below it
# (padded to 8), MiniLM at two sequence lengths (the arena's pages grow with the sequence: without
# a second length its sequence and weight terms are not told apart); every other row is held out,
# those at batch 16 (two chunks) and the tiny decoder included.
ET_LEAN_CALIBRATION = {("tiny-encoder", 8, 64), ("tiny-encoder", 1, 32), ("minilm", 8, 64), ("minilm", 8, 128),
                       ("smollm2-135m", 2, 64)}
OUT = Path(__file__).parent / "results"


def export(name: str, folder: Path, backends: tuple[str, ...]) -> Path:
    from edgepeft.exporters import export_bundle, load_model
    from edgepeft.specs import LoraSpec

    path = folder / f"{name}-{'-'.join(backends)}.edgepeft"
    if path.exists():
        return path
    kw = {"max_length": 128} if name in LLMS else {} if name == "tiny-decoder" else {"labels": tuple("abcde")}
    src = load_model(name, **kw)
    head = ("classifier",) if src.task == "classification" else ()
    export_bundle(src, methods=[LoraSpec(rank=8, alpha=16.0, targets=MODELS[name], modules_to_save=head)], out=path,
                  quant="int8", backends=backends)
    return path


def run(models, backends, grid, folder: Path) -> list[dict]:
    rows = []
    for name in models:
        path = export(name, folder, tuple(backends))
        manifest = open_bundle(path).manifest
        for backend in backends:
            if backend not in manifest.backends:
                print(f"{name}: no {backend} graph, skipped")
                continue
            for batch, seq in (LLM_GRID if name in LLMS else grid):
                seq = min(seq, manifest.max_length)
                m = profiler.measure(path, backend=backend, batch=batch, seq=seq, threads=2)
                cal = _calibration(backend)
                planned = _planned(manifest, backend)
                rows.append({"model": name, "backend": backend, "batch": batch, "seq": seq, "measured": m["peaks"],
                             "planned": planned, "max_length": manifest.max_length,
                             "baseline": m["baseline"], "calibration": (name, batch, seq) in cal,
                             "card": manifest.memory, "trainable": manifest.trainable_params})
                print(name, backend, batch, seq, {k: v >> 20 for k, v in m["peaks"].items()}, flush=True)
    return rows


def _calibration(backend: str) -> set:
    return {"lean": LEAN_CALIBRATION, "executorch": ET_CALIBRATION,
            "executorch-lean": ET_LEAN_CALIBRATION}.get(backend, CALIBRATION)


def fit_lean(rows: list[dict]) -> dict:
    """The lean model's constants (edgepeft.memory_lean): each phase's excess over its exact
    byte terms, by least squares on the calibration rows."""
    from edgepeft import memory_lean

    cal = [r for r in rows if r["calibration"] and r["backend"] == "lean"]
    zero = memory_lean.LeanCosts(library=0, train_fixed=0, eval_fixed=0, swap_fixed=0, k_block=0.0, k_eval=0.0)
    one = memory_lean.LeanCosts(library=0, train_fixed=0, eval_fixed=0, swap_fixed=0, k_block=1.0, k_eval=1.0)
    preds = [(zero.predict(_manifest_like(r), batch=r["batch"], seq=r["seq"], trainable_params=r["trainable"]),
              one.predict(_manifest_like(r), batch=r["batch"], seq=r["seq"], trainable_params=r["trainable"]), r)
             for r in cal]
    library = float(np.median([r["measured"]["open"] - p0.phases["open"] for p0, _, r in preds]))

    def solve(phase: str) -> tuple[float, float]:
        a = np.array([[1.0, p1.phases[phase] - p0.phases[phase]] for p0, p1, _ in preds])
        y = np.array([r["measured"][phase] - p0.phases[phase] - library for p0, _, r in preds])
        return tuple(np.linalg.lstsq(a, y, rcond=None)[0])

    (t0, k_b), (e0, k_e) = solve("train_step"), solve("evaluate")
    s0 = np.median([r["measured"]["swap"] - p0.phases["swap"] - library for p0, _, r in preds])
    return {"library": int(library), "train_fixed": int(t0), "eval_fixed": int(e0), "swap_fixed": int(s0),
            "k_block": round(float(k_b), 3), "k_eval": round(float(k_e), 3)}


def fit_executorch_lean(rows: list[dict]) -> dict:
    """executorch-lean's constants (edgepeft.memory_lean.ExecutorchLeanCosts): the library from
    open; then one least squares over the calibration rows' train, evaluate and swap excesses
    over their exact byte terms: a fixed cost per phase and the arena's two factors, shared by
    the three phases (the arena is the same resident pages in all of them)."""
    from edgepeft import memory_lean

    cal = [r for r in rows if r["calibration"] and r["backend"] == "executorch-lean"]
    if not cal:
        return {}
    costs = [memory_lean.ExecutorchLeanCosts(library=0, train_fixed=0, eval_fixed=0, swap_fixed=0, k_hidden=a,
                                             k_weights=w) for a, w in ((0.0, 0.0), (1.0, 0.0), (0.0, 1.0))]
    at = lambda c, r: c.predict(_manifest_like(r), batch=r["batch"], seq=r["seq"],  # noqa: E731
                                trainable_params=r["trainable"]).phases
    preds = [([at(c, r) for c in costs], r) for r in cal]
    library = float(np.median([r["measured"]["open"] - p[0]["open"] for p, r in preds]))
    a, y = [], []
    for col, phase in enumerate(("train_step", "evaluate", "swap")):
        for (p0, p_h, p_w), r in preds:
            a.append([float(col == 0), float(col == 1), float(col == 2), p_h[phase] - p0[phase], p_w[phase] - p0[phase]])
            y.append(r["measured"][phase] - p0[phase] - library)
    t0, e0, s0, k_h, k_w = np.linalg.lstsq(np.array(a), np.array(y), rcond=None)[0]
    return {"library": int(library), "train_fixed": int(t0), "eval_fixed": int(e0), "swap_fixed": int(s0),
            "k_hidden": round(float(k_h), 3), "k_weights": round(float(k_w), 3)}


def _planned(manifest, backend: str) -> list[int] | None:
    """(batch, seq) a fixed-batch backend's programs were planned for (ExecuTorch), else None."""
    from edgepeft.backends import record

    setting = record(backend).caps.batch_setting
    return None if setting is None else [int(manifest.backends[backend].settings[setting]), manifest.max_length]


def fit_planned(rows: list[dict], backend: str) -> dict:
    """ExecuTorch's constants: its memory is planned at export for the program's batch, so the
    activation term is taken at that batch and the row's sequence (only touched pages count).
    Per phase on the calibration rows: open = library + k_w * frozen; train - open = t0 + k_d *
    dequantized + k_a * activations; evaluate - train = e0 + ew * frozen (the inference
    program's own weights; it shares the training program's arena)."""
    cal = [r for r in rows if r["calibration"] and r["backend"] == backend]
    if not cal:
        return {}
    mi = memory_model.INTERPRETER
    frozen = lambda r: r["card"]["frozen_bytes"]  # noqa: E731
    a = np.array([[1.0, frozen(r)] for r in cal])
    library, k_w = np.linalg.lstsq(a, np.array([r["measured"]["open"] - mi - 4 * r["trainable"] for r in cal]),
                                   rcond=None)[0]
    acts = lambda r: r["planned"][0] * float(np.polyval(r["card"]["activations_per_example"][::-1], r["seq"]))  # noqa: E731
    a = np.array([[1.0, r["card"]["dequant_fp32_bytes"], acts(r)] for r in cal])
    y = np.array([r["measured"]["train_step"] - r["measured"]["open"] - 16 * r["trainable"] for r in cal])
    t0, k_d, k_a = np.linalg.lstsq(a, y, rcond=None)[0]
    y = np.array([r["measured"]["evaluate"] - r["measured"]["train_step"] for r in cal])
    e0, ew = np.linalg.lstsq(np.array([[1.0, frozen(r)] for r in cal]), y, rcond=None)[0]
    return {"library": int(library), "k_weights": round(float(k_w), 3), "train_fixed": int(t0),
            "k_dequant": round(float(k_d), 3), "k_acts": round(float(k_a), 3), "e0": int(e0), "e1": 0.0,
            "eval_weights": round(float(ew), 3)}


def predict_row(r: dict):
    if r["backend"] == "lean":
        from edgepeft import memory_lean

        return memory_lean.COSTS.predict(_manifest_like(r), batch=r["batch"], seq=r["seq"],
                                         trainable_params=r["trainable"])
    return memory_model.predict(_manifest_like(r), backend=r["backend"], batch=r["batch"], seq=r["seq"])


def fit(rows: list[dict], backend: str) -> dict:
    """Least squares for each phase's increment over the previous one."""
    if backend == "lean":
        return fit_lean(rows)
    if backend == "executorch":
        return fit_planned(rows, backend)
    if backend == "executorch-lean":
        return fit_executorch_lean(rows)
    cal = [r for r in rows if r["calibration"] and r["backend"] == backend]
    if not cal:
        return {}
    mi = memory_model.INTERPRETER
    # open = interpreter + library + k_w * frozen + adapter
    a = np.array([[1.0, r["card"]["frozen_bytes"]] for r in cal])
    y = np.array([r["measured"]["open"] - mi - 4 * r["trainable"] for r in cal])
    library, k_w = np.linalg.lstsq(a, y, rcond=None)[0]
    # train - open = t0 + k_d * dequantized + k_a * activations + 4 * 4 * trainable
    acts = lambda r: r["batch"] * float(np.polyval(r["card"]["activations_per_example"][::-1], r["seq"]))  # noqa: E731
    a = np.array([[1.0, r["card"]["dequant_fp32_bytes"], acts(r)] for r in cal])
    y = np.array([r["measured"]["train_step"] - r["measured"]["open"] - 16 * r["trainable"] for r in cal])
    t0, k_d, k_a = np.linalg.lstsq(a, y, rcond=None)[0]
    # evaluate - train = e0 + e1 * batch * d(activations)/d(seq) * seq + ew * frozen (the
    # evaluation/inference session's own weights, where the backend opens one)
    per_pos = lambda r: r["batch"] * (r["card"]["activations_per_example"][1]  # noqa: E731
                                      + 2 * r["card"]["activations_per_example"][2] * r["seq"]) * r["seq"]
    a = np.array([[1.0, per_pos(r), r["card"]["frozen_bytes"]] for r in cal])
    y = np.array([r["measured"]["evaluate"] - r["measured"]["train_step"] for r in cal])
    e0, e1, ew = np.linalg.lstsq(a, y, rcond=None)[0]
    return {"library": int(library), "k_weights": round(float(k_w), 3), "train_fixed": int(t0), "k_dequant": round(float(k_d), 3),
            "k_acts": round(float(k_a), 3), "e0": int(e0), "e1": round(float(e1), 3),
            "eval_weights": round(float(ew), 3)}


def report(rows: list[dict]) -> tuple[list[dict], str]:
    from edgepeft.manifest import Manifest

    out, lines = [], ["| model | backend | batch x seq | set | " + " | ".join(memory_model.PHASES) + " |",
                      "|---|---|---|---|" + "---|" * len(memory_model.PHASES)]
    for r in rows:
        p = predict_row(r)
        err = {k: 100.0 * (p.phases[k] - v) / v for k, v in r["measured"].items()}
        out.append({k: r[k] for k in ("model", "backend", "batch", "seq", "calibration")}
                   | {"measured": r["measured"], "predicted": p.phases, "error_pct": err})
        cells = [f"{r['measured'][k] / 2**20:.0f} / {p.phases[k] / 2**20:.0f} ({err[k]:+.1f}%)"
                 for k in memory_model.PHASES]
        lines.append(f"| {r['model']} | {r['backend']} | {r['batch']} x {r['seq']} | "
                     f"{'fit' if r['calibration'] else 'held out'} | " + " | ".join(cells) + " |")
    del Manifest
    return out, "\n".join(lines)


class _manifest_like:  # noqa: N801 - just what predict() reads
    def __init__(self, r: dict):
        self.memory = r["card"]
        self.trainable_params = r["trainable"]
        self.max_length = r["seq"]
        self.inputs = [type("IO", (), {"shape": ("batch", "seq")})()]
        self.model_name = r["model"]
        if r.get("planned"):  # a fixed-batch backend reads its planned shape from the bundle
            from edgepeft.backends import record
            from edgepeft.manifest import BackendEntry

            self.max_length = r["max_length"]
            setting = record(r["backend"]).caps.batch_setting
            self.backends = {r["backend"]: BackendEntry({}, {setting: r["planned"][0]})}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--backends", default="ort-training,portable")
    ap.add_argument("--fit", action="store_true")
    ap.add_argument("--rows", type=Path, default=None, help="reuse measured rows (JSON) instead of measuring")
    ap.add_argument("--work", type=Path, default=Path("out/bench-memory"))
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    t, start = time.time(), provenance.machine()
    rows = (json.loads(a.rows.read_text()) if a.rows else
            run(a.models.split(","), a.backends.split(","), GRID, a.work))
    for r in rows:  # rows reused from an earlier run take today's calibration sets
        r["calibration"] = (r["model"], r["batch"], r["seq"]) in _calibration(r["backend"])
    (a.work / "rows.json").write_text(json.dumps(rows))
    fitted = {be: fit(rows, be) for be in a.backends.split(",")} if a.fit else {}
    for be, constants in fitted.items():
        print(be, constants)
    results, table = report(rows)
    write(a, results, table, fitted, start, time.time() - t)


def write(a: argparse.Namespace, results: list[dict], table: str, fitted: dict, start: dict, seconds: float) -> None:
    """memory_model[_<backends>].{json,md} with the command, the machine and its load at start
    and end (edgepeft.provenance), and the constants ``--fit`` solved (the report itself uses
    the ones in edgepeft/, which the fit's printout is pasted into)."""
    errs = [abs(e) for r in results for e in r["error_pct"].values()]
    held = [abs(e) for r in results if not r["calibration"] for e in r["error_pct"].values()]
    summary = {"max_abs_error_pct": round(max(errs), 1), "max_abs_error_pct_held_out": round(max(held or [0]), 1),
               "rows": len(results), "held_out_rows": sum(not r["calibration"] for r in results),
               "seconds": round(seconds, 1),
               "machine": {"machine": platform.machine(), "python": platform.python_version(),
                           "processor": platform.processor()}}
    # Other backends' rows go to files of their own (memory_model_lean.*, memory_model_executorch-lean.*).
    name = "memory_model" if a.backends == "ort-training,portable" else "memory_model_" + a.backends.replace(",", "_")
    command = "python -m benchmarks.memory_model " + " ".join(sys.argv[1:])
    doc = provenance.write_results(OUT / f"{name}.json", {"summary": summary, "fitted": fitted, "results": results},
                                   command=command, start=start)
    end = json.loads(doc.read_text())["loadavg_end"]
    md = (f"# Memory model: measured / predicted peak RSS (MiB) per phase, error in %\n\n"
          f"`{command}`: {start['date']}, {start['cpu_count']} cores ({start['cpu']}), {summary['machine']['machine']}, "
          f"Python {summary['machine']['python']}, load average {start['loadavg'][0]:.1f} at start, {end[0]:.1f} at "
          f"end; measured with 2 threads. Max |error|: {summary['max_abs_error_pct']}% "
          f"(held-out rows: {summary['max_abs_error_pct_held_out']}%).\n\n{table}\n")
    (OUT / f"{name}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
