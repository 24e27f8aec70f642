"""The embedded durable log: the producer/consumer contract of the Kafka backend over local files,
for a laptop or a CI run with no broker (URL `file:///path`).

Layout under the root:
    topics/<topic>/meta.json                    {"partitions": N}, fixed by whoever creates the topic
    topics/<topic>/<p>/<base offset>.seg        framed records (streams.framing), rolled at segment_bytes;
                                                payload = timestamp_ms u64 | key length u16 | key | value
    topics/<topic>/<p>/.lock                    flock held while appending: several processes may write
    groups/<group>/<topic>.json                 committed next offset per partition (atomic replace)
    groups/<group>/<topic>.lock                 flock held by the group's one live consumer

An offset is a record's index in its partition. A batch is acknowledged after write + fsync, so an
acknowledged record survives a crash of the process or of the machine. A writer that died
mid-append leaves a torn record; the next writer cuts it off (holding the partition lock) and
readers never read past it. Unlike Kafka there is no group rebalancing: one consumer per group
and topic at a time (a second one raises), and no retention (segments stay until deleted).
"""

from __future__ import annotations

import collections
import fcntl
import json
import logging
import os
import struct
import time
import zlib
from pathlib import Path

from streams.consumer import BaseConsumer, ConsumerConfig, RawRecord
from streams.framing import Tail, atomic_write, count_records, frame, fsync_dir, read_records
from streams.producer import BaseProducer, ProducerConfig, check_topic

log = logging.getLogger(__name__)

_REC = struct.Struct("<QH")


def _pack(key: bytes, value: bytes, ts_ms: int) -> bytes:
    return _REC.pack(ts_ms, len(key)) + key + value


def _unpack(payload: bytes) -> tuple[int, bytes, bytes]:
    ts_ms, n = _REC.unpack_from(payload)
    start = _REC.size
    return ts_ms, payload[start : start + n], payload[start + n :]


def _segments(folder: Path) -> list[tuple[int, Path]]:
    out = []
    for name in os.listdir(folder) if folder.exists() else ():
        if name.endswith(".seg"):
            out.append((int(name[:-4]), folder / name))
    return sorted(out)


def _segment_path(folder: Path, base: int) -> Path:
    return folder / f"{base:020d}.seg"


class _PartitionWriter:
    """Appends batches to one partition; safe across processes through the partition's flock."""

    def __init__(self, folder: Path, segment_bytes: int) -> None:
        self.folder = folder
        self.segment_bytes = segment_bytes
        folder.mkdir(parents=True, exist_ok=True)
        self._lock = open(folder / ".lock", "a+b")
        self._f = None
        self._base = -1  # base offset of the segment we have open
        self._count = 0  # records in it
        self._end = 0  # bytes of good records in it

    def _catch_up(self) -> None:
        """Learn what other writers appended since our last batch; cut a dead writer's torn tail."""
        segs = _segments(self.folder)
        if not segs:
            segs = [(0, _segment_path(self.folder, 0))]
            segs[0][1].touch()
            fsync_dir(self.folder)
        base, path = segs[-1]
        if base != self._base:
            if self._f is not None:
                self._f.close()
            self._f = open(path, "a+b")
            self._base, self._count, self._end = base, 0, 0
        n, end, tail = count_records(self._f, self._end)
        self._count += n
        self._end = end
        if tail is not Tail.END:
            log.warning("%s: cutting a torn record at byte %d of segment %d", self.folder, end, base)
            self._f.truncate(end)

    def append(self, payloads: list[bytes]) -> int:
        """Write and fsync the batch; returns the offset of its first record."""
        fcntl.flock(self._lock, fcntl.LOCK_EX)
        try:
            self._catch_up()
            if self._end >= self.segment_bytes and self._count:
                self._base += self._count
                self._f.close()
                self._f = open(_segment_path(self.folder, self._base), "a+b")
                fsync_dir(self.folder)
                self._count = self._end = 0
            data = b"".join(frame(p) for p in payloads)
            self._f.write(data)
            self._f.flush()
            os.fsync(self._f.fileno())
            first = self._base + self._count
            self._count += len(payloads)
            self._end += len(data)
            return first
        finally:
            fcntl.flock(self._lock, fcntl.LOCK_UN)

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
        self._lock.close()


