"""What every event consumer shares: decoding, dead letters, de-duplication, and the commit rule.

How a caller (the trainer) uses a consumer, in this order:

    1. `deliveries = consumer.poll()` decodes records; a malformed one or one of an unknown schema
       major goes to the dead-letter topic with its reason (the consumer carries on), and an
       event_id already in the de-dup window is dropped (counted in `duplicates`).
    2. Apply the events to your state (training buffer, counters, ...).
    3. Make that state durable, and store `consumer.dedup_state()` inside it, in the same atomic
       write (temp file, fsync, rename): the window must describe exactly the events your durable
       state has absorbed.
    4. `consumer.commit()`: first makes the dead letters durable on their topic, then commits the
       position after every record poll() has returned (next offset = last + 1).

A crash before 3 loses nothing: the records were not committed and come again. A crash between 3
and 4 redelivers records your state already holds; restart with
`open_consumer(..., dedup_state=<the bytes from your state>)` and they are dropped as duplicates,
so the effect is exactly once. The window is bounded (`dedup_capacity` most recent ids), which is
enough because redelivery only reaches back to the last commit (at most one poll batch per
partition behind the durable state) and producer duplicates (spill replay) sit near the original.
A rebalance that moves a partition to another consumer (Kafka only) can redeliver there without
this window: at-least-once, with duplicates bounded by one uncommitted batch.
"""

from __future__ import annotations

import collections
import logging
import struct
import time
from dataclasses import dataclass

