"""The runtime backends, one record each. Every table about backends is read from ``REGISTRY``:
the runtime's loaders, availability checks and "auto" (edgepeft.runtime.backends), the
exporter's builders (edgepeft.exporters.targets), the memory model (edgepeft.memory_model),
the manifest's entry roles, the session's static-size precheck, and the CLI's choices,
``inspect`` table and ``profile`` help.

The core imports neither side, so a record names its runtime loader, its export builder and
any special availability check by import path (``"module:attribute"``), resolved by the side
that uses it (``load``). Adding a backend: its name in edgepeft.names, one record below, a
loader class implementing edgepeft.runtime.backends.base.Backend, an export builder."""
from __future__ import annotations

import dataclasses
import importlib
import types
from typing import Any, Literal, Mapping

from edgepeft import names
from edgepeft.errors import BackendError
from edgepeft.memory_lean import COSTS as LEAN_COSTS
from edgepeft.memory_model import (EXECUTORCH_COSTS, ORT_TRAINING_COSTS, PORTABLE_COSTS, BackendCosts, MemoryModel,
                                   PlannedCosts)

_TRAIN_ALL = "train, evaluate, infer, swap"


def _split_path(path: Any, what: str) -> tuple[str, str]:
    module, sep, attr = path.partition(":") if isinstance(path, str) else ("", "", "")
    if not (module and sep and attr):
        raise ValueError(f"{what} must be an import path 'package.module:attribute', got {path!r}")
    return module, attr


@dataclasses.dataclass(frozen=True)
class Capabilities:
    """What a session can do with the backend, as ``edgepeft inspect`` shows it."""

    can: str                       # e.g. "train, evaluate, infer, swap"
    batch: Literal["any", "fixed"]  # "fixed": the batch is set at export (the runtime pads or splits)
    needs: str                     # what must be installed to run it
    # With a fixed batch: the entry setting that holds it.
    batch_setting: str | None = None

    def __post_init__(self) -> None:
        if self.batch not in ("any", "fixed"):
            raise ValueError(f"`batch` must be 'any' or 'fixed', got {self.batch!r}")
        if (self.batch == "fixed") != (self.batch_setting is not None):
            raise ValueError("a fixed batch names the entry setting that holds it (`batch_setting`), "
                             "and only a fixed batch does")


@dataclasses.dataclass(frozen=True)
class BackendRecord:
    """Everything edgepeft knows about one runtime backend."""

    name: str
    # "module:Class" of the runtime loader (edgepeft.runtime.backends.base.Backend), built as
    # ``Class(bundle, threads=...)``.
    loader: str
    # Installed here when importlib.util.find_spec finds each of these modules (nothing is
    # imported) and, if given, ``check`` ("module:function" -> bool) says so.
    requires: tuple[str, ...]
    caps: Capabilities
    # "module:function" of the export builder: (InjectedModel, ForwardGraph, tmp) -> BackendTarget.
    export: str
    # Manifest entry keys naming bundle members; ``settings`` maps the other keys to their type.
    members: tuple[str, ...]
    settings: Mapping[str, type] = dataclasses.field(default_factory=dict, hash=False)
    # Bundle members outside the entry that the backend also loads (counted by the static precheck).
    loads: tuple[str, ...] = ()
    check: str | None = None
    # Written by export_bundle when no backends are named.
    default_export: bool = False
    # Left out with a warning, rather than failing a default export, when the model cannot give it.
    best_effort: bool = False
    # The memory model: fitted BackendCosts, any object with ``predict(manifest, *, batch, seq,
    # trainable_params) -> Prediction``, or None (no prediction: budgets are measured only).
    memory: BackendCosts | MemoryModel | None = dataclasses.field(default=None, hash=False)

    def __post_init__(self) -> None:
        for field in ("loader", "export", *(("check",) if self.check is not None else ())):
            _split_path(getattr(self, field), f"{self.name}.{field}")
        if not self.name or not self.members or not self.requires:
            raise ValueError(f"backend record {self.name!r} needs a name, member roles and required modules")
        clash = set(self.members) & set(self.settings)
        if clash:
            raise ValueError(f"backend {self.name!r}: entry keys {sorted(clash)} are both members and settings")
        if self.memory is not None and not callable(getattr(self.memory, "predict", None)):
            raise ValueError(f"backend {self.name!r}: `memory` must have a predict() method or be None")
        object.__setattr__(self, "settings", types.MappingProxyType(dict(self.settings)))


