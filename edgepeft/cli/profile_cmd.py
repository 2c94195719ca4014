"""`edgepeft devices` and `edgepeft profile`: memory per device (see edgepeft.cli.profiler)."""
from __future__ import annotations

import json
from pathlib import Path

import click

from edgepeft import devices as devices_mod
from edgepeft.cli._shared import auto_help, backend_choice, console
from edgepeft.errors import SpecError
from edgepeft.memory import fmt_bytes

_profiles = click.option("--profiles", "profile_files", multiple=True,
                         type=click.Path(exists=True, dir_okay=False, path_type=Path),
                         help="A TOML file of your own device profiles (repeatable; same shape as the built-in "
                              "devices.toml; a device of the same name replaces the built-in one).")
# The device tables are wide; a fixed width keeps them whole when piped.
_WIDTH = 140


def _prediction_help() -> str:
    """Which backends the memory model predicts (the others are refused: nothing to fit devices by)."""
    from edgepeft.backends import REGISTRY

    have = [n for n, r in REGISTRY.items() if r.memory is not None]
    lack = [n for n, r in REGISTRY.items() if r.memory is None]
    return (f"The memory model predicts {', '.join(have)}" + (
        f"; it has no prediction for {', '.join(lack)} (measure those with `edgepeft train --budget`)." if lack
        else "."))


@click.command()
@_profiles
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def devices(profile_files: tuple[Path, ...], as_json: bool) -> None:
    """List the device profiles: RAM, the memory one app may use, cores, arch, emulated CPU."""
    found = devices_mod.load(profile_files)
    if as_json:
        click.echo(json.dumps([vars(d) for d in found.values()], indent=2))
        return
    from rich.table import Table

    t = Table("device", "title", "RAM", "app budget", "cores", "arch", "qemu cpu")
    for d in found.values():
        t.add_row(d.name, d.title, fmt_bytes(d.ram), fmt_bytes(d.budget), str(d.cores), d.arch, d.qemu_cpu or "-")
    console(width=_WIDTH).print(t)


@click.command()
@click.argument("bundle", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--device", "device_names", multiple=True, help="A device profile to check (repeatable).")
@click.option("--all-devices", is_flag=True, help="Check every device profile.")
@_profiles
@click.option("--backend", default="auto", show_default=True, type=backend_choice(auto=True),
              help=f"Training backend; {auto_help(budget=False)}. {_prediction_help()}")
@click.option("--batch", default=8, show_default=True, help="Training batch size.")
@click.option("--seq", type=int, default=None, help="Sequence length (default: the bundle's max_length).")
@click.option("--threads", type=int, default=None, help="onnxruntime threads for the measured run.")
@click.option("--predict-only", is_flag=True, help="Do not measure: the memory model only (instant).")
@click.option("--enforce", is_flag=True,
              help="Re-run the phases under a hard memory cap equal to each device's budget (cgroup v1, else "
                   "an address-space rlimit) and report whether the run survived.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON (schema edgepeft.profile/1).")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write a PNG chart of phase peaks against each device's budget.")
def profile(bundle: Path, device_names: tuple[str, ...], all_devices: bool, profile_files: tuple[Path, ...],
            backend: str, batch: int, seq: int | None, threads: int | None, predict_only: bool, enforce: bool,
            as_json: bool, plot: Path | None) -> None:
    """Memory of BUNDLE per phase (open, train step, evaluate, swap, infer): predicted from its
    manifest and measured for real in a fresh process; whether it fits each device, with the
    largest batch, sequence length and LoRA rank that would."""
    from edgepeft.cli import profiler
    from edgepeft.bundle import open_bundle
    from edgepeft.memory_model import predict
    from edgepeft.runtime.backends import resolve

    profiler.validate_args(batch, seq)
    picked = _pick_devices(device_names, all_devices, profile_files)
    if enforce and predict_only:
        raise SpecError("--enforce runs the bundle for real: drop --predict-only")
    manifest = open_bundle(bundle).manifest
    backend = resolve(backend, manifest)
    _require_prediction(backend, manifest)
    pred = predict(manifest, backend=backend, batch=batch, seq=seq)
    measured = None if predict_only else profiler.measure(bundle, backend=backend, batch=batch, seq=pred.seq,
                                                          threads=threads)
    mpeak = max(measured["peaks"].values()) if measured else None
    fits = [profiler.fit_device(manifest, d, pred, mpeak) for d in picked]
    enforced = {}
    if enforce:
        for d in picked:
            enforced[d.name] = profiler.measure(bundle, backend=backend, batch=batch, seq=pred.seq,
                                                threads=threads, cap=d)
    report = profiler.build_report(bundle, manifest, pred, measured, fits, enforced)
    if plot:
        from edgepeft.cli.profile_plot import plot_report

        plot_report(report, plot)
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        _print(report)


def _require_prediction(backend: str, manifest) -> None:
    """SpecError for a backend the memory model has no prediction for: the report and the
    device fits are built on it."""
    from edgepeft.memory_model import no_prediction, predicted_backends

    if no_prediction(backend) is not None:
        others = [b for b in predicted_backends() if b in manifest.backends]
        raise SpecError(f"no prediction for backend {backend!r}: `edgepeft profile` fits devices by the memory model, "
                        "which has none for it yet. Measure it with a memory budget instead (`edgepeft train "
                        "--budget ...` meters every phase)" + (f", or profile the bundle's {', '.join(others)} "
                                                               f"backend (--backend {others[0]})" if others else ""))


def _pick_devices(device_names: tuple[str, ...], all_devices: bool, profile_files: tuple[Path, ...]) -> list:
    known = devices_mod.load(profile_files)
    if all_devices and device_names:
        raise SpecError("give --device NAME or --all-devices, not both")
    picked = list(known.values()) if all_devices else [devices_mod.get(n, profile_files) for n in device_names]
    if not picked:
        raise SpecError("name a device (--device rpi4-2gb; see `edgepeft devices`) or pass --all-devices")
    return picked


def _print(report: dict) -> None:
    from rich.table import Table

    c = console(width=_WIDTH)
    c.print(f"[bold]{report['model']}[/] on {report['backend']}, batch {report['batch']} x seq {report['seq']}")
    t = Table("phase", "predicted", "measured", "error")
    meas = (report["measured"] or {}).get("phases", {})
    for p, v in report["predicted"]["phases"].items():
        err = (report["error_pct"] or {}).get(p)
        t.add_row(p, fmt_bytes(v), fmt_bytes(meas[p]) if p in meas else "-", f"{err:+.1f}%" if err is not None else "-")
    c.print(t)
    t = Table("device", "budget", "peak", "fits", "headroom", "max batch", "max seq", "max LoRA rank", "enforced")
    for d in report["devices"]:
        e = d["enforce"]
        enf = "-" if e is None else ("survived" if e["survived"] else f"killed ({e['method']})")
        t.add_row(d["name"], fmt_bytes(d["budget"]), f"{fmt_bytes(d['peak'])} ({d['peak_source'][:4]}.)",
                  "[green]yes[/]" if d["fits"] else "[red]no[/]", fmt_bytes(d["headroom"]), str(d["max_batch"]),
                  "-" if d["max_seq"] is None else str(d["max_seq"]),
                  "-" if d["max_lora_rank"] is None else str(d["max_lora_rank"]), enf)
    c.print(t)
