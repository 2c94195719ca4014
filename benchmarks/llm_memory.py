"""LLM training memory, side by side in one run: edgepeft's lean backend (block-wise graphs,
chunked LM head, memory-mapped int8 weights), the same cut as ExecuTorch programs on XNNPACK
(executorch-lean, when the bundle carries it), edgepeft's portable backend on the SAME bundle
(today's whole-model gradient graph), and PyTorch eager + Hugging Face PEFT (transformers'
model from the same GGUF, fp32). LoRA r8 on q_proj/v_proj, AdamW, batch x seq tokens, 2
threads. Each configuration runs in its own fresh process; phases (open, train_step,
evaluate, infer) are measured as the process's resident high-water mark reset at each phase's
start, and the whole process's peak comes from the OS (wait4), imports included.

    python -m benchmarks llm_memory [--model smollm2-135m] [--batch 4 --seq 128 --steps 3]
        [--backends lean,executorch-lean,portable]"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

from benchmarks.common import RESULTS, THREADS, Run, md_table, median, plt, run_child, work

NAME = "llm_memory"
PHASES = ("open", "train_step", "evaluate", "infer")
CONFIGS = {
    "edgepeft lean (int8 base)": ("edgepeft", "lean"),
    "edgepeft executorch-lean (int8 base, XNNPACK)": ("edgepeft", "executorch-lean"),
    "edgepeft portable (int8 base, whole-model graph)": ("edgepeft", "portable"),
    "PyTorch eager + HF PEFT LoRA (fp32)": ("peft", ""),
}
# The ablation (--ablation): lean with one lever off at a time, on the same bundle.
ABLATION = {
    "lean, base resident (pages kept), head in one chunk (full logits)": ("edgepeft", "lean:resident:fullhead"),
    "lean, base resident (pages kept), chunked head": ("edgepeft", "lean:resident"),
    "lean, pages released per graph, head in one chunk (full logits)": ("edgepeft", "lean:fullhead"),
}
REFERENCE = "PyTorch eager + HF PEFT LoRA (fp32)"
# MiB and the phases each budget covers (issue 15: SmolLM2's train step, evaluate and infer in a
# Pi Zero 2 W; Gemma 3's LoRA training, whose infer returns 0.5 GB of logits by definition).
TARGETS = {"smollm2-135m": (320, ("train_step", "evaluate", "infer")), "gemma3-270m": (512, ("train_step",))}


def bundle(model: str, seq: int, backends: tuple[str, ...], batch: int) -> Path:
    fixed = f"-b{batch}" if "executorch-lean" in backends else ""  # its programs are built for one batch
    return work() / f"{model}-{seq}-lora-int8-{'-'.join(backends)}{fixed}.edgepeft"


def _mib(b: int) -> float:
    return round(b / 2**20, 1)


def _batch(manifest_or_vocab, batch: int, seq: int, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    vocab = manifest_or_vocab
    ids = rng.integers(4, min(vocab, 30000), size=(batch, seq))
    labels = np.full((batch, seq), -100, np.int64)
    labels[:, :-1] = ids[:, 1:]
    return ids, np.ones((batch, seq), np.int64), labels


def child_export(model: str, seq: int, backends: tuple[str, ...], batch: int) -> dict:
    from edgepeft.exporters import export_bundle, load_model
    from edgepeft.specs import LoraSpec

    t = time.time()
    out = bundle(model, seq, backends, batch)
    res = export_bundle(load_model(model, max_length=seq), methods=[LoraSpec(rank=8, alpha=16,
                        targets=("q_proj", "v_proj"))], quant="int8", out=out, backends=backends,
                        executorch_batch_size=batch)
    return {"seconds": time.time() - t, "bundle_mb": out.stat().st_size / 1e6,
            "members_mb": {k: round(v / 1e6, 2) for k, v in _member_sizes(out).items()},
            "trainable": res.manifest.trainable_params}


def _member_sizes(path: Path) -> dict[str, int]:
    import zipfile

    with zipfile.ZipFile(path) as z:
        return {i.filename: i.file_size for i in z.infolist()}


def _phases():
    """(peaks, times, phase): ``phase(name, fn)`` runs fn with the high-water mark reset and
    records its peak RSS and wall time."""
    from edgepeft.memory import peak_rss_bytes, reset_peak

    peaks: dict[str, int] = {}
    times: dict[str, list[float]] = {}

    def phase(name, fn):
        reset_peak()
        t = time.perf_counter()
        out = fn()
        times.setdefault(name, []).append(time.perf_counter() - t)
        peaks[name] = max(peaks.get(name, 0), peak_rss_bytes())
        return out

    return peaks, times, phase


def _ablate(s, flags: list[str]) -> None:
    from edgepeft.runtime import lean_head

    if "resident" in flags:
        s.backend.release_weights = False
    if "fullhead" in flags:
        lean_head.CHUNK = 1 << 30  # the whole vocabulary at once: (positions x vocab) logits


def child_edgepeft(model: str, backend: str, batch: int, seq: int, steps: int, path: Path) -> dict:
    from edgepeft.data import Batch
    from edgepeft.runtime import OptimizerSpec, Session

    peaks, times, phase = _phases()

    backend, *flags = backend.split(":")
    store = work() / f"llm-store-{model}-{backend}"
    shutil.rmtree(store, ignore_errors=True)
    s = phase("open", lambda: Session.open(path, adapter="bench", store=store, backend=backend,
                                           cache_dir=work() / "cache", threads=THREADS,
                                           optimizer=OptimizerSpec(lr=1e-3)))
    _ablate(s, flags)
    ids, mask, labels = _batch(s.manifest.outputs[0].shape[-1], batch, seq)
    b = Batch({"input_ids": ids, "attention_mask": mask}, labels)
    losses = [phase("train_step", lambda: s.train_step(b)) for _ in range(steps)]
    ev = phase("evaluate", lambda: s.evaluate([b]))
    phase("infer", lambda: s.infer(b.feeds))
    s.close()
    return {"peaks_mib": {k: _mib(v) for k, v in peaks.items()}, "seconds": times, "losses": losses,
            "eval_loss": ev.loss, "torch_loaded": "torch" in sys.modules}


def _hf_model(model: str):
    import transformers

    from edgepeft.exporters.zoo.gguf_loader import smollm2_gguf_path

    if model != "smollm2-135m":
        from edgepeft.exporters.zoo import gguf_gemma3  # noqa: F401  (the Gemma GGUF's path)

        path = gguf_gemma3.gemma3_gguf_path()
    else:
        path = smollm2_gguf_path()
    return transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                             torch_dtype="float32")


def child_peft(model: str, batch: int, seq: int, steps: int) -> dict:

    peaks, times, phase = _phases()

    def load():
        import peft
        import torch

        torch.set_num_threads(THREADS)
        m = peft.get_peft_model(_hf_model(model), peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                                 target_modules=["q_proj", "v_proj"]))
        return m, torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3)

    m, opt = phase("open", load)
    import torch
    import torch.nn.functional as F

    ids, mask, labels = (torch.from_numpy(x) for x in _batch(m.config.vocab_size, batch, seq))

    def step():
        opt.zero_grad()
        logits = m(input_ids=ids, attention_mask=mask).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
        loss.backward()
        opt.step()
        return float(loss)

    losses = [phase("train_step", step) for _ in range(steps)]
    with torch.no_grad():
        phase("evaluate", lambda: float(F.cross_entropy(m(input_ids=ids, attention_mask=mask).logits.reshape(
            -1, m.config.vocab_size), labels.reshape(-1), ignore_index=-100)))
        phase("infer", lambda: m(input_ids=ids, attention_mask=mask).logits)
    return {"peaks_mib": {k: _mib(v) for k, v in peaks.items()}, "seconds": times, "losses": losses,
            "torch_loaded": True}


def run(model: str, batch: int, seq: int, steps: int, reps: int, configs: dict, backends: tuple[str, ...]) -> dict:
    path = bundle(model, seq, backends, batch)
    if not path.exists():
        export = run_child("benchmarks.llm_memory", ["--child", "export", "--model", model, "--seq", str(seq),
                                                     "--batch", str(batch), "--backends", ",".join(backends)],
                           timeout=3600)
    else:
        export = {"reused": str(path), "members_mb": {k: round(v / 1e6, 2) for k, v in _member_sizes(path).items()}}
    results: dict[str, list] = {k: [] for k in configs}
    for _ in range(reps):  # interleaved, so that a noisy period hits every configuration
        for name, (kind, backend) in configs.items():
            args = ["--child", kind, "--model", model, "--batch", str(batch), "--seq", str(seq),
                    "--steps", str(steps), "--backends", ",".join(backends), *(["--backend", backend] if backend else [])]
            results[name].append(run_child("benchmarks.llm_memory", args, timeout=3600))
    return {"model": model, "batch": batch, "seq": seq, "steps": steps, "reps": reps, "export": export,
            "results": results, "summary": summarize(results, model)}


def _process_peak(r: dict) -> float:
    """The child's peak: wait4's ru_maxrss follows the high-water mark that each phase resets, so
    the phases' own peaks (which cover the child's life from its first phase on) count too."""
    return round(max(r["os_peak_rss_mib"], *r["peaks_mib"].values()), 1)


def summarize(results: dict[str, list], model: str) -> dict:
    ref_peak = max(_process_peak(r) for r in results[REFERENCE])
    ref_step = median([t for r in results[REFERENCE] for t in r["seconds"]["train_step"][1:]])
    out = {}
    for name, runs in results.items():
        peak = max(_process_peak(r) for r in runs)
        step = median([t for r in runs for t in r["seconds"]["train_step"][1:]])
        out[name] = {"process_peak_mib": peak, "vs_peft": round(peak / ref_peak, 3),
                     "phase_peaks_mib": {p: max(r["peaks_mib"][p] for r in runs) for p in PHASES},
                     "median_step_s": round(step, 3), "step_vs_peft": round(step / ref_step, 3),
                     "losses": runs[0]["losses"], "torch_loaded": runs[0]["torch_loaded"]}
    lean, today = out["edgepeft lean (int8 base)"], out.get("edgepeft portable (int8 base, whole-model graph)")
    if today:
        out["lean_vs_portable"] = {"step_time": round(lean["median_step_s"] / today["median_step_s"], 3),
                                   "process_peak": round(lean["process_peak_mib"] / today["process_peak_mib"], 3)}
    et = out.get("edgepeft executorch-lean (int8 base, XNNPACK)")
    if et:
        out["executorch_lean_vs_lean"] = {"step_time": round(et["median_step_s"] / lean["median_step_s"], 3),
                                          "process_peak": round(et["process_peak_mib"] / lean["process_peak_mib"], 3)}
    if model in TARGETS:
        budget, phases = TARGETS[model]
        worst = max(lean["phase_peaks_mib"][p] for p in phases)
        out["target"] = {"budget_mib": budget, "phases": list(phases), "lean_worst_phase_mib": worst,
                         "met": worst <= budget}
    return out


def markdown(doc: dict) -> str:
    s = doc["summary"]
    rows = [[name, *(v["phase_peaks_mib"][p] for p in PHASES), v["process_peak_mib"], f"{v['vs_peft']:.2f}x",
             v["median_step_s"], f"{v['step_vs_peft']:.2f}x", "yes" if v["torch_loaded"] else "no"]
            for name, v in s.items() if name in CONFIGS or name in ABLATION]
    md = (f"{doc['model']}, LoRA r8 q/v, AdamW, batch {doc['batch']} x {doc['seq']} tokens, {THREADS} threads, "
          f"{doc['reps']} process(es) per configuration x {doc['steps']} steps (first untimed). Peak RSS in MiB.\n\n")
    md += md_table(["configuration", *PHASES, "process peak", "vs PEFT", "median step (s)", "step vs PEFT",
                    "torch in process"], rows)
    if "lean_vs_portable" in s:
        lv = s["lean_vs_portable"]
        md += (f"\nlean / portable on the same bundle: step time {lv['step_time']:.2f}x, process peak "
               f"{lv['process_peak']:.2f}x\n")
    if "executorch_lean_vs_lean" in s:
        e = s["executorch_lean_vs_lean"]
        md += (f"\nexecutorch-lean / lean on the same bundle: step time {e['step_time']:.2f}x, process peak "
               f"{e['process_peak']:.2f}x\n")
    if "target" in s:
        t = s["target"]
        md += (f"\ntarget: {', '.join(t['phases'])} each <= {t['budget_mib']} MiB: lean's worst of them "
               f"{t['lean_worst_phase_mib']} MiB -> {'met' if t['met'] else 'NOT met'}\n")
    return md


def plot(doc: dict, path: Path) -> None:
    from edgepeft.devices import load as load_devices

    p = plt()
    fig, ax = p.subplots(figsize=(9, 4.5))
    names_ = [n for n in CONFIGS if n in doc["summary"]]
    width = 0.8 / len(names_)
    for i, name in enumerate(names_):
        vals = [doc["summary"][name]["phase_peaks_mib"][ph] for ph in PHASES]
        ax.bar([j + i * width for j in range(len(PHASES))], vals, width, label=name)
    budgets: dict[float, list[str]] = {}
    for d in load_devices(()).values():  # devices with one budget share one labelled line
        budgets.setdefault(round(d.budget / 2**20), []).append(d.name)
    top = max(v for name in names_ for v in doc["summary"][name]["phase_peaks_mib"].values())
    for mib, devs in sorted(budgets.items()):
        if mib < 1.3 * top:
            ax.axhline(mib, ls="--", lw=0.8, color="grey")
            ax.text(len(PHASES) - 0.4, mib, f"{', '.join(devs)} {mib:.0f}", fontsize=7, va="bottom", ha="right")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(PHASES))], PHASES)
    ax.set_ylabel("peak RSS of the process (MiB)")
    ax.set_title(f"{doc['model']} LoRA training, batch {doc['batch']} x {doc['seq']}: memory per phase")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks llm_memory")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--child", choices=["export", "edgepeft", "peft"])
    ap.add_argument("--backend", default="lean")
    ap.add_argument("--ablation", action="store_true", help="also run lean with one lever off at a time")
    ap.add_argument("--backends", default="lean,portable",
                    help="graphs in the bundle (lean,portable; lean alone skips today's graph, e.g. for Gemma 3)")
    a = ap.parse_args(argv)
    backends = tuple(a.backends.split(","))
    if a.child == "export":
        res = child_export(a.model, a.seq, backends, a.batch)
    elif a.child == "edgepeft":
        res = child_edgepeft(a.model, a.backend, a.batch, a.seq, a.steps, bundle(a.model, a.seq, backends, a.batch))
    elif a.child == "peft":
        res = child_peft(a.model, a.batch, a.seq, a.steps)
    else:
        run_ = Run(NAME, argv if argv is not None else sys.argv[2:])
        run_.name = f"{NAME}_{a.model}"  # one results file per model
        configs = {k: v for k, v in {**CONFIGS, **(ABLATION if a.ablation else {})}.items()
                   if v[0] != "edgepeft" or v[1].split(":")[0] in backends}
        doc = run(a.model, a.batch, a.seq, a.steps, a.reps, configs, backends)
        path = run_.write(doc, markdown(doc))
        plot(doc, path.with_suffix(".png"))
        print((RESULTS / f"{NAME}_{a.model}.md").read_text())
        return 0
    print(json.dumps(res, default=float))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    sys.exit(main())
