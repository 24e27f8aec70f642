"""The producer's spill file: where records wait, in order, while the broker is unreachable.

One append-only file of framed (key, value) records plus a small cursor file saying how far the
replay has been acknowledged by the broker. A process that dies keeps both: the next producer on
the same path replays what is left (records between the cursor and the last good record). A torn
last record, from a crash mid-append, is cut off when the file is opened.

Only the producer's pump thread touches a SpillFile; it takes a file lock so two processes never
share one path.
"""

from __future__ import annotations

import fcntl
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from streams.framing import FRAME_OVERHEAD, atomic_write, count_records, frame, read_records, recover

_KEY_LEN = struct.Struct("<H")
_CURSOR = struct.Struct("<Q")


@dataclass(frozen=True)
class SpillRecord:
    """A spilled record and where it sits in the file."""

    pos: int  # frame start: identifies the record within this file generation
    end: int  # frame end: the cursor value once this record and all before it are replayed
    key: bytes
    value: bytes


def pack_record(key: bytes, value: bytes) -> bytes:
    """The spill payload of one Kafka record: key length u16, key, value."""
    return _KEY_LEN.pack(len(key)) + key + value


def unpack_record(payload: bytes) -> tuple[bytes, bytes]:
    """Inverse of pack_record."""
    (n,) = _KEY_LEN.unpack_from(payload)
    return payload[2 : 2 + n], payload[2 + n :]


class SpillFile:
    """Append-only spill with a persisted replay cursor and a byte limit."""

    def __init__(self, path: str | os.PathLike[str], max_bytes: int) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self._lock_fd = os.open(f"{self.path}.lock", os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise RuntimeError(f"spill file {self.path} is in use by another producer; give each one its own path") from None
        self._f = open(self.path, "a+b")
        self._cursor_path = Path(f"{self.path}.cursor")
        cursor = 0
        if self._cursor_path.exists():
            raw = self._cursor_path.read_bytes()
            cursor = _CURSOR.unpack(raw)[0] if len(raw) == _CURSOR.size else 0
        # Replay resumes after the last acknowledged record; a torn tail is dropped (never acked
        # by anyone: the process died while writing it).
        _n, self._end, self.torn_bytes = recover(self._f, 0)
        self.cursor = min(cursor, self._end)  # records before it are acknowledged
        self.recovered, _end, _tail = count_records(self._f, self.cursor)
        self._persisted_cursor = self.cursor
        self._dirty = False

    @property
    def size(self) -> int:
        """Bytes in the file (replayed records included, until `reset`)."""
        return self._end

    def append(self, key: bytes, value: bytes) -> bool:
        """Append one record (written to the OS, fsync'd by `sync`); False when over max_bytes."""
        data = frame(pack_record(key, value))
        if self._end + len(data) > self.max_bytes:
            return False
        self._f.write(data)
        self._f.flush()  # to the OS: survives our process dying; `sync` covers the machine dying
        self._end += len(data)
        self._dirty = True
        return True

    def read(self, pos: int, max_records: int) -> list[SpillRecord]:
        """Records from `pos` (a record boundary), at most max_records."""
        if pos >= self._end:
            return []
        scan = read_records(self._f, pos, max_records=max_records)
        out = []
        for rec_pos, payload in scan.records:
            key, value = unpack_record(payload)
            out.append(SpillRecord(rec_pos, rec_pos + FRAME_OVERHEAD + len(payload), key, value))
        return out

    @property
    def end(self) -> int:
        """Position after the last record."""
        return self._end

    def advance(self, cursor: int) -> None:
        """Every record before `cursor` is acknowledged (persisted by the next `sync`)."""
        self.cursor = max(self.cursor, min(cursor, self._end))

    def sync(self) -> None:
        """fsync appended records and persist the replay cursor."""
        if self._dirty:
            os.fsync(self._f.fileno())
            self._dirty = False
        if self.cursor != self._persisted_cursor:
            atomic_write(self._cursor_path, _CURSOR.pack(self.cursor))
            self._persisted_cursor = self.cursor

    def reset(self) -> None:
        """Everything is replayed: empty the file and the cursor, freeing the disk."""
        self._f.truncate(0)
        self._f.flush()
        os.fsync(self._f.fileno())
        self._end = self.cursor = 0
        atomic_write(self._cursor_path, _CURSOR.pack(0))
        self._persisted_cursor = 0

    def close(self) -> None:
        """Sync and release the file and its lock."""
        try:
            self.sync()
        finally:
            self._f.close()
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
