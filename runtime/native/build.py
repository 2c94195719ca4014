"""Builds the native ExecuTorch runner (et_runner.cpp) against the executorch wheel's own
headers and libraries, once per source/wheel/machine, into a cache folder; imports nothing of
executorch or torch (the wheel is found by its files).

    python -m edgepeft.runtime.native.build     # `make native`; otherwise built on first use

A device without a compiler points EDGEPEFT_ET_RUNNER at a library built elsewhere for it."""
from __future__ import annotations

import hashlib
import importlib.util
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

from edgepeft.errors import BackendError

SOURCE = Path(__file__).with_name("et_runner.cpp")
# The wheel's libraries: the runtime, the CPU kernels (registered by static initializers, so
# linked with --no-as-needed), the XNNPACK delegate and the shared thread pool.
LIBS = ("executorch", "executorch_kernels_optimized", "executorch_backend_xnnpack", "executorch_threadpool")
# What the wheel's CMake config (lib/cmake/executorch) asks consumers to compile with.
DEFINES = ("C10_USING_CUSTOM_GENERATED_MACROS", "ET_EVENT_TRACER_ENABLED")


def executorch_dir() -> Path:
    """The installed executorch package folder (lib/ and include/), or EDGEPEFT_EXECUTORCH_DIR."""
    env = os.environ.get("EDGEPEFT_EXECUTORCH_DIR")
    if env:
        return Path(env)
    spec = importlib.util.find_spec("executorch")  # locates the package; runs none of its code
    if spec is None or not spec.submodule_search_locations:
        raise BackendError("the executorch backend needs the executorch==1.5.1 wheel's runtime libraries: "
                           "pip install --no-deps executorch==1.5.1 (torch is not needed on the device)")
    return Path(list(spec.submodule_search_locations)[0])


def cache_dir() -> Path:
    return Path(os.environ.get("EDGEPEFT_NATIVE_CACHE") or Path.home() / ".cache" / "edgepeft" / "native")


def library_path() -> Path:
    """The runner library, built now if this source, wheel and machine have none yet."""
    prebuilt = os.environ.get("EDGEPEFT_ET_RUNNER")
    if prebuilt:
        return Path(prebuilt)
    et = executorch_dir()
    lib = et / "lib" / "libexecutorch.so"
    if not lib.exists():
        raise BackendError(f"the executorch package at {et} has no lib/libexecutorch.so; install executorch==1.5.1")
    key = hashlib.sha256(SOURCE.read_bytes() + str(et.resolve()).encode() + str(lib.stat().st_mtime_ns).encode()
                         + platform.machine().encode()).hexdigest()[:16]
    out = cache_dir() / f"libedgepeft_et_{key}.so"
    if not out.exists():
        _compile(et, out)
    return out


def _compile(et: Path, out: Path) -> None:
    """g++ (or $CXX) into a temporary file renamed into place: concurrent first uses are safe."""
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        raise BackendError("building the ExecuTorch runner needs a C++17 compiler (g++) on this machine, or "
                           "EDGEPEFT_ET_RUNNER pointing at a runner built elsewhere (python -m edgepeft.runtime.native.build)")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    inc = et / "include"
    cmd = [cxx, "-O2", "-std=c++17", "-fPIC", "-shared", "-Wno-deprecated-declarations",
           *(f"-D{d}" for d in DEFINES), f"-I{inc}", f"-I{inc / 'executorch/runtime/core/portable_type/c10'}",
           str(SOURCE), "-o", tmp, f"-L{et / 'lib'}", "-Wl,--no-as-needed", *(f"-l{n}" for n in LIBS),
           f"-Wl,-rpath,{et / 'lib'}"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        os.unlink(tmp)
        raise BackendError(f"building the ExecuTorch runner failed ({' '.join(cmd[:2])} ...):\n{done.stderr[-2000:]}")
    os.replace(tmp, out)


if __name__ == "__main__":
    print(library_path())
