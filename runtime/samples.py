"""Crash-safe on-device logs: an append-only record log (one checksummed JSON record a line)
and, over it, the bounded sample buffer a personalization loop trains from.

A record is written as ``<crc32 hex> <json>\\n`` with one ``write`` and, by default, an
fsync. A crash can only tear the last line; reading ignores a record whose checksum does not
match or that lacks its newline, and opening for append cuts a torn tail off first, so the
next record starts on a clean line instead of being glued to the torn one. Torch-free."""
from __future__ import annotations

import hashlib
import json
import os
import random
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence, TypeVar

from edgepeft.errors import DataError, SpecError
from edgepeft.fsutil import atomic_path, fsync_dir


def _encode(payload: Mapping[str, Any]) -> bytes:
    body = json.dumps(payload, separators=(",", ":"), sort_keys=True, ensure_ascii=True)
    return f"{zlib.crc32(body.encode()):08x} {body}\n".encode()


def _decode(line: bytes) -> dict[str, Any] | None:
    """The record on a full line (newline included), or None when it is torn or damaged."""
    if not line.endswith(b"\n") or len(line) < 10 or line[8:9] != b" ":
        return None
    body = line[9:-1]
    try:
        if int(line[:8], 16) != zlib.crc32(body):
            return None
        rec = json.loads(body)
    except ValueError:
        return None
    return rec if isinstance(rec, dict) else None


class RecordLog:
    """Append-only JSON records with a checksum each; what a crash leaves half-written is
    ignored on read and cut off before the next append."""

    def __init__(self, path: str | Path, *, fsync: bool = True):
        self.path = Path(path)
        self.fsync = fsync
        self.damaged = 0  # records skipped by the last read (bad checksum, torn tail)

    def _scan(self) -> Iterator[tuple[int, dict[str, Any] | None]]:
        """(end offset, record or None) per line."""
        if not self.path.is_file():
            return
        offset = 0
        with open(self.path, "rb") as f:
            for line in f:
                offset += len(line)
                yield offset, _decode(line)

    def read(self) -> list[dict[str, Any]]:
        out, self.damaged = [], 0
        for _, rec in self._scan():
            if rec is None:
                # A damaged record in the middle (disk corruption, not a crash) is skipped too:
                # losing one sample beats refusing the whole buffer.
                self.damaged += 1
            else:
                out.append(rec)
        return out

    def repair(self) -> None:
        """Cut a torn or damaged tail off, so appends start on a clean line."""
        good_end, end = 0, 0
        for end, rec in self._scan():
            if rec is not None:
                good_end = end
        if end != good_end:
            with open(self.path, "rb+") as f:
                f.truncate(good_end)
                os.fsync(f.fileno())

    def append(self, *records: Mapping[str, Any]) -> None:
        if not records:
            return
        data = b"".join(_encode(r) for r in records)
        new = not self.path.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # O_APPEND + one write per call: records from this call land together at the end.
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, data)
            if self.fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        if new and self.fsync:
            fsync_dir(self.path.parent)

    def rewrite(self, records: list[Mapping[str, Any]]) -> None:
        """Replace the whole log atomically (the old or the new version survives a crash)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.path) as tmp:
            tmp.write_bytes(b"".join(_encode(r) for r in records))


@dataclass(frozen=True)
class Sample:
    """One buffered sample: its sequence number (1, 2, ... over the buffer's life) and its
    fields (``{"text", "label"}`` for text, anything JSON for other inputs)."""

    seq: int
    data: dict[str, Any]

    @property
    def key(self) -> int:
        """A stable hash of the content: the same sample always falls on the same side of the
        train / held-out split, whatever its position in the buffer."""
        body = json.dumps(self.data, sort_keys=True, separators=(",", ":")).encode()
        return int.from_bytes(hashlib.sha256(body).digest()[:8], "big")


class SampleBuffer:
    """The newest ``capacity`` samples of one user, persisted in a ``RecordLog``. The log is
    compacted (atomically rewritten with the newest ``capacity``) when it holds twice that."""

    def __init__(self, path: str | Path, capacity: int, *, fsync: bool = True):
        if not isinstance(capacity, int) or capacity < 1:
            raise SpecError(f"`capacity` must be an int >= 1, got {capacity!r}")
        self.capacity = capacity
        self.log = RecordLog(path, fsync=fsync)
        self.log.repair()
        self._samples: list[Sample] = []
        self._on_disk = 0
        for rec in self.log.read():
            if isinstance(rec.get("seq"), int) and isinstance(rec.get("data"), dict):
                self._samples.append(Sample(rec["seq"], rec["data"]))
        self._on_disk = len(self._samples)
        self._samples = self._samples[-capacity:]

    @property
    def last_seq(self) -> int:
        return self._samples[-1].seq if self._samples else 0

    def __len__(self) -> int:
        return len(self._samples)

    def samples(self) -> list[Sample]:
        return list(self._samples)

    def add(self, items: list[Mapping[str, Any]]) -> list[Sample]:
        """Append samples (JSON-serializable mappings), durably, before they count."""
        new = []
        for i, data in enumerate(items):
            if not isinstance(data, Mapping):
                raise DataError(f"a sample must be a mapping of JSON values, got {type(data).__name__}")
            new.append(Sample(self.last_seq + i + 1, dict(data)))
        try:
            self.log.append(*({"seq": s.seq, "data": s.data} for s in new))
        except TypeError as e:
            raise DataError(f"samples must hold JSON values only (str, numbers, lists, dicts): {e}") from None
        self._samples = (self._samples + new)[-self.capacity:]
        self._on_disk += len(new)
        if self._on_disk >= 2 * self.capacity:
            self.log.rewrite([{"seq": s.seq, "data": s.data} for s in self._samples])
            self._on_disk = len(self._samples)
        return new


T = TypeVar("T")


def shuffled_batches(items: Sequence[T], steps: int, batch_size: int, seed: str) -> Iterator[list[T]]:
    """``steps`` batches of ``items`` drawn without replacement, reshuffled after each pass (the
    Personalizer's rounds and a fleet device's local steps); the same seed gives the same batches."""
    rng, order = random.Random(seed), []
    for _ in range(steps):
        batch: list[T] = []
        while len(batch) < min(batch_size, len(items)):
            if not order:
                order = list(items)
                rng.shuffle(order)
            batch.append(order.pop())
        yield batch
