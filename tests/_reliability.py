"""Helpers for the reliability tests: a synthetic manifest (no export needed), a deterministic
"training" that drives the real optimizer and adapter store, and the bodies of worker
processes (started through a forkserver, so a worker costs milliseconds, not an interpreter
start-up). Workers live in this importable module so the forkserver can find them."""
from __future__ import annotations

import multiprocessing
import os
import signal
import time
from pathlib import Path

import numpy as np

from edgepeft.adapters import AdapterStore
from edgepeft.manifest import Manifest, TensorInfo
from edgepeft.optim import Optimizer, OptimizerSpec
from edgepeft.specs import LoraSpec

ADAPTER = "alice"
# ~0.6 MB of weights + 1.2 MB of AdamW state: a save takes a few milliseconds, so random kills
# land inside it often.
SHAPES = {"layer.q.lora_A": (4, 16384), "layer.q.lora_B": (16384, 4), "head.weight": (8, 2048)}
SPEC = OptimizerSpec(name="adamw", lr=1e-2)


def synthetic_manifest(shapes: dict[str, tuple[int, ...]] = SHAPES) -> Manifest:
    return Manifest(
        schema_version=1, sdk_version="test", model_name="synthetic", model_sha256="0" * 64,
        task="classification", loss="cross_entropy",
        methods=(LoraSpec(rank=4, alpha=8.0, targets=("q",), modules_to_save=("head",)),),
        trainable=tuple(TensorInfo(n, f"base_model.model.{n}.weight" if "lora" in n else f"base_model.model.{n}",
                                   s, "lora") for n, s in shapes.items()),
        inputs=(), outputs=(), labels=("neg", "pos"), max_length=8, quantization={"scheme": "none"},
        base_params=1, backends={},
    )


def initial_tensors() -> dict[str, np.ndarray]:
    return {n: np.full(s, 0.5, np.float32) for n, s in SHAPES.items()}


def grads(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A deterministic stand-in for a backward pass."""
    return {n: (np.sin(v) + np.float32(0.1)).astype(np.float32) for n, v in tensors.items()}


class Replay:
    """The exact (tensors, optimizer state) after n steps, computed in the test process."""

    def __init__(self):
        self._opt = Optimizer(SPEC)
        self._states = [(initial_tensors(), self._opt.state_dict())]

    def at(self, n: int) -> tuple[dict[str, np.ndarray], tuple[dict[str, np.ndarray], int]]:
        while len(self._states) <= n:
            tensors = self._opt.step(self._states[-1][0], grads(self._states[-1][0]))
            flat, t = self._opt.state_dict()
            self._states.append((tensors, ({k: v.copy() for k, v in flat.items()}, t)))
        return self._states[n]


def resume(store: AdapterStore) -> tuple[dict[str, np.ndarray], Optimizer, int]:
    """What a session does on open: the stored adapter and optimizer, or a fresh start."""
    opt = Optimizer(SPEC)
    if not store.exists(ADAPTER):
        return initial_tensors(), opt, 0
    tensors, meta = store.load(ADAPTER)
    state = store.load_optimizer(ADAPTER)
    if state is not None:
        opt.load_state_dict(*state)
    return tensors, opt, int(meta["steps"])


def train_forever(root: str, progress, started, max_steps: int = 10**9) -> None:
    """Worker: resume adapter alice, then step and save until killed. ``progress`` holds the
    last step whose save returned."""
    store = AdapterStore(Path(root), synthetic_manifest())
    store.hold(ADAPTER)
    tensors, opt, steps = resume(store)
    progress.value = steps
    started.set()
    while steps < max_steps:
        tensors = opt.step(tensors, grads(tensors))
        steps += 1
        store.save(ADAPTER, tensors, meta={"steps": steps}, optimizer=opt.state_dict())
        progress.value = steps


# Filesystem operations a save performs, in edgepeft.adapters' namespace or globally.
FS_OPS = ("save_file", "fsync_dir", "os.replace", "os.fsync", "os.mkdir", "shutil.rmtree")


def install_tripwire(die_at: int | None, counter: list[int]) -> None:
    """Wrap every FS_OPS function: count calls, and SIGKILL this process just before call
    number ``die_at`` (None: only count)."""
    import shutil

    import edgepeft.adapters as adapters

    def wrap(fn):
        def tripwire(*a, **kw):
            counter[0] += 1
            if counter[0] == die_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return fn(*a, **kw)
        return tripwire

    adapters.save_file = wrap(adapters.save_file)
    adapters.fsync_dir = wrap(adapters.fsync_dir)
    os.replace, os.fsync, os.mkdir = wrap(os.replace), wrap(os.fsync), wrap(os.mkdir)
    shutil.rmtree = wrap(shutil.rmtree)


def save_and_die(root: str, value: float, die_at: int) -> None:
    """Worker: save alice with every tensor = ``value``, dying before FS op ``die_at``."""
    store = AdapterStore(Path(root), synthetic_manifest())
    install_tripwire(die_at, [0])
    store.save(ADAPTER, {n: np.full(s, value, np.float32) for n, s in SHAPES.items()}, meta={"steps": int(value)})


def save_with_file_size_limit(root: str, limit: int, result) -> None:
    """Worker: save under RLIMIT_FSIZE (the kernel refuses writes past ``limit`` bytes, as a
    full disk would); report the error type and message."""
    import resource

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of death
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    store = AdapterStore(Path(root), synthetic_manifest())
    try:
        store.save(ADAPTER, {n: np.full(s, 2.0, np.float32) for n, s in SHAPES.items()}, meta={"steps": 2})
        result.put(("ok", ""))
    except BaseException as e:  # noqa: BLE001 - the test checks the type
        result.put((f"{type(e).__module__}.{type(e).__name__}", str(e)))


def hold_lock(root: str, ready, release, seconds: float | None = None) -> None:
    """Worker: hold alice's lock (as a training session does) until ``release`` is set, or for
    ``seconds``."""
    store = AdapterStore(Path(root), synthetic_manifest())
    store.hold(ADAPTER)
    ready.set()
    release.wait(seconds)
    store.release_all()


def save_many(root: str, writer: int, n: int, start, errors) -> None:
    """Worker: save alice ``n`` times, each version marked with (writer, i) in its tensors and
    its metadata, without holding the adapter between saves."""
    store = AdapterStore(Path(root), synthetic_manifest(), lock_wait=30.0)
    start.wait()
    try:
        for i in range(n):
            v = float(writer * 1000 + i)
            store.save(ADAPTER, {k: np.full(s, v, np.float32) for k, s in SHAPES.items()},
                       meta={"steps": i, "writer": writer, "value": v})
            time.sleep(0.01)  # let the reader in now and then (flock is not fair)
    except BaseException as e:  # noqa: BLE001
        errors.put(f"{type(e).__name__}: {e}")


def context():
    """A forkserver with numpy, safetensors and the store preloaded."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["numpy", "safetensors.numpy", "edgepeft.adapters", "_reliability"])
    return ctx


def wait_dead(proc, timeout: float = 30.0) -> None:
    proc.join(timeout)
    if proc.is_alive():
        raise TimeoutError(f"worker {proc.pid} did not exit")


def sleep_random(rng: np.random.Generator, max_s: float) -> None:
    time.sleep(float(rng.uniform(0.0, max_s)))
