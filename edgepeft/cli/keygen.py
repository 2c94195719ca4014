"""`edgepeft keygen`: an ed25519 key pair to sign bundles."""
from __future__ import annotations

from pathlib import Path

import click

from edgepeft.cli._shared import out_option


@click.command()
@out_option("Private key file to write; the public key goes to OUT.pub.", required=True,
            type=click.Path(dir_okay=False, path_type=Path))
@click.option("--force", is_flag=True, help="Overwrite existing key files.")
def keygen(out: Path, force: bool) -> None:
    """Make an ed25519 key pair to sign bundles (export --sign OUT; devices trust OUT.pub).
    OUT's folder must exist."""
    from edgepeft.fsutil import check_output_file
    from edgepeft.signing import generate_key, key_id, load_public_key

    check_output_file(out, "private key", create_parents=False)

    priv, pub = generate_key(out, overwrite=force)
    click.echo(f"wrote {priv} (private: keep it secret) and {pub} (public: give it to devices); "
               f"key id {key_id(load_public_key(pub))}")
