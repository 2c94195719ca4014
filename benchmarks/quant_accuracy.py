"""What storing the frozen base small costs in accuracy: SmolLM2-135M with LoRA r8 on q/v
exported for the lean backend with quant none / int8 / int4 (and int4 with float32 block
scales, the ablation that decides float16), each reported with its bundle size, the size of
lean/weights.safetensors and the perplexity of held-out BBC News articles (48 texts of up to
128 tokens, ``Session.evaluate`` on the lean backend, no training). Each variant is exported and
evaluated in a fresh process.

It also requantizes the GGUF files' own weights to int4 (blocks of 32) and reports the error
per GGUF tensor type: Q4_1 and Q4_K blocks must come over exactly (the quantizer keeps the 4-bit
grid a block lies on), Q5_0 / Q6_K / Q8_0 ones lose precision.

    python -m benchmarks quant_accuracy [--model smollm2-135m] [--texts 48] [--seq 128] [--batch 8]"""
from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import time
import zipfile
from pathlib import Path

from benchmarks.common import THREADS, Run, md_table, run_child, work

NAME = "quant_accuracy"
# variant -> (quant, block scale dtype forced for int4 or None: the exporter's choice, embedding
# tables (and so a tied LM head) kept int8 in an int4 export). The last two are ablations.
VARIANTS = {"none (fp32)": ("none", None, False), "int8": ("int8", None, False), "int4": ("int4", None, False),
            "int4, float32 scales": ("int4", "float32", False),
            "int4, embedding/head int8": ("int4", None, True)}
TARGET_MB = 100  # issue 15: the SmolLM2 int4 bundle at or under 100 MB


def bundle_path(model: str, variant: str) -> Path:
    tag = "".join(c if c.isalnum() else "-" for c in variant).strip("-")
    return work() / f"quant-{model}-{tag}-lean.edgepeft"


def held_out_texts(n: int, seed: int = 0) -> list[str]:
    """``n`` BBC News articles drawn with a fixed seed across the five topics."""
    from edgepeft.cli.datasets import bbc_news

    articles = bbc_news()
    return [e.text for e in random.Random(seed).sample(articles, n)]


def child_variant(model: str, variant: str, seq: int, n_texts: int, batch: int) -> dict:
    import numpy as np
    import torch

    from edgepeft.data import Example
    from edgepeft.exporters import export_bundle, load_model
    from edgepeft.exporters import quantize
    from edgepeft.runtime import OptimizerSpec, Session
    from edgepeft.specs import LoraSpec

    quant, scale_dtype, int8_tables = VARIANTS[variant]
    src = load_model(model, max_length=seq)
    if scale_dtype:  # ablation: every int4 block scale and min in float32
        quantize.INT4_SCALE_DTYPE = np.dtype(scale_dtype).type
    if int8_tables:  # ablation: embedding tables fall back to int8 rows, as a weight off the blocks does
        tables = {tuple(m.weight.shape) for m in src.model.modules() if isinstance(m, torch.nn.Embedding)}
        fits = quantize.int4_fits
        quantize.int4_fits = lambda w: fits(w) and tuple(w.shape) not in tables
    out = bundle_path(model, variant)
    out.parent.mkdir(parents=True, exist_ok=True)
    t = time.time()
    res = export_bundle(src, methods=[LoraSpec(rank=8, alpha=16, targets=("q_proj", "v_proj"))], quant=quant,
                        out=out, backends=("lean",))
    export_s = time.time() - t
    errors = _weight_errors(src.model, res.reference)
    with zipfile.ZipFile(out) as z:
        members = {i.filename: i.file_size for i in z.infolist()}
    store = work() / f"quant-store-{out.stem}"
    shutil.rmtree(store, ignore_errors=True)
    s = Session.open(out, adapter="eval", store=store, backend="lean", cache_dir=work() / "cache", threads=THREADS,
                     optimizer=OptimizerSpec(lr=1e-3))
    texts = held_out_texts(n_texts)
    batches = [s.encoder.batch([Example(x) for x in texts[i:i + batch]]) for i in range(0, len(texts), batch)]
    t = time.time()
    ev = s.evaluate(batches)
    eval_s = time.time() - t
    check = {"lean": s.evaluate(batches[:1]).loss, "eager": _eager_loss(res, batches[0])}
    s.close()
    q = res.manifest.quantization
    return {"variant": variant, "quant": quant, "bundle_bytes": out.stat().st_size,
            "weights_bytes": members["lean/weights.safetensors"], "members": members,
            "scale_dtypes": q.get("scale_dtypes", []), "int4_tensors": len(q.get("int4_tensors", [])),
            "int8_tensors": len(q["tensors"]) - len(q.get("int4_tensors", [])),
            "eval_loss": ev.loss, "perplexity": math.exp(ev.loss), "eval_tokens": ev.n,
            "first_batch_loss_lean_vs_eager": check, "weight_error": errors,
            "export_s": round(export_s, 1), "eval_s": round(eval_s, 1)}


