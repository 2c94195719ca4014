"""Start a bundle from an adapter trained on a host with Hugging Face PEFT (a folder with
adapter_config.json + adapter_model.safetensors)."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

from edgepeft import names
from edgepeft.errors import AdapterError
from edgepeft.exporters.peft import Trainable
from edgepeft.specs import LoraSpec, MethodSpec


def load_peft_adapter(folder: str | Path, trainables: list[Trainable], methods: list[MethodSpec]) -> None:
    """Copy the folder's tensors into ``trainables`` (matched by PEFT key), after checking that
    its config and shapes fit the methods being exported."""
    folder = Path(folder)
    cfg_path, weights = folder / names.ADAPTER_CONFIG, folder / names.ADAPTER_WEIGHTS
    if not cfg_path.is_file() or not weights.is_file():
        bin_file = folder / "adapter_model.bin"
        extra = " (adapter_model.bin is a pickle: re-save it with safe_serialization=True)" if bin_file.exists() else ""
        raise AdapterError(f"{str(folder)!r} is not a PEFT adapter folder: it needs {names.ADAPTER_CONFIG} and "
                           f"{names.ADAPTER_WEIGHTS}{extra}")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as e:
        raise AdapterError(f"cannot read {cfg_path}: {e}") from None
    lora = next((m for m in methods if isinstance(m, LoraSpec)), None)
    peft_type = cfg.get("peft_type")
    if peft_type == "LORA":
        if lora is None:
            raise AdapterError(f"{folder} holds a LoRA adapter but the export has no LoraSpec; add one")
        if cfg.get("r") != lora.rank:
            raise AdapterError(f"{folder} has LoRA rank r={cfg.get('r')}, the export uses rank {lora.rank}: "
                               f"export with rank={cfg.get('r')}")
        alpha = cfg.get("lora_alpha")
        if alpha is not None and float(alpha) != lora.alpha:
            raise AdapterError(f"{folder} has lora_alpha={alpha}, the export uses alpha={lora.alpha}: "
                               f"export with alpha={alpha} (the scaling must match the weights)")
        if bool(cfg.get("use_rslora", False)) != lora.use_rslora:
            raise AdapterError(f"{folder} has use_rslora={cfg.get('use_rslora')}, the export has {lora.use_rslora}")
    elif peft_type not in (None,):
        raise AdapterError(f"{folder} is a PEFT {peft_type!r} adapter; only LORA (and edgepeft's own folders) "
                           "can start a bundle")
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError) as e:
        raise AdapterError(f"cannot read {weights}: {e}") from None
    by_key = {t.peft_key: t for t in trainables}
    unknown = sorted(set(tensors) - set(by_key))
    if unknown:
        raise AdapterError(f"{folder}: tensors {unknown[:5]} have no place in this export (its trainable keys are "
                           f"e.g. {sorted(by_key)[:3]}); check the LoRA targets and modules_to_save")
    for key, value in tensors.items():
        t = by_key[key]
        if tuple(value.shape) != tuple(t.param.shape):
            raise AdapterError(f"{folder}: {key} has shape {tuple(value.shape)}, the export needs {tuple(t.param.shape)}")
    missing = sorted(set(by_key) - set(tensors))
    if missing:
        warnings.warn(f"{folder} has no values for {missing[:5]}{'...' if len(missing) > 5 else ''}; "
                      "they keep their fresh initialisation", stacklevel=2)
    with torch.no_grad():
        for key, value in tensors.items():
            by_key[key].param.copy_(value.to(torch.float32))
