"""`edgepeft inspect`: what a bundle holds (named ``inspect_cmd`` so it never shadows the
standard library's ``inspect``)."""
from __future__ import annotations

from pathlib import Path

import click

from edgepeft.cli._shared import console


@click.command("inspect")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
def inspect_bundle(bundle: Path, as_json: bool) -> None:
    """Show what a bundle holds: model, methods, trainable tensors, quantization, members."""
    from edgepeft.bundle import read_manifest

    m = read_manifest(bundle)
    if as_json:
        click.echo(m.to_json())
        return
    c = console()
    c.print(f"[bold]{bundle}[/]  schema v{m.schema_version}, written by edgepeft {m.sdk_version}")
    c.print(f"model {m.model_name} (sha256 {m.model_sha256[:12]}), task {m.task}, loss {m.loss}, "
            f"labels {list(m.labels)}, max length {m.max_length}")
    c.print(f"base params {m.base_params:,}; trainable {m.trainable_params:,} "
            f"({100 * m.trainable_params / m.base_params:.3f}%); frozen base {m.quantization.get('scheme')}")
    c.print(f"inputs {[(i.name, i.dtype, list(i.shape)) for i in m.inputs]}; backends {sorted(m.backends)}")
    c.print(_backends_table(m))
    c.print(_methods_table(m))
    c.print(_members_table(m))


def _backends_table(m):
    """One row per runtime backend of the registry (edgepeft.backends): present in the bundle,
    what it does, its batch, what it needs, whether the memory model predicts it and whether it
    can run here."""
    from rich.table import Table

    from edgepeft.backends import REGISTRY
    from edgepeft.runtime.backends import available

    tab = Table("backend", "in bundle", "can", "batch", "needs", "predicted", "runs here")
    for name, r in REGISTRY.items():
        entry, caps = m.backends.get(name), r.caps
        batch = caps.batch
        if caps.batch_setting is not None:
            batch = f"batch {entry.settings.get(caps.batch_setting)} (pads/splits)" if entry else "fixed at export"
        tab.add_row(name, "yes" if entry is not None else "no", caps.can, batch, caps.needs,
                    "yes" if r.memory is not None else "no", "yes" if available(name) else "no")
    return tab


def _methods_table(m):
    """Trainable parameters per PEFT method, with the method's spec."""
    from rich.table import Table

    by_method: dict[str, int] = {}
    for t in m.trainable:
        by_method[t.method] = by_method.get(t.method, 0) + t.numel
    specs = {spec.method: spec for spec in m.methods}
    tab = Table("method", "trainable params", "% of base", "spec")
    for meth, n in by_method.items():
        spec = specs.get(meth)
        tab.add_row(meth, f"{n:,}", f"{100 * n / m.base_params:.3f}", _spec_text(spec) if spec else "(with lora)")
    return tab


def _members_table(m):
    from rich.table import Table

    tab = Table("member", "sha256")
    for name, digest in m.members.items():
        tab.add_row(name, digest[:16])
    return tab


def _spec_text(spec) -> str:
    parts = []
    for k, v in spec.to_dict().items():
        if k == "method" or v is None or v == [] or v == ():
            continue
        parts.append(f"{k}={','.join(map(str, v)) if isinstance(v, list) else v}")
    return " ".join(parts)
