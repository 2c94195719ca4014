"""Backend on ExecuTorch's training runtime (executorch 1.5.1): the bundle's training program
gives loss and gradients, its XNNPACK inference program gives logits, and the session's numpy
optimizer steps.

ExecuTorch's Python runtime links libtorch, so this module imports torch and executorch lazily,
only when the backend is built: ``edgepeft.runtime`` without it stays torch-free (on a phone
the C++ runtime runs the same programs without torch).

The training program is built for a fixed batch. A smaller batch is padded with copies of its
first row labelled IGNORE_INDEX (the program's loss averages over labelled positions only, so
padding changes neither loss nor gradients); a larger one is split into chunks whose losses
and gradients are averaged weighted by their labelled positions, which is the full batch's
mean (``edgepeft.runtime.batching``). The adapter lives in the program's own parameter
memory: ``named_parameters()`` of the training module aliases it, so a swap is an in-place
copy and the frozen base is never reloaded."""
from __future__ import annotations

import warnings
from typing import Iterator, Mapping

import numpy as np

from edgepeft import names
from edgepeft.bundle import OpenedBundle
from edgepeft.data import Batch
from edgepeft.errors import BackendError
from edgepeft.runtime.backends.base import backend_entry, check_inputs
from edgepeft.runtime.batching import accumulate
from edgepeft.runtime.losses import cross_entropy



def _runtime():
    """(torch, ExecuTorch's training loader, ExecuTorch's program loader), imported on first use."""
    try:
        import torch
        from executorch.extension.pybindings import portable_lib
        from executorch.extension.training import _load_for_executorch_for_training
    except ImportError as e:
        raise BackendError(f"the executorch backend needs executorch==1.5.1 and torch ({e.name} is missing): "
                           "pip install 'edgepeft[executorch]'") from None
    return torch, _load_for_executorch_for_training, portable_lib