class _PartitionReader:
    """Reads one partition from an offset on, following segment rolls; stops at a torn tail."""

    def __init__(self, folder: Path, offset: int) -> None:
        self.folder = folder
        self.next_offset = offset
        self._f = None
        self._base = -1
        self._pos = 0

    def _open_at(self, offset: int) -> bool:
        segs = _segments(self.folder)
        if not segs:
            return False
        if offset < segs[0][0]:
            offset = segs[0][0]  # segments before it were deleted by hand
        base, path = [s for s in segs if s[0] <= offset][-1]
        if self._f is not None:
            self._f.close()
        self._f, self._base, self._pos = open(path, "rb"), base, 0
        skip = offset - base
        while skip > 0:  # walk to the offset; only on start-up and after a seek
            scan = read_records(self._f, self._pos, max_records=min(skip, 4096))
            if not scan.records:
                break
            skip -= len(scan.records)
            self._pos = scan.end
        self.next_offset = offset - skip  # an offset past the end waits at the end
        return True

    def read(self, max_records: int) -> list[tuple[int, bytes, bytes]]:
        """(offset, key, value) of up to max_records records after the last one read."""
        if self._f is None and not self._open_at(self.next_offset):
            return []
        out: list[tuple[int, bytes, bytes]] = []
        while len(out) < max_records:
            scan = read_records(self._f, self._pos, max_records=max_records - len(out))
            for _pos, payload in scan.records:
                _ts, key, value = _unpack(payload)
                out.append((self.next_offset, key, value))
                self.next_offset += 1
            self._pos = scan.end
            if scan.records:
                continue
            # Nothing more here. A complete segment is followed by one starting at next_offset;
            # a PARTIAL tail is a write in progress (or a dead writer's, cut by the next writer).
            if scan.tail is Tail.END and _segment_path(self.folder, self.next_offset).exists() \
                    and self.next_offset != self._base:
                self._open_at(self.next_offset)
                continue
            break
        return out

    def close(self) -> None:
        if self._f is not None:
            self._f.close()


class EmbeddedLog:
    """A folder of topics, partitions and committed group positions (layout in the module doc)."""

    def __init__(self, root: str | os.PathLike[str], partitions: int = 1, segment_bytes: int = 64 << 20) -> None:
        if partitions < 1:
            raise ValueError(f"partitions={partitions}: must be >= 1")
        if segment_bytes < 1:
            raise ValueError(f"segment_bytes={segment_bytes}: must be >= 1")
        self.root = Path(root)
        self.default_partitions = partitions
        self.segment_bytes = segment_bytes
        self._writers: dict[tuple[str, int], _PartitionWriter] = {}

    def topic_dir(self, topic: str) -> Path:
        """Folder of a topic."""
        return self.root / "topics" / check_topic(topic)

    def partitions(self, topic: str) -> int:
        """Partition count of `topic`, creating the topic with the default count if it is new."""
        folder = self.topic_dir(topic)
        meta = folder / "meta.json"
        if not meta.exists():
            folder.mkdir(parents=True, exist_ok=True)
            tmp = folder / f"meta.json.{os.getpid()}.tmp"
            tmp.write_text(json.dumps({"partitions": self.default_partitions}))
            try:
                os.link(tmp, meta)  # atomic create-if-absent: the first creator's count wins
                fsync_dir(folder)
            except FileExistsError:
                pass
            finally:
                tmp.unlink()
        return int(json.loads(meta.read_text())["partitions"])

    def append(self, topic: str, partition: int, records: list[tuple[bytes, bytes]]) -> int:
        """Durably append (key, value) records to a partition; returns the first record's offset."""
        writer = self._writers.get((topic, partition))
        if writer is None:
            writer = self._writers[(topic, partition)] = _PartitionWriter(
                self.topic_dir(topic) / str(partition), self.segment_bytes)
        ts = int(time.time() * 1000)
        return writer.append([_pack(k, v, ts) for k, v in records])

    def reader(self, topic: str, partition: int, offset: int) -> _PartitionReader:
        """A reader of one partition starting at `offset`."""
        return _PartitionReader(self.topic_dir(topic) / str(partition), offset)

    def _group_file(self, group: str, topic: str, suffix: str) -> Path:
        folder = self.root / "groups" / check_topic(group, "group")
        folder.mkdir(parents=True, exist_ok=True)
        return folder / f"{topic}.{suffix}"

    def committed(self, group: str, topic: str) -> dict[int, int]:
        """Committed next offsets of `group` on `topic` ({} for a new group)."""
        path = self._group_file(group, topic, "json")
        return {int(p): int(o) for p, o in json.loads(path.read_text()).items()} if path.exists() else {}

    def commit(self, group: str, topic: str, offsets: dict[int, int]) -> None:
        """Atomically record next offsets for some partitions (others keep theirs)."""
        merged = {**self.committed(group, topic), **offsets}
        atomic_write(self._group_file(group, topic, "json"), json.dumps({str(p): o for p, o in merged.items()}).encode())

    def close(self) -> None:
        """Close open segment files."""
        for w in self._writers.values():
            w.close()
        self._writers.clear()


