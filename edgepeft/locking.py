"""Inter-process locks on adapters: one advisory lock file per adapter (``flock`` on POSIX,
``msvcrt.locking`` on Windows), so two processes never train or write one adapter at once.

The kernel drops a lock when its process dies, even by SIGKILL, so a crash never leaves an
adapter locked, and the lock file itself may stay behind harmlessly. Locks belong to a
process: ``flock`` locks taken through two descriptors of one process conflict with each
other, so sessions of one process share a lock through a refcounted registry (a session that
swaps back or a second session on the same adapter in one app keeps working), and threads of
that process serialize their writes with the lock's mutex."""
from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from edgepeft.errors import LockError

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None
    import msvcrt

_POLL_S = 0.05


@dataclass
class _Entry:
    fd: int
    count: int = 0
    mutex: threading.RLock = field(default_factory=threading.RLock)


# Process-wide by necessity (see the module docstring): path -> the one descriptor holding it.
_held: dict[str, _Entry] = {}
_held_guard = threading.Lock()


@dataclass(frozen=True)
class HeldLock:
    """One reference to a held lock; ``release`` it once. ``mutex`` serializes this process's
    threads writing under the lock."""

    key: str

    @property
    def mutex(self) -> threading.RLock:
        return _held[self.key].mutex

    def release(self) -> None:
        with _held_guard:
            entry = _held.get(self.key)
            if entry is None:
                return
            entry.count -= 1
            if entry.count > 0:
                return
            del _held[self.key]
        _unlock(entry.fd)
        os.close(entry.fd)


def acquire(path: Path, *, timeout: float, what: str) -> HeldLock:
    """Lock ``path`` (created if missing) for this process, waiting up to ``timeout`` seconds
    for another process to let go; LockError names the holder's pid when it does not."""
    path = Path(path)
    key = os.path.realpath(path)
    with _held_guard:
        if key in _held:
            _held[key].count += 1
            return HeldLock(key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise LockError(f"cannot create the lock file for {what} ({e}); check that the folder is writable") from None
    deadline = time.monotonic() + max(0.0, timeout)
    while True:
        try:
            _try_lock(fd)
            break
        except BlockingIOError:
            if time.monotonic() >= deadline:
                holder = _holder(fd)
                os.close(fd)
                waited = f" after waiting {timeout:g} s" if timeout > 0 else ""
                raise LockError(f"{what} is in use by another process{holder}{waited}; wait for it to finish "
                                "(or close its session) and retry, or use another adapter") from None
            time.sleep(_POLL_S)
        except OSError as e:  # e.g. a file system without locks
            os.close(fd)
            raise LockError(f"cannot lock {what} ({e}); keep the adapter store on a local file system") from None
    _note_holder(fd)
    with _held_guard:
        if key in _held:  # another thread of this process got there first: share its lock
            _held[key].count += 1
            _unlock(fd)
            os.close(fd)
        else:
            _held[key] = _Entry(fd, 1)
    return HeldLock(key)


def _try_lock(fd: int) -> None:
    if fcntl is not None:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
    except OSError as e:
        raise BlockingIOError(str(e)) from None


def _unlock(fd: int) -> None:
    if fcntl is not None:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return
    os.lseek(fd, 0, os.SEEK_SET)
    msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)


def _note_holder(fd: int) -> None:
    """Write our pid into the lock file, so a process that waits in vain can name us."""
    if fcntl is None:  # Windows locks byte 0 itself: leave the file empty
        return
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
    except OSError:
        pass  # the pid is only for the message; the lock itself is held


def _holder(fd: int) -> str:
    try:
        pid = os.pread(fd, 32, 0) if fcntl is not None else b""
        return f" (pid {int(pid)})" if pid.strip() else ""
    except (OSError, ValueError):
        return ""
