"""The bundle: one zip holding manifest.json and the members it lists with their sha256.

Writing is atomic. Opening checks the manifest, refuses unsafe zip entries, verifies every
member's hash and extracts into a cache folder keyed by the manifest's hash, so a bundle is
unpacked once and a tampered cache is caught on the next open."""
from __future__ import annotations

import os
import shutil
import stat
import zipfile
from dataclasses import dataclass
from pathlib import Path

from edgepeft import names
from edgepeft.errors import BundleError
from edgepeft.fsutil import atomic_path, fsync_dir, sha256_bytes, sha256_file
from edgepeft.manifest import Manifest

MAX_MEMBER_BYTES = 4 << 30  # a member claiming more than 4 GiB is not a bundle we wrote
MAX_MANIFEST_BYTES = 16 << 20


def write_bundle(out: Path, manifest: Manifest, files: dict[str, Path]) -> Manifest:
    """Pack ``files`` (member name -> local path) with ``manifest`` into ``out`` atomically.
    Returns the manifest with the members' hashes filled in."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    members = {m: sha256_file(p) for m, p in files.items()}
    manifest = manifest.with_members(members)
    with atomic_path(out) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=6) as z:
            z.writestr(names.MANIFEST, manifest.to_json())
            for member, path in sorted(files.items()):
                z.write(path, member)
    return manifest


def _check_entry(info: zipfile.ZipInfo) -> None:
    n = info.filename
    parts = n.replace("\\", "/").split("/")
    if n.startswith(("/", "\\")) or (len(n) > 1 and n[1] == ":") or ".." in parts:
        raise BundleError(f"bundle entry {n!r} has an unsafe path (absolute or '..'); refusing the bundle")
    mode = (info.external_attr >> 16) & 0xFFFF
    if stat.S_ISLNK(mode):
        raise BundleError(f"bundle entry {n!r} is a symbolic link; refusing the bundle")
    if info.file_size > MAX_MEMBER_BYTES:
        raise BundleError(f"bundle entry {n!r} claims {info.file_size} bytes, over the {MAX_MEMBER_BYTES} limit")


def read_manifest(path: Path) -> Manifest:
    """Read and validate only the manifest (cheap: for `inspect`)."""
    with _open_zip(path) as z:
        return _manifest_of(z, path)


def _open_zip(path: Path) -> zipfile.ZipFile:
    path = Path(path)
    if not path.is_file():
        raise BundleError(f"bundle {str(path)!r} does not exist; export one with `edgepeft export`")
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise BundleError(f"{str(path)!r} is not a readable edgepeft bundle ({e}); re-export or re-download it") from None


def _manifest_of(z: zipfile.ZipFile, path: Path) -> Manifest:
    try:
        info = z.getinfo(names.MANIFEST)
    except KeyError:
        raise BundleError(f"{str(path)!r} has no {names.MANIFEST}: not an edgepeft bundle, or truncated") from None
    if info.file_size > MAX_MANIFEST_BYTES:
        raise BundleError(f"{names.MANIFEST} in {str(path)!r} is implausibly large ({info.file_size} bytes)")
    try:
        raw = z.read(info)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
        raise BundleError(f"cannot read {names.MANIFEST} from {str(path)!r} ({e}); the bundle is corrupted") from None
    return Manifest.from_json(raw)


@dataclass(frozen=True)
class OpenedBundle:
    """A verified bundle, unpacked: ``path(member)`` gives a member's local file."""

    source: Path
    manifest: Manifest
    root: Path

    def path(self, member: str) -> Path:
        if member not in self.manifest.members:
            raise BundleError(f"bundle {str(self.source)!r} has no member {member!r}")
        return self.root / member


def default_cache_dir() -> Path:
    env = os.environ.get("EDGEPEFT_CACHE")
    base = Path(env) if env else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "edgepeft"
    return base / "bundles"


def open_bundle(path: Path, cache_dir: Path | None = None) -> OpenedBundle:
    path = Path(path)
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    with _open_zip(path) as z:
        manifest = _manifest_of(z, path)
        infos = z.infolist()
        for info in infos:
            _check_entry(info)
        present = {i.filename for i in infos if not i.is_dir()} - {names.MANIFEST}
        listed = set(manifest.members)
        if present != listed:
            raise BundleError(
                f"bundle {str(path)!r} does not hold exactly the members its manifest lists "
                f"(missing: {sorted(listed - present)}, unlisted: {sorted(present - listed)}); re-export it"
            )
        key = sha256_bytes(z.read(names.MANIFEST))[:24]
        root = cache_dir / key
        if root.is_dir() and _cache_ok(root, manifest):
            return OpenedBundle(path, manifest, root)
        root.parent.mkdir(parents=True, exist_ok=True)
        tmp = root.with_name(f".{key}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            for member, digest in manifest.members.items():
                dest = tmp / member
                dest.parent.mkdir(parents=True, exist_ok=True)
                try:
                    with z.open(member) as src, open(dest, "wb") as dst:
                        shutil.copyfileobj(src, dst, 1 << 20)
                except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
                    raise BundleError(f"bundle member {member!r} is unreadable ({e}); the bundle is corrupted: re-download it") from None
                if sha256_file(dest) != digest:
                    raise BundleError(f"bundle member {member!r} does not match its sha256 in the manifest; the bundle was altered or corrupted: re-download it")
            shutil.rmtree(root, ignore_errors=True)
            os.replace(tmp, root)
            fsync_dir(root.parent)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return OpenedBundle(path, manifest, root)


def _cache_ok(root: Path, manifest: Manifest) -> bool:
    """Re-hash the unpacked members: a cache altered after unpacking is unpacked again."""
    for member, digest in manifest.members.items():
        p = root / member
        if not p.is_file() or sha256_file(p) != digest:
            return False
    return True
