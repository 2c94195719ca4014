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
gives the error on held-out rows)."""
from __future__ import annotations

from dataclasses import dataclass

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

        lean = lean_section(manifest)
        t = F32 * trainable_params
        pos = seq + lean["extra_positions"]
        c0, c1, c2 = lean["block_acts_per_example"]
        block = batch * max(0.0, c0 + c1 * pos + c2 * pos * pos) + lean["block_dequant_fp32_bytes"]
        kept = lean["blocks"] * batch * pos * lean["hidden"] * F32
        parts = {"interpreter": INTERPRETER, "library": self.library, "adapter": t, "block_inputs": kept,
                 "block": int(self.k_block * block), "head_train": _head(lean, batch, seq, train=True),
                 "head_eval": _head(lean, batch, seq, train=False),
                 "logits": batch * seq * lean["head_rows"] * F32, "gradients": t, "optimizer_state": 2 * t}
        base = INTERPRETER + self.library + t
        train = (base + self.train_fixed + kept + parts["block"] + parts["head_train"] + 4 * t)
        evaluate = base + self.eval_fixed + int(self.k_eval * block) + parts["head_eval"]
        phases = {"open": base, "train_step": train, "evaluate": evaluate, "swap": base + self.swap_fixed + 3 * t,
                  "infer": evaluate - parts["head_eval"] + parts["logits"]}
        return Prediction("lean", batch, seq, phases, parts)


def lean_section(manifest: Manifest) -> dict:
    lean = (manifest.memory or {}).get("lean")
    if not lean:
        raise SpecError(f"bundle {manifest.model_name!r} has no lean memory card (exported by an older edgepeft or "
                        "without the lean backend): re-export it with backend 'lean' to predict its memory")
    return lean


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
