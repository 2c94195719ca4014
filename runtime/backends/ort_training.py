"""Backend on ONNX Runtime's on-device training API (onnxruntime-training-cpu 1.19.2): the
training graph gives loss and gradients; the session's numpy optimizer applies them."""
from __future__ import annotations

from typing import Mapping

import numpy as np

from edgepeft import names
from edgepeft.bundle import OpenedBundle
from edgepeft.data import Batch
from edgepeft.runtime.backends._ort_import import session_options, training_api
from edgepeft.errors import BundleError
from edgepeft.runtime.backends.base import backend_entry, check_inputs, engine_errors


class OrtTrainingBackend:
    name = names.BACKEND_ORT

    def __init__(self, bundle: OpenedBundle, *, threads: int | None = None):
        entry = backend_entry(bundle, self.name, "ort-training artifacts")
        api = training_api()
        import onnxruntime as ort

        opts = session_options(ort, threads)
        self._trainable = bundle.manifest.trainable_names
        members = entry.members
        paths = {role: str(bundle.path(member)) for role, member in members.items()}
        with engine_errors(self.name, "loading the checkpoint", members=[members["checkpoint"]]):
            self._state = api.CheckpointState.load_checkpoint(paths["checkpoint"])
        # The Module must exist before any parameter assignment (assigning into a bare
        # CheckpointState segfaults in 1.19.2).
        graphs = [members["training_model"], members["eval_model"], members["checkpoint"]]
        with engine_errors(self.name, "building the training module", members=graphs):
            self._module = api.Module(paths["training_model"], self._state, paths["eval_model"], device="cpu",
                                      session_options=opts)
            self._inputs = list(self._module.input_names())
        self._check_checkpoint(bundle, members["checkpoint"])
        self._causal = bundle.manifest.task == "causal-lm"

    def _check_checkpoint(self, bundle: OpenedBundle, member: str) -> None:
        """BundleError unless the checkpoint holds every trainable tensor at its manifest shape:
        assigning an adapter into a mismatched parameter is not something to discover mid-step."""
        with engine_errors(self.name, "reading the checkpoint's parameters", members=[member]):
            params = self._state.parameters
            have = {n: tuple(params[n].data.shape) for n in self._trainable if n in params}
        bad = [f"{t.name} {have.get(t.name, 'missing')} (manifest {t.shape})" for t in bundle.manifest.trainable
               if have.get(t.name) != t.shape]
        if bad:
            raise BundleError(f"bundle member {member!r} does not hold the trainable tensors the manifest lists: "
                              f"{bad[:3]}; the bundle is corrupted or was altered: re-export it")

    def _args(self, batch: Batch) -> list[np.ndarray]:
        feeds = dict(batch.feeds)
        if batch.labels is not None:
            feeds[names.LABELS_INPUT] = batch.labels
        else:  # inference through the eval graph: placeholder labels, the loss is ignored
            first = next(iter(batch.feeds.values()))
            feeds[names.LABELS_INPUT] = np.zeros(first.shape[:2] if self._causal else first.shape[:1], np.int64)
        check_inputs(feeds, self._inputs)
        return [feeds[n] for n in self._inputs]

    @engine_errors(names.BACKEND_ORT, "the train step")
    def forward_backward(self, batch: Batch) -> tuple[float, dict[str, np.ndarray]]:
        self._module.train()
        out = self._module(*self._args(batch))
        loss = float(out[0] if isinstance(out, tuple) else out)
        params = self._state.parameters
        grads = {n: np.array(params[n].grad, dtype=np.float32) for n in self._trainable}
        self._module.lazy_reset_grad()
        return loss, grads

    @engine_errors(names.BACKEND_ORT, "evaluation")
    def eval_step(self, batch: Batch) -> tuple[float, np.ndarray]:
        return self._eval(batch)

    def _eval(self, batch: Batch) -> tuple[float, np.ndarray]:
        self._module.eval()
        loss, logits = self._module(*self._args(batch))
        return float(loss), np.asarray(logits)

    @engine_errors(names.BACKEND_ORT, "inference")
    def infer(self, feeds: Mapping[str, np.ndarray]) -> np.ndarray:
        # The eval graph serves inference too: same weights, no second copy of the base.
        return self._eval(Batch(dict(feeds), None))[1]

    def named_parameters(self) -> dict[str, np.ndarray]:
        params = self._state.parameters
        return {n: params[n].data.copy() for n in self._trainable}

    @engine_errors(names.BACKEND_ORT, "loading the adapter")
    def load_parameters(self, tensors: Mapping[str, np.ndarray]) -> None:
        params = self._state.parameters
        for n in self._trainable:
            params[n] = np.ascontiguousarray(tensors[n], dtype=np.float32)

    def close(self) -> None:
        self._module = self._state = None
