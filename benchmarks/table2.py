"""The survey's Table 2 ("Revisiting Fine-Tuning", 2025) reproduced on this SDK: full fine-tuning,
bottleneck adapters, LoRA, prefix tuning, prompt tuning and BitFit on BBC News with MiniLM and
on MNIST with EfficientNet-Lite0, one fixed training budget, held-out test sets.

Protocol (the same for every method): one fixed budget of STEPS steps of BATCH examples (the
same batches, in the same order); AdamW; three learning rates per method, the one with the
best validation accuracy chosen; the test split is evaluated once, for the chosen run only.
PEFT methods train with edgepeft (exported bundle, int8 frozen base, ort-training runtime);
full fine-tuning has no edgepeft equivalent and trains in eager PyTorch (fp32) on the same
model, batches and steps. Every PEFT method trains the fresh task head alongside.

    python -m benchmarks table2 [--tiny] [--seeds 1] [--only bbc|mnist]"""
from __future__ import annotations

import argparse
import copy
import math
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from benchmarks.common import RESULTS, THREADS, work, Run, md_table, plt, set_threads

NAME = "table2"
METHODS = ("full", "bottleneck", "lora", "prefix", "prompt", "bitfit")
LABEL = {"full": "full fine-tuning", "bottleneck": "bottleneck adapters (Houlsby)", "lora": "LoRA",
         "prefix": "prefix tuning", "prompt": "prompt tuning", "bitfit": "BitFit"}
# The survey's Table 2: accuracy relative to full fine-tuning (%), trainable parameters (% of base).
SURVEY = {"full": (100, "100"), "bottleneck": (98, "3-5"), "lora": (98, "0.5-1"), "prefix": (95, "0.1-0.3"),
          "prompt": (92, "0.01-0.1"), "bitfit": (94, "0.01-0.1")}
# Three learning rates per method (the same search budget for all), each grid where that
# method's literature trains: full fine-tuning low, soft prompts high.
LRS = {"full": (3e-5, 1e-4, 3e-4), "bottleneck": (1e-3, 3e-3, 1e-2), "lora": (1e-3, 3e-3, 1e-2),
       "bitfit": (1e-3, 3e-3, 1e-2), "prefix": (3e-3, 1e-2, 3e-2), "prompt": (3e-3, 1e-2, 3e-2)}


@dataclass(frozen=True)
class Task:
    name: str
    title: str
    source: Callable[[], Any]          # () -> ModelSource, the same initial weights every call
    head: str
    lora_targets: tuple[str, ...]
    adapter_size: int
    n_tokens: int
    n_train: int
    n_val: int
    n_test: int
    steps: int
    batch: int
    notes: str = ""
    extra: dict = field(default_factory=dict)


def specs(method: str, t: Task) -> list:
    from edgepeft.specs import BitFitSpec, BottleneckSpec, LoraSpec, PrefixSpec, PromptSpec, SelectiveSpec

    head = SelectiveSpec(modules=(t.head,))
    return {
        "bottleneck": lambda: [BottleneckSpec(kind="houlsby", size=t.adapter_size), head],
        "lora": lambda: [LoraSpec(rank=8, alpha=16, targets=t.lora_targets, modules_to_save=(t.head,))],
        "prefix": lambda: [PrefixSpec(n_tokens=t.n_tokens), head],
        "prompt": lambda: [PromptSpec(n_tokens=t.n_tokens, init="text", init_text="the topic of this news article is"),
                           head],
        "bitfit": lambda: [BitFitSpec(pattern=rf"^(?!{t.head}$).+$"), head],
    }[method]()


