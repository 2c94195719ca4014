"""Durable file writes: a reader sees the old complete file or the new complete file, never a
torn one (temp file in the same directory, fsync, rename, fsync the directory)."""
from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path
from typing import Iterator

from edgepeft.errors import PathError


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temp path beside ``target``; on success it replaces ``target`` durably; on any
    error it is removed and ``target`` is untouched."""
    target = Path(target)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
        fsync_dir(target.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_bytes(target: Path, data: bytes) -> None:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def check_output_file(path: Path, what: str, *, create_parents: bool) -> Path:
    """``path`` checked as a file to write: PathError if it is a folder, if a parent is a file,
    or (``create_parents`` False: the CLI's rule, as most command-line tools) if its folder
    does not exist; with ``create_parents`` (the Python API's rule) missing folders are made."""
    path = Path(path)
    if path.is_dir():
        raise PathError(f"{what} {str(path)!r} is a folder; give a file path inside it, e.g. {str(path / 'x')!r}")
    parent = _existing_ancestor(path.parent)
    if not parent.is_dir():
        raise PathError(f"cannot write {what} {str(path)!r}: {str(parent)!r} is a file, not a folder; "
                        "choose another path")
    if parent != path.parent:
        if not create_parents:
            raise PathError(f"cannot write {what} {str(path)!r}: folder {str(path.parent)!r} does not exist; "
                            f"create it first (mkdir -p {str(path.parent)!r})")
        ensure_dir(path.parent, what)
    return path


def ensure_dir(folder: Path, what: str) -> Path:
    """``folder`` made if missing; PathError (saying what to do) if it or a parent is a file or
    it cannot be made."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise PathError(f"{what} {str(folder)!r} cannot be a folder: {str(_existing_ancestor(folder))!r} is a file; "
                        "choose another path") from None
    except OSError as e:
        raise PathError(f"{what} {str(folder)!r} cannot be made ({e.strerror or e}); choose a writable path") from None
    return folder


def _existing_ancestor(p: Path) -> Path:
    """The nearest of ``p`` and its parents that exists (as anything)."""
    p = Path(p)
    while not p.exists() and p != p.parent:
        p = p.parent
    return p