# In the order "auto" prefers them (edgepeft.runtime.backends.resolve).
REGISTRY: dict[str, BackendRecord] = {r.name: r for r in (
    BackendRecord(
        names.BACKEND_ORT, loader="edgepeft.runtime.backends.ort_training:OrtTrainingBackend",
        requires=("onnxruntime",), check="edgepeft.runtime.backends._ort_import:has_training_build",
        caps=Capabilities(_TRAIN_ALL, "any", "onnxruntime-training-cpu 1.19.2 (x86_64)"),
        export="edgepeft.exporters.targets:build_ort", members=("training_model", "eval_model", "checkpoint"),
        default_export=True, memory=ORT_TRAINING_COSTS),
    BackendRecord(
        names.BACKEND_PORTABLE, loader="edgepeft.runtime.backends.portable:PortableBackend",
        requires=("onnxruntime",), caps=Capabilities(_TRAIN_ALL, "any", "any onnxruntime >= 1.17; no torch"),
        export="edgepeft.exporters.targets:build_portable", members=("gradient_model",),
        loads=(names.INFERENCE_MODEL,), default_export=True, best_effort=True, memory=PORTABLE_COSTS),
    BackendRecord(
        names.BACKEND_LEAN, loader="edgepeft.runtime.backends.lean:LeanBackend", requires=("onnxruntime",),
        caps=Capabilities(_TRAIN_ALL, "any", "any onnxruntime >= 1.17; no torch; a model with lean parts"),
        export="edgepeft.exporters.lean:build_target", members=("plan", "weights"), memory=LEAN_COSTS),
    BackendRecord(
        names.BACKEND_EXECUTORCH, loader="edgepeft.runtime.backends.executorch:ExecutorchBackend",
        requires=("executorch",),
        caps=Capabilities("train, evaluate, infer (XNNPACK), swap", "fixed",
                          "executorch 1.5.1's runtime libraries (no torch) and g++ once, to build the runner",
                          batch_setting=names.EXECUTORCH_BATCH_SIZE),
        export="edgepeft.exporters.targets:build_executorch", members=("training_program", "inference_program"),
        settings={names.EXECUTORCH_BATCH_SIZE: int},
        memory=PlannedCosts(EXECUTORCH_COSTS, names.BACKEND_EXECUTORCH, names.EXECUTORCH_BATCH_SIZE)),
    BackendRecord(
        names.BACKEND_EXECUTORCH_LEAN, loader="edgepeft.runtime.backends.executorch_lean:ExecutorchLeanBackend",
        requires=("executorch",),
        caps=Capabilities(_TRAIN_ALL + " (block-wise, XNNPACK)", "fixed",
                          "executorch 1.5.1's runtime libraries (no torch); a model with lean parts, int8 or fp32",
                          batch_setting=names.EXECUTORCH_BATCH_SIZE),
        export="edgepeft.exporters.lean_executorch:build_target", members=("plan", "weights"),
        settings={names.EXECUTORCH_BATCH_SIZE: int}, memory=importlib.import_module("edgepeft.memory_lean").EXECUTORCH_COSTS),
)}

# What export_bundle writes when not told, and every backend it can write.
DEFAULT_EXPORT_BACKENDS = tuple(r.name for r in REGISTRY.values() if r.default_export)
EXPORT_BACKENDS = tuple(REGISTRY)


def record(name: str) -> BackendRecord:
    """The record of backend ``name``; BackendError naming the known ones otherwise."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise BackendError(f"unknown backend {name!r}; known: {list(REGISTRY)}") from None


def load(path: str) -> Any:
    """The attribute a record's ``"module:attribute"`` path names, imported now."""
    module, attr = _split_path(path, path)
    return getattr(importlib.import_module(module), attr)