class ExecutorchBackend:
    name = names.BACKEND_EXECUTORCH

    def __init__(self, bundle: OpenedBundle, *, threads: int | None = None):
        m = bundle.manifest
        entry = backend_entry(bundle, self.name, "ExecuTorch programs")
        try:
            self.batch_size = int(entry.settings[names.EXECUTORCH_BATCH_SIZE])
            training, inference = entry.members["training_program"], entry.members["inference_program"]
        except (KeyError, ValueError) as e:
            raise BackendError(f"the bundle's executorch entry is malformed ({e!r}); re-export the bundle") from None
        torch, load_training, lib = _runtime()
        self._torch, self._lib = torch, lib
        if threads:
            # ExecuTorch's kernels share one process-wide thread pool.
            lib._unsafe_reset_threadpool(threads)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "This API is experimental", on every load
            self._train = load_training(str(bundle.path(training)))
        self._inference_path = str(bundle.path(inference))
        self._infer_module = None  # loaded on first evaluate/infer: training alone never pays for it
        self._inputs = [i.name for i in m.inputs]
        self._trainable = m.trainable_names
        # The runtime hands out its parameter tensors only after a first run: one step on a
        # placeholder batch (one token per row, every position ignored) exposes them.
        self._train.forward_backward("forward", self._placeholder(m))
        # Aliases of the program's parameter memory, by manifest name.
        live = self._train.named_parameters()
        prefix = names.EXECUTORCH_PARAM_PREFIX
        self._params = {k[len(prefix):]: v for k, v in live.items() if k.startswith(prefix)}
        if sorted(self._params) != sorted(self._trainable) or len(live) != len(self._params):
            raise BackendError("the ExecuTorch training program's parameters do not match the manifest's trainable "
                               f"tensors ({sorted(live)[:3]}... vs {list(self._trainable)[:3]}...); re-export the bundle")
        self._grad_names = {n: prefix + n for n in self._trainable}

    def _placeholder(self, m) -> tuple:
        """Model inputs and labels of the program's batch size: symbolic dimensions 1, token ids
        and masks 1, floats 0, labels IGNORE_INDEX."""
        dtypes = {"int64": np.int64, "int32": np.int32, "float32": np.float32}
        b = self.batch_size
        tensors = []
        for i in m.inputs:
            shape = tuple(b if d == "batch" else 1 if isinstance(d, str) else int(d) for d in i.shape)
            dt = dtypes.get(i.dtype, np.float32)
            tensors.append(self._torch.from_numpy(np.full(shape, 1 if dt != np.float32 else 0, dtype=dt)))
        label_shape = (b,) if m.task != "causal-lm" else (b, tensors[0].shape[1])
        labels = self._torch.from_numpy(np.full(label_shape, names.IGNORE_INDEX, dtype=np.int64))
        return (*tensors, labels)

    # -- batches ---------------------------------------------------------------------------
    def _chunks(self, feeds: Mapping[str, np.ndarray], labels: np.ndarray | None) -> Iterator[tuple[int, Batch]]:
        """(real rows, chunk of exactly ``batch_size`` rows) for the rows of ``feeds``."""
        check_inputs(feeds, self._inputs)
        arrays = [np.asarray(feeds[n]) for n in self._inputs]
        rows = len(arrays[0])
        b = self.batch_size
        for start in range(0, rows, b):
            real = min(b, rows - start)
            parts = {n: _pad_rows(a[start:start + real], b) for n, a in zip(self._inputs, arrays)}
            lab = None
            if labels is not None:
                lab = np.full((b, *labels.shape[1:]), names.IGNORE_INDEX, dtype=np.int64)
                lab[:real] = labels[start:start + real]
            yield real, Batch(parts, lab)

    def _tensors(self, chunk: Batch) -> list:
        return [self._torch.from_numpy(chunk.feeds[n]) for n in self._inputs]

    def _run(self, chunk: Batch) -> tuple[float, dict[str, np.ndarray]]:
        """Loss and gradients (copied out of the runtime's buffers) of one full-size chunk."""
        out = self._train.forward_backward("forward", (*self._tensors(chunk), self._torch.from_numpy(chunk.labels)))
        g = self._train.named_gradients()
        return float(out[0]), {n: g[self._grad_names[n]].numpy().copy() for n in self._trainable}

    # -- Backend Protocol ------------------------------------------------------------------
    def forward_backward(self, batch: Batch) -> tuple[float, dict[str, np.ndarray]]:
        chunks = (c for _, c in self._chunks(batch.feeds, np.asarray(batch.labels)))
        return accumulate(chunks, self._run)

    def eval_step(self, batch: Batch) -> tuple[float, np.ndarray]:
        logits = self.infer(batch.feeds)
        return cross_entropy(logits, batch.labels), logits

    def infer(self, feeds: Mapping[str, np.ndarray]) -> np.ndarray:
        if self._infer_module is None:
            self._infer_module = self._lib._load_for_executorch(self._inference_path)
        adapter = [self._params[n] for n in self._trainable]
        outs = []
        for real, chunk in self._chunks(feeds, None):
            logits = self._infer_module.forward((*self._tensors(chunk), *adapter))[0]
            outs.append(logits.numpy()[:real].copy())
        return np.concatenate(outs)

    def named_parameters(self) -> dict[str, np.ndarray]:
        return {n: self._params[n].detach().numpy().copy() for n in self._trainable}

    def load_parameters(self, tensors: Mapping[str, np.ndarray]) -> None:
        # copy_ writes into the program's own memory: the next step sees the new adapter.
        for n in self._trainable:
            self._params[n].copy_(self._torch.from_numpy(np.ascontiguousarray(tensors[n], dtype=np.float32)))

    def close(self) -> None:
        self._train = self._infer_module = None
        self._params = {}


def _pad_rows(a: np.ndarray, rows: int) -> np.ndarray:
    """``a`` with ``rows`` rows: copies of its first row fill the gap (real, finite inputs, so
    the padded rows' logits stay finite and their zero loss weight gives zero gradient)."""
    a = np.ascontiguousarray(a)
    if len(a) == rows:
        return a
    return np.ascontiguousarray(np.concatenate([a, np.repeat(a[:1], rows - len(a), axis=0)]))
