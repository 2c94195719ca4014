"""Sizes per PEFT method: the bundle, the frozen base as stored (fp32 vs int8), and the adapter
(bytes, and % of the base). MiniLM-L6 with each method of Table 2 (+ the fresh head), and LoRA
on EfficientNet-Lite0; LoRA also exported with an fp32 base for the int8 comparison.

    python -m benchmarks sizes [--tiny]"""
from __future__ import annotations

import argparse
import dataclasses
import math
from pathlib import Path

from benchmarks.common import RESULTS, work, Run, md_table, plt

NAME = "sizes"


def frozen_bytes(model_path: Path) -> int:
    """Bytes of the frozen tensors as stored: the inference graph's initializers (adapter
    tensors are graph inputs there, not initializers)."""
    import onnx
    from onnx.helper import tensor_dtype_to_np_dtype

    m = onnx.load(str(model_path), load_external_data=False)
    return sum(tensor_dtype_to_np_dtype(i.data_type).itemsize * math.prod(i.dims) for i in m.graph.initializer)


def measure(path: Path) -> dict:
    from edgepeft import names
    from edgepeft.bundle import open_bundle

    b = open_bundle(path, work() / "sizes" / "cache")
    m = b.manifest
    adapter = b.root / names.INITIAL_ADAPTER_DIR
    adapter_files = {f.name: f.stat().st_size for f in adapter.iterdir()}
    head = sum(math.prod(t.shape) for t in m.trainable if t.method in ("selective", "modules_to_save"))
    q = m.quantization
    return {"bundle_bytes": path.stat().st_size, "frozen_bytes": frozen_bytes(b.path(names.INFERENCE_MODEL)),
            "base_params": m.base_params, "base_fp32_bytes": 4 * m.base_params,
            "trainable_params": m.trainable_params, "method_params": m.trainable_params - head,
            "adapter_tensor_bytes": 4 * m.trainable_params, "adapter_file_bytes": sum(adapter_files.values()),
            "adapter_files": adapter_files, "quantized_tensors": len(q.get("tensors", [])),
            "quantized_int8_bytes": q.get("int8_bytes", 0), "quantized_fp32_bytes": q.get("fp32_bytes", 0),
            "members": {k: v for k, v in sorted(_member_sizes(path).items())}}


def _member_sizes(path: Path) -> dict[str, int]:
    import zipfile

    with zipfile.ZipFile(path) as z:
        return {i.filename: i.compress_size for i in z.infolist()}


