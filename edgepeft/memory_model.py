"""Predict a bundle's memory, phase by phase, from its manifest alone (no graph is opened).

The phases run in one process in the order a personalization round runs them: open ->
train_step (whose first step allocates the optimizer state) -> evaluate -> swap -> infer.
Each phase's figure is the process's peak resident memory during it, so a later phase
includes what earlier ones left allocated: onnxruntime's arenas keep their high-water mark.

Terms, all in bytes:
    open       = interpreter + runtime library + k_w * frozen weights as stored + adapter
    train_step = open + fixed + dequantized fp32 weights + k_a * activations(batch, seq)
                 + gradients + optimizer state (2 moments) + the updated adapter
    evaluate   = train_step + e0 + e1 * batch * seq * activations_per_position(seq)
                 + k_e * frozen weights (backends that open a session of their own for it)
    swap       = evaluate + a second adapter and its optimizer state
    infer      = swap (inference reuses the evaluation session and its arena)

``activations(batch, seq)`` is what autograd keeps for backward, measured on the host at
export (the manifest's memory card: ``c0 + c1*seq + c2*seq**2`` per example). The per-backend
constants (``BackendCosts``: runtime library, k_w, k_a, e0, e1) were fitted on this project's host (x86_64,
Python 3.11, onnxruntime 1.19.2 training / plain) by ``benchmarks/memory_model.py``, which
also reports the error on every model and configuration it measures. On another
architecture the library term differs by tens of MiB: measure there with ``edgepeft profile``
(no ``--predict-only``) before trusting a tight fit.

Which model predicts a backend is its record's ``memory`` (edgepeft.backends): these
constants for the whole-graph backends, or any ``MemoryModel`` of the backend's own. A backend
without one has no prediction: its budgets are measured only, and the precheck says so."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Protocol

from edgepeft.errors import MemoryBudgetError, SpecError
from edgepeft.manifest import Manifest
from edgepeft.memory import MiB

PHASES = ("open", "train_step", "evaluate", "swap", "infer")


@dataclass(frozen=True)
class Prediction:
    backend: str
    batch: int
    seq: int
    phases: dict[str, int]
    parts: dict[str, int] = field(default_factory=dict)

    @property
    def peak(self) -> int:
        return max(self.phases.values())

    def session_peak(self) -> int:
        """What a session adds to the process (the interpreter was there before)."""
        return self.peak - self.parts["interpreter"]


class MemoryModel(Protocol):
    """What a backend's record (edgepeft.backends) may name as its memory model."""

    def predict(self, manifest: Manifest, *, batch: int, seq: int, trainable_params: int) -> Prediction:
        """The phases' peaks for ``batch`` x ``seq`` with ``trainable_params`` trainable floats."""


@dataclass(frozen=True)
class BackendCosts:
    """Fitted constants of one whole-graph backend (see the module docstring): a MemoryModel."""

    library: int       # onnxruntime import + sessions' fixed cost
    k_weights: float   # frozen bytes in memory per byte stored
    train_fixed: int   # the training session's fixed cost at its first step
    k_dequant: float   # live fp32 bytes per byte DequantizeLinear materializes in a step
    k_acts: float      # runtime activation bytes per byte autograd keeps
    e0: int            # evaluate's fixed extra
    e1: float          # evaluate's extra per example per activation byte per position
    eval_weights: float  # evaluation-session bytes per frozen byte stored (0: shares the training one)

    def predict(self, manifest: Manifest, *, batch: int, seq: int, trainable_params: int) -> Prediction:
        """The module docstring's terms with these constants (``predict()`` names the backend)."""
        k = self
        c = card(manifest)
        t = 4 * trainable_params
        acts = activations(manifest, batch, seq)
        per_position = batch * (c["activations_per_example"][1] + 2 * c["activations_per_example"][2] * seq)
        parts = {
            "interpreter": INTERPRETER,
            "library": k.library,
            "weights": int(k.k_weights * c["frozen_bytes"]),
            "adapter": t,
            "train_fixed": k.train_fixed,
            "dequantized": int(k.k_dequant * c["dequant_fp32_bytes"]),
            "activations": int(k.k_acts * acts),
            "gradients": t,
            "optimizer_state": 2 * t,
            "evaluate_extra": int(k.e0 + k.e1 * per_position * seq + k.eval_weights * c["frozen_bytes"]),
            "second_adapter": 3 * t,
        }
        p = parts
        opened = p["interpreter"] + p["library"] + p["weights"] + p["adapter"]
        train = (opened + p["train_fixed"] + p["dequantized"] + p["activations"] + p["gradients"]
                 + p["optimizer_state"] + p["adapter"])
        evaluate = train + p["evaluate_extra"]
        phases = {"open": opened, "train_step": train, "evaluate": evaluate,
                  "swap": evaluate + p["second_adapter"], "infer": evaluate + p["second_adapter"]}
        return Prediction("", batch, seq, phases, parts)



