"""Adapter store: one folder per adapter, in Hugging Face PEFT's format
(``adapter_config.json`` + ``adapter_model.safetensors``) plus ``edgepeft_adapter.json``
(which bundle it fits, how far it was trained, the weights' sha256).

A folder is replaced as a whole: the new version is written and fsynced in a temp folder,
the old one renamed aside, the new one renamed in, the old one removed. A crash at any point
leaves the old or the new complete version, and ``_recover`` puts an orphaned old one back.
All of it runs under the adapter's inter-process lock, so writers never interleave and a
recovery never races a live save."""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from edgepeft import names
from edgepeft.errors import AdapterError, LockError
from edgepeft.fsutil import fsync_dir, sha256_file
from edgepeft.locking import HeldLock, acquire
from edgepeft.manifest import Manifest

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def check_adapter_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise AdapterError(
            f"adapter name {name!r} is not allowed: use 1-64 letters, digits, '_', '-' or '.', "
            "starting with a letter or digit"
        )
    return name


def default_store(bundle_path: Path) -> Path:
    """Where a bundle's adapters live unless told otherwise: ``x.edgepeft`` -> ``x.adapters``
    next to it."""
    p = Path(bundle_path)
    return p.with_name(p.stem + ".adapters")


def peft_config(manifest: Manifest) -> dict[str, Any]:
    """adapter_config.json: PEFT's own config where PEFT has the method (LoRA, prompt tuning),
    so PEFT can load the folder (edgepeft's own method specs go in edgepeft_adapter.json)."""
    specs = {m.method: m for m in manifest.methods}
    cfg: dict[str, Any] = {
        "base_model_name_or_path": manifest.model_name,
        "inference_mode": True,
        "task_type": {"classification": "SEQ_CLS", "causal-lm": "CAUSAL_LM"}.get(manifest.task),
        "peft_type": None,
    }
    if set(specs) == {"lora"}:
        lora = specs["lora"]
        cfg.update({
            "peft_type": "LORA",
            "r": lora.rank,
            "lora_alpha": lora.alpha,
            "use_rslora": lora.use_rslora,
            "lora_dropout": 0.0,
            "bias": "none",
            "fan_in_fan_out": False,
            "target_modules": lora.target_pattern or list(lora.targets),
            "modules_to_save": list(lora.modules_to_save) or None,
        })
    elif set(specs) == {"prompt"}:
        cfg.update({"peft_type": "PROMPT_TUNING", "num_virtual_tokens": specs["prompt"].n_tokens,
                    "prompt_tuning_init": "TEXT" if specs["prompt"].init == "text" else "RANDOM",
                    "prompt_tuning_init_text": specs["prompt"].init_text})
    return cfg


# Lock files live here; the leading '_' is not allowed in adapter names, so it is never one.
LOCK_DIR = "_locks"
# How long a save waits for another process's save of the same adapter to finish.
SAVE_LOCK_WAIT_S = 10.0


