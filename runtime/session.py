"""Session: one bundle's frozen base in memory, one active adapter at a time, hot-swappable.

Adapters seen in this session are kept in memory (they are small), so swapping back and forth
restores each adapter exactly as it was, saved or not; ``save_adapter`` writes the active one
to the store atomically."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from edgepeft import memory_model, names
from edgepeft.adapters import AdapterStore, check_adapter_name, default_store
from edgepeft.bundle import OpenedBundle, open_bundle
from edgepeft.data import Batch, Example, TextEncoder
from edgepeft.errors import AdapterError, BackendError, DataError, MemoryBudgetError, NumericalError
from edgepeft.manifest import Manifest
from edgepeft.memory import parse_size
from edgepeft.optim import Optimizer, OptimizerSpec
from edgepeft.runtime.backends import Backend, make_backend, resolve
from edgepeft.runtime.backends.base import eval_predictions
from edgepeft.runtime.batching import accumulate
from edgepeft.runtime import inputs as check
from edgepeft.runtime.budget import MemoryBudget, static_bytes
from edgepeft.runtime.guard import UpdateGuard

_DEFAULT_GUARD = UpdateGuard()

# Their homes are edgepeft.errors and edgepeft.adapters; importable from here as before.
__all__ = ["EvalResult", "NumericalError", "Session", "UpdateGuard", "default_store"]


@dataclass(frozen=True)
class EvalResult:
    """Mean loss and top-1 accuracy over ``n`` labelled positions (examples for
    classification, predicted tokens for causal LM)."""

    loss: float
    accuracy: float
    n: int

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.loss, 700.0))


def _precheck(budget: MemoryBudget, bundle: OpenedBundle, what: str, batch: int | None):
    """What to check once the backend is chosen and before it loads: the bundle's static size,
    and with a limit the memory model's prediction (at ``batch``, else for opening)."""
    def check(name: str) -> None:
        where = f"{what} on {name}"
        budget.precheck(static_bytes(bundle, name), where)
        if budget.limit is not None:
            note = memory_model.check(bundle.manifest, backend=name, batch=batch, seq=None, budget=budget.limit,
                                      what=where)
            if note is not None:  # stated, never skipped silently: the measured phases still apply
                budget.note(note)
    return check


@dataclass
class _Adapter:
    """An adapter held in memory: its tensors (the source of truth), its optimizer, its steps."""

    tensors: dict[str, np.ndarray]
    optimizer: Optimizer
    steps: int = 0