def tasks(tiny: bool) -> dict[str, Task]:
    from edgepeft.exporters import load_model

    from benchmarks.data import DIGITS, efficientnet_lite0_at

    from edgepeft.exporters.zoo import BBC_TOPICS

    if tiny:
        return {
            "bbc": Task("bbc", "BBC News (tiny-encoder)", lambda: load_model("tiny-encoder", labels=BBC_TOPICS), "classifier",
                        ("query", "value"), 8, 2, 20, 10, 10, 2, 4),
            "mnist": Task("mnist", "MNIST (tiny-cnn)", lambda: load_model("tiny-cnn", labels=DIGITS), "_fc",
                          ("_expand_conv", "_project_conv"), 8, 2, 20, 10, 10, 2, 4, extra={"size": 32}),
        }
    seq, size = 64, 64
    return {
        "bbc": Task("bbc", f"BBC News, 5 topics, MiniLM-L6 ({seq} tokens)",
                    lambda: load_model("minilm", labels=BBC_TOPICS, max_length=seq), "classifier", ("query", "value"),
                    64, 10, 250, 100, 250, 60, 8, extra={"seq": seq}),
        "mnist": Task("mnist", f"MNIST, EfficientNet-Lite0 ImageNet weights ({size}x{size} RGB)",
                      lambda: efficientnet_lite0_at(size, DIGITS), "_fc", ("_expand_conv", "_project_conv"),
                      64, 10, 300, 200, 500, 60, 16, extra={"size": size}),
    }


# -- data ---------------------------------------------------------------------------------------

def _order(n: int, steps: int, batch: int, seed: int) -> list[list[int]]:
    """``steps`` batches of ``batch`` indices: epochs of fresh seeded shuffles, concatenated."""
    flat: list[int] = []
    epoch = 0
    while len(flat) < steps * batch:
        idx = list(range(n))
        random.Random(seed * 1000 + epoch).shuffle(idx)
        flat += idx
        epoch += 1
    return [flat[i * batch:(i + 1) * batch] for i in range(steps)]


def make_batches(t: Task, encoder, seed: int) -> dict[str, list]:
    """train (``steps`` batches), val and test batches (Batch objects) for the task."""
    from edgepeft.data import Batch
    from edgepeft.cli.datasets import bbc_news

    from benchmarks.data import mnist_rgb, three_way_split

    if t.name == "bbc":
        ex = bbc_news()
        tr, va, te = three_way_split([e.label for e in ex], n_train=t.n_train, n_val=t.n_val, n_test=t.n_test, seed=7)
        pick = lambda idx: encoder.batch([ex[i] for i in idx])  # noqa: E731
    else:
        x, y = mnist_rgb(t.extra["size"])
        tr, va, te = three_way_split(list(y), n_train=t.n_train, n_val=t.n_val, n_test=t.n_test, seed=7)
        pick = lambda idx: Batch({"pixel_values": x[idx]}, y[idx])  # noqa: E731
    chunks = lambda idx: [pick(idx[i:i + 32]) for i in range(0, len(idx), 32)]  # noqa: E731
    return {"train": [pick([tr[i] for i in b]) for b in _order(len(tr), t.steps, t.batch, seed)],
            "val": chunks(va), "test": chunks(te)}


# -- training -------------------------------------------------------------------------------------

