"""ExecuTorch programs run from Python without torch: a ctypes binding of the small native
runner in et_runner.cpp (built from the executorch wheel's headers and libraries by
``build.py``). One call runs a program's method on numpy arrays and returns copies of its
outputs; what a run needs (the adapter tensors, the batch) is passed in every time."""
from __future__ import annotations

import contextlib
import ctypes
import os
import threading
from typing import Iterator, Sequence

import numpy as np

from edgepeft.errors import BackendError

# ExecuTorch ScalarType codes (runtime/core/portable_type/scalar_type.h) of the dtypes we pass.
_CODES = {np.dtype(np.uint8): 0, np.dtype(np.int8): 1, np.dtype(np.int32): 3, np.dtype(np.int64): 4,
          np.dtype(np.float32): 6, np.dtype(np.float64): 7, np.dtype(np.bool_): 11}
_DTYPES = {code: dt for dt, code in _CODES.items()}
_ERR = 512


class ExecutorchError(RuntimeError):
    """ExecuTorch refused to load or run a program (its error code in the message). The backend
    turns it into BundleError/BackendError naming the member or phase (runtime.backends.base)."""
_lib: ctypes.CDLL | None = None
_lock = threading.Lock()


def _library() -> ctypes.CDLL:
    """The runner, built on first use and loaded once per process."""
    global _lib
    with _lock:
        if _lib is None:
            from edgepeft.runtime.native.build import library_path

            path = library_path()
            try:
                lib = ctypes.CDLL(str(path))
            except OSError as e:
                raise BackendError(f"cannot load the ExecuTorch runner {path}: {e}; rebuild it "
                                   "(python -m edgepeft.runtime.native.build) or reinstall executorch==1.5.1") from None
            vp, i, cp, sz = ctypes.c_void_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t
            lib.edgepeft_et_open.restype, lib.edgepeft_et_open.argtypes = vp, [cp, cp, cp, sz]
            lib.edgepeft_et_num_inputs.argtypes = [vp]
            lib.edgepeft_et_run.argtypes = [vp, i, ctypes.POINTER(vp), ctypes.POINTER(i), ctypes.POINTER(i),
                                            ctypes.POINTER(ctypes.c_int64), cp, sz]
            lib.edgepeft_et_output.argtypes = [vp, i, ctypes.POINTER(vp), ctypes.POINTER(i),
                                               ctypes.POINTER(ctypes.c_int64)]
            lib.edgepeft_et_close.argtypes = [vp]
            lib.edgepeft_et_planned_sizes.argtypes = [cp, cp, ctypes.POINTER(ctypes.c_int64), i, cp, sz]
            _lib = lib
    return _lib


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """ExecuTorch logs its thread-pool and CPU probing to fd 2 at info level: hide those lines."""
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def set_threads(n: int) -> None:
    """Threads of ExecuTorch's process-wide pool (its kernels and XNNPACK share it)."""
    lib = _library()
    with _quiet_stderr():
        lib.edgepeft_et_set_threads(int(n))


def planned_sizes(path: str, *, what: str, method: str = "forward") -> list[int]:
    """Bytes of each planned (activation) buffer ``method`` of the program at ``path`` needs."""
    lib = _library()
    sizes, err = (ctypes.c_int64 * 16)(), ctypes.create_string_buffer(_ERR)
    with _quiet_stderr():
        n = lib.edgepeft_et_planned_sizes(str(path).encode(), method.encode(), sizes, 16, err, _ERR)
    if n < 0 or n > 16:
        raise ExecutorchError(f"ExecuTorch cannot read {what} ({path}): {err.value.decode(errors='replace')}")
    return list(sizes[:n])


class Program:
    """One method of a .pte program, memory-mapped, its memory planned once at load."""

    def __init__(self, path: str, *, what: str, method: str = "forward"):
        self._lib = _library()
        self.what = what
        err = ctypes.create_string_buffer(_ERR)
        with _quiet_stderr():
            handle = self._lib.edgepeft_et_open(str(path).encode(), method.encode(), err, _ERR)
        if not handle:
            raise ExecutorchError(f"ExecuTorch cannot load {what} ({path}): {err.value.decode(errors='replace')}")
        self._handle = ctypes.c_void_p(handle)
        self.num_inputs = self._lib.edgepeft_et_num_inputs(self._handle)

    def run(self, arrays: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Copies of the method's outputs for ``arrays`` (C-contiguous, dtypes in _CODES)."""
        if self._handle is None:
            raise BackendError(f"{self.what} is closed")
        arrays = [np.ascontiguousarray(a) for a in arrays]  # kept alive through the call
        if len(arrays) != self.num_inputs:
            raise BackendError(f"{self.what} takes {self.num_inputs} inputs, got {len(arrays)}; re-export the bundle")
        n = len(arrays)
        shape = [d for a in arrays for d in a.shape]
        err = ctypes.create_string_buffer(_ERR)
        count = self._lib.edgepeft_et_run(
            self._handle, n, (ctypes.c_void_p * n)(*[a.ctypes.data for a in arrays]),
            (ctypes.c_int * n)(*[_CODES[a.dtype] for a in arrays]), (ctypes.c_int * n)(*[a.ndim for a in arrays]),
            (ctypes.c_int64 * max(1, len(shape)))(*shape), err, _ERR)
        if count < 0:
            raise ExecutorchError(f"ExecuTorch failed running {self.what}: {err.value.decode(errors='replace')} "
                                  f"(input shapes {[a.shape for a in arrays]})")
        return [self._output(i) for i in range(count)]

    def _output(self, i: int) -> np.ndarray:
        data, code, shape = ctypes.c_void_p(), ctypes.c_int(), (ctypes.c_int64 * 8)()
        rank = self._lib.edgepeft_et_output(self._handle, i, ctypes.byref(data), ctypes.byref(code), shape)
        if rank < 0 or code.value not in _DTYPES:
            raise BackendError(f"{self.what}: output {i} is not a tensor edgepeft reads; re-export the bundle")
        dtype = _DTYPES[code.value]
        dims = tuple(shape[:rank])
        size = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
        buf = (ctypes.c_char * size).from_address(data.value) if size else b""
        # A copy: the runtime reuses this memory on the next run.
        return np.frombuffer(buf, dtype=dtype, count=size // dtype.itemsize).reshape(dims).copy()

    def close(self) -> None:
        if self._handle is not None:
            self._lib.edgepeft_et_close(self._handle)
            self._handle = None

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()
