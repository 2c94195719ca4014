"""A device-like Python environment: a fresh virtualenv holding the edgepeft wheel and the
portable backend's dependencies only (plain onnxruntime, numpy, safetensors, tokenizers; no
torch, no onnxruntime-training). Used to prove the device path runs without the host stack."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import venv
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# edgepeft's core dependencies plus [portable] (the wheel itself is installed --no-deps).
DEVICE_REQUIREMENTS = ("onnxruntime", "numpy", "safetensors", "tokenizers", "click", "rich", "cryptography",
                       "tomli; python_version < '3.11'")


def _source_copy(dst: Path) -> Path:
    """The distribution's sources (pyproject, README, every package folder) copied to ``dst``.
    Building in the checkout itself shares setuptools' build/ folder between concurrent builds
    (two test workers), and one build's wheel can then miss packages the other just removed."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib
    cfg = tomllib.loads((REPO / "pyproject.toml").read_text())
    dst.mkdir(parents=True, exist_ok=True)
    for f in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / f, dst / f)
    for folder in sorted({d.split("/")[0] for d in cfg["tool"]["setuptools"]["package-dir"].values()}):
        shutil.copytree(REPO / folder, dst / folder, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dst


def build_wheel(out_dir: Path) -> Path:
    """The edgepeft wheel, built from a private copy of this checkout with the current interpreter."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        src = _source_copy(Path(tmp) / "src")
        subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                        "-w", str(out_dir), str(src)], check=True)
    return next(out_dir.glob("edgepeft-*.whl"))


def make_device_venv(root: Path, wheel: Path) -> Path:
    """Create ``root`` with the wheel and the device dependencies; returns its python."""
    venv.EnvBuilder(with_pip=True, clear=True).create(root)
    py = root / "bin" / "python"
    # No constraints file here on purpose: the device gets whatever onnxruntime PyPI serves
    # today (the maintained one), not the dev environment's pins.
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                    *DEVICE_REQUIREMENTS], check=True)
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps", str(wheel)],
                   check=True)
    return py


def run_json(python: Path, script: str, *args: str, timeout: float = 600) -> dict:
    """Run ``script`` (source text) with ``python`` outside the repo; it prints one JSON line last."""
    # The host's PYTHONPATH (which a Ray driver leaves set) must not reach the device interpreter.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([str(python), "-c", script, *args], capture_output=True, text=True, timeout=timeout,
                          cwd="/", env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"device script failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
