"""The bundle: one zip holding manifest.json and the members it lists with their sha256.

Writing is atomic. Opening checks every zip entry (no absolute or '..' paths, links, odd
compression or absurd sizes), the manifest, an optional ed25519 signature over it, and every
member's hash, and extracts into a cache folder keyed by the manifest's hash, so a bundle is
unpacked once and a tampered cache is caught on the next open. Whatever the file holds, opening
raises a BundleError or returns a complete, verified bundle: nothing half-unpacked is used."""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import stat
import struct
import threading
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from edgepeft import names
from edgepeft.errors import BundleError, ManifestError, PathError, SignatureError
from edgepeft.fsutil import atomic_path, check_output_file, ensure_dir, fsync_dir, sha256_bytes, sha256_file
from edgepeft.manifest import Manifest

MAX_MEMBER_BYTES = 4 << 30  # a member claiming more than 4 GiB is not a bundle we wrote
MAX_TOTAL_BYTES = 16 << 30
MAX_MANIFEST_BYTES = 16 << 20
MAX_ENTRIES = 10_000
# Weights and graphs compress a few times at most; far more is a zip bomb. Checked only on
# large members, since small ones (e.g. an all-zero LoRA B) may legitimately compress to nothing.
MAX_RATIO, RATIO_FLOOR = 200, 16 << 20
SIGNATURE_MEMBER = names.SIGNATURE_MEMBER  # defined in names, so signing need not import bundle
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_.+-]+(/[A-Za-z0-9_.+-]+)*$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
# Everything the zip module raises on a damaged file (zlib.error, struct.error are not
# BadZipFile; an encrypted or exotic entry raises RuntimeError/NotImplementedError).
_ZIP_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError, RuntimeError,
               NotImplementedError, OverflowError, zlib.error, struct.error)


def write_bundle(out: Path, manifest: Manifest, files: dict[str, Path], *, sign_key=None) -> Manifest:
    """Pack ``files`` (member name -> local path) with ``manifest`` into ``out`` atomically.
    ``sign_key`` (a private key file from ``edgepeft keygen``) adds an ed25519 signature over
    the manifest. Returns the manifest with the members' hashes filled in. Missing folders of
    ``out`` are made (the CLI refuses them instead); a parent that is a file is a PathError."""
    signing = _signing() if sign_key is not None else None
    out = check_output_file(Path(out), "bundle", create_parents=True)
    key = signing.load_private_key(sign_key) if signing else None
    members = {m: sha256_file(p) for m, p in files.items()}
    manifest = manifest.with_members(members)
    manifest_bytes = manifest.to_json().encode()
    with atomic_path(out) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=6) as z:
            z.writestr(names.MANIFEST, manifest_bytes)
            if key is not None:
                z.writestr(SIGNATURE_MEMBER, signing.sign_manifest(manifest_bytes, key))
            for member, path in sorted(files.items()):
                z.write(path, member)
    return manifest


def _check_name(n: str, what: str) -> None:
    parts = n.replace("\\", "/").split("/")
    if not _SAFE_NAME.match(n) or any(p in ("", ".", "..") for p in parts):
        raise BundleError(f"{what} {n!r} has an unsafe path (absolute, '..', or odd characters); refusing the bundle")


def _check_entry(info: zipfile.ZipInfo) -> None:
    n = info.filename
    _check_name(n[:-1] if n.endswith("/") else n, "bundle entry")
    mode = (info.external_attr >> 16) & 0xFFFF
    if stat.S_ISLNK(mode):
        raise BundleError(f"bundle entry {n!r} is a symbolic link; refusing the bundle")
    if stat.S_IFMT(mode) not in (0, stat.S_IFREG, stat.S_IFDIR):  # 0: type not recorded (zipfile.writestr)
        raise BundleError(f"bundle entry {n!r} is not a regular file (mode {mode:o}); refusing the bundle")
    if info.flag_bits & 0x1:
        raise BundleError(f"bundle entry {n!r} is encrypted; edgepeft bundles never are: refusing the bundle")
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise BundleError(f"bundle entry {n!r} uses compression method {info.compress_type}; "
                          "edgepeft bundles are stored or deflated: refusing the bundle")
    if info.file_size > MAX_MEMBER_BYTES:
        raise BundleError(f"bundle entry {n!r} claims {info.file_size} bytes, over the {MAX_MEMBER_BYTES} limit")
    if info.file_size > RATIO_FLOOR and info.file_size > MAX_RATIO * max(1, info.compress_size):
        raise BundleError(f"bundle entry {n!r} expands {info.file_size // max(1, info.compress_size)}x "
                          "(a zip bomb?); refusing the bundle")


