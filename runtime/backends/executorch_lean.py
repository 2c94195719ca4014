"""The executorch-lean backend: the lean backend's block walk (edgepeft.runtime.backends.lean:
blocks forward keeping only each block's input, backward one block at a time with the block
recomputed, a causal LM's head in vocabulary chunks) over ExecuTorch programs lowered to
XNNPACK, run by the native runner (edgepeft.runtime.native: no torch, no executorch Python
package). The frozen weights are the memory-mapped ``lean/weights.safetensors`` fed to each
program as inputs without copies; every program of the process plans its activations in one
shared arena.

Programs take positional inputs, so the plan lists each program's input and output names. The
batch is fixed at export: a smaller one is padded with rows labelled IGNORE_INDEX, a larger one
split, and the chunks' losses and gradients averaged by labelled positions
(``edgepeft.runtime.batching``)."""
from __future__ import annotations

from typing import Mapping

import numpy as np

from edgepeft import names
from edgepeft.data import Batch
from edgepeft.errors import BackendError, BundleError
from edgepeft.runtime.backends.base import check_inputs, engine_errors
from edgepeft.runtime.backends.lean import LeanBackend
from edgepeft.runtime.batching import accumulate, fixed_chunks, labelled
from edgepeft.runtime.native import Program, planned_sizes, set_threads


class _Program:
    """One lean program on the native runner, its inputs and outputs named by the plan."""

    def __init__(self, program: Program, signature: Mapping[str, list[str]]):
        self._p = program
        self.inputs, self.outputs = list(signature["inputs"]), list(signature["outputs"])
        if program.num_inputs != len(self.inputs):
            raise BundleError(f"{program.what} takes {program.num_inputs} inputs, the plan lists "
                              f"{len(self.inputs)}; the bundle was altered: re-export it")

    def run(self, feeds: list[np.ndarray]) -> list[np.ndarray]:
        return self._p.run(feeds)

    def close(self) -> None:
        self._p.close()


class ExecutorchLeanBackend(LeanBackend):
    name = names.BACKEND_EXECUTORCH_LEAN

    def _prepare(self, threads: int | None) -> None:
        try:
            self.batch_size = int(self._entry.settings[names.EXECUTORCH_BATCH_SIZE])
            self._signatures = self._plan["signatures"]
        except (KeyError, ValueError, TypeError) as e:
            raise BundleError(f"the bundle's {self.name} plan is malformed ({e!r}); re-export the bundle") from None
        if threads:
            set_threads(threads)
        self._load_largest_first()

    def _members(self) -> list[str]:
        parts = [self._plan["pre"], self._plan["post"], *self._plan["graphs"].values()]
        return [p[k] for p in parts for k in ("fwd", "vjp") if p.get(k)]

    def _load_largest_first(self) -> None:
        """Every program, loaded now in decreasing order of planned memory: the first sizes the
        process's shared arena and the others fit in it. Loaded on first use instead, a small
        program (the embeddings) would size it and each larger one would get memory of its own
        (SmolLM2 at 4 x 128: 27 MiB more)."""
        members = self._members()
        with engine_errors(self.name, "reading the programs' planned memory", members=members):
            sizes = {m: max(planned_sizes(str(self._bundle.path(m)), what=m) or [0]) for m in members}
        for m in sorted(members, key=lambda m: -sizes[m]):
            self._graph(m)

    def _open_graph(self, member: str) -> _Program:
        if member not in self._signatures:
            raise BundleError(f"the {self.name} plan has no signature for {member}; re-export the bundle")
        return _Program(Program(str(self._bundle.path(member)), what=f"the program {member}"),
                        self._signatures[member])

    def _chunks(self, feeds: Mapping[str, np.ndarray], labels: np.ndarray | None):
        check_inputs(feeds, self._inputs)
        return fixed_chunks(feeds, labels, self._inputs, self.batch_size)

    # -- the lean walk, one program-sized chunk at a time ----------------------------------------
    def _forward_backward(self, batch: Batch) -> tuple[float, dict[str, np.ndarray]]:
        chunks = (c for _, c in self._chunks(batch.feeds, np.asarray(batch.labels)))
        return accumulate(chunks, super()._forward_backward)

    def _infer(self, feeds: Mapping[str, np.ndarray]) -> np.ndarray:
        outs = [super(ExecutorchLeanBackend, self)._infer(c.feeds)[:real] for real, c in self._chunks(feeds, None)]
        # One chunk: its rows as they are (a causal LM's logits are the call's largest array).
        return outs[0] if len(outs) == 1 else np.concatenate(outs)

    def _eval_predictions(self, batch: Batch) -> tuple[float, np.ndarray]:
        total, loss, preds = 0, 0.0, []
        for real, c in self._chunks(batch.feeds, np.asarray(batch.labels)):
            l_c, p_c = super()._eval_predictions(c)
            n = labelled(c)
            loss, total = loss + (n * l_c if n else 0.0), total + n
            preds.append(p_c[:real])
        if total == 0:
            raise BackendError("the batch has no labelled positions to evaluate")
        return loss / total, np.concatenate(preds)

    def close(self) -> None:
        for s in self._sessions.values():
            s.close()
        super().close()
