"""Adapter store: one folder per adapter, in Hugging Face PEFT's format
(``adapter_config.json`` + ``adapter_model.safetensors``) plus ``edgepeft_adapter.json``
(which bundle it fits, how far it was trained, the weights' sha256).

A folder is replaced as a whole: the new version is written and fsynced in a temp folder,
the old one renamed aside, the new one renamed in, the old one removed. A crash at any point
leaves the old or the new complete version, and ``_recover`` puts an orphaned old one back."""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from edgepeft import names
from edgepeft.errors import AdapterError
from edgepeft.fsutil import fsync_dir, sha256_file
from edgepeft.manifest import Manifest

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def check_adapter_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise AdapterError(
            f"adapter name {name!r} is not allowed: use 1-64 letters, digits, '_', '-' or '.', "
            "starting with a letter or digit"
        )
    return name


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


class AdapterStore:
    """The adapters of one bundle, in folder ``root``."""

    def __init__(self, root: Path, manifest: Manifest):
        self.root = Path(root)
        self.manifest = manifest

    def folder(self, name: str) -> Path:
        return self.root / check_adapter_name(name)

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        for p in self.root.iterdir():
            if p.name.startswith(".old-"):
                self._recover(p.name[len(".old-"):])
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and _NAME.match(p.name))

    def exists(self, name: str) -> bool:
        """A folder of that name is present (complete or not: ``load`` tells which)."""
        self._recover(name)
        return self.folder(name).is_dir()

    # -- write ---------------------------------------------------------------------------------
    def save(self, name: str, tensors: Mapping[str, np.ndarray], meta: Mapping[str, Any] | None = None,
             optimizer: tuple[Mapping[str, np.ndarray], int] | None = None) -> Path:
        """Write adapter ``name`` (and its optimizer state, if given) as one atomic unit."""
        check_adapter_name(name)
        self.validate(tensors, f"adapter {name!r}")
        self.root.mkdir(parents=True, exist_ok=True)
        by_key = {self.manifest.tensor(n).peft_key: np.ascontiguousarray(tensors[n], dtype=np.float32)
                  for n in self.manifest.trainable_names}
        final = self.folder(name)
        tmp = self.root / f".tmp-{name}-{os.getpid()}"
        old = self.root / f".old-{name}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
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
                save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in optimizer[0].items()},
                          str(opt_file))
                info["optimizer_step"] = int(optimizer[1])
                info["optimizer_sha256"] = sha256_file(opt_file)
            (tmp / names.ADAPTER_CONFIG).write_text(json.dumps(peft_config(self.manifest), indent=2))
            (tmp / names.ADAPTER_META).write_text(json.dumps(info, indent=2))
            for f in tmp.iterdir():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
            fsync_dir(tmp)
            self._recover(name)
            if final.exists():
                os.replace(final, old)
            os.replace(tmp, final)
            fsync_dir(self.root)
            shutil.rmtree(old, ignore_errors=True)
        except OSError as e:
            raise AdapterError(f"could not save adapter {name!r} in {str(self.root)!r} ({e}); the previous version is kept") from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return final

    def _recover(self, name: str) -> None:
        """Finish or undo a replacement a crash interrupted."""
        final, old = self.root / name, self.root / f".old-{name}"
        if old.exists():
            if final.exists():
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(old, final)

    # -- read ----------------------------------------------------------------------------------
    def load(self, name: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        folder = self.folder(name)
        self._recover(name)
        weights = folder / names.ADAPTER_WEIGHTS
        if not folder.is_dir():
            have = self.names()
            raise AdapterError(f"no adapter {name!r} in {str(self.root)!r} (have: {have or 'none'})")
        if not weights.is_file():
            raise AdapterError(f"adapter {name!r} in {str(self.root)!r} is incomplete (no {names.ADAPTER_WEIGHTS}); "
                               "restore it from a backup or delete the folder to start it afresh")
        try:
            meta = json.loads((folder / names.ADAPTER_META).read_text())
        except (OSError, ValueError):
            meta = {}
        if meta.get("weights_sha256") and meta["weights_sha256"] != sha256_file(weights):
            raise AdapterError(f"adapter {name!r} is corrupted (weights do not match their recorded sha256)")
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
        try:
            meta = json.loads((folder / names.ADAPTER_META).read_text())
        except (OSError, ValueError):
            raise AdapterError(f"adapter {name!r} has optimizer state but no readable {names.ADAPTER_META}") from None
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
        return flat, int(meta.get("optimizer_step", 0))

    def from_peft_keys(self, by_key: Mapping[str, np.ndarray], what: str) -> dict[str, np.ndarray]:
        key_to_name = {t.peft_key: t.name for t in self.manifest.trainable}
        unknown = sorted(set(by_key) - set(key_to_name))
        missing = sorted(set(key_to_name) - set(by_key))
        if unknown or missing:
            raise AdapterError(
                f"{what} does not fit this bundle: missing tensors {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                f"unknown tensors {unknown[:5]}{'...' if len(unknown) > 5 else ''}; it was trained for another bundle"
            )
        tensors = {key_to_name[k]: v for k, v in by_key.items()}
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
