"""The fleet adapter the server publishes, signed with the publisher's ed25519 key
(``edgepeft keygen``), and its check on the device before loading.

What is signed: a canonical JSON statement (``statement``) naming the bundle (its manifest's
sha256), the round, and each tensor's shape and sha256 over its float32 bytes. The signature
format and checks are edgepeft.signing's (the same ones a bundle's manifest gets), so a
device trusts a fleet adapter exactly when it would trust a bundle from that key.

On disk (``publish``): ``<dir>/round-NNNN/adapter.safetensors`` + ``fleet.json`` (the
statement) + ``fleet.sig``, each written atomically, and ``<dir>/latest.json`` pointing at the
newest round, replaced last: a crash mid-publish leaves the previous round as the latest."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
from safetensors.numpy import load_file, save_file

from edgepeft import signing
from edgepeft.fsutil import atomic_path, atomic_write_bytes

from edgepeft.fleet.errors import FleetError

KIND = "edgepeft-fleet-adapter"


def statement(tensors: Mapping[str, np.ndarray], bundle_sha256: str, round_: int) -> bytes:
    doc = {"kind": KIND, "bundle_sha256": bundle_sha256, "round": int(round_),
           "tensors": {k: {"shape": list(np.shape(v)),
                           "sha256": hashlib.sha256(np.ascontiguousarray(v, np.float32).tobytes()).hexdigest()}
                       for k, v in sorted(tensors.items())}}
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def sign(tensors: Mapping[str, np.ndarray], bundle_sha256: str, round_: int, key) -> bytes:
    """The signature (edgepeft.signing's JSON form) over ``statement(...)``."""
    return signing.sign_manifest(statement(tensors, bundle_sha256, round_), key)


def verify(tensors: Mapping[str, np.ndarray], bundle_sha256: str, round_: int, signature: bytes | None,
           keys: Iterable) -> str:
    """The signing key's id, or SignatureError (unsigned, other key, or altered tensors)."""
    return signing.verify_manifest(statement(tensors, bundle_sha256, round_), signature, signing.trusted(keys),
                                   f"(fleet adapter of round {round_})")


def publish(folder: str | Path, tensors: Mapping[str, np.ndarray], bundle_sha256: str, round_: int,
            key=None) -> Path:
    """Write round ``round_``'s fleet adapter (signed when ``key`` is given) and point
    ``latest.json`` at it; returns the round's folder."""
    root = Path(folder)
    out = root / f"round-{int(round_):04d}"
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "adapter.safetensors") as tmp:
        save_file({k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()}, str(tmp))
    atomic_write_bytes(out / "fleet.json", statement(tensors, bundle_sha256, round_))
    if key is not None:
        atomic_write_bytes(out / "fleet.sig", sign(tensors, bundle_sha256, round_, key))
    atomic_write_bytes(root / "latest.json", json.dumps({"round": int(round_), "folder": out.name}).encode())
    return out


def load_published(folder: str | Path, *, bundle_sha256: str, trusted_keys: Iterable | None,
                   round_: int | None = None) -> tuple[dict[str, np.ndarray], int]:
    """The published fleet adapter (the latest, or ``round_``) and its round, verified: its
    tensors must match the signed statement for this bundle (with ``trusted_keys``; without
    them, only the unsigned statement's hashes are checked)."""
    root = Path(folder)
    try:
        if round_ is None:
            round_ = int(json.loads((root / "latest.json").read_bytes())["round"])
        out = root / f"round-{int(round_):04d}"
        tensors = load_file(str(out / "adapter.safetensors"))
        claimed = (out / "fleet.json").read_bytes()
        sig = (out / "fleet.sig").read_bytes() if (out / "fleet.sig").exists() else None
    except (OSError, ValueError, KeyError) as e:
        raise FleetError(f"no readable fleet adapter in {str(root)!r} ({e}); run a fleet round first") from None
    if statement(tensors, bundle_sha256, round_) != claimed:
        raise FleetError(f"fleet adapter {str(out)!r} does not match its statement (other bundle, or altered "
                         "or torn tensors); do not load it")
    if trusted_keys is not None:
        verify(tensors, bundle_sha256, round_, sig, trusted_keys)
    return tensors, round_