@dataclass(frozen=True)
class PlannedCosts:
    """A backend whose programs plan their memory at export for a fixed batch (ExecuTorch): the
    same terms as ``costs`` at the program's batch, whatever batch is asked (a smaller batch is
    padded, a larger one split into program-sized chunks), and at the asked sequence length
    (the arena is planned for the longest, but only the pages a run touches become resident);
    plus a causal LM's logits on the host, which do grow with the asked batch (``split_logits``)."""

    costs: BackendCosts
    backend: str       # whose manifest entry holds the batch
    batch_setting: str  # that entry's setting

    def predict(self, manifest: Manifest, *, batch: int, seq: int, trainable_params: int) -> Prediction:
        entry = manifest.backends.get(self.backend)
        if entry is None:
            raise SpecError(f"bundle {manifest.model_name!r} has no {self.backend!r} programs to predict")
        planned = int(entry.settings[self.batch_setting])
        seq_run = min(seq, manifest.max_length)
        p = self.costs.predict(manifest, batch=planned, seq=seq_run, trainable_params=trainable_params)
        evaluate, infer = split_logits(batch, planned, seq_run, card(manifest).get("logits_per_position", 0))
        phases = p.phases | {"evaluate": p.phases["evaluate"] + evaluate, "infer": p.phases["infer"] + infer}
        return dataclasses.replace(p, batch=batch, seq=seq, phases=phases,
                                   parts=p.parts | {"eval_logits": evaluate, "infer_logits": infer})


