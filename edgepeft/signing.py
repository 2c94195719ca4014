"""Ed25519 signatures over a bundle's manifest.

The publisher signs the exact bytes of ``manifest.json``; the manifest holds the sha256 of
every other member, so one signature covers the whole bundle: graphs, tokenizer, and the
initial adapter (including one imported with ``--init-adapter``). The signature travels in
the bundle as ``manifest.sig`` (the one member the manifest cannot list). A device that opens
with ``trusted_keys`` refuses a bundle that is unsigned, signed by another key, or altered.

Adapters trained on the device are not signed: the device holds no publisher key, and a local
attacker who can rewrite the adapter store can rewrite the runtime too. Their sha256 records
catch corruption, not tampering."""
from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path
from typing import Iterable, Union

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edgepeft.errors import SignatureError, SpecError
from edgepeft.fsutil import atomic_write_bytes
from edgepeft.names import SIGNATURE_MEMBER

__all__ = ["SIGNATURE_MEMBER", "generate_key", "key_id", "load_private_key", "load_public_key", "sign_manifest",
           "trusted", "verify_manifest"]
ALGORITHM = "ed25519"
MAX_SIGNATURE_BYTES = 4096

PublicKeyLike = Union[str, Path, bytes, Ed25519PublicKey]


def generate_key(path: str | Path, *, overwrite: bool = False) -> tuple[Path, Path]:
    """Write a new private key to ``path`` (PEM, readable by its owner only) and its public
    key to ``path.pub``; returns both paths."""
    priv_path = Path(path)
    pub_path = priv_path.with_name(priv_path.name + ".pub")
    for p in (priv_path, pub_path):
        if p.exists() and not overwrite:
            raise SpecError(f"{str(p)!r} exists; refusing to overwrite a key (pass overwrite / --force)")
    key = Ed25519PrivateKey.generate()
    priv_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())
    priv_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(priv_path, priv_pem)
    os.chmod(priv_path, 0o600)
    atomic_write_bytes(pub_path, public_pem(key.public_key()))
    return priv_path, pub_path


def public_pem(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def key_id(key: Ed25519PublicKey) -> str:
    """A short fingerprint (sha256 of the raw public key), to name keys in messages."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def load_private_key(path: str | Path | Ed25519PrivateKey) -> Ed25519PrivateKey:
    if isinstance(path, Ed25519PrivateKey):
        return path
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as e:
        raise SignatureError(f"cannot read the private key {str(path)!r} ({e}); make one with `edgepeft keygen`") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SignatureError(f"{str(path)!r} is not an Ed25519 private key; make one with `edgepeft keygen`")
    return key


def load_public_key(key: PublicKeyLike) -> Ed25519PublicKey:
    """A public key from a PEM file path, PEM bytes, 32 raw bytes, or a key object."""
    if isinstance(key, Ed25519PublicKey):
        return key
    try:
        data = key if isinstance(key, bytes) else Path(key).read_bytes()
        if len(data) == 32:
            return Ed25519PublicKey.from_public_bytes(data)
        pub = serialization.load_pem_public_key(data)
    except (OSError, ValueError, TypeError) as e:
        raise SignatureError(f"cannot read the public key {_describe(key)} ({e}); pass the .pub file "
                             "`edgepeft keygen` wrote") from None
    if not isinstance(pub, Ed25519PublicKey):
        raise SignatureError(f"{_describe(key)} is not an Ed25519 public key")
    return pub


def _describe(key: PublicKeyLike) -> str:
    return f"({len(key)} bytes)" if isinstance(key, bytes) else repr(str(key))


def sign_manifest(manifest_bytes: bytes, key: str | Path | Ed25519PrivateKey) -> bytes:
    """The ``manifest.sig`` member for these exact manifest bytes."""
    priv = load_private_key(key)
    sig = priv.sign(manifest_bytes)
    return json.dumps({"algorithm": ALGORITHM, "key_id": key_id(priv.public_key()),
                       "signature": base64.b64encode(sig).decode()}, indent=2).encode()


def trusted(keys: Iterable[PublicKeyLike] | None) -> tuple[Ed25519PublicKey, ...] | None:
    """Normalize ``trusted_keys``: None means "do not check"; an empty list is a mistake."""
    if keys is None:
        return None
    if isinstance(keys, (str, Path, bytes, Ed25519PublicKey)):
        keys = [keys]
    out = tuple(load_public_key(k) for k in keys)
    if not out:
        raise SpecError("`trusted_keys` is empty: pass None to skip signature checks, or the publisher's public key(s)")
    return out


def verify_manifest(manifest_bytes: bytes, signature: bytes | None, keys: tuple[Ed25519PublicKey, ...],
                    where: str) -> str:
    """Check ``signature`` (the ``manifest.sig`` member, None if absent) over the manifest
    against the trusted ``keys``; returns the signing key's id, or raises SignatureError."""
    ids = ", ".join(key_id(k) for k in keys)
    if signature is None:
        raise SignatureError(f"bundle {where} is not signed, and only signed bundles are trusted here (keys {ids}); "
                             "get a bundle exported with `edgepeft export --sign KEY`")
    try:
        doc = json.loads(signature)
        if not isinstance(doc, dict) or doc.get("algorithm") != ALGORITHM:
            raise ValueError(f"algorithm must be {ALGORITHM!r}")
        sig = base64.b64decode(str(doc["signature"]), validate=True)
    except (ValueError, KeyError, TypeError, RecursionError) as e:
        raise SignatureError(f"bundle {where} has a malformed {SIGNATURE_MEMBER} ({type(e).__name__}: {e}); "
                             "re-download or re-export it") from None
    for k in keys:
        try:
            k.verify(sig, manifest_bytes)
            return key_id(k)
        except InvalidSignature:
            continue
    raise SignatureError(f"bundle {where}: its signature does not verify with any trusted key ({ids}): it was "
                         "altered after signing or signed by another publisher; do not use it")