def _check_entries(z: zipfile.ZipFile, path: Path) -> list[zipfile.ZipInfo]:
    infos = z.infolist()
    if len(infos) > MAX_ENTRIES:
        raise BundleError(f"bundle {str(path)!r} has {len(infos)} entries, over the {MAX_ENTRIES} limit")
    seen: set[str] = set()
    for info in infos:
        _check_entry(info)
        if info.filename in seen:
            raise BundleError(f"bundle entry {info.filename!r} appears twice in {str(path)!r}; refusing the bundle")
        seen.add(info.filename)
    total = sum(i.file_size for i in infos)
    if total > MAX_TOTAL_BYTES:
        raise BundleError(f"bundle {str(path)!r} claims {total} bytes unpacked, over the {MAX_TOTAL_BYTES} limit")
    return infos


def read_manifest(path: Path) -> Manifest:
    """Read and validate only the manifest (cheap: for `inspect`)."""
    with _open_zip(path) as z:
        _check_entries(z, path)
        return _parse_manifest(_manifest_bytes(z, path))


def _parse_manifest(raw: bytes) -> Manifest:
    try:
        manifest = Manifest.from_json(raw)
        manifest.check_backend_members()  # here, not in from_dict: a manifest being built has no members yet
        return manifest
    except RecursionError:  # JSON nested thousands deep: the json module recurses
        raise ManifestError("manifest.json is nested too deeply to be a manifest; the bundle is corrupted: "
                            "re-export it") from None


def _open_zip(path: Path) -> zipfile.ZipFile:
    path = Path(path)
    if path.is_dir():
        raise BundleError(f"{str(path)!r} is a folder, not a bundle file; give the .edgepeft file "
                          "(`edgepeft export --out FILE` writes one)")
    if not path.exists():
        raise BundleError(f"bundle {str(path)!r} does not exist; export one with `edgepeft export`")
    if not path.is_file():
        raise BundleError(f"{str(path)!r} is not a regular file; give the .edgepeft bundle file")
    try:
        return zipfile.ZipFile(path)
    except _ZIP_ERRORS as e:
        raise BundleError(f"{str(path)!r} is not a readable edgepeft bundle ({e}); re-export or re-download it") from None


def _read_member(z: zipfile.ZipFile, name: str, limit: int, path: Path) -> bytes | None:
    """A small member's bytes (None if absent), capped at ``limit``."""
    try:
        info = z.getinfo(name)
    except KeyError:
        return None
    if info.file_size > limit:
        raise BundleError(f"{name} in {str(path)!r} is implausibly large ({info.file_size} bytes)")
    try:
        return z.read(info)
    except _ZIP_ERRORS as e:
        raise BundleError(f"cannot read {name} from {str(path)!r} ({e}); the bundle is corrupted") from None


def _manifest_bytes(z: zipfile.ZipFile, path: Path) -> bytes:
    raw = _read_member(z, names.MANIFEST, MAX_MANIFEST_BYTES, path)
    if raw is None:
        raise BundleError(f"{str(path)!r} has no {names.MANIFEST}: not an edgepeft bundle, or truncated")
    return raw


@dataclass(frozen=True)
class OpenedBundle:
    """A verified bundle, unpacked: ``path(member)`` gives a member's local file.
    ``signed_by``: the id of the trusted key that verified it (None: not checked)."""

    source: Path
    manifest: Manifest
    root: Path
    signed_by: str | None = None

    def path(self, member: str) -> Path:
        if member not in self.manifest.members:
            raise BundleError(f"bundle {str(self.source)!r} has no member {member!r}")
        return self.root / member


def default_cache_dir() -> Path:
    env = os.environ.get("EDGEPEFT_CACHE")
    base = Path(env) if env else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "edgepeft"
    return base / "bundles"


def open_bundle(path: Path, cache_dir: Path | None = None, *, trusted_keys: Iterable | None = None) -> OpenedBundle:
    """Verify and unpack bundle ``path``. With ``trusted_keys`` (public keys: .pub files, PEM
    bytes or key objects), only a bundle whose manifest one of them signed is accepted."""
    path = Path(path)
    signing = _signing() if trusted_keys is not None else None
    keys = signing.trusted(trusted_keys) if signing else None
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    with _open_zip(path) as z:
        infos = _check_entries(z, path)
        raw = _manifest_bytes(z, path)
        signed_by = None
        if keys is not None:  # before parsing: an untrusted manifest is not even read
            sig = _read_member(z, SIGNATURE_MEMBER, signing.MAX_SIGNATURE_BYTES, path)
            signed_by = signing.verify_manifest(raw, sig, keys, repr(str(path)))
        manifest = _parse_manifest(raw)
        _check_members(manifest, infos, path, SIGNATURE_MEMBER)
        root = cache_dir / sha256_bytes(raw)[:24]
        if root.is_dir() and _cache_ok(root, manifest):
            return OpenedBundle(path, manifest, root, signed_by)
        _unpack(z, manifest, infos, root, path, SignatureError if signed_by else BundleError)
    return OpenedBundle(path, manifest, root, signed_by)