def run_peft(t: Task, method: str, seed: int, folder: Path, data_for) -> dict:
    from edgepeft.errors import EdgePeftError
    from edgepeft.exporters import export_bundle
    from edgepeft.runtime import NumericalError, OptimizerSpec, Session

    bundle = folder / f"{t.name}-{method}.edgepeft"
    t0 = time.time()
    try:
        res = export_bundle(t.source(), methods=specs(method, t), quant="int8", out=bundle, backends=("ort-training",))
    except EdgePeftError as e:
        return {"supported": False, "reason": f"{type(e).__name__}: {str(e).splitlines()[0]}"}
    m = res.manifest
    del res
    export_s = time.time() - t0
    store, cache = folder / f"{t.name}-{method}.store", folder / "cache"
    shutil.rmtree(store, ignore_errors=True)
    head_params = sum(math.prod(x.shape) for x in m.trainable if x.method in ("selective", "modules_to_save"))
    out = {"supported": True, "export_s": export_s, "base_params": m.base_params, "trainable_params": m.trainable_params,
           "method_params": m.trainable_params - head_params, "runs": []}
    best = None
    for lr in LRS[method]:
        name = f"lr{lr:g}".replace(".", "p").replace("-", "m")
        s = Session.open(bundle, adapter=name, store=store, cache_dir=cache, threads=THREADS, backend="ort-training",
                         optimizer=OptimizerSpec(lr=lr))
        data = data_for(s)
        t1 = time.time()
        losses, diverged = [], False
        try:
            for b in data["train"]:
                losses.append(s.train_step(b))
        except NumericalError:
            diverged = True
        train_s = time.time() - t1
        val = s.evaluate(data["val"])
        s.save_adapter()
        s.close()
        run = {"lr": lr, "val_acc": val.accuracy, "val_loss": val.loss, "first_loss": losses[0] if losses else None,
               "last_loss": losses[-1] if losses else None, "diverged": diverged, "train_s": train_s,
               "step_s": train_s / max(len(losses), 1)}
        out["runs"].append(run)
        if best is None or (val.accuracy, -val.loss) > (best[1]["val_acc"], -best[1]["val_loss"]):
            best = (name, run)
    s = Session.open(bundle, adapter=best[0], store=store, cache_dir=cache, threads=THREADS, backend="ort-training")
    test = s.evaluate(data_for(s)["test"])  # once, for the chosen run only
    s.close()
    out.update(chosen_lr=best[1]["lr"], val_acc=best[1]["val_acc"], test_acc=test.accuracy, test_n=test.n)
    return out


def run_full(t: Task, seed: int, data: dict) -> dict:
    import torch
    import torch.nn.functional as F

    def feeds(b):
        return [torch.from_numpy(v) for v in b.feeds.values()]

    def evaluate(model, batches):
        correct = n = 0
        loss = 0.0
        with torch.no_grad():
            for b in batches:
                logits = model(*feeds(b))
                y = torch.from_numpy(b.labels)
                loss += F.cross_entropy(logits, y, reduction="sum").item()
                correct += int((logits.argmax(-1) == y).sum())
                n += len(y)
        return correct / n, loss / n

    base = t.source().model
    out = {"supported": True, "base_params": sum(p.numel() for p in base.parameters()), "runs": []}
    out["trainable_params"] = out["method_params"] = out["base_params"]
    best = None
    for lr in LRS["full"]:
        model = copy.deepcopy(base).eval()  # eval: no dropout, as the exported training graphs
        for p in model.parameters():
            p.requires_grad_(True)
        opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
        t1 = time.time()
        losses = []
        for b in data["train"]:
            opt.zero_grad()
            loss = F.cross_entropy(model(*feeds(b)), torch.from_numpy(b.labels))
            loss.backward()
            opt.step()
            losses.append(loss.item())
        train_s = time.time() - t1
        acc, vloss = evaluate(model, data["val"])
        diverged = not all(math.isfinite(x) for x in losses)
        run = {"lr": lr, "val_acc": acc, "val_loss": vloss, "first_loss": losses[0], "last_loss": losses[-1],
               "diverged": diverged, "train_s": train_s, "step_s": train_s / len(losses)}
        out["runs"].append(run)
        if best is None or (acc, -vloss) > (best[1]["val_acc"], -best[1]["val_loss"]):
            best = (model, run)
        else:
            del model
    acc, _ = evaluate(best[0], data["test"])
    out.update(chosen_lr=best[1]["lr"], val_acc=best[1]["val_acc"], test_acc=acc,
               test_n=sum(len(b.labels) for b in data["test"]))
    return out


