"""Backend on ExecuTorch's C++ runtime (executorch 1.5.1) without torch: the bundle's training
program takes the model inputs, the labels and the adapter tensors and returns the loss and
one gradient per adapter tensor; its inference program takes the model inputs and the adapter
tensors and returns logits. Both run through the small native runner in
``edgepeft.runtime.native`` (built from the executorch wheel's headers and libraries, driven by
ctypes), their linears on XNNPACK; the session's numpy optimizer steps, as on the portable
backend, and the adapter lives in numpy buffers fed at every run, so a swap replaces those
buffers and never touches the frozen base.

The programs are built for a fixed batch. A smaller batch is padded with copies of its first
row labelled IGNORE_INDEX (the program's loss averages over labelled positions only, so
padding changes neither loss nor gradients); a larger one is split into chunks whose losses
and gradients are averaged weighted by their labelled positions, which is the full batch's
mean (``edgepeft.runtime.batching``)."""
from __future__ import annotations

from typing import Iterator, Mapping

import numpy as np

from edgepeft import names
from edgepeft.bundle import OpenedBundle
from edgepeft.data import Batch
from edgepeft.errors import BackendError
from edgepeft.runtime.backends.base import backend_entry, check_inputs, engine_errors
from edgepeft.runtime.batching import accumulate, fixed_chunks
from edgepeft.runtime.losses import cross_entropy
from edgepeft.runtime.native import Program, set_threads


class ExecutorchBackend:
    name = names.BACKEND_EXECUTORCH

    def __init__(self, bundle: OpenedBundle, *, threads: int | None = None):
        m = bundle.manifest
        entry = backend_entry(bundle, self.name, "ExecuTorch programs")
        try:
            self.batch_size = int(entry.settings[names.EXECUTORCH_BATCH_SIZE])
            training, inference = entry.members["training_program"], entry.members["inference_program"]
        except (KeyError, ValueError) as e:
            raise BackendError(f"the bundle's {self.name} entry is malformed ({e!r}); re-export the bundle") from None
        if threads:
            set_threads(threads)
        self._inputs = [i.name for i in m.inputs]
        self._trainable = list(m.trainable_names)
        with engine_errors(self.name, "loading the training program", members=[training]):
            self._train = Program(str(bundle.path(training)), what=f"the training program {training}")
        expected = len(self._inputs) + 1 + len(self._trainable)
        if self._train.num_inputs != expected:
            # Bundles exported before edgepeft ran ExecuTorch without torch kept the adapter inside
            # the program, for ExecuTorch's torch-linked training module.
            raise BackendError(f"{training} takes {self._train.num_inputs} inputs, not the {expected} "
                               "(model inputs, labels, adapter tensors) this runtime feeds: it was exported by an "
                               "older edgepeft for ExecuTorch's Python training module; re-export the bundle")
        self._inference_path, self._inference_member = str(bundle.path(inference)), inference
        self._infer_program: Program | None = None  # loaded on first evaluate/infer
        self._params: dict[str, np.ndarray] = {}

    def _chunks(self, feeds: Mapping[str, np.ndarray], labels: np.ndarray | None) -> Iterator[tuple[int, Batch]]:
        check_inputs(feeds, self._inputs)
        return fixed_chunks(feeds, labels, self._inputs, self.batch_size)

    def _adapter(self) -> list[np.ndarray]:
        if not self._params:
            raise BackendError("no adapter loaded")
        return [self._params[n] for n in self._trainable]

    def _run(self, chunk: Batch) -> tuple[float, dict[str, np.ndarray]]:
        """Loss and gradients of one full-size chunk."""
        with engine_errors(self.name, "the training step"):
            loss, *grads = self._train.run([*(chunk.feeds[n] for n in self._inputs), chunk.labels, *self._adapter()])
        return float(loss), dict(zip(self._trainable, grads))

    # -- Backend Protocol ------------------------------------------------------------------
    def forward_backward(self, batch: Batch) -> tuple[float, dict[str, np.ndarray]]:
        chunks = (c for _, c in self._chunks(batch.feeds, np.asarray(batch.labels)))
        return accumulate(chunks, self._run)

    def eval_step(self, batch: Batch) -> tuple[float, np.ndarray]:
        logits = self.infer(batch.feeds)
        return cross_entropy(logits, batch.labels), logits

    def infer(self, feeds: Mapping[str, np.ndarray]) -> np.ndarray:
        if self._infer_program is None:
            with engine_errors(self.name, "loading the inference program", members=[self._inference_member]):
                self._infer_program = Program(self._inference_path,
                                              what=f"the inference program {self._inference_member}")
        adapter = self._adapter()
        with engine_errors(self.name, "inference"):
            outs = [self._infer_program.run([*(chunk.feeds[n] for n in self._inputs), *adapter])[0][:real]
                    for real, chunk in self._chunks(feeds, None)]
        return outs[0] if len(outs) == 1 else np.concatenate(outs)  # one chunk: no copy of its logits

    def named_parameters(self) -> dict[str, np.ndarray]:
        return {n: v.copy() for n, v in self._params.items()}

    def load_parameters(self, tensors: Mapping[str, np.ndarray]) -> None:
        self._params = {n: np.ascontiguousarray(tensors[n], dtype=np.float32) for n in self._trainable}

    def close(self) -> None:
        for program in (self._train, self._infer_program):
            if program is not None:
                program.close()
        self._train = self._infer_program = None
        self._params = {}