def _weight_errors(source, reference) -> dict:
    """Relative RMS error of the bundle's frozen weights (the reference's) against the source
    model's float32 ones: over all of them, and over the embedding tables alone."""
    import torch

    ref = {n.replace(".base_layer", ""): p for n, p in reference.named_parameters()}
    tables = {id(m.weight) for m in source.modules() if isinstance(m, torch.nn.Embedding)}
    sums = {"all": [0.0, 0.0], "embedding": [0.0, 0.0]}
    with torch.no_grad():
        for n, p in source.named_parameters():
            if n not in ref or ref[n].shape != p.shape:
                continue
            e, w = float((ref[n].double() - p.double()).square().sum()), float(p.double().square().sum())
            for k in ("all", "embedding") if id(p) in tables else ("all",):
                sums[k][0] += e
                sums[k][1] += w
    return {k: math.sqrt(e / w) if w else 0.0 for k, (e, w) in sums.items()}


def _eager_loss(res, batch) -> float:
    """The export's eager reference model (its weights are the bundle's, dequantized) on one
    batch: the lean backend's loss must match it."""
    import torch
    import torch.nn.functional as F

    with torch.no_grad():
        logits = res.reference(*(torch.from_numpy(batch.feeds[i.name]) for i in res.manifest.inputs))
        return float(F.cross_entropy(logits.flatten(0, 1), torch.from_numpy(batch.labels).flatten(),
                                     ignore_index=-100))


# -- the GGUF files' own weights, requantized ------------------------------------------------------
def _minmax_error(w) -> float:
    """Plain min/max over 15 steps per block (no grid search): the largest error."""
    import numpy as np

    x = w.reshape(-1, 32)
    lo, hi = x.min(-1, keepdims=True), x.max(-1, keepdims=True)
    s = (hi - lo) / 15
    q = np.clip(np.rint((x - lo) / np.where(s > 0, s, 1)), 0, 15)
    return float(np.abs(q * s + lo - x).max())


def gguf_check(which: str) -> dict:
    """Per GGUF tensor type: tensors, the largest |int4 - GGUF| weight error, the relative RMS
    error, the same largest error with plain min/max blocks, and the block scale dtypes chosen."""
    import gguf
    import numpy as np

    from edgepeft.exporters import quantize
    from edgepeft.exporters.zoo.gguf_loader import dequantize_tensor, smollm2_gguf_path

    if which == "smollm2-135m":
        path = smollm2_gguf_path()
    else:
        from edgepeft.exporters.zoo.gguf_gemma3 import gemma3_gguf_path

        path = gemma3_gguf_path()
    stats: dict[str, dict] = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        if len(t.shape) != 2:
            continue
        w = dequantize_tensor(t)
        qt = quantize.quantize_int4(w)
        err = qt.dequantize() - w
        st = stats.setdefault(t.tensor_type.name, {"tensors": 0, "params": 0, "max_abs_error": 0.0,
                                                   "minmax_only_max_abs_error": 0.0, "_se": 0.0, "_sw": 0.0,
                                                   "max_abs_weight": 0.0, "scale_dtypes": []})
        st["tensors"] += 1
        st["params"] += int(w.size)
        st["max_abs_error"] = max(st["max_abs_error"], float(np.abs(err).max()))
        st["minmax_only_max_abs_error"] = max(st["minmax_only_max_abs_error"], _minmax_error(w))
        st["max_abs_weight"] = max(st["max_abs_weight"], float(np.abs(w).max()))
        st["_se"] += float(np.square(err, dtype=np.float64).sum())
        st["_sw"] += float(np.square(w, dtype=np.float64).sum())
        st["scale_dtypes"] = sorted(set(st["scale_dtypes"]) | {str(qt.scale.dtype)})
        del w, qt, err
    for st in stats.values():
        se, sw = st.pop("_se"), st.pop("_sw")
        st["relative_rms_error"] = math.sqrt(se / sw) if sw else 0.0
    return {"file": path.name, "types": stats}


