"""The chart of `edgepeft profile --plot`: each phase's peak (predicted and measured) as bars,
each device's budget as a labelled horizontal line. matplotlib is imported here only, so the
device side never needs it."""
from __future__ import annotations

from pathlib import Path

from edgepeft.errors import SpecError
from edgepeft.memory import MiB


def plot_report(report: dict, out: Path) -> Path:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SpecError("--plot needs matplotlib: pip install 'edgepeft[plot]'") from None
    phases = list(report["predicted"]["phases"])
    pred = [report["predicted"]["phases"][p] / MiB for p in phases]
    meas = report["measured"]["phases"] if report["measured"] else None
    fig, ax = plt.subplots(figsize=(10, 5.5), dpi=110)
    x = range(len(phases))
    w = 0.38 if meas else 0.6
    ax.bar([i - (w / 2 if meas else 0) for i in x], pred, w, label="predicted", color="#4C72B0")
    if meas:
        ax.bar([i + w / 2 for i in x], [meas[p] / MiB for p in phases], w, label="measured (this host)",
               color="#DD8452")
    top = max(pred + ([v / MiB for v in meas.values()] if meas else []))
    devices = sorted(report["devices"], key=lambda d: d["budget"])
    shown = [d for d in devices if d["budget"] / MiB <= top * 4] or devices[:1]
    lines: dict[int, list[dict]] = {}
    for d in shown:  # devices with the same budget share one line and one label
        lines.setdefault(d["budget"], []).append(d)
    for budget, group in lines.items():
        y = budget / MiB
        fits = group[0]["fits"]
        color = "#2ca02c" if fits else "#d62728"
        ax.hlines(y, -0.6, len(phases) - 0.45, color=color, linestyle="--", linewidth=1)
        label = ", ".join(d["name"] for d in group)
        ax.text(len(phases) - 0.4, y, f"{label}\n{y:.0f} MiB: {'fits' if fits else 'does not fit'}", va="center",
                ha="left", color=color, fontsize=8)
    hidden = len(devices) - len(shown)
    ax.set_xticks(list(x), phases)
    ax.set_ylabel("peak resident memory (MiB)")
    ax.set_ylim(0, max(top, max(d["budget"] / MiB for d in shown)) * 1.1)
    title = f"{report['model']} on {report['backend']}, batch {report['batch']} x seq {report['seq']}"
    if hidden:
        title += f"\n({hidden} larger device budgets not drawn: all above {top * 4:.0f} MiB)"
    ax.set_title(title, fontsize=10)
    ax.legend(loc="upper left", fontsize=8)
    ax.set_xlim(-0.6, len(phases) + 1.9)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out
