"""`edgepeft adapters ...`: manage a bundle's adapters."""
from __future__ import annotations

import json
from pathlib import Path

import click


@click.group()
def adapters() -> None:
    """Manage a bundle's adapters."""


@adapters.command("list")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--store", type=click.Path(file_okay=False, path_type=Path), help="Adapter folder.")
@click.option("--json", "as_json", is_flag=True)
def adapters_list(bundle: Path, store: Path | None, as_json: bool) -> None:
    """List the adapters stored for BUNDLE."""
    from edgepeft.adapters import AdapterStore, default_store
    from edgepeft.bundle import read_manifest

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