def run_task(t: Task, seed: int, folder: Path, record: Callable[[], None], results: dict,
             methods: list[str]) -> None:
    cache: dict[str, dict] = {}

    def data_for(session) -> dict:
        if "d" not in cache:  # built once, from the first bundle's own encoder (same tokenizer for all)
            cache["d"] = make_batches(t, session.encoder if t.name == "bbc" else None, seed)
        return cache["d"]

    order = [m for m in METHODS if m != "full" and m in methods] + ["full"] * ("full" in methods)
    # (full fine-tuning last: it reuses the batches the first bundle's encoder made)
    for method in order:
        t0 = time.time()
        if method == "full":
            if "d" not in cache:
                raise RuntimeError("no PEFT bundle opened: nothing built the batches")
            r = run_full(t, seed, cache["d"])
        else:
            r = run_peft(t, method, seed, folder, data_for)
        r["seconds"] = time.time() - t0
        results[t.name]["seeds"].setdefault(str(seed), {})[method] = r
        print(f"[table2] {t.name} seed {seed} {method}: " + (
            f"test {r['test_acc']:.3f} (val {r['val_acc']:.3f}, lr {r['chosen_lr']:g}), {r['seconds']:.0f} s"
            if r["supported"] else f"unsupported ({r['reason'][:120]})"), flush=True)
        record()


def summarize(results: dict) -> dict:
    """Per task and method: mean test accuracy over seeds, relative to full fine-tuning."""
    for tr in results.values():
        rows = {}
        for method in METHODS:
            rs = [s[method] for s in tr["seeds"].values() if method in s]
            if not rs:
                continue
            if not rs[0]["supported"]:
                rows[method] = {"supported": False, "reason": rs[0]["reason"]}
                continue
            acc = float(np.mean([r["test_acc"] for r in rs]))
            rows[method] = {"supported": True, "test_acc": acc, "seeds": len(rs),
                            "chosen_lrs": [r["chosen_lr"] for r in rs],
                            "pct_params_method": 100 * rs[0]["method_params"] / rs[0]["base_params"],
                            "pct_params_with_head": 100 * rs[0]["trainable_params"] / rs[0]["base_params"],
                            "step_s": float(np.median([x["step_s"] for r in rs for x in r["runs"]]))}
        full = rows.get("full", {}).get("test_acc")
        for r in rows.values():
            if r.get("supported") and full:
                r["relative_pct"] = 100 * r["test_acc"] / full
        tr["summary"] = rows
    return results


def markdown(results: dict) -> str:
    out = []
    for tr in results.values():
        out.append(f"**{tr['title']}**: {tr['budget']}\n")
        rows = []
        for method in METHODS:
            r = tr.get("summary", {}).get(method)
            if r is None:
                continue
            sv, sp = SURVEY[method]
            if not r["supported"]:
                rows.append([LABEL[method], "not supported", "", "", "", f"{sv}%", f"{sp}%"])
                continue
            rows.append([LABEL[method], f"{r['test_acc']:.3f}", f"{r.get('relative_pct', float('nan')):.0f}%",
                         f"{r['pct_params_method']:.3g}% ({r['pct_params_with_head']:.3g}%)",
                         ", ".join(f"{x:g}" for x in r["chosen_lrs"]), f"{sv}%", f"{sp}%"])
        out.append(md_table(["method", "test accuracy", "relative to full FT", "% params trained (with head)",
                             "chosen lr", "survey: relative", "survey: % params"], rows))
        unsupported = [f"{m}: {r['reason']}" for m, r in tr.get("summary", {}).items() if not r["supported"]]
        if unsupported:
            out.append("\nNot supported on this model (no slot or site for the method): " + "; ".join(unsupported))
        out.append("")
    return "\n".join(out)