def partition_for(key: bytes, partitions: int) -> int:
    """Partition of a key: stable across processes (crc32, not Python's salted hash)."""
    return zlib.crc32(key) % partitions


class LogEventProducer(BaseProducer):
    """publish() to the embedded log: same queue and counters as Kafka's; a batch is acknowledged
    once written and fsync'd (group commit), so spilling never happens here."""

    def __init__(self, log_: EmbeddedLog, config: ProducerConfig | None = None) -> None:
        super().__init__(config or ProducerConfig())
        self._log = log_
        self._partitions = log_.partitions(self.config.topic)
        self._thread.start()

    def _extra_stats(self) -> dict[str, object]:
        return dict(in_flight=0, spill_pending=0, connected=True)

    def _pump(self) -> None:
        while True:
            with self._cv:
                closing, deadline = self._closing, self._close_deadline
            batch = self._take(2000, 0.0 if closing else 0.5)  # publish() and close() wake us at once
            if batch:
                self._write(batch, deadline)
            elif closing:
                break
        self._log.close()

    def _write(self, batch: list[tuple[bytes, bytes]], deadline: float) -> None:
        by_partition: dict[int, list[tuple[bytes, bytes]]] = collections.defaultdict(list)
        for key, value in batch:
            by_partition[partition_for(key, self._partitions)].append((key, value))
        for partition, records in by_partition.items():
            while True:
                try:
                    self._log.append(self.config.topic, partition, records)
                    outcome = "acked"
                except OSError:
                    log.exception("embedded log %s: append failed", self._log.root)
                    if time.monotonic() < deadline:
                        time.sleep(0.5)  # a full disk may free up; the queue absorbs the wait
                        continue
                    outcome = "failed"
                with self._cv:
                    self._holding -= len(records)
                    self._n[outcome] += len(records)
                break


class LogEventConsumer(BaseConsumer):
    """Token events from the embedded log (commit protocol in streams.consumer)."""

    def __init__(self, log_: EmbeddedLog, config: ConsumerConfig | None = None, dedup_state: bytes | None = None) -> None:
        super().__init__(config or ConsumerConfig(), dedup_state)
        cfg = self.config
        self._log = log_
        self._lock = open(log_._group_file(cfg.group, cfg.topic, "lock"), "a+b")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise RuntimeError(f"group {cfg.group!r} already has a live consumer on {cfg.topic!r} "
                               "(the embedded log allows one per group)") from None
        committed = log_.committed(cfg.group, cfg.topic)
        self._readers = [log_.reader(cfg.topic, p, committed.get(p, 0)) for p in range(log_.partitions(cfg.topic))]
        self._next = 0  # round-robin start, so one busy partition cannot starve the others
        self._dead_letters: list[tuple[bytes, bytes]] = []

    def _fetch(self, timeout_s: float, max_records: int) -> list[RawRecord]:
        deadline = time.monotonic() + timeout_s
        while True:
            out: list[RawRecord] = []
            n = len(self._readers)
            for i in range(n):
                p = (self._next + i) % n
                for offset, key, value in self._readers[p].read(max_records - len(out)):
                    out.append(RawRecord(self.config.topic, p, offset, key, value))
                if len(out) >= max_records:
                    break
            self._next = (self._next + 1) % n
            left = deadline - time.monotonic()
            if out or left <= 0:
                return out
            time.sleep(min(left, 0.02))  # no file notifications here; a short sleep is cheap

    def _commit_positions(self, positions: dict[tuple[str, int], int]) -> None:
        self._log.commit(self.config.group, self.config.topic,
                         {p: o for (t, p), o in positions.items() if t == self.config.topic})

    def _send_dead_letter(self, key: bytes | None, value: bytes) -> None:
        self._dead_letters.append((key or b"", value))

    def _flush_dead_letters(self) -> None:
        if self._dead_letters:
            self._log.partitions(self.config.dead_letter_topic)  # creates the topic on first use
            self._log.append(self.config.dead_letter_topic, 0, self._dead_letters)
            self._dead_letters.clear()

    def close(self) -> None:
        """Release the group (nothing is committed here)."""
        for r in self._readers:
            r.close()
        self._log.close()
        fcntl.flock(self._lock, fcntl.LOCK_UN)
        self._lock.close()
