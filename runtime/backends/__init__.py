"""Runtime backends behind one Protocol; chosen by name, or "auto": ort-training where the
training build is installed and the bundle has its artifacts, else portable, else executorch
(last: its Python runtime imports torch)."""
from __future__ import annotations

import importlib.util
from typing import Callable

from edgepeft import names
from edgepeft.bundle import OpenedBundle
from edgepeft.errors import BackendError
from edgepeft.runtime.backends._ort_import import has_training_build
from edgepeft.runtime.backends.base import Backend

BACKENDS = (names.BACKEND_ORT, names.BACKEND_PORTABLE, names.BACKEND_LEAN, names.BACKEND_EXECUTORCH)


def available(name: str) -> bool:
    if name == names.BACKEND_ORT:
        return has_training_build()
    if name in (names.BACKEND_PORTABLE, names.BACKEND_LEAN):
        return importlib.util.find_spec("onnxruntime") is not None
    if name == names.BACKEND_EXECUTORCH:
        # The backend module imports torch only when a backend is built.
        from edgepeft.runtime.backends.executorch import available as et_available

        return et_available()
    return False


def resolve(name: str, manifest) -> str:
    """The backend "auto" stands for with this bundle here: the first of BACKENDS the bundle
    has and this machine can run. Other names pass through."""
    if name != "auto":
        return name
    found = next((b for b in BACKENDS if b in manifest.backends and available(b)), "")
    if not found:
        raise BackendError(f"no runtime backend available here for this bundle (it has "
                           f"{sorted(manifest.backends)}); install onnxruntime (portable) or "
                           "onnxruntime-training-cpu==1.19.2 (ort-training)")
    return found


def make_backend(name: str, bundle: OpenedBundle, *, threads: int | None,
                 precheck: Callable[[str], None] = lambda name: None) -> Backend:
    """``precheck(name)`` runs once the backend is chosen, before it loads anything."""
    name = resolve(name, bundle.manifest)
    if name in BACKENDS:
        precheck(name)
    if name == names.BACKEND_ORT:
        from edgepeft.runtime.backends.ort_training import OrtTrainingBackend

        return OrtTrainingBackend(bundle, threads=threads)
    if name == names.BACKEND_PORTABLE:
        from edgepeft.runtime.backends.portable import PortableBackend

        return PortableBackend(bundle, threads=threads)
    if name == names.BACKEND_LEAN:
        from edgepeft.runtime.backends.lean import LeanBackend

        return LeanBackend(bundle, threads=threads)
    if name == names.BACKEND_EXECUTORCH:
        from edgepeft.runtime.backends.executorch import ExecutorchBackend

        return ExecutorchBackend(bundle, threads=threads)
    raise BackendError(f"unknown backend {name!r}; known: {list(BACKENDS)}")


__all__ = ["BACKENDS", "Backend", "available", "make_backend", "resolve"]
