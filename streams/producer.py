"""What every event producer shares: config, counters, and a `publish` that never waits on I/O.

`publish()` is called on the serving path. It encodes the event (tens of microseconds) and appends
the bytes to a bounded in-memory queue; a background pump thread owned by the backend (Kafka, or
the embedded log) takes them from there. Nothing in `publish` touches a socket or a file, so a
dead broker cannot slow decoding down.

Counters (ProducerStats), and the identity they satisfy at every instant:

    enqueued + recovered == acked + replayed + failed + dropped + queue_depth + in_flight + spill_pending

- enqueued: records publish() accepted.        - rejected: publish() refused (queue full or closed).
- acked: acknowledged by the broker / the log on the first try.
- spilled: written to the spill file (broker unreachable).   - replayed: spilled, then acknowledged.
- recovered: found in the spill file at start (a previous process left them).
- dropped: lost because the spill file reached its byte limit (the only way an enqueued record is lost).
- failed: refused by the broker for the record itself (e.g. larger than the broker accepts).
- in_flight: sent, not yet acknowledged (records replayed from the spill count in spill_pending).
"""

from __future__ import annotations

import collections
import os
import re
import threading
import time
from dataclasses import dataclass, fields
from pathlib import Path

from streams.schema import TokenEvent, encode

DEFAULT_TOPIC = "spectutor.token_events.v1"
_TOPIC_RE = re.compile(r"^[A-Za-z0-9._-]{1,249}$")  # Kafka's rule; the embedded log uses it for paths too


def check_topic(name: str, field_name: str = "topic") -> str:
    """Validate a topic name (Kafka's alphabet), naming the offending field."""
    if not _TOPIC_RE.match(name or ""):
        raise ValueError(f"{field_name}={name!r}: use 1-249 characters from [A-Za-z0-9._-]")
    return name


@dataclass(frozen=True)
class ProducerConfig:
    """How a producer queues, batches and spills. Defaults suit one serving replica."""

    topic: str = DEFAULT_TOPIC
    """Topic the events go to."""
    client_id: str = "spectutor"
    """Names this producer to the broker and, by default, its spill file: one per replica."""
    max_queue_events: int = 20_000
    """Queue bound in records; publish() rejects beyond it (back-pressure, counted)."""
    max_queue_bytes: int = 128 << 20
    """Queue bound in encoded bytes."""
    linger_ms: int = 5
    """Kafka batching delay: records sent within this window share one request."""
    stall_timeout_s: float = 3.0
    """An unacknowledged record older than this means the broker is unreachable: spill."""
    max_in_flight: int = 10_000
    """Records sent but not acknowledged, at most (bounds memory while a broker stalls)."""
    reconnect_interval_s: float = 0.5
    """Pause between attempts to reach the broker again."""
    spill_path: str | None = None
    """Spill file; default $SPECTUTOR_HOME/spill/<topic>.<client_id>.spill."""
    max_spill_bytes: int = 1 << 30
    """Spill size limit; records beyond it are dropped (counted)."""
    spill_fsync_s: float = 0.2
    """How often spilled records and the replay cursor are fsync'd."""
    kafka_compression: str | None = None
    """Kafka batch compression. None: the schema already zlib-compresses each record's body; gzip
    over a batch of them saves under 1% (kafka_batch_gzip_saving in bench/results/streams-cpu.json)."""
    logprobs_f32: bool = False
    """Keep top-k log-probs in float32 on the wire (default float16, see streams.schema)."""

    def __post_init__(self) -> None:
        check_topic(self.topic)
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
                raise ValueError(f"{f.name}={value}: must be >= 0")
        for name in ("max_queue_events", "max_queue_bytes", "max_in_flight", "max_spill_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: must be >= 1")
        if self.stall_timeout_s <= 0:
            raise ValueError(f"stall_timeout_s={self.stall_timeout_s}: must be > 0")
        if self.kafka_compression not in (None, "gzip", "snappy", "lz4", "zstd"):
            raise ValueError(f"kafka_compression={self.kafka_compression!r}: None, gzip, snappy, lz4 or zstd")

    def resolved_spill_path(self) -> Path:
        """Where this producer spills."""
        if self.spill_path:
            return Path(self.spill_path)
        home = Path(os.environ.get("SPECTUTOR_HOME", Path.home() / ".cache" / "spectutor"))
        return home / "spill" / f"{self.topic}.{self.client_id}.spill"


