"""Backend on any maintained onnxruntime (no training build, no torch): the bundle's standard
ONNX gradient graph gives loss and gradients, the inference graph gives logits, and the
session's numpy optimizer steps. The adapter lives in numpy buffers fed as graph inputs, so a
swap replaces those buffers and never touches the frozen base."""
from __future__ import annotations

from typing import Mapping

import numpy as np

from edgepeft import names
from edgepeft.bundle import OpenedBundle
from edgepeft.data import Batch
from edgepeft.errors import BackendError
from edgepeft.runtime.backends._ort_import import onnxruntime, session_options
from edgepeft.runtime.backends.base import backend_entry, check_inputs, engine_errors
from edgepeft.runtime.losses import cross_entropy


class PortableBackend:
    name = names.BACKEND_PORTABLE

    def __init__(self, bundle: OpenedBundle, *, threads: int | None = None):
        m = bundle.manifest
        entry = backend_entry(bundle, self.name, "portable gradient graph")
        ort = onnxruntime()
        opts = session_options(ort, threads)
        # The inference graph keeps adapter tensors as overridable initializers on purpose;
        # ORT warns about each one at load.
        opts.log_severity_level = 3
        # onnxruntime >= 1.20 may fuse DequantizeLinear + MatMul into an 8-bit kernel that also
        # quantizes activations; keep full-precision activations so training matches eager.
        opts.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
        # No constant folding: it would turn every int8 DequantizeLinear into a resident fp32
        # copy of the weight (MiniLM: +70 MB per session). Dequantizing per run is what keeps
        # the frozen base int8 in memory.
        def session(member: str):
            with engine_errors(self.name, "creating an onnxruntime session", members=[member]):
                return ort.InferenceSession(str(bundle.path(member)), opts, providers=["CPUExecutionProvider"],
                                            disabled_optimizers=["ConstantFolding"])
        self._session = session
        self._grad = self._session(entry.members["gradient_model"])
        self._infer_session = None  # made on first evaluate/infer: training alone never pays for it
        self._trainable = m.trainable_names
        self._inputs = [i.name for i in m.inputs]
        self._params: dict[str, np.ndarray] = {}

    def _feeds(self, batch: Batch) -> dict[str, np.ndarray]:
        check_inputs(batch.feeds, self._inputs)
        if not self._params:
            raise BackendError("no adapter loaded")
        return {**{n: batch.feeds[n] for n in self._inputs}, **self._params}

    @engine_errors(names.BACKEND_PORTABLE, "the train step")
    def forward_backward(self, batch: Batch) -> tuple[float, dict[str, np.ndarray]]:
        feeds = self._feeds(batch)
        feeds[names.LABELS_INPUT] = batch.labels
        loss, *grads = self._grad.run(None, feeds)
        return float(loss), dict(zip(self._trainable, grads))

    @engine_errors(names.BACKEND_PORTABLE, "evaluation")
    def eval_step(self, batch: Batch) -> tuple[float, np.ndarray]:
        logits = self._logits(batch.feeds)
        return cross_entropy(logits, batch.labels), logits

    @engine_errors(names.BACKEND_PORTABLE, "inference")
    def infer(self, feeds: Mapping[str, np.ndarray]) -> np.ndarray:
        return self._logits(feeds)

    def _logits(self, feeds: Mapping[str, np.ndarray]) -> np.ndarray:
        if self._infer_session is None:
            self._infer_session = self._session(names.INFERENCE_MODEL)
        return self._infer_session.run([names.LOGITS_OUTPUT], self._feeds(Batch(dict(feeds))))[0]

    def named_parameters(self) -> dict[str, np.ndarray]:
        return {n: v.copy() for n, v in self._params.items()}

    def load_parameters(self, tensors: Mapping[str, np.ndarray]) -> None:
        self._params = {n: np.ascontiguousarray(tensors[n], dtype=np.float32) for n in self._trainable}

    def close(self) -> None:
        self._grad = self._infer_session = None
