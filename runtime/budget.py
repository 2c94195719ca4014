"""The session's memory budget: checked before loading (from the manifest) and measured after
every phase (the high-water mark of resident memory above the session's starting point)."""
from __future__ import annotations

from dataclasses import dataclass, field

from edgepeft.bundle import OpenedBundle
from edgepeft.errors import MemoryBudgetError
from edgepeft.memory import fmt_bytes, peak_rss_bytes, reset_peak, rss_bytes
from edgepeft import names


def static_bytes(bundle: OpenedBundle, backend: str) -> int:
    """What loading the bundle for training on ``backend`` costs at the least: the graphs and
    tensors it loads, and per trainable float a gradient and two AdamW moments."""
    m = bundle.manifest
    if backend in m.backends:
        members = list(m.backends[backend].values())
        if backend == names.BACKEND_PORTABLE:
            members.append(names.INFERENCE_MODEL)
    else:
        members = []
    files = sum(bundle.path(x).stat().st_size for x in members if x in m.members)
    return files + 3 * 4 * m.trainable_params


@dataclass
class MemoryBudget:
    limit: int | None
    baseline: int = 0
    peaks: dict[str, int] = field(default_factory=dict)

    def start(self) -> None:
        self.baseline = rss_bytes()
        self.exact = reset_peak()

    def precheck(self, need: int, what: str) -> None:
        if self.limit is not None and need > self.limit:
            raise MemoryBudgetError(
                f"{what} needs at least {fmt_bytes(need)}, over the memory budget of {fmt_bytes(self.limit)}; "
                "raise the budget or export a smaller bundle (lower rank, int8 base, shorter sequences)"
            )

    def begin(self) -> None:
        """Start measuring a phase (the high-water mark restarts from the current RSS)."""
        reset_peak()

    def end(self, phase: str) -> int:
        used = max(0, peak_rss_bytes() - self.baseline)
        self.peaks[phase] = max(self.peaks.get(phase, 0), used)
        if self.limit is not None and used > self.limit:
            raise MemoryBudgetError(
                f"{phase} reached {fmt_bytes(used)} above the session's start, over the memory budget of "
                f"{fmt_bytes(self.limit)}; use smaller batches or shorter sequences, or raise the budget"
            )
        return used
