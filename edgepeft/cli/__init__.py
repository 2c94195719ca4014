"""The `edgepeft` command. Thin click commands over the library; user errors (EdgePeftError)
print as one line without a traceback."""
from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

import click

import edgepeft
from edgepeft.errors import EdgePeftError


class _Group(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except EdgePeftError as e:
            raise click.ClickException(str(e)) from None


def _console():
    from rich.console import Console

    return Console(stderr=False, highlight=False)


@click.group(cls=_Group)
@click.version_option(edgepeft.__version__, prog_name="edgepeft")
def main() -> None:
    """edgepeft: parameter-efficient fine-tuning on the device.

    Export a PyTorch model with PEFT adapters into a bundle (host), then train, evaluate and
    hot-swap adapters over its frozen int8 base (device)."""


def _names(value: str | None) -> tuple[str, ...]:
    return tuple(x.strip() for x in value.split(",") if x.strip()) if value else ()


@main.command()
@click.option("--model", "model_ref", required=True,
              help="tiny-encoder, minilm, or pkg.module:factory returning an edgepeft.exporters.ModelSource.")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Bundle file to write.")
@click.option("--rank", default=8, show_default=True, help="LoRA rank.")
@click.option("--alpha", default=16.0, show_default=True, help="LoRA alpha (scaling = alpha / rank).")
@click.option("--targets", default="query,value", show_default=True, help="Comma-separated Linear layer names for LoRA.")
@click.option("--modules-to-save", default="classifier", show_default=True,
              help="Comma-separated modules trained in full (e.g. a new head); empty for none.")
@click.option("--labels", default=None, help="Comma-separated class labels (default: the model's own).")
@click.option("--quant", type=click.Choice(["int8", "none"]), default="int8", show_default=True,
              help="Frozen base weights as int8 (per-row scales) or fp32.")
@click.option("--method", "method_texts", multiple=True, metavar="NAME[:k=v,...]",
              help="A PEFT method (repeat for hybrids), e.g. 'prompt:n_tokens=8', 'bitfit', "
                   "'adapter:kind=pfeiffer,size=32', 'lora:rank=4,targets=query|value'. "
                   "When given, replaces the LoRA options above.")
@click.option("--backend", "backends", multiple=True, type=click.Choice(["ort-training", "portable", "executorch"]),
              help="Training graphs to write (repeatable). Default: both (portable left out with a "
                   "warning where the model cannot be turned into one).")
@click.option("--init-adapter", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="A PEFT LoRA adapter folder (e.g. trained with HF PEFT) to start from.")
@click.option("--executorch-batch-size", default=8, show_default=True, type=click.IntRange(min=1),
              help="Batch the ExecuTorch training program is built for (with --backend executorch; the "
                   "runtime pads smaller batches and splits larger ones).")
@click.option("--sign", "sign_key", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Sign the bundle's manifest with this private key (from `edgepeft keygen`).")
def export(model_ref: str, out: Path, rank: int, alpha: float, targets: str, modules_to_save: str,
           labels: str | None, quant: str, method_texts: tuple[str, ...], backends: tuple[str, ...],
           init_adapter: Path | None, executorch_batch_size: int, sign_key: Path | None) -> None:
    """Export a model with LoRA into a bundle (host side; needs torch)."""
    try:
        from edgepeft.exporters import export_bundle, load_model
    except ImportError as e:
        raise click.ClickException(f"export needs the host side ({e.name} missing): pip install 'edgepeft[export]'")
    from edgepeft.specs import LoraSpec, parse_method

    if sign_key is not None:
        from edgepeft.signing import load_private_key

        load_private_key(sign_key)  # a bad key fails now, not after a long export
    if method_texts:
        methods = [parse_method(t) for t in method_texts]
    else:
        methods = [LoraSpec(rank=rank, alpha=alpha, targets=_names(targets), modules_to_save=_names(modules_to_save))]
    kwargs = {"labels": _names(labels)} if labels else {}
    src = load_model(model_ref, **kwargs)
    res = export_bundle(src, methods=methods, quant=quant, out=out, init_adapter=init_adapter,
                        backends=backends or None, sign_key=sign_key, executorch_batch_size=executorch_batch_size)
    m = res.manifest
    click.echo(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB): {m.model_name}, "
               f"{m.trainable_params:,} trainable of {m.base_params:,} params "
               f"({100 * m.trainable_params / m.base_params:.2f}%), base {m.quantization['scheme']}, "
               f"backends {', '.join(b for b in m.backends if b != 'onnx-inference')}")


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
def inspect(bundle: Path, as_json: bool) -> None:
    """Show what a bundle holds: model, methods, trainable tensors, quantization, members."""
    from edgepeft.bundle import read_manifest

    m = read_manifest(bundle)
    if as_json:
        click.echo(m.to_json())
        return
    from rich.table import Table

    c = _console()
    c.print(f"[bold]{bundle}[/]  schema v{m.schema_version}, written by edgepeft {m.sdk_version}")
    c.print(f"model {m.model_name} (sha256 {m.model_sha256[:12]}), task {m.task}, loss {m.loss}, "
            f"labels {list(m.labels)}, max length {m.max_length}")
    c.print(f"base params {m.base_params:,}; trainable {m.trainable_params:,} "
            f"({100 * m.trainable_params / m.base_params:.3f}%); frozen base {m.quantization.get('scheme')}")
    c.print(f"inputs {[(i.name, i.dtype, list(i.shape)) for i in m.inputs]}; backends {sorted(m.backends)}")
    c.print(_backends_table(m))
    by_method: dict[str, int] = {}
    for t in m.trainable:
        by_method[t.method] = by_method.get(t.method, 0) + t.numel
    specs = {spec.method: spec for spec in m.methods}
    tab = Table("method", "trainable params", "% of base", "spec")
    for meth, n in by_method.items():
        spec = specs.get(meth)
        tab.add_row(meth, f"{n:,}", f"{100 * n / m.base_params:.3f}", _spec_text(spec) if spec else "(with lora)")
    c.print(tab)
    mem = Table("member", "sha256")
    for name, digest in m.members.items():
        mem.add_row(name, digest[:16])
    c.print(mem)


# What each runtime backend does with a bundle that carries it.
_BACKEND_CAPS = {
    "ort-training": ("train, evaluate, infer, swap", "any", "onnxruntime-training-cpu 1.19.2 (x86_64)"),
    "portable": ("train, evaluate, infer, swap", "any", "any onnxruntime >= 1.17; no torch"),
    "executorch": ("train, evaluate, infer (XNNPACK), swap", "fixed", "executorch 1.5.1 (its Python runtime imports torch)"),
}


def _backends_table(m):
    """One row per training backend: present in the bundle, what it does, its batch, and
    whether it can run here."""
    from rich.table import Table

    from edgepeft.runtime.backends import available

    tab = Table("backend", "in bundle", "can", "batch", "needs", "runs here")
    for name, (can, batch, needs) in _BACKEND_CAPS.items():
        entry = m.backends.get(name)
        if batch == "fixed":
            batch = f"batch {entry.get('batch_size')} (pads/splits)" if entry else "fixed at export"
        tab.add_row(name, "yes" if entry is not None else "no", can, batch, needs, "yes" if available(name) else "no")
    return tab


def _spec_text(spec) -> str:
    parts = []
    for k, v in spec.to_dict().items():
        if k == "method" or v is None or v == [] or v == ():
            continue
        parts.append(f"{k}={','.join(map(str, v)) if isinstance(v, list) else v}")
    return " ".join(parts)


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--data", required=True, type=click.Path(path_type=Path), help='JSONL: {"text": ..., "label": ...}.')
@click.option("--adapter", required=True, help="Adapter to train (created from the bundle's initial one if new).")
@click.option("--steps", default=20, show_default=True, type=click.IntRange(min=1), help="Optimizer steps.")
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(min=1))
@click.option("--lr", default=1e-3, show_default=True, type=float, help="AdamW learning rate.")
@click.option("--eval-data", type=click.Path(path_type=Path), help="JSONL to evaluate before and after.")
@click.option("--store", type=click.Path(file_okay=False, path_type=Path),
              help="Adapter folder (default: BUNDLE's name with .adapters).")
