"""Runtime backends behind one Protocol; chosen by name, or "auto" (the first available)."""
from __future__ import annotations

import importlib.util
import os

from edgepeft.bundle import OpenedBundle
from edgepeft.errors import BackendError
from edgepeft.runtime.backends.base import Backend

BACKENDS = ("ort-training",)


def available(name: str) -> bool:
    if name == "ort-training":
        spec = importlib.util.find_spec("onnxruntime")
        if spec is None or not spec.submodule_search_locations:
            return False
        return os.path.isdir(os.path.join(list(spec.submodule_search_locations)[0], "training", "api"))
    return False


def make_backend(name: str, bundle: OpenedBundle, *, threads: int | None) -> Backend:
    if name == "auto":
        name = next((b for b in BACKENDS if available(b) and b in bundle.manifest.backends), "")
        if not name:
            raise BackendError(f"no runtime backend available here for this bundle (bundle has "
                               f"{sorted(bundle.manifest.backends)}); install onnxruntime-training-cpu==1.19.2")
    if name == "ort-training":
        from edgepeft.runtime.backends.ort_training import OrtTrainingBackend

        return OrtTrainingBackend(bundle, threads=threads)
    raise BackendError(f"unknown backend {name!r}; known: {list(BACKENDS)}")


__all__ = ["BACKENDS", "Backend", "available", "make_backend"]
