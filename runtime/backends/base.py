"""The one Protocol every runtime backend implements (numpy tensors in and out).

A backend computes; the session owns the adapter tensors and the optimizer, so that every
backend trains the same way and adapters move between backends unchanged."""
from __future__ import annotations

from typing import Mapping, Protocol, runtime_checkable

import numpy as np

from edgepeft.data import Batch


@runtime_checkable
class Backend(Protocol):
    name: str

    def forward_backward(self, batch: Batch) -> tuple[float, dict[str, np.ndarray]]:
        """Loss and the gradient of every trainable tensor (by manifest name); no update."""

    def eval_step(self, batch: Batch) -> tuple[float, np.ndarray]:
        """Loss and logits, no gradients."""

    def infer(self, feeds: Mapping[str, np.ndarray]) -> np.ndarray:
        """Logits for model inputs (no labels)."""

    def named_parameters(self) -> dict[str, np.ndarray]:
        """Copies of the trainable tensors as the backend holds them."""

    def load_parameters(self, tensors: Mapping[str, np.ndarray]) -> None:
        """Assign trainable tensors in place (the frozen base is not reloaded)."""

    def close(self) -> None: ...