def split_logits(batch: int, planned: int, seq: int, vocab: int) -> tuple[int, int]:
    """A causal LM's logits on the host side of a fixed-batch program (bytes; 0 for a classifier,
    whose logits are a few floats per row), for (evaluate, infer). Inference keeps each chunk's
    (planned x seq x vocab) output alive (the real rows are a view of it); several chunks are
    then concatenated into the (batch x seq x vocab) result, one is returned as it is.
    Evaluation then takes the cross-entropy of that result in float64: a copy, ``x - max`` and
    its ``exp`` (3 x 8 bytes per logit) next to the float32 result. These depend on the ASKED
    batch, not the planned one: a batch larger than the program's gives more logits, not a
    bigger arena."""
    per_row = seq * vocab
    chunks = -(-batch // planned)
    result = planned if chunks == 1 else batch  # rows of the float32 array the call returns
    infer = (chunks * planned + (batch if chunks > 1 else 0)) * per_row * 4
    # The cross-entropy's peak: the float32 result (4) + three float64 arrays (3 x 8) per logit.
    return max(infer, (4 * result + 3 * 8 * batch) * per_row), infer


# Python 3.11 + numpy + edgepeft.runtime imported, measured before Session.open.
INTERPRETER = 33 * MiB
# `python -m benchmarks.memory_model --fit` (calibration rows only), 2026-11-28; the backends'
# records (edgepeft.backends) name them.
ORT_TRAINING_COSTS = BackendCosts(library=40_577_674, k_weights=1.415, train_fixed=5_252_083, k_dequant=0.783,
                                  k_acts=1.93, e0=1_754_638, e1=0.15, eval_weights=0.797)
PORTABLE_COSTS = BackendCosts(library=39_370_547, k_weights=1.79, train_fixed=6_673_220, k_dequant=0.503,
                              k_acts=1.417, e0=2_343_313, e1=0.179, eval_weights=2.385)

# `python -m benchmarks.memory_model --backends executorch --fit` (calibration rows only), 2026-12-01,
# with the native runner (arena shared by both programs, touched pages only).
# Its record wraps them in PlannedCosts (the programs' fixed batch).
EXECUTORCH_COSTS = BackendCosts(library=4_742_765, k_weights=0.066, train_fixed=10_055_632, k_dequant=4.315,
                                k_acts=0.922, e0=285_866, e1=0.0, eval_weights=1.099)


def card(manifest: Manifest) -> dict:
    c = manifest.memory
    if not c or "activations_per_example" not in c:
        raise SpecError(f"bundle {manifest.model_name!r} has no memory card (exported by an older edgepeft): "
                        "re-export it to predict its memory")
    return c


def activations(manifest: Manifest, batch: int, seq: int) -> float:
    c0, c1, c2 = card(manifest)["activations_per_example"]
    return batch * max(0.0, c0 + c1 * seq + c2 * seq * seq)


def has_seq(manifest: Manifest) -> bool:
    return any(isinstance(d, str) and d != "batch" for io in manifest.inputs for d in io.shape)


def model(backend: str) -> MemoryModel | None:
    """The memory model backend's record names (None: it has none); BackendError for a name
    that is no backend."""
    # The registry holds this module's constants, so it is imported when asked (at the top it
    # would be a cycle).
    from edgepeft.backends import record

    return record(backend).memory


def predicted_backends() -> list[str]:
    from edgepeft.backends import REGISTRY

    return [name for name, r in REGISTRY.items() if r.memory is not None]


def no_prediction(backend: str) -> str | None:
    """What a precheck states for a backend the memory model cannot predict; None when it can."""
    return None if model(backend) is not None else f"no prediction for backend {backend!r}; measured only"


def predict(manifest: Manifest, *, backend: str, batch: int, seq: int | None = None,
            trainable_params: int | None = None) -> Prediction:
    """Peak RSS of each phase for ``batch`` examples of ``seq`` positions (default: the
    bundle's max_length), by the model of ``backend``'s record. ``trainable_params``
    overrides the manifest's count (to ask "what rank would fit"). SpecError for a backend
    without a model."""
    m = model(backend)
    if m is None:
        raise SpecError(f"no memory prediction for backend {backend!r}: the memory model has none for it (it "
                        f"predicts {predicted_backends()}). Measure it instead: a session with a memory budget "
                        "meters every phase (Session.open(memory_budget=...), `edgepeft train --budget`)")
    if batch < 1:
        raise SpecError(f"`batch` must be >= 1, got {batch}")
    seq = manifest.max_length if seq is None or not has_seq(manifest) else seq
    if seq < 1:
        raise SpecError(f"`seq` must be >= 1, got {seq}")
    t = trainable_params if trainable_params is not None else manifest.trainable_params
    return dataclasses.replace(m.predict(manifest, batch=batch, seq=seq, trainable_params=t), backend=backend)


def largest(fits, hi: int) -> int:
    """The largest n in [1, hi] with ``fits(n)``, for a ``fits`` true up to some n and false
    after (memory grows with batch, sequence and rank); 0 if not even 1 fits."""
    if hi < 1 or not fits(1):
        return 0
    lo = 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


def largest_batch(manifest: Manifest, *, backend: str, seq: int | None, budget: int, upto: int) -> int:
    """The largest batch size <= ``upto`` whose predicted session peak fits ``budget`` (0: none)."""
    return largest(lambda b: predict(manifest, backend=backend, batch=b, seq=seq).session_peak() <= budget, upto)


def check(manifest: Manifest, *, backend: str, batch: int | None, seq: int | None, budget: int,
          what: str) -> str | None:
    """Refuse, before anything is allocated, a configuration predicted over ``budget`` (bytes
    a session may add to the process); ``batch=None`` checks opening only. For a backend the
    memory model has no prediction for, returns the note the caller must state ("no
    prediction for backend X; measured only") instead. Bundles without a memory card are not
    refused here (the session still measures every phase)."""
    note = no_prediction(backend)
    if note is not None or not manifest.memory:
        return note
    pred = predict(manifest, backend=backend, batch=batch or 1, seq=seq)
    need, worst = ((pred.phases["open"], "open") if batch is None
                   else (pred.peak, max(pred.phases, key=pred.phases.get)))
    need -= pred.parts["interpreter"]
    if need > budget:
        from edgepeft.memory import fmt_bytes

        shape = "" if batch is None else f", batch {batch} x seq {pred.seq}"
        raise MemoryBudgetError(
            f"{what} is predicted to need {fmt_bytes(need)} ({worst} phase{shape}), over the memory budget of "
            f"{fmt_bytes(budget)}: lower the batch size or sequence length (`edgepeft profile` shows the largest "
            "that fit), pass micro_batch=True to split batches, export with a lower rank or an int8 base, or "
            "raise the budget")
    return None
