"""Which way dependencies point, read from the source (AST): the core (``edgepeft/`` outside
``edgepeft/cli/``) is the contract both sides share and imports neither side nor torch/onnx;
``runtime/`` never imports torch, onnx or the exporters (the ExecuTorch backend included: it runs
the programs through its own native runner); ``exporters/`` never imports the
runtime or the CLI; ``fleet/`` (edgepeft.fleet: the core, the runtime and flwr) never imports
torch, onnx, the exporters or the CLI. Only ``edgepeft/cli/`` imports both sides.

Every import counts: module level, inside functions, relative, ``from edgepeft import runtime``,
and ``importlib.import_module("...")`` / ``__import__("...")`` with a literal name."""
from __future__ import annotations

import ast
import sys
import textwrap
from pathlib import Path

import edgepeft

ROOT = Path(edgepeft.__file__).resolve().parent.parent
# Source folder -> the package it is imported as (pyproject's [tool.setuptools.package-dir]).
PACKAGES = {"edgepeft": "edgepeft", "runtime": "edgepeft.runtime", "exporters": "edgepeft.exporters",
            "fleet": "edgepeft.fleet"}

HOST_LIBS = ("torch", "torchao", "onnx", "onnxscript", "onnxruntime", "executorch")
CORE_FORBIDDEN = ("edgepeft.runtime", "edgepeft.exporters", "edgepeft.cli") + HOST_LIBS
RUNTIME_FORBIDDEN = ("torch", "torchao", "onnx", "onnxscript", "executorch", "edgepeft.exporters", "edgepeft.cli")
EXPORTERS_FORBIDDEN = ("edgepeft.runtime", "edgepeft.cli")
# Fleet learning runs on devices: the runtime's rule, plus no CLI (flwr is allowed).
FLEET_FORBIDDEN = ("torch", "torchao", "onnx", "onnxscript", "executorch", "edgepeft.exporters", "edgepeft.cli")


def module_name(path: Path) -> str:
    rel = path.resolve().relative_to(ROOT)
    parts = [PACKAGES[rel.parts[0]], *rel.parts[1:]]
    parts[-1] = parts[-1].removesuffix(".py")
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(source: str, module: str, is_package: bool = False) -> set[str]:
    """Every module ``source`` (the text of ``module``) imports, wherever the import sits.
    ``from a import b`` yields both ``a`` and ``a.b`` (``b`` may be a submodule)."""
    package = module if is_package else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names if a.name != "*")
        elif isinstance(node, ast.Call) and _dynamic_import(node):
            found.add(node.args[0].value)
    return found


def _dynamic_import(node: ast.Call) -> bool:
    f = node.func
    named = (isinstance(f, ast.Name) and f.id in ("__import__", "import_module")) or (
        isinstance(f, ast.Attribute) and f.attr == "import_module")
    return named and bool(node.args) and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)


def hits(found: set[str], forbidden: tuple[str, ...]) -> list[str]:
    return sorted(m for m in found if any(m == f or m.startswith(f + ".") for f in forbidden))


def violations_in(source: str, module: str, forbidden: tuple[str, ...], is_package: bool = False) -> list[str]:
    return hits(imports(source, module, is_package), forbidden)


def violations(files: list[Path], forbidden: tuple[str, ...]) -> dict[str, list[str]]:
    """{file: the forbidden modules it imports} over ``files``; empty when they keep the rule."""
    out = {}
    for path in files:
        bad = violations_in(path.read_text(encoding="utf-8"), module_name(path), forbidden,
                            path.name == "__init__.py")
        if bad:
            out[str(path.relative_to(ROOT))] = bad
    return out


