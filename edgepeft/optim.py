"""Optimizers in numpy over the adapter tensors (small: a LoRA adapter is ~10^5 floats).

Held by the session, not the backend, so every backend trains identically, each adapter keeps
its own state across swaps, and the state is saved beside the adapter for exact resumption.
Semantics follow torch.optim (AdamW: decoupled weight decay, bias correction; SGD: momentum
with dampening 0), so parity against eager PyTorch covers the update too."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Mapping

import numpy as np

from edgepeft.errors import SpecError


@dataclass(frozen=True)
class OptimizerSpec:
    name: Literal["adamw", "sgd"] = "adamw"
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    momentum: float = 0.0
    max_grad_norm: float | None = None

    def __post_init__(self) -> None:
        if self.name not in ("adamw", "sgd"):
            raise SpecError(f"optimizer `name` must be 'adamw' or 'sgd', got {self.name!r}")
        def number(v) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        for field, v in (("lr", self.lr), ("eps", self.eps)):
            if not (number(v) and v > 0):
                raise SpecError(f"optimizer `{field}` must be a finite number > 0, got {v!r}")
        betas = tuple(self.betas) if isinstance(self.betas, (tuple, list)) else ()
        if len(betas) != 2 or not all(number(b) and 0.0 <= b < 1.0 for b in betas):
            raise SpecError(f"optimizer `betas` must be two numbers in [0, 1), got {self.betas!r}")
        object.__setattr__(self, "betas", betas)
        for field, v in (("weight_decay", self.weight_decay), ("momentum", self.momentum)):
            if not (number(v) and v >= 0):
                raise SpecError(f"optimizer `{field}` must be a finite number >= 0, got {v!r}")
        if self.max_grad_norm is not None and not (number(self.max_grad_norm) and self.max_grad_norm > 0):
            raise SpecError(f"`max_grad_norm` must be a finite number > 0 or None, got {self.max_grad_norm!r}")


class Optimizer:
    def __init__(self, spec: OptimizerSpec):
        self.spec = spec
        self.t = 0
        self.state: dict[str, dict[str, np.ndarray]] = {}

    def step(self, params: Mapping[str, np.ndarray], grads: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Return updated copies of ``params`` (the inputs are not modified)."""
        s = self.spec
        scale = 1.0
        if s.max_grad_norm is not None:
            norm = math.sqrt(sum(float(np.sum(np.square(g, dtype=np.float64))) for g in grads.values()))
            scale = min(1.0, s.max_grad_norm / (norm + 1e-6))
        self.t += 1
        out: dict[str, np.ndarray] = {}
        with np.errstate(over="ignore", invalid="ignore"):  # the caller rejects non-finite results
            for name, p in params.items():
                out[name] = self._update(name, p, grads[name], scale)
        return out

    def _update(self, name: str, p: np.ndarray, grad: np.ndarray, scale: float) -> np.ndarray:
        s = self.spec
        g = grad.astype(np.float32) * np.float32(scale)
        st = self.state.setdefault(name, {})
        p = p.astype(np.float32, copy=True)
        if s.name == "adamw":
            b1, b2 = s.betas
            p *= np.float32(1.0 - s.lr * s.weight_decay)
            m = b1 * st.get("exp_avg", np.zeros_like(p)) + (1 - b1) * g
            v = b2 * st.get("exp_avg_sq", np.zeros_like(p)) + (1 - b2) * g * g
            st["exp_avg"], st["exp_avg_sq"] = m.astype(np.float32), v.astype(np.float32)
            bc1, bc2 = 1 - b1 ** self.t, 1 - b2 ** self.t
            denom = np.sqrt(v) / math.sqrt(bc2) + s.eps
            p -= np.float32(s.lr / bc1) * (m / denom).astype(np.float32)
            return p
        if s.weight_decay:
            g = g + np.float32(s.weight_decay) * p
        if s.momentum:
            buf = st.get("momentum_buffer")
            buf = g.copy() if buf is None else np.float32(s.momentum) * buf + g
            st["momentum_buffer"] = buf
            g = buf
        p -= np.float32(s.lr) * g
        return p

    def state_dict(self) -> tuple[dict[str, np.ndarray], int]:
        flat = {f"{name}::{k}": v for name, st in self.state.items() for k, v in st.items()}
        return flat, self.t

    def load_state_dict(self, flat: Mapping[str, np.ndarray], t: int) -> None:
        self.state = {}
        for key, v in flat.items():
            name, _, k = key.rpartition("::")
            self.state.setdefault(name, {})[k] = np.asarray(v, dtype=np.float32)
        self.t = int(t)