def main(argv: list[str] | None = None) -> Path:
    from edgepeft.exporters import export_bundle, load_model

    from benchmarks.data import DIGITS
    from benchmarks.table2 import specs, tasks

    ap = argparse.ArgumentParser(prog="python -m benchmarks sizes")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--methods", nargs="+", default=["lora", "bottleneck", "prefix", "prompt", "bitfit"],
                    help="methods on the text model (LoRA is always also exported with an fp32 base)")
    ap.add_argument("--no-image", action="store_true", help="skip the image model")
    ap.add_argument("--out", type=Path, default=RESULTS)
    a = ap.parse_args(argv)
    run = Run(NAME, argv)
    folder = work() / ("sizes-tiny" if a.tiny else "sizes")
    folder.mkdir(parents=True, exist_ok=True)
    text = tasks(a.tiny)["bbc"]
    image = dataclasses.replace(tasks(a.tiny)["mnist"], source=lambda: load_model(
        "tiny-cnn" if a.tiny else "efficientnet-lite0", labels=DIGITS))
    cases = [(text, m, "int8") for m in dict.fromkeys(["lora", *a.methods])]
    cases += [(text, "lora", "none")] + ([] if a.no_image else [(image, "lora", "int8"), (image, "lora", "none")])
    rows = []
    for t, method, quant in cases:
        model = t.source().name
        path = folder / f"{model}-{method}-{quant}.edgepeft"
        if not path.exists():
            export_bundle(t.source(), methods=specs(method, t), quant=quant, out=path, backends=("ort-training",))
        r = {"model": model, "method": method, "base": "fp32" if quant == "none" else "int8", **measure(path)}
        rows.append(r)
        print(f"[sizes] {model} {method} {quant}: bundle {r['bundle_bytes'] / 1e6:.1f} MB", flush=True)
    ratios = {}
    for model in dict.fromkeys(r["model"] for r in rows):
        i8 = next(r for r in rows if r["model"] == model and r["method"] == "lora" and r["base"] == "int8")
        f32 = next(r for r in rows if r["model"] == model and r["method"] == "lora" and r["base"] == "fp32")
        ratios[model] = {"frozen_int8_over_fp32": i8["frozen_bytes"] / f32["frozen_bytes"],
                         "quantized_tensors_int8_over_fp32": i8["quantized_int8_bytes"] / max(i8["quantized_fp32_bytes"], 1),
                         "bundle_int8_over_fp32": i8["bundle_bytes"] / f32["bundle_bytes"]}
    md = md_table(["model", "method (+ head)", "frozen base", "bundle (MB)", "frozen base as stored (MB)",
                   "adapter file (KB)", "adapter / frozen base bytes", "trainable params",
                   "% of base params: with head (method only)"],
                  [[r["model"], r["method"], r["base"], f"{r['bundle_bytes'] / 1e6:.1f}", f"{r['frozen_bytes'] / 1e6:.1f}",
                    f"{r['adapter_file_bytes'] / 1e3:.0f}", f"{100 * r['adapter_file_bytes'] / r['frozen_bytes']:.2g}%",
                    f"{r['trainable_params']:,}",
                    f"{100 * r['trainable_params'] / r['base_params']:.3g}% ({100 * r['method_params'] / r['base_params']:.3g}%)"]
                   for r in rows])
    md += "\n\n" + md_table(["model", "frozen base int8 / fp32 (target <= 0.27)", "int8 tensors only / their fp32",
                             "bundle int8 / fp32"],
                            [[m, f"{v['frozen_int8_over_fp32']:.3f}", f"{v['quantized_tensors_int8_over_fp32']:.3f}",
                              f"{v['bundle_int8_over_fp32']:.3f}"] for m, v in ratios.items()])
    md += ("\n\nBundles hold the ort-training artifacts only (each other backend adds its own graph: see export_time). "
           "'frozen base as stored' is the inference graph's initializers: int8 weights + per-row scales, and what "
           "stays fp32 (biases, LayerNorms, tensors that are not 2-D).")
    run.write({"rows": rows, "ratios": ratios}, md, a.out)
    _plot(rows, a.out / f"{NAME}.png")
    print(md)
    return a.out / f"{NAME}.json"


def _plot(rows: list[dict], path: Path) -> None:
    pyplot = plt()
    fig, axes = pyplot.subplots(1, 2, figsize=(11, 3.8))
    labels = [f"{r['model']}\n{r['method']} {r['base']}" for r in rows]
    xs = range(len(rows))
    axes[0].bar(xs, [r["bundle_bytes"] / 1e6 for r in rows], label="bundle")
    axes[0].bar(xs, [r["frozen_bytes"] / 1e6 for r in rows], width=0.4, label="frozen base as stored")
    axes[0].set_ylabel("MB")
    axes[0].set_title("Bundle and frozen base", fontsize=10)
    axes[0].legend(fontsize=8)
    axes[1].bar(xs, [r["adapter_file_bytes"] / 1e3 for r in rows], color="tab:green")
    axes[1].set_yscale("log")
    axes[1].set_ylabel("KB (log)")
    axes[1].set_title("Adapter file (with head)", fontsize=10)
    for ax in axes:
        ax.set_xticks(list(xs))
        ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot.close(fig)


if __name__ == "__main__":
    main()