@click.option("--budget", default=None, help="Memory budget, e.g. 512MB.", envvar="EDGEPEFT_MEMORY_BUDGET")
@click.option("--micro-batch", is_flag=True,
              help="Split batches predicted over --budget into micro-batches that fit (same step).")
@click.option("--threads", default=None, type=click.IntRange(min=1), help="Compute threads.")
@click.option("--seed", default=0, show_default=True, help="Shuffling seed.")
@click.option("--backend", default="auto", show_default=True,
              type=click.Choice(["auto", "ort-training", "portable", "executorch"]),
              help="auto: ort-training where its package is installed, else portable, else executorch.")
@click.option("--trust", "trust", multiple=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              envvar="EDGEPEFT_TRUSTED_KEYS",
              help="Only open BUNDLE if one of these public keys (.pub from `edgepeft keygen`) signed it. Repeatable.")
def train(bundle: Path, data: Path, adapter: str, steps: int, batch_size: int, lr: float, eval_data: Path | None,
          store: Path | None, budget: str | None, micro_batch: bool, threads: int | None, seed: int, backend: str,
          trust: tuple[Path, ...]) -> None:
    """Train an adapter on a JSONL file, then save it (device side)."""
    from edgepeft.data import read_jsonl
    from edgepeft.memory import fmt_bytes
    from edgepeft.optim import OptimizerSpec
    from edgepeft.runtime import Session

    from edgepeft.bundle import read_manifest

    label_field = None if read_manifest(bundle).task == "causal-lm" else "label"
    examples = read_jsonl(data, label_field=label_field)
    held_out = read_jsonl(eval_data, label_field=label_field) if eval_data else None
    s = Session.open(bundle, memory_budget=budget, adapter=adapter, store=store, threads=threads,
                     optimizer=OptimizerSpec(lr=lr), backend=backend, trusted_keys=list(trust) or None,
                     batch_size=None if micro_batch else batch_size, micro_batch=micro_batch)
    enc = s.encoder
    if label_field:
        enc.label_array([e.label for e in examples])  # refuse unknown labels before training
    c = _console()
    if held_out:
        r = s.evaluate(enc.batches(held_out, 16))
        c.print(f"before: loss {r.loss:.4f}, accuracy {r.accuracy:.3f} on {r.n}")
    epochs = (enc.batches(examples, batch_size, shuffle=True, seed=seed + e) for e in itertools.count())
    batches = itertools.chain.from_iterable(epochs)
    loss = float("nan")
    with _progress(c) as prog:
        task = prog.add_task(f"training {adapter}", total=steps)
        for _ in range(steps):
            loss = s.train_step(next(batches))
            prog.update(task, advance=1, description=f"training {adapter} loss {loss:.4f}")
    path = s.save_adapter()
    c.print(f"last loss {loss:.4f}; adapter {adapter!r} ({s.steps} steps in all, {s.backend.name}) saved to {path}")
    if held_out:
        r = s.evaluate(enc.batches(held_out, 16))
        c.print(f"after: loss {r.loss:.4f}, accuracy {r.accuracy:.3f} on {r.n}")
    c.print("memory above start: " + ", ".join(f"{k} {fmt_bytes(v)}" for k, v in s.budget.peaks.items()))