def plot(results: dict, path: Path) -> None:
    pyplot = plt()
    fig, axes = pyplot.subplots(1, 2, figsize=(11, 5))
    methods = [m for m in METHODS if m != "full"]
    xs = np.arange(len(methods))
    width = 0.8 / (len(results) + 1)
    for k, (name, tr) in enumerate(results.items()):
        summ = tr.get("summary", {})
        rel = [summ.get(m, {}).get("relative_pct", np.nan) for m in methods]
        pct = [summ.get(m, {}).get("pct_params_method", np.nan) for m in methods]
        axes[0].bar(xs + k * width, rel, width, label=tr["title"].split(",")[0] + " (measured)")
        axes[1].bar(xs + k * width, pct, width, label=tr["title"].split(",")[0] + " (measured)")
        for x, m in zip(xs, methods):
            if summ.get(m, {}).get("supported") is False:
                for ax, y in ((axes[0], 2), (axes[1], 0.012)):
                    ax.text(x + k * width, y, "not\nsupported", rotation=90, ha="center", va="bottom", fontsize=6)
            elif "relative_pct" in summ.get(m, {}):
                axes[0].text(x + k * width, rel[methods.index(m)] + 1, f"{rel[methods.index(m)]:.0f}", ha="center",
                             fontsize=6)
    k = len(results)
    axes[0].bar(xs + k * width, [SURVEY[m][0] for m in methods], width, label="survey", color="grey")
    lo_hi = [tuple(float(v) for v in SURVEY[m][1].split("-")) for m in methods]
    axes[1].bar(xs + k * width, [hi for _, hi in lo_hi], width, bottom=0, color="lightgrey", label="survey (upper end)")
    axes[1].bar(xs + k * width, [lo for lo, _ in lo_hi], width, color="grey", label="survey (lower end)")
    axes[0].set_ylabel("test accuracy, % of full fine-tuning")
    axes[0].axhline(100, color="black", lw=0.8, ls="--")
    axes[0].set_ylim(0, 115)
    axes[1].set_ylabel("trainable parameters, % of base (log)")
    axes[1].set_yscale("log")
    for ax in axes:
        ax.set_xticks(xs + width * len(results) / 2)
        ax.set_xticklabels(methods)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2)
    axes[0].set_title("Test accuracy relative to full fine-tuning", fontsize=9)
    axes[1].set_title("Trainable parameters, method only (head excluded)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot.close(fig)


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(prog="python -m benchmarks table2")
    ap.add_argument("--tiny", action="store_true", help="tiny models, 2 steps (the smoke test)")
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--only", choices=("bbc", "mnist"))
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    ap.add_argument("--out", type=Path, default=RESULTS)
    a = ap.parse_args(argv)
    run = Run(NAME, argv)
    set_threads()
    folder = work() / ("table2-tiny" if a.tiny else "table2")
    folder.mkdir(parents=True, exist_ok=True)
    ts = tasks(a.tiny)
    if a.only:
        ts = {a.only: ts[a.only]}
    results = {n: {"title": t.title, "budget": (
        f"{t.steps} steps of batch {t.batch} (AdamW), {t.n_train} train / {t.n_val} validation / {t.n_test} test "
        f"examples, 3 learning rates per method chosen on validation, {a.seeds} seed(s)"),
        "config": {"steps": t.steps, "batch": t.batch, "n_train": t.n_train, "n_val": t.n_val, "n_test": t.n_test,
                   "adapter_size": t.adapter_size, "virtual_tokens": t.n_tokens, "lora_rank": 8,
                   "lora_targets": list(t.lora_targets), **t.extra, "lrs": LRS,
                   "peft_runtime": "edgepeft ort-training, int8 frozen base", "full_ft": "eager PyTorch fp32"},
        "seeds": {}} for n, t in ts.items()}

    def record() -> None:
        summarize(results)
        run.write({"tasks": results, "survey": SURVEY}, markdown(results), a.out)

    for seed in range(a.seeds):
        for t in ts.values():
            run_task(t, seed, folder, record, results, a.methods)
    record()
    plot(results, a.out / f"{NAME}.png")
    print(markdown(results))
    return a.out / f"{NAME}.json"


if __name__ == "__main__":
    main()