def py_files(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


CORE = [p for p in py_files("edgepeft") if "cli" not in p.relative_to(ROOT / "edgepeft").parts[:1]]
CLI = py_files("edgepeft/cli")
RUNTIME = py_files("runtime")
EXPORTERS = py_files("exporters")
FLEET = py_files("fleet")


# -- the scanner itself: it must see what the rules are about --------------------------------------

SYNTHETIC = textwrap.dedent("""
    import numpy as np
    from edgepeft import runtime
    from . import exporters
    from .errors import SpecError

    def later():
        import torch.nn as nn
        from edgepeft.cli.profiler import measure
        return importlib.import_module("onnx")

    class K:
        def m(self):
            return __import__("executorch")
""")


def test_scanner_sees_every_kind_of_import():
    found = imports(SYNTHETIC, "edgepeft.fake")
    assert {"numpy", "edgepeft.runtime", "edgepeft.exporters", "edgepeft.errors", "torch.nn",
            "edgepeft.cli.profiler", "onnx", "executorch"} <= found
    assert hits(found, CORE_FORBIDDEN) == ["edgepeft.cli.profiler", "edgepeft.cli.profiler.measure",
                                           "edgepeft.exporters", "edgepeft.runtime", "executorch", "onnx",
                                           "torch.nn"]
    # And a rule over it fails: the same source as a core file is a violation.
    assert violations_in(SYNTHETIC, "edgepeft.fake", CORE_FORBIDDEN)


def test_scanner_matches_whole_names_only():
    found = imports("import onnxruntime\nimport torchvision_like\nfrom edgepeft import runtime_notes\n", "edgepeft.x")
    assert hits(found, RUNTIME_FORBIDDEN) == []
    assert hits(found, ("onnxruntime",)) == ["onnxruntime"]


def test_relative_imports_resolve_against_the_package():
    assert "edgepeft.runtime.budget" in imports("from ..budget import Budget\n", "edgepeft.runtime.backends.base")
    assert "edgepeft.runtime.session" in imports("from .session import Session\n", "edgepeft.runtime", True)


def test_the_scan_covers_the_tree():
    # An empty glob would make every rule below pass vacuously.
    assert len(CORE) >= 10 and len(CLI) >= 8 and len(RUNTIME) >= 5 and len(EXPORTERS) >= 5
    assert ROOT / "edgepeft" / "cli" / "__init__.py" not in CORE
    # The CLI is where both sides meet: the scanner finds both there.
    found = set().union(*(imports(p.read_text(), module_name(p), p.name == "__init__.py") for p in CLI))
    assert hits(found, ("edgepeft.runtime",)) and hits(found, ("edgepeft.exporters",))


# -- the rules ------------------------------------------------------------------------------------

def test_core_imports_neither_side_nor_host_libraries():
    assert violations(CORE, CORE_FORBIDDEN) == {}, "move this code into edgepeft/cli/ or the side it belongs to"


def test_runtime_imports_no_torch_onnx_or_exporters():
    assert violations(RUNTIME, RUNTIME_FORBIDDEN) == {}


def test_the_executorch_backend_has_no_exception():
    assert ROOT / "runtime" / "backends" / "executorch.py" in RUNTIME


def test_exporters_import_no_runtime_or_cli():
    assert violations(EXPORTERS, EXPORTERS_FORBIDDEN) == {}


def test_fleet_imports_no_torch_onnx_exporters_or_cli():
    assert len(FLEET) >= 5, "the scan must see fleet/"
    assert violations(FLEET, FLEET_FORBIDDEN) == {}
    # It may use the core, the runtime and flwr: the scanner sees them there.
    found = set().union(*(imports(p.read_text(), module_name(p), p.name == "__init__.py") for p in FLEET))
    assert hits(found, ("edgepeft.runtime",)) and hits(found, ("flwr",))


def test_cli_modules_shadow_no_standard_library_module():
    # Anyone who puts edgepeft/cli on sys.path (running one of its files as a script) would
    # otherwise replace the standard library's module (inspect, profile) for every importer.
    clash = sorted(p.stem for p in CLI if p.stem in sys.stdlib_module_names)
    assert clash == [], "rename these modules (e.g. inspect_cmd.py)"