class AdapterStore:
    """The adapters of one bundle, in folder ``root``.

    Writes take the adapter's inter-process lock (``edgepeft.locking``), so two processes
    never interleave writes to one adapter; ``hold`` keeps an adapter locked for a whole
    session, so a second process cannot train it meanwhile (LockError, naming the holder)."""

    def __init__(self, root: Path, manifest: Manifest, *, lock_wait: float = SAVE_LOCK_WAIT_S):
        self.root = Path(root)
        self.manifest = manifest
        self.lock_wait = lock_wait
        self._held: dict[str, HeldLock] = {}
        self._pending: set[str] = set()  # held as soon as the store folder exists

    def folder(self, name: str) -> Path:
        return self.root / check_adapter_name(name)

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        for p in self.root.iterdir():
            if p.name.startswith(".old-"):
                self._recover(p.name[len(".old-"):], wait=0.0)
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and _NAME.match(p.name))

    def exists(self, name: str) -> bool:
        """A folder of that name is present (complete or not: ``load`` tells which)."""
        self._recover(name, wait=0.0)
        return self.folder(name).is_dir()

    # -- locks ---------------------------------------------------------------------------------
    def _lock_path(self, name: str) -> Path:
        return self.root / LOCK_DIR / f"{check_adapter_name(name)}.lock"

    def _what(self, name: str) -> str:
        return f"adapter {name!r} in {str(self.root)!r}"

    def hold(self, name: str) -> None:
        """Lock adapter ``name`` against other processes until ``release_all``; LockError at
        once if another process holds it. A store folder that does not exist yet is not
        created for this: the lock is taken at the first save."""
        if name in self._held:
            return
        if not self.root.is_dir():
            self._pending.add(check_adapter_name(name))
            return
        self._held[name] = acquire(self._lock_path(name), timeout=0.0, what=self._what(name))
        self._pending.discard(name)

    def release(self, name: str) -> None:
        """Release this store's lock on ``name`` (no-op if not held)."""
        lock = self._held.pop(name, None)
        if lock is not None:
            lock.release()
        self._pending.discard(name)

    def release_all(self) -> None:
        for lock in self._held.values():
            lock.release()
        self._held.clear()
        self._pending.clear()

    @contextlib.contextmanager
    def _locked(self, name: str, wait: float) -> Iterator[None]:
        """Run the body under the adapter's lock: the one this store holds, or one taken for
        the body (kept if the adapter was waiting to be held)."""
        if name in self._pending:
            self.hold(name)
        lock = self._held.get(name)
        temporary = lock is None
        if temporary:
            lock = acquire(self._lock_path(name), timeout=wait, what=self._what(name))
        try:
            with lock.mutex:
                yield
        finally:
            if temporary:
                lock.release()

    # -- write ---------------------------------------------------------------------------------
    def save(self, name: str, tensors: Mapping[str, np.ndarray], meta: Mapping[str, Any] | None = None,
             optimizer: tuple[Mapping[str, np.ndarray], int] | None = None) -> Path:
        """Write adapter ``name`` (and its optimizer state, if given) as one atomic unit. On any
        failure (a full disk, no permission) the previous version stays and AdapterError says why."""
        check_adapter_name(name)
        self.validate(tensors, f"adapter {name!r}")
        by_key = {self.manifest.tensor(n).peft_key: np.ascontiguousarray(tensors[n], dtype=np.float32)
                  for n in self.manifest.trainable_names}
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise AdapterError(f"cannot create the adapter store {str(self.root)!r} ({e}); check the path "
                               "and free space") from None
        with self._locked(name, self.lock_wait):
            return self._replace(name, by_key, meta, optimizer)

    def _replace(self, name: str, by_key: dict[str, np.ndarray], meta: Mapping[str, Any] | None,
                 optimizer: tuple[Mapping[str, np.ndarray], int] | None) -> Path:
        """Under the lock: write a temp folder, then swap it in (see the module docstring)."""
        final, old = self.root / name, self.root / f".old-{name}"
        self._recover_locked(name)
        self._remove_stale_temps(name)
        tmp = self.root / f".tmp-{name}-{os.getpid()}"
        try:
            self._write_folder(tmp, by_key, meta, optimizer)
            if final.exists():
                os.replace(final, old)
            os.replace(tmp, final)
        except (OSError, SafetensorError) as e:
            self._recover_locked(name)  # the old version back in place, if it was moved aside
            shutil.rmtree(tmp, ignore_errors=True)
            raise AdapterError(f"could not save adapter {name!r} in {str(self.root)!r} ({e}); the previous version "
                               "is kept: free some disk space or check permissions, then save again") from None
        try:
            fsync_dir(self.root)  # make the rename durable before the old version goes
        except OSError as e:
            raise AdapterError(f"adapter {name!r} was written to {str(final)!r} but could not be flushed to disk "
                               f"({e}); a power loss now may bring back the previous version") from None
        shutil.rmtree(old, ignore_errors=True)
        return final

    def _write_folder(self, tmp: Path, by_key: dict[str, np.ndarray], meta: Mapping[str, Any] | None,
                      optimizer: tuple[Mapping[str, np.ndarray], int] | None) -> None:
        tmp.mkdir()
        weights = tmp / names.ADAPTER_WEIGHTS
        save_file(by_key, str(weights), metadata={"format": "pt"})
        info = {
            "sdk_version": self.manifest.sdk_version,
            "model_sha256": self.manifest.model_sha256,
            "weights_sha256": sha256_file(weights),
            "methods": [m.to_dict() for m in self.manifest.methods],
            **(dict(meta) if meta else {}),
        }
        if optimizer is not None and optimizer[0]:
            opt_file = tmp / names.ADAPTER_OPTIM
            save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in optimizer[0].items()}, str(opt_file))
            info["optimizer_step"] = int(optimizer[1])
            info["optimizer_sha256"] = sha256_file(opt_file)
        (tmp / names.ADAPTER_CONFIG).write_text(json.dumps(peft_config(self.manifest), indent=2))
        (tmp / names.ADAPTER_META).write_text(json.dumps(info, indent=2))
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        fsync_dir(tmp)

    def _remove_stale_temps(self, name: str) -> None:
        """Temp folders of this adapter left by a killed writer (only a lock holder gets here,
        so no live writer owns one)."""
        for p in self.root.glob(f".tmp-{name}-*"):
            if p.name.rpartition("-")[0] == f".tmp-{name}":
                shutil.rmtree(p, ignore_errors=True)

    def _recover(self, name: str, wait: float) -> None:
        """Finish or undo a replacement a crash interrupted; if another process holds the
        adapter (it may be mid-save), leave it to that process."""
        if not (self.root / f".old-{check_adapter_name(name)}").exists():
            return
        try:
            with self._locked(name, wait):
                self._recover_locked(name)
        except LockError:
            pass

    def _recover_locked(self, name: str) -> None:
        final, old = self.root / name, self.root / f".old-{name}"
        if old.exists():
            if final.exists():
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(old, final)

    # -- read ----------------------------------------------------------------------------------
    def load(self, name: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        folder = self.folder(name)
        self._recover(name, wait=self.lock_wait)
        weights = folder / names.ADAPTER_WEIGHTS
        if not folder.is_dir():
            have = self.names()
            raise AdapterError(f"no adapter {name!r} in {str(self.root)!r} (have: {have or 'none'})")
        if not weights.is_file():
            raise AdapterError(f"adapter {name!r} in {str(self.root)!r} is incomplete (no {names.ADAPTER_WEIGHTS}); "
                               "restore it from a backup or delete the folder to start it afresh")
        meta = _read_meta(folder)
        if meta is None:
            meta = {}
        if meta.get("weights_sha256") and meta["weights_sha256"] != sha256_file(weights):
            raise AdapterError(f"adapter {name!r} is corrupted (weights do not match their recorded sha256)")
        steps = meta.get("steps", 0)
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
            raise AdapterError(f"adapter {name!r}: {names.ADAPTER_META} records steps={steps!r}, not a count; "
                               "the folder is corrupted: restore it or delete it to start afresh")
        try:
            by_key = load_file(str(weights))
        except (SafetensorError, OSError, ValueError) as e:
            raise AdapterError(f"adapter {name!r} cannot be read ({e})") from None
        return self.from_peft_keys(by_key, f"adapter {name!r}"), meta

    def load_optimizer(self, name: str) -> tuple[dict[str, np.ndarray], int] | None:
        """The optimizer state saved with adapter ``name``, or None if it has none."""
        folder = self.folder(name)
        path = folder / names.ADAPTER_OPTIM
        if not path.is_file():
            return None
        meta = _read_meta(folder)
        if meta is None:
            raise AdapterError(f"adapter {name!r} has optimizer state but no readable {names.ADAPTER_META}")
        if meta.get("optimizer_sha256") != sha256_file(path):
            raise AdapterError(f"adapter {name!r}: optimizer state is corrupted (sha256 mismatch)")
        try:
            flat = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise AdapterError(f"adapter {name!r}: optimizer state cannot be read ({e})") from None
        shapes = {t.name: t.shape for t in self.manifest.trainable}
        for key, v in flat.items():
            tensor = key.rpartition("::")[0]
            if tensor not in shapes or tuple(v.shape) != shapes[tensor]:
                raise AdapterError(f"adapter {name!r}: optimizer state entry {key!r} does not fit this bundle")
        step = meta.get("optimizer_step", 0)
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise AdapterError(f"adapter {name!r}: optimizer_step={step!r} is not a count; the folder is corrupted")
        return flat, step

    def from_peft_keys(self, by_key: Mapping[str, np.ndarray], what: str) -> dict[str, np.ndarray]:
        key_to_name = {t.peft_key: t.name for t in self.manifest.trainable}
        unknown = sorted(set(by_key) - set(key_to_name))
        missing = sorted(set(key_to_name) - set(by_key))
        if unknown or missing:
            raise AdapterError(
                f"{what} does not fit this bundle: missing tensors {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                f"unknown tensors {unknown[:5]}{'...' if len(unknown) > 5 else ''}; it was trained for another bundle"
            )
        odd = sorted(k for k, v in by_key.items() if not np.issubdtype(v.dtype, np.floating))
        if odd:
            raise AdapterError(f"{what}: tensors {odd[:5]} are not floating point; it was not written by PEFT or edgepeft")
        tensors = {key_to_name[k]: np.asarray(v, dtype=np.float32) for k, v in by_key.items()}
        self.validate(tensors, what)
        return tensors

    def validate(self, tensors: Mapping[str, np.ndarray], what: str) -> None:
        want = {t.name: t for t in self.manifest.trainable}
        if set(tensors) != set(want):
            raise AdapterError(
                f"{what} does not fit this bundle: expected tensors {sorted(want)[:3]}..., "
                f"missing {sorted(set(want) - set(tensors))[:5]}, unknown {sorted(set(tensors) - set(want))[:5]}"
            )
        for n, arr in tensors.items():
            a = np.asarray(arr)
            if tuple(a.shape) != want[n].shape:
                raise AdapterError(f"{what}: tensor {n!r} has shape {tuple(a.shape)}, the bundle needs {want[n].shape}")
            if not np.all(np.isfinite(a)):
                raise AdapterError(f"{what}: tensor {n!r} holds NaN or infinite values; refusing it")


def _read_meta(folder: Path) -> dict[str, Any] | None:
    """edgepeft_adapter.json as a dict, or None if it is missing or not a JSON object."""
    try:
        meta = json.loads((folder / names.ADAPTER_META).read_text())
    except (OSError, ValueError, RecursionError):
        return None
    return meta if isinstance(meta, dict) else None
