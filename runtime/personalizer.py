"""Personalizer: the on-device personalization loop over one Session, for many users.

Per user: a bounded, crash-safe sample buffer; a trigger (every N new samples, or on demand);
a round of K training steps inside the session's memory budget; a guardrail that evaluates the
user's own held-out samples before and after the round and keeps the new adapter only if it is
not worse (else the last good one is restored, and that round's new samples are quarantined);
and a metrics log (JSONL) with one record per round. Files, under ``root``: ``<user>/samples.log`` and ``<user>/rounds.jsonl``; the adapters
live in the session's adapter store under the users' names. Torch-free."""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Sequence

from edgepeft.adapters import check_adapter_name
from edgepeft.data import Batch, Example
from edgepeft.errors import AdapterError, DataError, MemoryBudgetError, SpecError
from edgepeft.runtime.samples import RecordLog, Sample, SampleBuffer, shuffled_batches
from edgepeft.errors import NumericalError
from edgepeft.runtime.session import EvalResult, Session

Metric = Literal["loss", "accuracy"]
Batcher = Callable[[Sequence[Mapping[str, Any]]], Batch]


@dataclass(frozen=True)
class PersonalizerConfig:
    """How the loop runs. Checked at construction."""

    every: int = 32              # a round after this many new samples of a user; 0: on demand only
    steps: int = 10              # K optimizer steps per round
    batch_size: int = 8
    capacity: int = 1000         # newest samples kept per user
    holdout: float = 0.2         # share of a user's samples never trained on: the guardrail's slice
    min_holdout: int = 4         # fewer held-out samples than this: the round is skipped
    min_train: int = 4
    metric: Metric = "loss"      # what "not worse" compares on the held-out slice
    tolerance: float = 0.0       # accepted worsening (loss up / accuracy down by at most this)
    eval_batch_size: int = 16
    seed: int = 0
    base_adapter: str | None = None  # a stored adapter new users start from (default: the bundle's initial one)
    # Samples that came in with a rolled-back or failed round are never trained on or checked
    # against again: poisoned or mislabeled data must not get a second try (they age out of the
    # buffer). Turn off to retry them in later rounds.
    quarantine: bool = True
    fsync: bool = True           # fsync every append (turn off only for tests or throwaway data)

    def __post_init__(self) -> None:
        for name, low in (("every", 0), ("steps", 1), ("batch_size", 1), ("capacity", 2), ("min_holdout", 1),
                          ("min_train", 1), ("eval_batch_size", 1)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < low:
                raise SpecError(f"`{name}` must be an int >= {low}, got {v!r}")
        if not (isinstance(self.holdout, (int, float)) and 0.0 < self.holdout < 1.0):
            raise SpecError(f"`holdout` must be a fraction in (0, 1), got {self.holdout!r}")
        if self.metric not in ("loss", "accuracy"):
            raise SpecError(f"`metric` must be 'loss' or 'accuracy', got {self.metric!r}")
        if not (isinstance(self.tolerance, (int, float)) and self.tolerance >= 0 and math.isfinite(self.tolerance)):
            raise SpecError(f"`tolerance` must be a finite number >= 0, got {self.tolerance!r}")
        if self.base_adapter is not None:
            check_adapter_name(self.base_adapter)


@dataclass(frozen=True)
class RoundResult:
    """One round of one user. ``status``: accepted (the new adapter is the user's last good
    one), rolled_back (worse on the held-out slice: the previous adapter is active again),
    failed (a step was not finite or broke the memory budget: rolled back too), skipped (too
    few samples: nothing trained)."""

    user: str
    round: int
    trigger: Literal["every", "manual"]
    status: Literal["accepted", "rolled_back", "failed", "skipped"]
    reason: str
    last_seq: int
    n_train: int
    n_holdout: int
    steps: int = 0
    before: EvalResult | None = None
    after: EvalResult | None = None
    losses: tuple[float, ...] = ()
    seconds: float = 0.0
    adapter_steps: int = 0       # the user's adapter's total steps after the round
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def accepted(self) -> bool:
        return self.status == "accepted"

    def to_record(self) -> dict[str, Any]:
        rec = asdict(self)
        for k in ("before", "after"):
            ev = getattr(self, k)
            rec[k] = None if ev is None else {"loss": ev.loss, "accuracy": ev.accuracy, "n": ev.n}
        rec["losses"] = list(self.losses)
        rec["time"] = time.time()
        return rec


@dataclass
class _UserState:
    """What the metrics log says about a user's rounds so far."""

    rounds: int = 0
    last_seq: int = 0             # newest sample seen by the last round of any outcome
    trusted_seq: int = 0          # newest sample seen by the last accepted round
    quarantined: list[tuple[int, int]] = field(default_factory=list)  # (after, upto] seq ranges

    def update(self, rec: Mapping[str, Any], quarantine: bool) -> None:
        prev, last = self.last_seq, int(rec.get("last_seq", 0))
        self.rounds = int(rec.get("round", self.rounds + 1))
        if rec.get("status") == "accepted":
            self.trusted_seq = last
        elif rec.get("status") in ("rolled_back", "failed") and quarantine and last > prev:
            self.quarantined.append((prev, last))
        self.last_seq = max(prev, last)

    def is_quarantined(self, seq: int) -> bool:
        return any(lo < seq <= hi for lo, hi in self.quarantined)


class Personalizer:
    """``add(user, samples)`` buffers a user's samples and runs a round when the trigger
    fires; ``personalize(user)`` runs one now; ``activate(user)`` puts the user's last good
    adapter in the session (for ``infer``). The Personalizer owns the adapters named after its
    users: train them only through it, or the guardrail's "last good" means nothing.

    ``batcher`` turns buffered samples (dicts) into a ``Batch``; the default reads
    ``{"text", "label"}`` with the bundle's tokenizer. Pass one for images or other inputs."""

    def __init__(self, session: Session, root: str | Path, config: PersonalizerConfig | None = None, *,
                 batcher: Batcher | None = None):
        self.session = session
        self.root = Path(root)
        self.config = config or PersonalizerConfig()
        self._batcher = batcher
        self._users: set[str] = set()
        # Only the last-used user's buffer is kept in memory: memory stays flat as users are added.
        self._buf: tuple[str, SampleBuffer] | None = None
        self._state: dict[str, _UserState] = {}

    # -- samples ---------------------------------------------------------------------------
    def add(self, user: str, samples: Sequence[Example | Mapping[str, Any]]) -> RoundResult | None:
        """Persist ``samples`` of ``user`` (durably, before anything else), then run a round if
        ``every`` new samples have come in since the last one. Returns that round, or None."""
        if isinstance(samples, (str, bytes, Mapping, Example)):
            raise DataError(f"add() takes a list of samples (Examples or mappings), got one {type(samples).__name__}: "
                            "pass [sample]")
        buf = self.buffer(user)
        buf.add([self._to_record(s) for s in samples])
        if self.config.every and buf.last_seq - self._user_state(user).last_seq >= self.config.every:
            return self._round(user, "every")
        return None

    def buffer(self, user: str) -> SampleBuffer:
        self._check_user(user)
        if self._buf is None or self._buf[0] != user:
            self._buf = (user, SampleBuffer(self.root / user / "samples.log", self.config.capacity,
                                            fsync=self.config.fsync))
        return self._buf[1]

    def split(self, user: str) -> tuple[list[Sample], list[Sample]]:
        """The user's buffered samples as (train, held-out), quarantined ones left out. A
        sample's side follows from a hash of its content, so it never moves between rounds or
        after a restart, and a duplicate never lands on both sides."""
        st = self._user_state(user)
        train, hold = [], []
        cut = int(self.config.holdout * 10_000)
        for s in self.buffer(user).samples():
            if not st.is_quarantined(s.seq):
                (hold if s.key % 10_000 < cut else train).append(s)
        return train, hold

    def guard_slice(self, user: str) -> tuple[list[Sample], str]:
        """The held-out samples a round is judged on: those the user's last good adapter was
        accepted with ("trusted"), so a batch of poisoned samples cannot vouch for itself by
        also filling the held-out slice; before any accepted round (or with too few trusted
        samples), every held-out sample ("all")."""
        hold = self.split(user)[1]
        trusted = [s for s in hold if s.seq <= self._user_state(user).trusted_seq]
        if len(trusted) >= self.config.min_holdout:
            return trusted, "trusted"
        return hold, "all"

    def _to_record(self, s: Example | Mapping[str, Any]) -> dict[str, Any]:
        if isinstance(s, Example):
            rec: dict[str, Any] = {"text": s.text}
            if s.label is not None:
                rec["label"] = s.label
        elif isinstance(s, Mapping):
            rec = dict(s)
        else:
            raise DataError(f"a sample must be an Example or a mapping, got {type(s).__name__}")
        m = self.session.manifest
        if self._batcher is None:
            if not isinstance(rec.get("text"), str):
                raise DataError("samples need a 'text' string (or pass batcher= to the Personalizer for other inputs)")
            if m.task == "classification" and rec.get("label") not in m.labels:
                raise DataError(f"label {rec.get('label')!r} is not in the bundle's labels {list(m.labels)}")
        return rec

    def _batch(self, samples: Sequence[Sample]) -> Batch:
        data = [s.data for s in samples]
        if self._batcher is not None:
            return self._batcher(data)
        return self.session.encoder.batch([Example(d["text"], d.get("label")) for d in data])

    # -- rounds ----------------------------------------------------------------------------
    def personalize(self, user: str) -> RoundResult:
        """Run a round for ``user`` now (the on-demand trigger)."""
        self.buffer(user)
        return self._round(user, "manual")

    def rounds(self, user: str) -> list[dict[str, Any]]:
        """The user's metrics log: one record per round, oldest first."""
        self._check_user(user)
        return RecordLog(self.root / user / "rounds.jsonl").read()

    def _user_state(self, user: str) -> _UserState:
        if user not in self._state:
            st = _UserState()
            for rec in self.rounds(user):
                st.update(rec, self.config.quarantine)
            self._state[user] = st
        return self._state[user]

    def _round(self, user: str, trigger: Literal["every", "manual"]) -> RoundResult:
        cfg, s = self.config, self.session
        t0 = time.perf_counter()
        n_round = self._user_state(user).rounds + 1
        train = self.split(user)[0]
        hold, which = self.guard_slice(user)
        last_seq = self.buffer(user).last_seq
        self.activate(user)
        extra = {"holdout_slice": which, "train_peak_bytes": s.budget.peaks.get("train_step", 0)}
        common = dict(user=user, round=n_round, trigger=trigger, last_seq=last_seq, n_train=len(train),
                      n_holdout=len(hold), extra=extra)
        if len(hold) < cfg.min_holdout or len(train) < cfg.min_train:
            res = RoundResult(**common, status="skipped", adapter_steps=s.steps,
                              reason=f"too few samples: {len(train)} to train (need {cfg.min_train}), "
                                     f"{len(hold)} held out (need {cfg.min_holdout}); add more")
            return self._log(res)
        before = self._evaluate(hold)
        losses: list[float] = []
        try:
            for batch in self._train_batches(train, f"{cfg.seed}:{user}:{n_round}"):
                losses.append(s.train_step(batch))
            after = self._evaluate(hold)
        except (NumericalError, MemoryBudgetError) as e:
            self._reload_active(user)
            res = RoundResult(**common, status="failed", reason=f"{type(e).__name__}: {e}", steps=len(losses),
                              before=before, losses=tuple(losses), seconds=time.perf_counter() - t0,
                              adapter_steps=s.steps)
            return self._log(res)
        extra["train_peak_bytes"] = s.budget.peaks.get("train_step", 0)  # before the result is frozen
        ok, why = self._not_worse(before, after)
        if ok:
            s.save_adapter()
        else:
            self._reload_active(user)
        res = RoundResult(**common, status="accepted" if ok else "rolled_back", reason=why, steps=len(losses),
                          before=before, after=after, losses=tuple(losses), seconds=time.perf_counter() - t0,
                          adapter_steps=s.steps)
        return self._log(res)

    def _log(self, res: RoundResult) -> RoundResult:
        rec = res.to_record()
        RecordLog(self.root / res.user / "rounds.jsonl", fsync=self.config.fsync).append(rec)
        self._user_state(res.user).update(rec, self.config.quarantine)
        return res

    def _not_worse(self, before: EvalResult, after: EvalResult) -> tuple[bool, str]:
        cfg = self.config
        if not math.isfinite(after.loss):
            return False, "held-out loss is not finite after the round"
        if cfg.metric == "loss":
            ok = after.loss <= before.loss + cfg.tolerance
            return ok, f"held-out loss {before.loss:.4f} -> {after.loss:.4f}"
        ok = after.accuracy >= before.accuracy - cfg.tolerance
        return ok, f"held-out accuracy {before.accuracy:.4f} -> {after.accuracy:.4f}"

    def _evaluate(self, samples: Sequence[Sample]) -> EvalResult:
        k = self.config.eval_batch_size
        return self.session.evaluate(self._batch(samples[i:i + k]) for i in range(0, len(samples), k))

    def _train_batches(self, train: list[Sample], seed: str):
        """``steps`` batches drawn without replacement, reshuffling each pass over the data."""
        for batch in shuffled_batches(train, self.config.steps, self.config.batch_size, seed):
            yield self._batch(batch)

    # -- adapters --------------------------------------------------------------------------
    def activate(self, user: str) -> None:
        """Make ``user``'s last good adapter the session's active one. A new user's adapter
        starts from ``config.base_adapter`` (or the bundle's initial adapter) and is stored at
        once: that is where a first rollback returns to."""
        self._check_user(user)
        s, store = self.session, self.session.store
        if not store.exists(user) and self.config.base_adapter is not None:
            if not store.exists(self.config.base_adapter):
                raise AdapterError(f"base adapter {self.config.base_adapter!r} is not in the store "
                                   f"{str(store.root)!r}: save it first (session.save_adapter)")
            tensors, _ = store.load(self.config.base_adapter)
            store.save(user, tensors, meta={"steps": 0, "base_adapter": self.config.base_adapter})
        s.swap_adapter(user, create=True)
        if not store.exists(user):
            s.save_adapter()
        # Other users' adapters are on disk; dropping their in-memory copies keeps memory flat.
        for other in self._users - {user}:
            s.unload_adapter(other)
        self._users.add(user)

    def _reload_active(self, user: str) -> None:
        """Discard the active adapter's unsaved changes (back to its last good, stored version)."""
        self.session.revert_adapter()

    def _check_user(self, user: str) -> None:
        check_adapter_name(user)
        if user == self.config.base_adapter:
            raise AdapterError(f"user name {user!r} is the base adapter's name; choose another")

