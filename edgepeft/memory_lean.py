"""The lean backend's memory model, from the manifest alone (its memory card's ``lean`` section).

Unlike the whole-graph backends, the lean backend's phases are not cumulative: weights are
memory-mapped and released after every graph, onnxruntime runs without an arena, and what a
phase allocates is freed when it ends. Each phase is the resident base plus what that phase
holds at its worst moment:

    base       = interpreter + runtime library + the adapter
    train_step = base + t0 + the block inputs kept for backward (blocks x batch x seq x hidden)
                 + k_b * (one block's saved activations + its dequantized weights)
                 + head: hidden, its gradient and one vocabulary chunk of logits (causal LM)
                 + gradients, AdamW moments and the updated adapter
    evaluate   = base + e0 + k_e * (one block's activations + dequantized weights) + head (no gradient)
    infer      = evaluate, less the head's loss pass, plus the full logits the call returns
                 (causal LM: batch x seq x vocab)
    swap       = base + s0 + a second adapter and its optimizer state

``t0``, ``e0``, ``s0``, ``k_b``, ``k_e`` and the library term were fitted on this project's host by
``python -m benchmarks.memory_model --backends lean --fit`` (calibration rows only; the report
gives the error on held-out rows).

The executorch-lean backend runs the same walk on ExecuTorch programs with a batch fixed at
export: ``ExecutorchLeanCosts`` takes these terms at the programs' batch and adds the arena the
process keeps (its class docstring), fitted by ``--backends executorch-lean --fit``."""
from __future__ import annotations

from dataclasses import dataclass

from edgepeft import names
from edgepeft.errors import SpecError
from edgepeft.manifest import Manifest

F32 = 4
HEAD_CHUNK = 4096  # rows of the LM head per step (runtime/lean_head.CHUNK)


@dataclass(frozen=True)
class LeanCosts:
    library: int     # onnxruntime import and the lean graphs' sessions
    train_fixed: int
    eval_fixed: int
    swap_fixed: int
    k_block: float   # live bytes in a step per byte of one block's saved activations + dequantized weights
    k_eval: float    # the same in evaluation (forward only)

    def predict(self, manifest: Manifest, *, batch: int, seq: int, trainable_params: int):
        from edgepeft.memory_model import INTERPRETER, Prediction

        lean, t = lean_section(manifest), F32 * trainable_params
        parts = {"interpreter": INTERPRETER, "library": self.library, "adapter": t,
                 **_terms(lean, batch, seq), "gradients": t, "optimizer_state": 2 * t}
        block = parts.pop("block_acts") + lean["block_dequant_fp32_bytes"]
        parts["block"] = int(self.k_block * block)
        base = INTERPRETER + self.library + t
        train = (base + self.train_fixed + parts["block_inputs"] + parts["block"] + parts["head_train"] + 4 * t)
        evaluate = base + self.eval_fixed + int(self.k_eval * block) + parts["head_eval"]
        phases = {"open": base, "train_step": train, "evaluate": evaluate, "swap": base + self.swap_fixed + 3 * t,
                  "infer": evaluate - parts["head_eval"] + parts["logits"]}
        return Prediction("lean", batch, seq, phases, parts)


@dataclass(frozen=True)
class ExecutorchLeanCosts:
    """The executorch-lean backend (the lean walk over ExecuTorch programs): the lean terms at
    the programs' batch, fixed at export (a smaller batch is padded to it, a larger one run in
    chunks of it, one after the other), on top of an arena the process keeps. ExecuTorch plans
    each program's activations, dequantized weights and copied-in inputs in it; its pages become
    resident when a run touches them (with the run's sequence) and stay, so unlike the lean
    backend's, every phase after the first step holds it, the swap included. Phase by phase:

        held       = open + arena (k_hidden * one block's input, batch x seq x hidden floats: the
                     programs' tensors are mostly multiples of it; + k_weights * (one block's
                     dequantized weights + the stored weights outside the blocks: embeddings,
                     an untied head, all copied in as program inputs))
        train_step = held + t0 + block inputs kept for backward + the larger of the weights
                     outside the blocks (their pages are read whole by the embedding program,
                     then released) and the LM head's working set + gradients and AdamW moments
        evaluate   = held + e0 + the larger of those weights and the head's working set (no gradient)
        swap       = held + s0 + a second adapter and its optimizer state
        infer      = held + e0 + the larger of those weights and the logits (_chunked_logits)

    Fitted on int8 bundles; for an fp32 one every stored weight counts as outside the blocks,
    which over-predicts (the safe side of a budget)."""

    library: int     # the native runner: ExecuTorch + XNNPACK loaded, programs opened
    train_fixed: int
    eval_fixed: int
    swap_fixed: int
    k_hidden: float   # resident arena bytes per byte of one block's input at the planned batch
    k_weights: float  # ... per byte of its dequantized weights + the stored weights outside the blocks

    def predict(self, manifest: Manifest, *, batch: int, seq: int, trainable_params: int):
        from edgepeft.memory_model import INTERPRETER, Prediction

        lean, planned, seq = lean_section(manifest), planned_batch(manifest), min(seq, manifest.max_length)
        t, outside = F32 * trainable_params, _outside_blocks(manifest, lean)
        terms = _terms(lean, planned, seq)
        del terms["block_acts"]  # autograd's count, not ExecuTorch's plan (k_hidden fits the arena better)
        hidden = terms["block_inputs"] // lean["blocks"]
        arena = self.k_hidden * hidden + self.k_weights * (lean["block_dequant_fp32_bytes"] + outside)
        parts = {"interpreter": INTERPRETER, "library": self.library, "adapter": t, "arena": int(arena), **terms,
                 "outside_blocks": outside, "logits": _chunked_logits(lean, batch, planned, seq),
                 "gradients": t, "optimizer_state": 2 * t}
        opened = INTERPRETER + self.library + t
        held = opened + parts["arena"]  # from the first step on
        phases = {"open": opened,
                  "train_step": held + self.train_fixed + terms["block_inputs"] + max(outside, terms["head_train"])
                  + 4 * t,
                  "evaluate": held + self.eval_fixed + max(outside, terms["head_eval"]),
                  "swap": held + self.swap_fixed + 3 * t,
                  "infer": held + self.eval_fixed + max(outside, parts["logits"])}
        return Prediction(names.BACKEND_EXECUTORCH_LEAN, batch, seq, phases, parts)


