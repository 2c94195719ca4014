"""No code execution from data on the device path: the runtime and the torch-free core never
unpickle (tensors are safetensors, numpy loads refuse pickles, no torch.load, eval or exec,
no custom-op libraries named by a bundle). Checked statically over the source, and
dynamically over a train/save/swap/infer session with the unpickling entry points disabled."""
from __future__ import annotations

import ast
import pickle
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEVICE_PATH = [p for d in ("edgepeft", "runtime") for p in sorted((ROOT / d).rglob("*.py"))]
BANNED_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "marshal", "shelve"}
BANNED_CALLS = {"eval", "exec", "compile", "__import__", "torch.load", "pickle.load", "pickle.loads",
                "yaml.load", "yaml.unsafe_load", "register_custom_ops_library", "ctypes.CDLL", "ctypes.cdll.LoadLibrary"}
NUMPY_LOADS = {"np.load", "numpy.load"}
# Reviewed exceptions, each with its reason: (file, what the scan reports) -> why it is safe.
ALLOWED = {
    ("runtime/backends/lean.py", "calls ctypes.CDLL"):
        "the C library under its fixed name, for malloc_trim; never a path from a bundle",
    ("runtime/native/__init__.py", "calls ctypes.CDLL"):
        "the ExecuTorch runner the project builds into its own cache (runtime/native/build.py); "
        "never a path from a bundle",
}


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _violations(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    out = []
    for node in ast.walk(tree):
        where = f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            out += [f"{where} imports {a.name}" for a in node.names if a.name.split(".")[0] in BANNED_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in BANNED_MODULES:
            out.append(f"{where} imports from {node.module}")
        elif isinstance(node, ast.Call):
            name = _dotted(node.func)
            if name in BANNED_CALLS or name.rpartition(".")[2] in {"register_custom_ops_library", "unsafe_load"}:
                out.append(f"{where} calls {name}")
            kw = {k.arg: k.value for k in node.keywords}
            if name in NUMPY_LOADS and not (isinstance(kw.get("allow_pickle"), ast.Constant)
                                           and kw["allow_pickle"].value is False):
                out.append(f"{where} calls {name} without allow_pickle=False")
            if "allow_pickle" in kw and not (isinstance(kw["allow_pickle"], ast.Constant) and kw["allow_pickle"].value is False):
                out.append(f"{where} passes allow_pickle other than False")
    return out


def test_the_device_path_has_no_unpickling_or_eval():
    assert len(DEVICE_PATH) > 15  # the scan sees the whole device path
    found = [v for p in DEVICE_PATH for v in _violations(p)]
    bad = [v for v in found if (v.split(":")[0], v.split(" ", 1)[1]) not in ALLOWED]
    assert bad == [], "\n".join(bad)
    # Every exception is still there to be reviewed (a stale entry would hide a new use).
    assert {(v.split(":")[0], v.split(" ", 1)[1]) for v in found} >= set(ALLOWED)


def test_the_scanner_catches_what_it_looks_for(tmp_path):
    """The check itself works: each banned form in a file is reported."""
    sample = tmp_path / "edgepeft" / "bad.py"
    sample.parent.mkdir()
    sample.write_text("import pickle\nfrom dill import loads\nimport numpy as np\nimport marshal\n"
                      "np.load('x.npy')\nnp.load('x.npy', allow_pickle=True)\nnp.load('x', allow_pickle=False)\n"
                      "torch.load('w.pt')\neval('1')\nsess.register_custom_ops_library('lib.so')\n")
    global ROOT
    saved, ROOT = ROOT, tmp_path
    try:
        found = _violations(sample)
    finally:
        ROOT = saved
    assert len(found) == 9, found  # np.load(..., allow_pickle=True) is reported twice


def test_a_device_session_never_unpickles(open_session, bundle_int8, tmp_path, train_examples, monkeypatch):
    def refuse(*a, **kw):
        raise AssertionError("the device path tried to unpickle")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    real_np_load = np.load

    def np_load(*a, allow_pickle=False, **kw):
        assert allow_pickle is False, "np.load with allow_pickle=True on the device path"
        return real_np_load(*a, allow_pickle=False, **kw)

    monkeypatch.setattr(np, "load", np_load)
    s = open_session(bundle_int8.path, store=tmp_path / "store")
    s.train_step(train_examples)
    s.save_adapter()
    s.swap_adapter("bob", create=True)
    s.swap_adapter("alice")
    s.infer(["good fun"])
    s.close()
    again = open_session(bundle_int8.path, store=tmp_path / "store")
    assert again.steps == 1
