"""Runtime backends behind one Protocol, as their records in edgepeft.backends.REGISTRY
describe them: chosen by name, or "auto" (``resolve``). Nothing here names a backend: a
backend's loader, its availability check and its place in "auto"'s order are its record's."""
from __future__ import annotations

import importlib.util
from typing import Callable

from edgepeft import memory_model
from edgepeft.backends import REGISTRY, load, record
from edgepeft.bundle import OpenedBundle
from edgepeft.errors import BackendError, EdgePeftError
from edgepeft.manifest import Manifest
from edgepeft.runtime.backends.base import Backend

BACKENDS = tuple(REGISTRY)


def available(name: str) -> bool:
    """Whether backend ``name`` can run here: the modules its record requires are installed
    (found, not imported: nothing heavy loads) and its special check, if any, passes."""
    r = REGISTRY.get(name)
    if r is None or any(importlib.util.find_spec(m) is None for m in r.requires):
        return False
    return r.check is None or bool(load(r.check)())


def resolve(name: str, manifest: Manifest, *, budget: int | None = None, batch: int | None = None) -> str:
    """The backend "auto" stands for with this bundle here; other names pass through.

    Without ``budget``: the first of BACKENDS (the registry's order) the bundle has and this
    machine can run. With ``budget`` (bytes a session may add): among those, the one the memory
    model predicts leanest at ``batch`` (default 1) within the budget; then those it has no
    prediction for, in the registry's order; then those predicted over it."""
    if name != "auto":
        return name
    here = [b for b in BACKENDS if b in manifest.backends and available(b)]
    if not here:
        needs = "; ".join(f"{b}: {REGISTRY[b].caps.needs}" for b in BACKENDS if b in manifest.backends)
        raise BackendError(f"no runtime backend available here for this bundle (it has "
                           f"{sorted(manifest.backends)}); install what one of its backends needs ({needs})")
    if budget is None:
        return here[0]
    # min keeps the registry's order among equal keys.
    return min(here, key=lambda b: _budget_rank(manifest, b, budget, batch or 1))


def _budget_rank(manifest: Manifest, backend: str, budget: int, batch: int) -> tuple[int, int]:
    """(0: predicted within ``budget``, 1: no prediction, 2: predicted over it; the predicted
    session peak) for "auto" under a budget."""
    if memory_model.no_prediction(backend) is not None or not manifest.memory:
        return 1, 0
    try:
        need = memory_model.predict(manifest, backend=backend, batch=batch).session_peak()
    except EdgePeftError:  # e.g. a memory card without this backend's section (an older export)
        return 1, 0
    return (0 if need <= budget else 2), need


def make_backend(name: str, bundle: OpenedBundle, *, threads: int | None,
                 precheck: Callable[[str], None] = lambda name: None) -> Backend:
    """Backend ``name`` (or "auto", without a budget) loaded for ``bundle``: its record's loader
    class, imported now. ``precheck(name)`` runs once the backend is chosen, before it loads
    anything."""
    name = resolve(name, bundle.manifest)
    loader = record(name).loader
    precheck(name)
    return load(loader)(bundle, threads=threads)


__all__ = ["BACKENDS", "Backend", "available", "make_backend", "resolve"]
