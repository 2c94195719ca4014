"""The device side stays torch-free: a full runtime workflow in a fresh interpreter imports none
of torch, onnx, edgepeft.exporters or executorch, and the runtime's source neither imports
them nor unpickles anything."""
from __future__ import annotations

import ast
import io
import json
import re
import subprocess
import sys
import textwrap
import tokenize
from pathlib import Path

import pytest

import edgepeft

FORBIDDEN_MODULES = ("torch", "onnx", "edgepeft.exporters", "executorch")
RUNTIME_DIR = Path(edgepeft.__file__).resolve().parent.parent / "runtime"

WORKFLOW = textwrap.dedent("""
    import json, sys
    import edgepeft.runtime as rt

    bundle, store, cache = sys.argv[1:4]
    s = rt.Session.open(bundle, adapter="alice", store=store, cache_dir=cache, threads=1,
                        optimizer=rt.OptimizerSpec(lr=1e-2))
    b = s.encoder.batch([rt.Example("a lovely film", "pos"), rt.Example("awful and boring", "neg")])
    losses = [s.train_step(b), s.train_step(b)]
    s.save_adapter()
    s.swap_adapter("bob", create=True)
    logits = s.infer(["a lovely film"])
    s.swap_adapter("alice")
    s.close()
    forbidden = {forbidden!r}
    print(json.dumps({{
        "loaded": sorted(m for m in sys.modules if any(m == f or m.startswith(f + ".") for f in forbidden)),
        "ort_training": "onnxruntime.training.api" in sys.modules,
        "losses": losses,
        "logits_shape": list(logits.shape),
        "adapters": s.adapters(),
    }}))
""").format(forbidden=FORBIDDEN_MODULES)


def test_runtime_workflow_imports_no_host_side_modules(bundle_int8, tmp_path):
    r = subprocess.run([sys.executable, "-c", WORKFLOW, str(bundle_int8.path), str(tmp_path / "store"),
                        str(tmp_path / "cache")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout.strip().splitlines()[-1])
    assert report["loaded"] == [], f"the runtime imported {report['loaded']}"
    # The workflow really ran on the ORT training backend.
    assert report["ort_training"] is True
    assert len(report["losses"]) == 2 and report["losses"][1] < report["losses"][0]
    assert report["logits_shape"] == [1, 2]
    assert report["adapters"] == ["alice", "bob"]
    assert (tmp_path / "store" / "alice" / "adapter_model.safetensors").is_file()


def test_the_isolation_check_detects_a_forbidden_import(bundle_int8, tmp_path):
    """Control: the same probe does see a module the workflow imports on purpose."""
    code = WORKFLOW.replace("import edgepeft.runtime as rt", "import edgepeft.runtime as rt\nimport onnx")
    r = subprocess.run([sys.executable, "-c", code, str(bundle_int8.path), str(tmp_path / "store"),
                        str(tmp_path / "cache")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "onnx" in json.loads(r.stdout.strip().splitlines()[-1])["loaded"]


# -- static check ---------------------------------------------------------------------------------------
FORBIDDEN_CODE = [
    (re.compile(r"\bimport\s+torch\b|\bfrom\s+torch\b"), "imports torch"),
    (re.compile(r"\bimport\s+onnx\b|\bfrom\s+onnx\b"), "imports onnx"),
    # The backends' registry may name the executorch backend module (edgepeft.runtime.backends.executorch).
    (re.compile(r"(?<!backends \. )(?<!backends\.)\bexecutorch\b"), "mentions executorch"),
    (re.compile(r"\bexporters\b"), "uses edgepeft.exporters"),
    (re.compile(r"\bpickle\b|\bcPickle\b|\bdill\b|\bjoblib\b"), "uses pickle"),
    (re.compile(r"\btorch\s*\.\s*load\b"), "calls torch.load"),
    (re.compile(r"\ballow_pickle\s*=\s*True\b"), "passes allow_pickle=True"),
]


def code_without_docs(source: str) -> str:
    """The source with comments and docstrings removed (prose may name what code must not use)."""
    tree = ast.parse(source)
    doc_starts = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                doc_starts.add((body[0].lineno, body[0].col_offset))
    kept = [tok.string for tok in tokenize.generate_tokens(io.StringIO(source).readline)
            if tok.type != tokenize.COMMENT and not (tok.type == tokenize.STRING and tok.start in doc_starts)]
    return " ".join(kept)


def violations(source: str) -> list[str]:
    code = code_without_docs(source)
    found = [why for pattern, why in FORBIDDEN_CODE if pattern.search(code)]
    # Imports by name, however spelled (importlib / __import__ with a literal).
    for node in ast.walk(ast.parse(source)):
        mods = []
        if isinstance(node, ast.Import):
            mods = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            mods = [node.module]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str) and getattr(node.func, "attr", getattr(node.func, "id", "")) \
                in ("import_module", "__import__"):
            mods = [node.args[0].value]
        for m in mods:
            if m.split(".")[0] in ("torch", "onnx", "executorch", "pickle") or m.startswith("edgepeft.exporters"):
                found.append(f"imports {m}")
    return found


# Every backend is scanned, the executorch one included: it runs the programs through the
# project's native runner (runtime/native), not ExecuTorch's torch-linked Python package.
RUNTIME_FILES = sorted([*RUNTIME_DIR.glob("*.py"), *(RUNTIME_DIR / "backends").glob("*.py")])


def test_executorch_backend_is_scanned_and_imports_no_torch():
    assert RUNTIME_DIR / "backends" / "executorch.py" in RUNTIME_FILES
    probe = ("import sys, edgepeft.runtime.backends as b, edgepeft.runtime.backends.executorch\n"
             "b.available('executorch')\n"
             "print(sorted(m for m in ('torch', 'executorch') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr


def test_runtime_sources_are_found():
    assert {p.name for p in RUNTIME_FILES} >= {"__init__.py", "session.py", "budget.py", "ort_training.py", "base.py"}


@pytest.mark.parametrize("path", RUNTIME_FILES, ids=lambda p: str(p.relative_to(RUNTIME_DIR)))
def test_runtime_source_has_no_host_side_code(path):
    assert violations(path.read_text()) == []


@pytest.mark.parametrize("snippet", [
    "import torch",
    "import torch.nn as nn",
    "from torch import nn",
    "import onnx",
    "from onnx import helper",
    "from edgepeft.exporters import export_bundle",
    "import edgepeft.exporters.zoo",
    "import pickle",
    "x = torch.load(p)",
    "np.load(p, allow_pickle=True)",
    "importlib.import_module('torch')",
    "m = __import__('executorch')",
    "def f():\n    from edgepeft import exporters\n",
])
def test_the_static_check_catches(snippet):
    assert violations(snippet + "\n")


@pytest.mark.parametrize("snippet", [
    '"""No torch here: we never import torch, onnx or exporters."""\nimport numpy as np\n',
    "import onnxruntime as ort  # not onnx\n",
    "# import torch\nx = 1\n",
])
def test_the_static_check_ignores_prose_and_onnxruntime(snippet):
    assert violations(snippet) == []