from streams.producer import DEFAULT_TOPIC, check_topic
from streams.schema import DeadLetter, SchemaError, TokenEvent, decode_event, encode

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ConsumerConfig:
    """What a consumer reads and how much it remembers."""

    topic: str = DEFAULT_TOPIC
    """Topic of token events."""
    group: str = "spectutor-trainer"
    """Consumer group; committed positions belong to it."""
    dlq_topic: str | None = None
    """Dead-letter topic; default '<topic>.dlq'."""
    max_poll_records: int = 500
    """Records one poll() returns at most."""
    dedup_capacity: int = 100_000
    """event_ids remembered for de-duplication (16 bytes each in dedup_state())."""
    session_timeout_s: float = 10.0
    """Kafka: a consumer silent this long is dropped from the group and its partitions move."""
    client_id: str = "spectutor-consumer"
    """Names this consumer to the broker."""

    def __post_init__(self) -> None:
        check_topic(self.topic)
        check_topic(self.dead_letter_topic, "dlq_topic")
        if not self.group:
            raise ValueError("group: must not be empty")
        for name in ("max_poll_records", "dedup_capacity"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: must be >= 1")
        if self.session_timeout_s <= 0:
            raise ValueError(f"session_timeout_s={self.session_timeout_s}: must be > 0")

    @property
    def dead_letter_topic(self) -> str:
        """The dead-letter topic actually used."""
        return self.dlq_topic or f"{self.topic}.dlq"


@dataclass(frozen=True)
class Delivery:
    """One event handed to the caller, with where it came from."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    event: TokenEvent


@dataclass(frozen=True)
class RawRecord:
    """A record as a backend fetched it, before decoding."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes


@dataclass(frozen=True)
class ConsumerStats:
    """A snapshot of the consumer's counters."""

    polled: int = 0  # records read from the log
    delivered: int = 0  # events handed to the caller
    duplicates: int = 0  # dropped: event_id already in the window
    dead_lettered: int = 0  # sent to the dead-letter topic
    commits: int = 0
    paused: bool = False


_WINDOW_HEADER = struct.Struct("<4sI")
_WINDOW_MAGIC = b"DDW1"


class DedupWindow:
    """The `capacity` most recently seen event_ids; the oldest is forgotten first."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._ids: collections.OrderedDict[bytes, None] = collections.OrderedDict()

    def seen(self, event_id: str) -> bool:
        """True if event_id is in the window; otherwise remember it and return False."""
        key = bytes.fromhex(event_id)
        if key in self._ids:
            return True
        self._ids[key] = None
        if len(self._ids) > self.capacity:
            self._ids.popitem(last=False)
        return False

    def __len__(self) -> int:
        return len(self._ids)

    def to_bytes(self) -> bytes:
        """Serialised window (oldest first), to be stored with the caller's durable state."""
        return _WINDOW_HEADER.pack(_WINDOW_MAGIC, len(self._ids)) + b"".join(self._ids)

    @classmethod
    def from_bytes(cls, data: bytes, capacity: int) -> "DedupWindow":
        """Inverse of to_bytes; keeps the newest `capacity` ids if the state holds more."""
        magic, n = _WINDOW_HEADER.unpack_from(data)
        body = memoryview(data)[_WINDOW_HEADER.size :]
        if magic != _WINDOW_MAGIC or len(body) != 16 * n:
            raise ValueError("not a de-dup window state")
        window = cls(capacity)
        for i in range(max(0, n - capacity), n):
            window._ids[bytes(body[16 * i : 16 * (i + 1)])] = None
        return window


class BaseConsumer:
    """Decoding, dead letters and de-dup over a backend's fetch/commit (see the module docstring
    for the commit steps a caller must follow)."""

    def __init__(self, config: ConsumerConfig, dedup_state: bytes | None = None) -> None:
        self.config = config
        self._dedup = (DedupWindow.from_bytes(dedup_state, config.dedup_capacity) if dedup_state
                       else DedupWindow(config.dedup_capacity))
        self._positions: dict[tuple[str, int], int] = {}  # next offset after what poll() returned
        self._n = dict(polled=0, delivered=0, duplicates=0, dead_lettered=0, commits=0)
        self._paused = False

    # ---- backend hooks

    def _fetch(self, timeout_s: float, max_records: int) -> list[RawRecord]:  # pragma: no cover
        raise NotImplementedError

    def _commit_positions(self, positions: dict[tuple[str, int], int]) -> None:  # pragma: no cover
        raise NotImplementedError

    def _send_dead_letter(self, key: bytes | None, value: bytes) -> None:  # pragma: no cover
        raise NotImplementedError

    def _flush_dead_letters(self) -> None:  # pragma: no cover
        raise NotImplementedError

    def _set_paused(self, paused: bool) -> None:
        pass

    def _keepalive(self, timeout_s: float) -> None:
        """While paused: whatever keeps this consumer's group membership alive."""
        time.sleep(min(timeout_s, 0.05))

    # ---- caller API

    def poll(self, timeout_s: float = 1.0, max_records: int | None = None) -> list[Delivery]:
        """Events after the last poll, decoded and de-duplicated; [] when paused or nothing came
        within timeout_s. Bad records are dead-lettered here and never returned."""
        if self._paused:
            self._keepalive(timeout_s)
            return []
        raw = self._fetch(timeout_s, max_records or self.config.max_poll_records)
        out: list[Delivery] = []
        for r in raw:
            self._n["polled"] += 1
            self._positions[(r.topic, r.partition)] = r.offset + 1
            try:
                event = decode_event(r.value)
            except SchemaError as exc:
                self._dead_letter(r, exc)
                continue
            if self._dedup.seen(event.event_id):
                self._n["duplicates"] += 1
                continue
            self._n["delivered"] += 1
            out.append(Delivery(r.topic, r.partition, r.offset, r.key, event))
        return out

    def poll_raw(self, timeout_s: float = 1.0, max_records: int | None = None) -> list[RawRecord]:
        """Records as stored: not decoded, not de-duplicated, never dead-lettered. For tools, e.g.
        reading a dead-letter topic with streams.schema.decode. commit() works as after poll()."""
        if self._paused:
            self._keepalive(timeout_s)
            return []
        raw = self._fetch(timeout_s, max_records or self.config.max_poll_records)
        for r in raw:
            self._n["polled"] += 1
            self._positions[(r.topic, r.partition)] = r.offset + 1
        return raw

    def _dead_letter(self, r: RawRecord, exc: SchemaError) -> None:
        log.warning("dead-lettering %s[%d]@%d: %s", r.topic, r.partition, r.offset, exc)
        letter = DeadLetter(reason=exc.reason, detail=exc.detail[:1000], source_topic=r.topic, partition=r.partition,
                            offset=r.offset, key=r.key, payload=bytes(r.value), group=self.config.group)
        self._send_dead_letter(r.key, encode(letter))
        self._n["dead_lettered"] += 1

    def commit(self) -> None:
        """Make dead letters durable, then commit the position after everything poll() returned.
        Call only once your work on those events is durable (module docstring, step 4). Raises if
        either step fails; nothing is committed then, and the records will come again."""
        self._flush_dead_letters()
        if self._positions:
            self._commit_positions(dict(self._positions))
        self._n["commits"] += 1

    def dedup_state(self) -> bytes:
        """The de-dup window as bytes, to store atomically with your durable state (step 3)."""
        return self._dedup.to_bytes()

    def pause(self) -> None:
        """Stop delivering (e.g. while training); keep calling poll() to stay in the group."""
        self._paused = True
        self._set_paused(True)

    def resume(self) -> None:
        """Deliver again from where delivery stopped."""
        self._paused = False
        self._set_paused(False)

    def stats(self) -> ConsumerStats:
        """A snapshot of the counters."""
        return ConsumerStats(**self._n, paused=self._paused)

    def close(self) -> None:  # pragma: no cover - backend
        """Leave the group without committing (commit first if your work is durable)."""
        raise NotImplementedError

    def __enter__(self) -> "BaseConsumer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
