"""Length-prefixed, checksummed records in append-only files (spill file, embedded log segments).

Frame: length u32 | crc32(payload) u32 | payload. A writer that died mid-append leaves a torn
tail: too few bytes for the length it announces (PARTIAL), or a full-length record whose checksum
fails (CORRUPT). Readers stop there; writers cut the file back to the last good record before
appending again (`recover`), so a torn record is never followed by good ones.
"""

from __future__ import annotations

import enum
import os
import struct
import zlib
from dataclasses import dataclass
from typing import BinaryIO

_FRAME = struct.Struct("<II")
FRAME_OVERHEAD = _FRAME.size
# Far above any record we write (events are tens of KB); a larger length is garbage, not data.
MAX_RECORD_BYTES = 64 << 20


class Tail(enum.Enum):
    """How a scan ended."""

    END = "end"  # at end of file, or at a record/byte limit (read on from `end`)
    PARTIAL = "partial"  # a record is announced but not all of it is there (yet)
    CORRUPT = "corrupt"  # a complete record whose checksum or length is wrong


def frame(payload: bytes) -> bytes:
    """One framed record, ready to append."""
    return _FRAME.pack(len(payload), zlib.crc32(payload)) + payload


@dataclass(frozen=True)
class Scan:
    """Records found from a start position, where the last good one ends, and why it stopped."""

    records: list[tuple[int, bytes]]  # (position of the frame, payload)
    end: int  # position just after the last good record
    tail: Tail


def read_records(f: BinaryIO, start: int, max_records: int | None = None, max_bytes: int = 8 << 20) -> Scan:
    """Read good records from `start`, stopping at max_records, about max_bytes, or a bad tail."""
    f.seek(start)
    records: list[tuple[int, bytes]] = []
    pos, taken = start, 0
    while max_records is None or len(records) < max_records:
        if taken >= max_bytes:  # more may follow; the caller reads on from `end`
            return Scan(records, pos, Tail.END)
        head = f.read(FRAME_OVERHEAD)
        if not head:
            return Scan(records, pos, Tail.END)
        if len(head) < FRAME_OVERHEAD:
            return Scan(records, pos, Tail.PARTIAL)
        length, crc = _FRAME.unpack(head)
        if length > MAX_RECORD_BYTES:
            return Scan(records, pos, Tail.CORRUPT)
        payload = f.read(length)
        if len(payload) < length:
            return Scan(records, pos, Tail.PARTIAL)
        if zlib.crc32(payload) != crc:
            return Scan(records, pos, Tail.CORRUPT)
        records.append((pos, payload))
        pos += FRAME_OVERHEAD + length
        taken += FRAME_OVERHEAD + length
    return Scan(records, pos, Tail.END)


def count_records(f: BinaryIO, start: int = 0) -> tuple[int, int, Tail]:
    """(number of good records from start, end of the last one, tail) without keeping payloads."""
    n, pos = 0, start
    while True:
        scan = read_records(f, pos, max_records=4096)
        n += len(scan.records)
        pos = scan.end
        if scan.tail is not Tail.END or not scan.records:
            return n, pos, scan.tail


def recover(f: BinaryIO, start: int = 0) -> tuple[int, int, int]:
    """Cut a torn tail off a file opened for writing: (records, good end, bytes cut).

    Call it holding whatever lock keeps other writers out: a record being written by a live writer
    looks exactly like a torn one.
    """
    n, end, _tail = count_records(f, start)
    size = f.seek(0, os.SEEK_END)
    if size > end:
        f.truncate(end)
        f.flush()
        os.fsync(f.fileno())
    return n, end, size - end


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make a rename or a new file in `path` durable (the directory entry is data too)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike[str], data: bytes) -> None:
    """Replace `path` with `data` so that a crash leaves either the old or the new content."""
    tmp = f"{os.fspath(path)}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))
