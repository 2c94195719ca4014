"""`edgepeft export`: a model with PEFT methods into a bundle (host side; needs torch)."""
from __future__ import annotations

from pathlib import Path

import click

from edgepeft.cli._shared import backend_choice, export_backends_help, names, out_option


@click.command()
@click.option("--model", "model_ref", required=True,
              help="tiny-encoder, minilm, or pkg.module:factory returning an edgepeft.exporters.ModelSource.")
@out_option("Bundle file to write.", required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--rank", default=8, show_default=True, help="LoRA rank.")
@click.option("--alpha", default=16.0, show_default=True, help="LoRA alpha (scaling = alpha / rank).")
@click.option("--targets", default="query,value", show_default=True, help="Comma-separated Linear layer names for LoRA.")
@click.option("--modules-to-save", default="classifier", show_default=True,
              help="Comma-separated modules trained in full (e.g. a new head); empty for none.")
@click.option("--labels", default=None, help="Comma-separated class labels (default: the model's own).")
@click.option("--quant", type=click.Choice(["int8", "int4", "none"]), default="int8", show_default=True,
              help="Frozen base weights as int8 (per-row scales), int4 (blocks of 32, lean backend only) or fp32.")
@click.option("--method", "method_texts", multiple=True, metavar="NAME[:k=v,...]",
              help="A PEFT method (repeat for hybrids), e.g. 'prompt:n_tokens=8', 'bitfit', "
                   "'bottleneck:kind=pfeiffer,size=32', 'lora:rank=4,targets=query|value'. "
                   "When given, replaces the LoRA options above.")
@click.option("--backend", "backends", multiple=True, type=backend_choice(auto=False), help=export_backends_help())
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
    """Export a model with LoRA into a bundle (host side; needs torch). OUT's folder must exist."""
    from edgepeft.errors import SpecError
    from edgepeft.fsutil import check_output_file

    # Before the export (which takes seconds to minutes): a path it could not write is refused now.
    check_output_file(out, "bundle", create_parents=False)
    label_names = names(labels)
    if len(set(label_names)) != len(label_names):
        raise SpecError(f"--labels has duplicates {sorted({x for x in label_names if label_names.count(x) > 1})}: "
                        "give each class one name")
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
        methods = [LoraSpec(rank=rank, alpha=alpha, targets=names(targets), modules_to_save=names(modules_to_save))]
    kwargs = {"labels": label_names} if label_names else {}
    src = load_model(model_ref, **kwargs)
    res = export_bundle(src, methods=methods, quant=quant, out=out, init_adapter=init_adapter,
                        backends=backends or None, sign_key=sign_key, executorch_batch_size=executorch_batch_size)
    m = res.manifest
    click.echo(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB): {m.model_name}, "
               f"{m.trainable_params:,} trainable of {m.base_params:,} params "
               f"({100 * m.trainable_params / m.base_params:.2f}%), base {m.quantization['scheme']}, "
               f"backends {', '.join(b for b in m.backends if b != 'onnx-inference')}")