def _progress(console):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, transient=False, disable=not sys.stdout.isatty())


@main.command()
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Private key file to write; the public key goes to OUT.pub.")
@click.option("--force", is_flag=True, help="Overwrite existing key files.")
def keygen(out: Path, force: bool) -> None:
    """Make an ed25519 key pair to sign bundles (export --sign OUT; devices trust OUT.pub)."""
    from edgepeft.signing import generate_key, key_id, load_public_key

    priv, pub = generate_key(out, overwrite=force)
    click.echo(f"wrote {priv} (private: keep it secret) and {pub} (public: give it to devices); "
               f"key id {key_id(load_public_key(pub))}")


@main.group(cls=_Group)
def adapters() -> None:
    """Manage a bundle's adapters."""


@adapters.command("list")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--store", type=click.Path(file_okay=False, path_type=Path), help="Adapter folder.")
@click.option("--json", "as_json", is_flag=True)
def adapters_list(bundle: Path, store: Path | None, as_json: bool) -> None:
    """List the adapters stored for BUNDLE."""
    from edgepeft.adapters import AdapterStore
    from edgepeft.bundle import read_manifest
    from edgepeft.runtime.session import default_store

    m = read_manifest(bundle)
    st = AdapterStore(store or default_store(bundle), m)
    rows = []
    for name in st.names():
        meta = {}
        try:
            meta = json.loads((st.folder(name) / "edgepeft_adapter.json").read_text())
        except (OSError, ValueError):
            pass
        rows.append({"name": name, "steps": meta.get("steps"), "backend": meta.get("backend"),
                     "fits_bundle": meta.get("model_sha256") == m.model_sha256, "path": str(st.folder(name))})
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    elif not rows:
        click.echo(f"no adapters in {st.root}")
    else:
        for r in rows:
            click.echo(f"{r['name']}\tsteps={r['steps']}\tbackend={r['backend']}\t{r['path']}")


@main.command()
@click.option("--out", default="out/demo", show_default=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--steps", default=30, show_default=True, type=click.IntRange(min=1), help="Training steps per user.")
@click.option("--budget", default="1GB", show_default=True, help="Memory budget of the device session.")
@click.option("--backend", default="ort-training", show_default=True,
              type=click.Choice(["ort-training", "portable", "executorch"]),
              help="Runtime backend (portable: plain onnxruntime; executorch: ExecuTorch, batch fixed at "
                   "export; both exports take a minute or two longer).")
def demo(out: Path, steps: int, budget: str, backend: str) -> None:
    """Export MiniLM + LoRA (int8 base), personalize two users on BBC News, hot-swap."""
    from edgepeft.cli.demo import run_demo

    run_demo(out, steps=steps, budget=budget, backend=backend)


if __name__ == "__main__":
    main()


# Memory per device lives in its own module; registered here so `edgepeft --help` lists it.
from edgepeft.cli.profile_cmd import devices as _devices, profile as _profile  # noqa: E402

main.add_command(_devices)
main.add_command(_profile)