# -- the run -----------------------------------------------------------------------------------------
def markdown(doc: dict) -> str:
    rows, base = [], doc["variants"][0]["perplexity"]
    for r in doc["variants"]:
        rows.append([r["variant"], f"{r['bundle_bytes'] / 1e6:.1f}", f"{r['weights_bytes'] / 1e6:.1f}",
                     ", ".join(r["scale_dtypes"]) or "-", f"{r['weight_error']['all']:.4f}",
                     f"{r['weight_error']['embedding']:.4f}", f"{r['perplexity']:.3f}",
                     f"{100 * (r['perplexity'] / base - 1):+.2f}%", r["export_s"], r["eval_s"]])
    md = (f"{doc['model']}, LoRA r8 q/v (initial adapter: the base model), lean backend only; perplexity of "
          f"{doc['texts']} held-out BBC News articles (up to {doc['seq']} tokens each, {doc['variants'][0]['eval_tokens']} "
          f"predicted tokens), {THREADS} threads.\n\n")
    md += md_table(["quant", "bundle (MB)", "lean/weights.safetensors (MB)", "int4 block scales",
                    "weight error (rel. RMS)", "embedding error (rel. RMS)", "perplexity", "vs fp32", "export (s)",
                    "evaluate (s)"], rows)
    gap = max(abs(r["first_batch_loss_lean_vs_eager"]["lean"] - r["first_batch_loss_lean_vs_eager"]["eager"])
              for r in doc["variants"])
    md += (f"\n\nlean vs the eager reference model (same dequantized weights) on the first batch: largest loss "
           f"difference {gap:.1e}")
    by = {r["variant"]: r for r in doc["variants"]}
    i4, f32, keep = by["int4"], by["int4, float32 scales"], by["int4, embedding/head int8"]
    md += (f"\n\nint4 vs int8: perplexity {100 * (i4['perplexity'] / by['int8']['perplexity'] - 1):+.2f}%. "
           f"Keeping only the embedding table (tied LM head) int8: {100 * (keep['perplexity'] / base - 1):+.2f}% "
           f"vs fp32 at {keep['bundle_bytes'] / 1e6:.1f} MB. Block scales float16 vs float32: perplexity "
           f"{i4['perplexity']:.3f} vs {f32['perplexity']:.3f}, weight error {i4['weight_error']['all']:.5f} vs "
           f"{f32['weight_error']['all']:.5f}, weights {i4['weights_bytes'] / 1e6:.1f} vs {f32['weights_bytes'] / 1e6:.1f} MB.")
    t = doc["target"]
    md += (f"\n\ntarget: the int4 bundle at or under {t['mb']} MB: {t['int4_bundle_mb']:.1f} MB -> "
           f"{'met' if t['met'] else 'NOT met'}\n")
    for name, chk in doc["gguf"].items():
        md += f"\n### {name}: the GGUF's own weights requantized to int4 (blocks of 32), `{chk['file']}`\n\n"
        md += md_table(["GGUF type", "2-D tensors", "params", "max abs weight", "max abs error",
                        "relative RMS error", "max abs error, plain min/max", "block scales"],
                       [[k, v["tensors"], f"{v['params'] / 1e6:.2f} M", f"{v['max_abs_weight']:.3g}",
                         f"{v['max_abs_error']:.3g}", f"{v['relative_rms_error']:.3g}",
                         f"{v['minmax_only_max_abs_error']:.3g}", ", ".join(v["scale_dtypes"])]
                        for k, v in sorted(chk["types"].items())])
        md += "\n"
    return md


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks quant_accuracy")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--texts", type=int, default=48)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--gguf", nargs="*", default=["smollm2-135m", "gemma3-270m"],
                    help="GGUF files whose weights to requantize (none: skip)")
    ap.add_argument("--child", choices=["variant", "gguf"])
    ap.add_argument("--variant", choices=list(VARIANTS))
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args(argv)
    if a.child == "variant":
        print(json.dumps(child_variant(a.model, a.variant, a.seq, a.texts, a.batch)))
        return 0
    if a.child == "gguf":
        print(json.dumps(gguf_check(a.model)))
        return 0
    run = Run(NAME, argv)
    common = ["--model", a.model, "--seq", str(a.seq), "--texts", str(a.texts), "--batch", str(a.batch)]
    variants = []
    for v in VARIANTS:
        print(f"== {v}", flush=True)
        variants.append(run_child("benchmarks.quant_accuracy", ["--child", "variant", "--variant", v, *common],
                                  timeout=3600))
    checks = {g: run_child("benchmarks.quant_accuracy", ["--child", "gguf", "--model", g], timeout=3600)
              for g in a.gguf}
    int4 = next(r for r in variants if r["variant"] == "int4")
    doc = {"model": a.model, "texts": a.texts, "seq": a.seq, "batch": a.batch, "variants": variants, "gguf": checks,
           "target": {"mb": TARGET_MB, "int4_bundle_mb": int4["bundle_bytes"] / 1e6,
                      "met": int4["bundle_bytes"] <= TARGET_MB * 1e6}}
    path = run.write(doc, markdown(doc), a.out)
    print(markdown(doc))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