class Session:
    """Use ``Session.open``."""

    def __init__(self, bundle: OpenedBundle, backend: Backend, store: AdapterStore, budget: MemoryBudget,
                 optimizer: OptimizerSpec):
        self.bundle = bundle
        self.backend = backend
        self.store = store
        self.budget = budget
        self.optimizer_spec = optimizer
        self._encoder: TextEncoder | None = None
        self._others: dict[str, _Adapter] = {}
        self._name = ""
        self._cur: _Adapter | None = None
        self.micro_batch = False
        # Refuses a step whose update is out of proportion to the weights (None: off).
        self.update_guard: UpdateGuard | None = _DEFAULT_GUARD

    @classmethod
    def open(cls, path: str | Path, *, memory_budget: int | str | None = None, adapter: str = "default",
             store: str | Path | None = None, backend: str = "auto", threads: int | None = None,
             optimizer: OptimizerSpec | None = None, cache_dir: str | Path | None = None,
             trusted_keys: Iterable | None = None, batch_size: int | None = None,
             micro_batch: bool = False, update_guard: UpdateGuard | None = _DEFAULT_GUARD) -> "Session":
        """Open a bundle for training and inference with ``adapter`` active: the stored adapter of
        that name if there is one, else a new adapter starting from the bundle's initial one.

        ``memory_budget`` (bytes or '512MB') caps what this session adds to the process's
        resident memory: checked against the bundle's static size before loading, and
        measured after every phase (MemoryBudgetError when over). With a budget, the memory
        model (edgepeft.memory_model) refuses before loading a bundle predicted over it (at
        ``batch_size`` when given, else for opening), and refuses each training batch
        predicted over it before running it; ``micro_batch=True`` instead splits such a batch
        into the largest micro-batches that fit and accumulates their gradients (the step
        equals the full batch's). If measured memory still crosses the budget after a step,
        the adapter is saved and MemoryBudgetError raised. A backend the memory model has no
        prediction for is measured only: the precheck says so ("no prediction for backend X;
        measured only": a warning, and in ``session.budget.notes``).

        ``backend``: a name of edgepeft.backends.REGISTRY, or "auto": the first backend, in the
        registry's order (ort-training, portable, lean, executorch), that the bundle carries and
        this machine can run. With a ``memory_budget``, "auto" instead prefers, among those,
        the one the memory model predicts leanest (at ``batch_size``, else 1) within the budget;
        backends it has no prediction for come after those, in the registry's order, and
        backends predicted over the budget last.

        ``trusted_keys`` (publisher public keys: .pub files from `edgepeft keygen`, PEM bytes or
        key objects): only a bundle signed by one of them opens (SignatureError otherwise).
        The session locks each adapter it loads against other processes until ``close``
        (LockError if another process holds it).

        ``update_guard`` (runtime.guard.UpdateGuard; None: off): a step whose update moves a
        tensor out of proportion to its weights (by default more than 10x its RMS, or RMS 1.0
        for a tensor under 0.1) is refused with NumericalError, changing nothing."""
        check_adapter_name(adapter)
        check.open_options(threads=threads, optimizer=optimizer, batch_size=batch_size, update_guard=update_guard)
        budget = MemoryBudget(parse_size(memory_budget))
        budget.start()
        bundle = open_bundle(Path(path), Path(cache_dir) if cache_dir else None, trusted_keys=trusted_keys)
        with budget.phase("open"):
            precheck = _precheck(budget, bundle, f"bundle {Path(path).name!r}", batch_size)
            name = resolve(backend, bundle.manifest, budget=budget.limit, batch=batch_size)
            be = make_backend(name, bundle, threads=threads, precheck=precheck)
            store_dir = Path(store) if store else default_store(Path(path))
            s = cls(bundle, be, AdapterStore(store_dir, bundle.manifest), budget, optimizer or OptimizerSpec())
            s.micro_batch = micro_batch
            s.update_guard = update_guard
            s._activate(adapter)
        return s

    def _activate(self, adapter: str) -> None:
        """Hold, load and install the session's first adapter (closing the session on failure)."""
        try:
            self.store.hold(adapter)  # a second process training it fails now, not at save time
            self._cur = self._load(adapter, create=True)
        except BaseException:
            self.close()
            raise
        self._name = adapter
        self.backend.load_parameters(self._cur.tensors)

    # -- adapters --------------------------------------------------------------------------
    @property
    def manifest(self) -> Manifest:
        return self.bundle.manifest

    @property
    def adapter(self) -> str:
        """The active adapter's name."""
        return self._name

    @property
    def steps(self) -> int:
        """Optimizer steps the active adapter has taken (across saves and sessions)."""
        return self._cur.steps

    def adapters(self) -> list[str]:
        """Adapters in the store, and those created in this session but not saved yet."""
        return sorted(set(self.store.names()) | set(self._others) | {self._name})

    def _load(self, name: str, *, create: bool) -> _Adapter:
        opt = Optimizer(self.optimizer_spec)
        if self.store.exists(name):
            tensors, meta = self.store.load(name)
            state = self.store.load_optimizer(name)
            if state is not None:
                opt.load_state_dict(*state)
            return _Adapter(tensors, opt, int(meta.get("steps", 0)))
        if create:
            initial = AdapterStore(self.bundle.root / "adapters", self.manifest).load("initial")[0]
            return _Adapter(initial, opt, 0)
        raise AdapterError(f"no adapter {name!r} (have {self.adapters()}); pass create=True to start a new one")

    def swap_adapter(self, name: str, *, create: bool = False) -> None:
        """Make ``name`` active in place (the frozen base is not reloaded). The adapter it
        replaces stays in memory as it is, optimizer state included, saved or not."""
        check_adapter_name(name)
        if name == self._name:
            return
        self.store.hold(name)  # no other process trains it while it is in this session
        nxt = self._others.pop(name, None) or self._load(name, create=create)
        self.backend.load_parameters(nxt.tensors)
        self._others[self._name] = self._cur
        self._name, self._cur = name, nxt

    def revert_adapter(self) -> None:
        """Discard the active adapter's changes since it was last saved: its tensors,
        optimizer state and step count come back from the store (a guardrail's rollback)."""
        if not self.store.exists(self._name):
            raise AdapterError(f"adapter {self._name!r} was never saved, so there is nothing to revert to: "
                               "save_adapter() it first")
        self._cur = self._load(self._name, create=False)
        self.backend.load_parameters(self._cur.tensors)

    def unload_adapter(self, name: str) -> None:
        """Drop the in-memory copy of the inactive adapter ``name`` (unsaved changes are lost)
        and release its lock; the next swap to it loads the stored version. Keeps a session
        serving many users flat in memory."""
        check_adapter_name(name)
        if name == self._name:
            raise AdapterError(f"adapter {name!r} is active: swap to another before unloading it")
        self._others.pop(name, None)
        self.store.release(name)

    def save_adapter(self, name: str | None = None) -> Path:
        """Write the active adapter and its optimizer state to the store, atomically, as
        ``name`` (default: the active adapter's own name)."""
        target = check_adapter_name(self._name if name is None else name)
        return self.store.save(target, self._cur.tensors,
                               meta={"steps": self._cur.steps, "backend": self.backend.name},
                               optimizer=self._cur.optimizer.state_dict())

    def parameters(self) -> dict[str, np.ndarray]:
        """Copies of the active adapter's tensors, read back from the backend."""
        return self.backend.named_parameters()

    # -- data ------------------------------------------------------------------------------
    @property
    def encoder(self) -> TextEncoder:
        if self._encoder is None:
            if names.TOKENIZER not in self.manifest.members:
                raise DataError("this bundle has no tokenizer: pass Batch objects of model inputs instead of texts")
            self._encoder = TextEncoder(self.bundle.path(names.TOKENIZER), self.manifest)
        return self._encoder

    def _as_batch(self, batch: Batch | Sequence[Example], need_labels: bool, what: str) -> Batch:
        if isinstance(batch, Batch):
            b = batch
        else:
            batch = check.examples(batch, what)
            if not batch:
                raise DataError("empty batch")
            b = self.encoder.batch(batch)
        if need_labels and b.labels is None:
            raise DataError("training and evaluation need labels")
        return b

    # -- steps -----------------------------------------------------------------------------
    def train_step(self, batch: Batch | Sequence[Example]) -> float:
        """One optimizer step on the active adapter; returns the loss (before the step). A step
        whose loss, gradients or updated tensors are not finite changes nothing and raises
        NumericalError."""
        b = self._as_batch(batch, need_labels=True, what="train_step()")
        chunks = self._fit_budget(b)
        with self.budget.phase("train_step", on_over=self._save_and_stop):
            loss, grads = self._forward_backward(chunks)
            self._apply(loss, grads)
        return loss

    def apply_gradients(self, loss: float, grads: Mapping[str, np.ndarray]) -> None:
        """One optimizer step on the active adapter from gradients computed elsewhere (DP-SGD's
        clipped, noised mean in edgepeft.fleet): the same shape, finiteness and update-size checks
        as ``train_step``, NumericalError/BackendError changing nothing. Run it inside
        ``training_phase()`` so that the budget's watchdog saves the adapter before it stops."""
        self._apply(float(loss), dict(grads))

    def training_phase(self):
        """The train step's metered phase (with the save-and-stop watchdog), for steps built from
        ``backend.forward_backward`` calls outside ``train_step``."""
        return self.budget.phase("train_step", on_over=self._save_and_stop)

    def _apply(self, loss: float, grads: dict[str, np.ndarray]) -> None:
        """The optimizer step on the active adapter, or NumericalError changing nothing."""
        cur = self._cur
        self._check_grads(grads)
        bad = not math.isfinite(loss) or not all(np.all(np.isfinite(g)) for g in grads.values())
        if not bad:
            saved = cur.optimizer.state_dict()
            new = cur.optimizer.step(cur.tensors, grads)
            bad = not all(np.all(np.isfinite(v)) for v in new.values())
            big = [] if bad or self.update_guard is None else self.update_guard.violations(cur.tensors, new)
            if bad or big:
                cur.optimizer.load_state_dict(*saved)
            if big:
                raise NumericalError(
                    f"a step on adapter {self._name!r} would move {'; '.join(big[:3])}: out of proportion to the "
                    f"weights ({self.update_guard}); nothing was changed: lower the learning rate or clip gradients "
                    "(OptimizerSpec(max_grad_norm=...)), or loosen the guard (Session.open(update_guard=...))")
        if bad:
            raise NumericalError(f"a step on adapter {self._name!r} gave a non-finite loss ({loss}), gradient or "
                                 "update; nothing was changed: lower the learning rate or check the data")
        self.backend.load_parameters(new)
        cur.tensors = new
        cur.steps += 1

    def _check_grads(self, grads: Mapping[str, np.ndarray]) -> None:
        """BackendError unless the backend gave one gradient per trainable tensor, at its shape
        (a damaged graph could give fewer, or broadcastable ones the optimizer would take)."""
        bad = [f"{t.name}: {getattr(grads.get(t.name), 'shape', 'missing')} (expected {t.shape})"
               for t in self.manifest.trainable
               if not isinstance(grads.get(t.name), np.ndarray) or tuple(grads[t.name].shape) != t.shape]
        if bad:
            raise BackendError(f"{self.backend.name} gave gradients that do not fit the adapter ({bad[:3]}); "
                               "the bundle's training graph is damaged: re-export it")

    def _save_and_stop(self, e: MemoryBudgetError) -> MemoryBudgetError:
        """The watchdog, when a step ended over the budget: keep the work, stop cleanly."""
        saved = self.save_adapter()
        return MemoryBudgetError(f"{e}. Training stopped; adapter {self._name!r} was saved to {saved}")

    def _fit_budget(self, b: Batch) -> list[Batch]:
        """``b`` as micro-batches predicted to fit the budget (just ``[b]`` without a budget)."""
        limit = self.budget.limit
        if limit is None or not self.manifest.memory:
            return [b]
        note = memory_model.no_prediction(self.backend.name)
        if note is not None:  # nothing to check or split by: the measured phase still applies
            self.budget.note(note)
            return [b]
        seq = next((b.feeds[io.name].shape[1] for io in self.manifest.inputs
                    if len(io.shape) > 1 and isinstance(io.shape[1], str)), None)
        kw = dict(backend=self.backend.name, seq=seq, budget=limit)
        if not self.micro_batch:
            memory_model.check(self.manifest, batch=len(b), what=f"a training batch of {len(b)}", **kw)
            return [b]
        m = memory_model.largest_batch(self.manifest, upto=len(b), **kw)
        if m == 0:
            memory_model.check(self.manifest, batch=1, what="a training batch of 1", **kw)
        return [Batch({k: v[i:i + m] for k, v in b.feeds.items()}, b.labels[i:i + m]) for i in range(0, len(b), m)]

    def _forward_backward(self, chunks: list[Batch]) -> tuple[float, dict[str, np.ndarray]]:
        """Loss and gradients of the whole batch: micro-batches weighted by their labelled
        positions (the backends' losses are means over those)."""
        if len(chunks) == 1:  # the whole batch, as the backend computes it
            return self.backend.forward_backward(chunks[0])
        return accumulate(chunks, self.backend.forward_backward)

    def evaluate(self, batches: Iterable[Batch | Sequence[Example]]) -> EvalResult:
        """Mean loss and top-1 accuracy over ``batches``, weighted by labelled positions."""
        total_loss, correct, n = 0.0, 0, 0
        with self.budget.phase("evaluate"):
            for batch in check.batches(batches):
                check.check_batch_item(batch)
                b = self._as_batch(batch, need_labels=True, what="evaluate()'s batches")
                loss, pred = eval_predictions(self.backend, b)
                valid = b.labels != names.IGNORE_INDEX
                count = int(valid.sum())
                total_loss += loss * count
                correct += int(((pred == b.labels) & valid).sum())
                n += count
        if n == 0:
            raise DataError("evaluate() got no batches")
        return EvalResult(total_loss / n, correct / n, n)

    def infer(self, inputs: Sequence[str] | Mapping[str, np.ndarray]) -> np.ndarray:
        """Logits for texts (a list of strings, tokenized with the bundle's tokenizer) or for
        model input arrays (a mapping of input name -> array); one row per text or batch row."""
        if isinstance(inputs, Mapping):
            feeds = check.feeds(inputs, [i.name for i in self.manifest.inputs], self.manifest.max_length)
        else:
            feeds = self.encoder.encode(check.texts(inputs, "infer()"))
        with self.budget.phase("infer"):
            logits = self.backend.infer(feeds)
        rows = len(next(iter(feeds.values()))) if feeds else None
        if not isinstance(logits, np.ndarray) or logits.ndim < 1 or (rows is not None and len(logits) != rows):
            raise BackendError(f"{self.backend.name} gave logits of shape {getattr(logits, 'shape', None)} for "
                               f"{rows} rows; the bundle's inference graph is damaged: re-export it")
        return logits

    def predict(self, texts: Sequence[str]) -> list[str]:
        """The label of each text (classification bundles)."""
        logits = self.infer(check.texts(texts, "predict()"))
        if logits.shape[-1] != len(self.manifest.labels):
            raise BackendError(f"the model gives {logits.shape[-1]} scores per text for {len(self.manifest.labels)} "
                               "labels: predict() is for classification bundles (use infer() for logits)")
        return [self.manifest.labels[i] for i in logits.argmax(axis=-1)]

    def close(self) -> None:
        self.backend.close()
        self.store.release_all()

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
