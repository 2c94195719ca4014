"""The one way the runtime measures memory: a phase meter, and the session's budget on top of it.

``with budget.phase("train_step"): ...`` restarts the resident high-water mark at entry (Linux
``/proc/self/clear_refs``) and at exit records the phase's peak, absolute and above the
baseline read by ``start()``, and its wall time; with a limit set, a peak above the baseline
over it raises MemoryBudgetError. The session checks its budget before loading (from the
manifest) and meters every phase; the profiler and the device scenario meter theirs with no
limit. Phases nest (the profiler's phase around a session's own): each reset restarts the mark,
so an outer phase sees the peak since the innermost reset."""
from __future__ import annotations

import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

from edgepeft.backends import REGISTRY
from edgepeft.bundle import OpenedBundle
from edgepeft.errors import MemoryBudgetError
from edgepeft.memory import fmt_bytes, peak_rss_bytes, reset_peak, rss_bytes


def static_bytes(bundle: OpenedBundle, backend: str) -> int:
    """What loading the bundle for training on ``backend`` costs at the least: the members its
    entry names and those its record says it also loads, and per trainable float a gradient
    and two AdamW moments."""
    m = bundle.manifest
    entry, rec = m.backends.get(backend), REGISTRY.get(backend)
    members = [] if entry is None else [*entry.members.values(), *(rec.loads if rec is not None else ())]
    files = sum(bundle.path(x).stat().st_size for x in members if x in m.members)
    return files + 3 * 4 * m.trainable_params


@dataclass(frozen=True)
class PhaseReading:
    """One metered run of a phase."""

    name: str
    peak: int       # the process's resident high-water mark during the phase (bytes)
    used: int       # ``peak`` above the meter's baseline, 0 at least (bytes)
    seconds: float  # wall time


@dataclass
class MemoryBudget:
    """A phase meter, with an optional ``limit`` (bytes above the baseline) it enforces.

    Per phase name it keeps the largest ``peaks`` (above the baseline: what the budget is
    checked against) and ``peak_rss`` (absolute: what compares with a device's RAM), and the
    ``seconds`` of the last run; ``last`` is the last reading."""

    limit: int | None
    baseline: int = 0
    peaks: dict[str, int] = field(default_factory=dict)
    peak_rss: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    last: PhaseReading | None = None
    exact: bool = False  # whether the high-water mark can be reset here (else peaks are since process start)
    # What the budget could not check before running (e.g. "no prediction for backend X; measured only").
    notes: list[str] = field(default_factory=list)

    def start(self) -> None:
        """Read the baseline (the resident memory now) and restart the high-water mark."""
        self.baseline = rss_bytes()
        self.exact = reset_peak()

    def note(self, text: str) -> None:
        """State something the budget could not check: a warning, and kept in ``notes`` (once)."""
        if text not in self.notes:
            self.notes.append(text)
            warnings.warn(text, stacklevel=3)

    def precheck(self, need: int, what: str) -> None:
        if self.limit is not None and need > self.limit:
            raise MemoryBudgetError(
                f"{what} needs at least {fmt_bytes(need)}, over the memory budget of {fmt_bytes(self.limit)}; "
                "raise the budget or export a smaller bundle (lower rank, int8 base, shorter sequences)"
            )

    @contextmanager
    def phase(self, name: str, *,
              on_over: Callable[[MemoryBudgetError], BaseException] | None = None) -> Iterator[None]:
        """Meter the ``with`` body as phase ``name``; a body that raises is not recorded. Over the
        limit, raises MemoryBudgetError, or what ``on_over(error)`` returns (the session's
        watchdog saves the adapter there first)."""
        reset_peak()
        t = time.perf_counter()
        yield
        err = self._record(name, peak_rss_bytes(), time.perf_counter() - t)
        if err is not None:
            if on_over is None:
                raise err
            raise on_over(err) from None

    def _record(self, name: str, peak: int, seconds: float) -> MemoryBudgetError | None:
        """Keep the reading; the error to raise when it is over the limit."""
        used = max(0, peak - self.baseline)
        self.last = PhaseReading(name, peak, used, seconds)
        self.peaks[name] = max(self.peaks.get(name, 0), used)
        self.peak_rss[name] = max(self.peak_rss.get(name, 0), peak)
        self.seconds[name] = seconds
        if self.limit is None or used <= self.limit:
            return None
        return MemoryBudgetError(
            f"{name} reached {fmt_bytes(used)} above the session's start, over the memory budget of "
            f"{fmt_bytes(self.limit)}; use smaller batches or shorter sequences, or raise the budget"
        )