def planned_batch(manifest: Manifest) -> int:
    entry = manifest.backends.get(names.BACKEND_EXECUTORCH_LEAN)
    if entry is None:
        raise SpecError(f"bundle {manifest.model_name!r} has no executorch-lean programs to predict: export it with "
                        "backend 'executorch-lean'")
    return int(entry.settings[names.EXECUTORCH_BATCH_SIZE])


def _outside_blocks(manifest: Manifest, lean: dict) -> int:
    """Stored bytes of the frozen weights outside the repeated blocks (the int8 blocks store a
    quarter of their dequantized fp32 bytes)."""
    from edgepeft.memory_model import card

    return max(0, int(card(manifest)["frozen_bytes"] - lean["blocks"] * lean["block_dequant_fp32_bytes"] // F32))


def _chunked_logits(lean: dict, batch: int, planned: int, seq: int) -> int:
    """A causal LM's inference: each chunk's (planned x seq x vocab) logits stay alive (the
    real rows are a view of them); several chunks are concatenated into the (batch x seq x
    vocab) result, one is returned as it is."""
    chunks = -(-batch // planned)
    return (chunks * planned + (batch if chunks > 1 else 0)) * seq * lean["head_rows"] * F32


def lean_section(manifest: Manifest) -> dict:
    lean = (manifest.memory or {}).get("lean")
    if not lean:
        raise SpecError(f"bundle {manifest.model_name!r} has no lean memory card (exported by an older edgepeft or "
                        "without the lean backend): re-export it with backend 'lean' to predict its memory")
    return lean


def _terms(lean: dict, batch: int, seq: int) -> dict[str, int]:
    """The byte terms both lean models share, for ``batch`` x ``seq``: one block's saved
    activations (before any fitted factor), the block inputs kept for backward, the LM head's
    working sets and the full logits an inference returns."""
    pos = seq + lean["extra_positions"]
    c0, c1, c2 = lean["block_acts_per_example"]
    return {"block_acts": int(batch * max(0.0, c0 + c1 * pos + c2 * pos * pos)),
            "block_inputs": lean["blocks"] * batch * pos * lean["hidden"] * F32,
            "head_train": _head(lean, batch, seq, train=True), "head_eval": _head(lean, batch, seq, train=False),
            "logits": batch * seq * lean["head_rows"] * F32}


def _head(lean: dict, batch: int, seq: int, *, train: bool) -> int:
    """The chunked LM head's working set: the final hidden states (and their gradient), and
    one chunk of logits and of dequantized head rows."""
    v = lean["head_rows"]
    if not v:
        return 0
    n, d = batch * seq, lean["hidden"]
    chunk = min(HEAD_CHUNK, v)
    hidden = n * d * F32 * (3 if train else 1)
    return int(hidden + n * chunk * F32 * (2 if train else 1) + chunk * d * F32)


# `python -m benchmarks.memory_model --backends lean --fit` (calibration rows only), 2026-12-01.
COSTS = LeanCosts(library=19_830_380, train_fixed=18_529_192, eval_fixed=17_752_787, swap_fixed=17_505_092,
                  k_block=1.737, k_eval=1.556)
# `python -m benchmarks.memory_model --backends executorch-lean --fit` (calibration rows only), 2026-12-01,
# bundles exported with executorch_batch_size=8; the executorch-lean record (edgepeft.backends) names them.
# benchmarks/results/memory_model_executorch-lean.* checks them on a second measurement of every row
# (its own refit, in the JSON's "fitted", is within 3% of these); refitted after 1992ff3 (programs loaded
# largest first: one arena).
EXECUTORCH_COSTS = ExecutorchLeanCosts(library=5_869_164, train_fixed=5_772_429, eval_fixed=8_666_725,
                                       swap_fixed=5_547_040, k_hidden=36.504, k_weights=1.331)
