"""What travels between the server and a device: the trainable tensors of one bundle, by the
names its manifest declares, and nothing else (the frozen base never leaves the device).

Optional int8 delta encoding (``int8_delta_mod``, a Flower client mod): the device sends
``q = round((new - fleet) / s)`` as int8 with one float32 scale ``s = max|new - fleet| / 127``
per tensor, about a quarter of the float32 bytes; the server decodes against the fleet adapter
it sent that round (``decode_reply``). Its accuracy cost is measured by ``examples.fleet``."""
from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from flwr.app import Array, ArrayRecord, Context, Message, MessageType
from flwr.clientapp.typing import ClientAppCallable

from edgepeft import names
from edgepeft.manifest import Manifest

from edgepeft.fleet.errors import FleetError

SCALE_SUFFIX = "::int8-scale"
Tensors = dict[str, np.ndarray]


def bundle_sha256(path: str | Path) -> str:
    """The bundle's identity for the fleet: sha256 of its manifest.json bytes (the manifest
    holds the sha256 of every other member, so this names the whole bundle)."""
    try:
        with zipfile.ZipFile(path) as z:
            return hashlib.sha256(z.read(names.MANIFEST)).hexdigest()
    except (OSError, KeyError, zipfile.BadZipFile) as e:
        raise FleetError(f"cannot read the manifest of bundle {str(path)!r} ({e}); pass an edgepeft bundle") from None


def to_record(tensors: Mapping[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in tensors.items()})


def from_record(record: ArrayRecord) -> Tensors:
    return {k: v.numpy() for k, v in record.items()}


def record_bytes(record: ArrayRecord) -> int:
    """Bytes of the arrays' serialized payloads (each tensor's .npy bytes), the part of a
    message that grows with the adapter."""
    return sum(len(a.data) for a in record.values())


def check_tensors(tensors: Mapping[str, np.ndarray], manifest: Manifest, what: str) -> Tensors:
    """``tensors`` as float32, exactly the manifest's trainable names and shapes, all finite;
    FleetError otherwise."""
    want = manifest.trainable_names
    if set(tensors) != set(want):
        extra, missing = sorted(set(tensors) - set(want)), sorted(set(want) - set(tensors))
        raise FleetError(f"{what} does not hold this bundle's trainable tensors (extra {extra[:3]}, missing "
                         f"{missing[:3]}): it comes from another bundle or method; refuse it")
    out = {}
    for n in want:
        a = np.asarray(tensors[n], dtype=np.float32)
        if a.shape != tuple(manifest.tensor(n).shape):
            raise FleetError(f"{what}: tensor {n!r} has shape {a.shape}, the bundle declares "
                             f"{tuple(manifest.tensor(n).shape)}; refuse it")
        if not np.all(np.isfinite(a)):
            raise FleetError(f"{what}: tensor {n!r} is not finite; refuse it")
        out[n] = a
    return out


# -- int8 delta encoding -------------------------------------------------------------------------

def encode_int8_delta(new: Mapping[str, np.ndarray], base: Mapping[str, np.ndarray]) -> Tensors:
    out: Tensors = {}
    for k, v in new.items():
        d = np.asarray(v, np.float32) - np.asarray(base[k], np.float32)
        peak = float(np.max(np.abs(d))) if d.size else 0.0
        scale = peak / 127.0 if peak > 0 else 1.0
        out[k] = np.clip(np.rint(d / scale), -127, 127).astype(np.int8)
        out[k + SCALE_SUFFIX] = np.array([scale], np.float32)
    return out


def is_int8_delta(tensors: Mapping[str, np.ndarray]) -> bool:
    return any(k.endswith(SCALE_SUFFIX) for k in tensors)


def decode_int8_delta(encoded: Mapping[str, np.ndarray], base: Mapping[str, np.ndarray]) -> Tensors:
    out: Tensors = {}
    for k, q in encoded.items():
        if k.endswith(SCALE_SUFFIX):
            continue
        if k + SCALE_SUFFIX not in encoded or k not in base or q.dtype != np.int8:
            raise FleetError(f"int8 delta for {k!r} is malformed (no scale, unknown name or not int8); refuse it")
        scale = float(np.asarray(encoded[k + SCALE_SUFFIX]).reshape(-1)[0])
        out[k] = np.asarray(base[k], np.float32) + q.astype(np.float32) * np.float32(scale)
    return out


def int8_delta_mod(msg: Message, ctx: Context, call_next: ClientAppCallable) -> Message:
    """Client mod: a train reply's arrays leave as an int8 delta against the arrays received.
    Put it first in ``mods`` (outermost), so it encodes after clipping (DP) has run."""
    if msg.metadata.message_type != MessageType.TRAIN:
        return call_next(msg, ctx)
    base = from_record(next(iter(msg.content.array_records.values())))
    out = call_next(msg, ctx)
    if out.has_error():
        return out
    key, rec = next(iter(out.content.array_records.items()))
    out.content.array_records[key] = to_record(encode_int8_delta(from_record(rec), base))
    return out


def ordered(tensors: Mapping[str, np.ndarray], order: Sequence[str]) -> list[np.ndarray]:
    return [np.asarray(tensors[n], np.float32) for n in order]
