"""Import ONNX Runtime's training API without torch.

The training build's ``onnxruntime/__init__`` probes ``onnxruntime.training.ortmodule``, and
``onnxruntime/training/__init__`` imports ortmodule too; with torch installed either import
pulls torch in (~280 MB RSS, ~4 s). The device side needs only ``training.api``: register the
``training`` package without running its ``__init__`` and make ``ortmodule`` unimportable,
before onnxruntime is first imported."""
from __future__ import annotations

import importlib.util
import os
import sys
import types

from edgepeft.errors import BackendError


def onnxruntime():
    """``import onnxruntime`` without dragging torch in (plain builds need no help; the
    training build gets the stub first)."""
    if "onnxruntime" not in sys.modules and has_training_build():
        _install_stub()
    try:
        import onnxruntime as ort
    except ImportError:
        raise BackendError("the portable backend needs onnxruntime (pip install 'edgepeft[portable]')") from None
    return ort


def session_options(ort, threads: int | None):
    """The SessionOptions every ONNX Runtime backend starts from (``ort``: the imported module)."""
    opts = ort.SessionOptions()
    # Batches vary in length and pre-planned memory patterns only raise the peak (MiniLM at the
    # same step time: ort-training 398 -> 378 MB, portable 448 -> 306 MB without them).
    opts.enable_mem_pattern = False
    if threads:
        # ORT re-pins its own threads and escapes taskset: the count must be explicit.
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    return opts


def _pkg_dir() -> str | None:
    spec = importlib.util.find_spec("onnxruntime")
    if spec is None or not spec.submodule_search_locations:
        return None
    return list(spec.submodule_search_locations)[0]


def has_training_build() -> bool:
    d = _pkg_dir()
    return d is not None and os.path.isdir(os.path.join(d, "training", "api"))


def _install_stub() -> None:
    if "onnxruntime.training" in sys.modules:
        return
    stub = types.ModuleType("onnxruntime.training")
    stub.__path__ = [os.path.join(_pkg_dir(), "training")]
    sys.modules["onnxruntime.training"] = stub
    sys.modules.setdefault("onnxruntime.training.ortmodule", None)


def training_api():
    if "onnxruntime.training" not in sys.modules:
        if _pkg_dir() is None:
            raise BackendError("the ort-training backend needs onnxruntime-training-cpu==1.19.2 "
                               "(pip install 'edgepeft[ort]'); or use another backend")
        if not has_training_build():
            raise BackendError("the installed onnxruntime has no training API (plain onnxruntime?): install "
                               "onnxruntime-training-cpu==1.19.2 in its place (pip install 'edgepeft[ort]')")
        _install_stub()
    try:
        from onnxruntime.training import api
    except ImportError as e:
        raise BackendError(f"ONNX Runtime's training API failed to import ({e})") from None
    return api
