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


def training_api():
    if "onnxruntime.training" not in sys.modules:
        spec = importlib.util.find_spec("onnxruntime")
        if spec is None or not spec.submodule_search_locations:
            raise BackendError("the ort-training backend needs onnxruntime-training-cpu==1.19.2 "
                               "(pip install 'edgepeft[ort]'); or use another backend")
        pkg_dir = os.path.join(list(spec.submodule_search_locations)[0], "training")
        if not os.path.isdir(os.path.join(pkg_dir, "api")):
            raise BackendError("the installed onnxruntime has no training API (plain onnxruntime?): install "
                               "onnxruntime-training-cpu==1.19.2 in its place (pip install 'edgepeft[ort]')")
        stub = types.ModuleType("onnxruntime.training")
        stub.__path__ = [pkg_dir]
        sys.modules["onnxruntime.training"] = stub
        sys.modules.setdefault("onnxruntime.training.ortmodule", None)
    try:
        from onnxruntime.training import api
    except ImportError as e:
        raise BackendError(f"ONNX Runtime's training API failed to import ({e})") from None
    return api
