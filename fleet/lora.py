"""Aggregating LoRA adapters, and what averaging A and B separately does.

A LoRA update of a weight is ``delta W = B @ A`` (scaled). Clients start a round from the same
fleet adapter (A0, B0) and return (A_i, B_i). Averaging each factor on its own (what FedAvg
does with the tensors it is given) yields ``mean(B) @ mean(A)``, but the average of the
clients' updates is ``mean(B @ A)``. With dA_i = A_i - A0 and dB_i = B_i - B0:

    mean(B) @ mean(A) - mean(B @ A) = mean(dB) @ mean(dA) - mean(dB @ dA)   (weighted means)

i.e. minus the (weighted) covariance of the clients' B and A changes: second order in the
local updates, so it grows with local steps, learning rate and how different the clients'
data are, and it is zero when only one factor moves. ``product_gap`` measures it on real
replies; the server reports it each round for bundles whose A is trainable.

LoRA-FA / FFA-LoRA (``LoraSpec(freeze_a=True)``): A is frozen in the base, only B (and any
``modules_to_save``) is trainable and travels, so ``mean(B_i) @ A = mean(B_i @ A)`` exactly:
plain weighted averaging is the exact aggregate of the clients' updates.

Pairs come from the manifest's PEFT keys (``...lora_A.weight`` / ``...lora_B.weight``, the
adapter file format the manifest declares), never from graph-name substrings."""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from edgepeft.manifest import Manifest

A_KEY, B_KEY = ".lora_A.weight", ".lora_B.weight"


def a_is_frozen(manifest: Manifest) -> bool:
    """True when the bundle's LoRA trains B only (LoRA-FA): averaging is exact."""
    return any(getattr(m, "freeze_a", False) for m in manifest.methods if m.method == "lora")


def lora_pairs(manifest: Manifest) -> list[tuple[str, str]]:
    """(A name, B name) of each LoRA layer whose two factors are both trainable."""
    by_key = {t.peft_key: t.name for t in manifest.trainable if t.method == "lora"}
    return [(name, by_key[key[: -len(A_KEY)] + B_KEY]) for key, name in sorted(by_key.items())
            if key.endswith(A_KEY) and key[: -len(A_KEY)] + B_KEY in by_key]


def weighted_mean(updates: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float]) -> dict[str, np.ndarray]:
    w = np.asarray(weights, np.float64)
    w = w / w.sum()
    return {k: sum(wi * np.asarray(u[k], np.float64) for wi, u in zip(w, updates)).astype(np.float32)
            for k in updates[0]}


def product_gap(updates: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float],
                pairs: Sequence[tuple[str, str]]) -> float:
    """``||mean(B) @ mean(A) - mean(B @ A)|| / ||mean(B @ A)||`` (Frobenius, over all LoRA
    layers together, weighted means): the relative error of averaging the factors apart."""
    if not pairs or not updates:
        return 0.0
    w = np.asarray(weights, np.float64)
    w = w / w.sum()
    err = ref = 0.0
    for a, b in pairs:
        mean_of_products = sum(wi * (np.asarray(u[b], np.float64) @ np.asarray(u[a], np.float64))
                               for wi, u in zip(w, updates))
        product_of_means = (sum(wi * np.asarray(u[b], np.float64) for wi, u in zip(w, updates))
                            @ sum(wi * np.asarray(u[a], np.float64) for wi, u in zip(w, updates)))
        err += float(np.sum((product_of_means - mean_of_products) ** 2))
        ref += float(np.sum(mean_of_products ** 2))
    return float(np.sqrt(err / ref)) if ref > 0 else 0.0
