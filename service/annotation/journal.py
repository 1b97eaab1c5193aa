"""The append-only journal of an annotation run, and atomic file writes.

The journal is a JSON-lines file next to the output. Its first line is a header holding
the job's fingerprint (model, inputs, output options); every later line is the record
of one image, either ``{"type": "image", "path": ...}`` or ``{"type": "error", "path":
..., "reason": ...}``. Records are appended one batch at a time, each batch flushed and
fsynced, so a kill loses at most the batch in flight. A kill in the middle of a write
leaves a torn last line; it is detected, ignored and cut off before appending again.
The file is locked while a run holds it, so two runs never write the same journal.
"""

from __future__ import annotations

import fcntl
import json
import os
import tempfile
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["Journal", "JournalError", "atomic_write_bytes", "atomic_write_json"]

JOURNAL_VERSION = 1


class JournalError(RuntimeError):
    """The journal cannot be used: locked by another run, corrupt, or from another job."""


def _fsync_dir(path: str) -> None:
    fd = os.open(os.path.dirname(os.path.abspath(path)) or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write a file so readers see either the old or the whole new content, even after a crash."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path)


def atomic_write_json(path: str, obj: Any) -> None:
    """:func:`atomic_write_bytes` of compact JSON."""
    atomic_write_bytes(path, json.dumps(obj, separators=(",", ":")).encode("utf-8"))


def _parse(data: bytes, path: str) -> tuple[list[dict[str, Any]], int]:
    """Parse complete lines; returns the records and the byte length of the valid prefix."""
    records: list[dict[str, Any]] = []
    offset = 0
    lines = data.split(b"\n")
    # The chunk after the last newline is a torn write (or empty): never a record.
    for number, line in enumerate(lines[:-1], start=1):
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or "type" not in record:
                raise ValueError("not a journal record")
        except ValueError as e:
            if number == len(lines) - 1:
                break  # a torn last line whose newline made it to disk: ignore it as well
            raise JournalError(
                f"{path}: line {number} is corrupt ({e}); pass --restart to discard the journal"
            ) from None
        records.append(record)
        offset += len(line) + 1
    return records, offset


def _differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    return [
        f"{k}: {old.get(k)!r} -> {new.get(k)!r}"
        for k in sorted(set(old) | set(new))
        if old.get(k) != new.get(k)
    ]


class Journal:
    """An open, locked journal. Use as a context manager.

    Args:
        path: the journal file; created when missing.
        fingerprint: what identifies the job; a journal with another fingerprint is refused.
        restart: discard any existing content instead of resuming.

    Raises:
        JournalError: another run holds the journal, it is corrupt, or it was written by a
            run with a different fingerprint (and ``restart`` is false).
    """

    def __init__(self, path: str, fingerprint: Mapping[str, Any], *, restart: bool = False) -> None:
        self.path = path
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            raise JournalError(f"{path}: another annotate run is writing this journal") from None
        try:
            self.records = self._open(dict(fingerprint), restart)
        except BaseException:
            os.close(self._fd)
            raise

    def _read_all(self) -> bytes:
        chunks = []
        os.lseek(self._fd, 0, os.SEEK_SET)
        while chunk := os.read(self._fd, 1 << 20):
            chunks.append(chunk)
        return b"".join(chunks)

    def _open(self, fingerprint: dict[str, Any], restart: bool) -> list[dict[str, Any]]:
        records, valid = ([], 0) if restart else _parse(self._read_all(), self.path)
        if records and records[0].get("type") == "header":
            diff = _differences(records[0].get("fingerprint", {}), fingerprint)
            if diff:
                raise JournalError(
                    f"{self.path}: was written by a run with different arguments ({'; '.join(diff)}); "
                    "rerun with the same arguments to resume, or pass --restart to start over"
                )
            os.ftruncate(self._fd, valid)
            os.fsync(self._fd)
            return records[1:]
        if records:
            raise JournalError(f"{self.path}: has no header line; pass --restart to discard it")
        os.ftruncate(self._fd, 0)
        self.append([{"type": "header", "version": JOURNAL_VERSION, "fingerprint": fingerprint}])
        _fsync_dir(self.path)  # the new file's directory entry must survive a crash too
        return []

    def append(self, records: Iterable[Mapping[str, Any]]) -> None:
        """Append records as one write, then fsync: they survive any later kill."""
        data = b"".join(json.dumps(r, separators=(",", ":")).encode("utf-8") + b"\n" for r in records)
        if not data:
            return
        os.lseek(self._fd, 0, os.SEEK_END)
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]
        os.fsync(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # also releases the lock
            self._fd = -1

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