@dataclass(frozen=True)
class ProducerStats:
    """A snapshot of the counters (see the module docstring for their identity)."""

    enqueued: int = 0
    rejected: int = 0
    acked: int = 0
    spilled: int = 0
    replayed: int = 0
    recovered: int = 0
    dropped: int = 0
    failed: int = 0
    queue_depth: int = 0
    in_flight: int = 0
    spill_pending: int = 0
    connected: bool = False

    @property
    def unaccounted(self) -> int:
        """Zero unless a record went missing from the books (the tests assert it stays 0)."""
        return (self.enqueued + self.recovered) - (
            self.acked + self.replayed + self.failed + self.dropped + self.queue_depth + self.in_flight + self.spill_pending
        )


class BaseProducer:
    """Bounded queue + counters + lifecycle; a backend supplies the pump thread (`_pump`)."""

    def __init__(self, config: ProducerConfig) -> None:
        self.config = config
        self._cv = threading.Condition()
        self._queue: collections.deque[tuple[bytes, bytes]] = collections.deque()
        self._queue_bytes = 0
        self._holding = 0  # taken off the queue by the pump and not yet placed: counted as queued
        self._closing = False
        self._close_deadline = float("inf")
        # Counters: written by the pump and broker callbacks under _cv's lock, read by stats().
        self._n = dict(enqueued=0, rejected=0, acked=0, spilled=0, replayed=0, recovered=0, dropped=0, failed=0)
        self._thread = threading.Thread(target=self._run_pump, name=f"spectutor-pump-{config.topic}", daemon=True)

    # ---- serving side

    def publish(self, event: TokenEvent) -> bool:
        """Encode `event` and hand it to the background thread; never waits on the network or disk.

        Keyed by request_id (all chunks of a request stay in order on one partition). Returns
        False if it was rejected because the queue is full or the producer is closed.
        """
        return self.publish_bytes(event.request_id.encode(), encode(event, logprobs_f32=self.config.logprobs_f32))

    def publish_bytes(self, key: bytes, value: bytes) -> bool:
        """Queue an already-encoded record (tools, tests, other message kinds). Same contract as publish."""
        with self._cv:
            if (
                self._closing
                or len(self._queue) >= self.config.max_queue_events
                or self._queue_bytes + len(value) > self.config.max_queue_bytes
            ):
                self._n["rejected"] += 1
                return False
            self._queue.append((key, value))
            self._queue_bytes += len(value)
            self._n["enqueued"] += 1
            self._cv.notify()
        return True

    # ---- pump side

    def _take(self, limit: int, wait_s: float) -> list[tuple[bytes, bytes]]:
        """Up to `limit` queued records, waiting up to wait_s for the first one."""
        with self._cv:
            if not self._queue and wait_s > 0 and not self._closing:
                self._cv.wait(wait_s)
            out = []
            while self._queue and len(out) < limit:
                key, value = self._queue.popleft()
                self._queue_bytes -= len(value)
                out.append((key, value))
            self._holding += len(out)  # the caller lowers it as it places each record
            return out

    def _count(self, **deltas: int) -> None:
        with self._cv:
            for name, d in deltas.items():
                self._n[name] += d

    def _run_pump(self) -> None:
        try:
            self._pump()
        finally:
            with self._cv:
                self._cv.notify_all()

    def _pump(self) -> None:  # pragma: no cover - abstract
        """Move records from the queue to their destination until closed; lower _holding as it goes."""
        raise NotImplementedError

    def _extra_stats(self) -> dict[str, object]:
        """Backend gauges (in_flight, spill_pending, connected), read under the lock."""
        return {}

    # ---- observation and shutdown

    def stats(self) -> ProducerStats:
        """A consistent snapshot of the counters."""
        with self._cv:
            return ProducerStats(**self._n, queue_depth=len(self._queue) + self._holding, **self._extra_stats())

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything published so far is acknowledged (spilled records replayed
        included). True if that happened within `timeout` seconds."""
        deadline = time.monotonic() + (timeout if timeout is not None else 1e9)
        while time.monotonic() < deadline:
            s = self.stats()
            if s.queue_depth == 0 and s.in_flight == 0 and s.spill_pending == 0:
                return True
            if not self._thread.is_alive():
                return False
            time.sleep(0.005)
        return False

    def close(self, timeout: float = 10.0) -> ProducerStats:
        """Stop accepting, deliver what can be delivered within `timeout`, keep the rest on disk
        (spill file) for the next producer on the same spill path. Returns the final counters."""
        with self._cv:
            self._closing = True
            self._close_deadline = time.monotonic() + timeout
            self._cv.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout + 5.0)
        return self.stats()

    def __enter__(self) -> "BaseProducer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