def _signing():
    """edgepeft.signing, imported only when signatures are made or checked, so a device that
    checks none runs without the cryptography package."""
    try:
        from edgepeft import signing
    except ImportError as e:
        raise BundleError(f"signed bundles need the cryptography package ({e.name} is missing): "
                          "pip install cryptography") from None
    return signing


def _check_members(manifest: Manifest, infos: list[zipfile.ZipInfo], path: Path, signature: str) -> None:
    for member, digest in manifest.members.items():
        _check_name(member, "manifest member")
        if not _SHA256.match(digest):
            raise BundleError(f"manifest member {member!r} has a malformed sha256 {digest[:80]!r}; re-export the bundle")
        parents = member.split("/")
        for i in range(1, len(parents)):
            if "/".join(parents[:i]) in manifest.members:  # a file that is also a folder
                raise BundleError(f"manifest member {member!r} lies inside member {'/'.join(parents[:i])!r}; "
                                  "refusing the bundle")
    present = {i.filename for i in infos if not i.is_dir()} - {names.MANIFEST, signature}
    listed = set(manifest.members)
    if present != listed:
        raise BundleError(
            f"bundle {str(path)!r} does not hold exactly the members its manifest lists "
            f"(missing: {sorted(listed - present)}, unlisted: {sorted(present - listed)}); re-export it"
        )


def _unpack(z: zipfile.ZipFile, manifest: Manifest, infos: list[zipfile.ZipInfo], root: Path, path: Path,
            mismatch: type[BundleError] = BundleError) -> None:
    """Extract and hash every member into a temp folder, then rename it to ``root``: the cache
    holds a complete verified bundle or nothing. A member that does not match its hash raises
    ``mismatch`` (SignatureError for a signed bundle: it was altered after signing)."""
    sizes = {i.filename: i.file_size for i in infos}
    _check_space(root.parent, sum(sizes[m] for m in manifest.members), path)
    tmp = root.with_name(f".{root.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for member, digest in manifest.members.items():
            if _extract(z, member, tmp / member, path) != digest:
                raise mismatch(f"bundle member {member!r} does not match its sha256 in the manifest; the bundle "
                                  "was altered or corrupted: re-download it")
        shutil.rmtree(root, ignore_errors=True)
        try:
            os.replace(tmp, root)
        except OSError:
            # Another process unpacked the same bundle meanwhile: use its copy if it is sound.
            if not (root.is_dir() and _cache_ok(root, manifest)):
                raise
        fsync_dir(root.parent)
    except OSError as e:
        raise BundleError(f"cannot unpack bundle {str(path)!r} into the cache {str(root.parent)!r} ({e}); free some "
                          "disk space or point EDGEPEFT_CACHE at a writable folder") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _check_space(folder: Path, need: int, path: Path) -> None:
    try:
        ensure_dir(folder, "the bundle cache")
    except PathError as e:
        raise PathError(f"{e} (set EDGEPEFT_CACHE, or pass cache_dir=, to a folder)") from None
    free = shutil.disk_usage(folder).free
    if need > free:
        raise BundleError(f"unpacking bundle {str(path)!r} needs {need} bytes but {str(folder)!r} has {free} free; "
                          "free some disk space or point EDGEPEFT_CACHE elsewhere")


def _extract(z: zipfile.ZipFile, member: str, dest: Path, path: Path) -> str:
    """Copy one member to ``dest``; returns its sha256. Read errors mean a corrupted bundle;
    write errors (a full disk) are OSError for the caller."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    h = hashlib.sha256()
    with open(dest, "wb") as dst:
        try:
            src = z.open(member)
        except _ZIP_ERRORS as e:
            raise BundleError(f"bundle member {member!r} is unreadable ({e}); the bundle is corrupted: "
                              "re-download it") from None
        with src:
            while True:
                try:
                    block = src.read(1 << 20)
                except _ZIP_ERRORS as e:
                    raise BundleError(f"bundle member {member!r} is unreadable ({e}); the bundle is corrupted: "
                                      "re-download it") from None
                if not block:
                    break
                h.update(block)
                dst.write(block)
    return h.hexdigest()


def _cache_ok(root: Path, manifest: Manifest) -> bool:
    """Re-hash the unpacked members: a cache altered after unpacking is unpacked again."""
    for member, digest in manifest.members.items():
        p = root / member
        if not p.is_file() or sha256_file(p) != digest:
            return False
    return True
