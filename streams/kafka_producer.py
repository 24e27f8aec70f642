"""Kafka event producer: publish() queues, one pump thread sends, a spill file covers outages.

Why the pump does its own failure detection: kafka-python 3.0.12's idempotent producer, after a
broker restart with batches in flight, leaves those batches neither acknowledged nor expired (it
waits on a producer-epoch bump that does not complete), and its close() raises on them. So the pump
watches the age of the oldest unacknowledged record; past `stall_timeout_s` it declares the broker
unreachable, abandons that client, writes its own copies of the unacknowledged records to the
spill file (oldest first), and spills every later record behind them. A connector thread builds a
fresh client (bootstrap + topic metadata) off the pump; once it is ready the pump replays the spill
file in order, new records still appended behind, and sends directly again once it is drained.

Per-key order holds because a record is sent directly only when the spill file is empty, and the
spill file is written and replayed in publish order. The price of abandoning a client is possible
duplicates (a record the broker stored but whose ack was lost is replayed); consumers drop them by
event_id. Pump states:

    CONNECTING --client ready--> ONLINE --stall/error--> SPILLING --client ready--> REPLAYING
    REPLAYING --spill drained--> ONLINE;  REPLAYING --stall/error--> SPILLING (rewind to first unacked)
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass

from kafka import KafkaProducer
from kafka import errors as kerr

from streams.producer import BaseProducer, ProducerConfig
from streams.spill import SpillFile

log = logging.getLogger(__name__)

# Errors about the record itself: resending cannot help, so it is counted as failed.
_RECORD_ERRORS = (kerr.MessageSizeTooLargeError, kerr.RecordListTooLargeError, kerr.InvalidRecordError,
                  kerr.UnsupportedForMessageFormatError, kerr.InvalidTopicError)
_BATCH = 500  # records moved per pump step: big enough to batch, small enough to stay responsive


@dataclass
class _Pending:
    seq: int
    key: bytes
    value: bytes
    sent_at: float
    spill_pos: int | None = None  # None: sent straight from the queue; else its place in the spill


def kafka_client_config(bootstrap: str, client_id: str, **overrides: object) -> dict[str, object]:
    """Producer settings spectutor relies on, all explicit (3.x defaults changed; see ecosystem.md §2)."""
    cfg: dict[str, object] = dict(
        bootstrap_servers=bootstrap,
        client_id=client_id,
        # Both explicit: with only the defaults, a conflicting option silently turns idempotence off.
        acks="all",
        enable_idempotence=True,
        max_in_flight_requests_per_connection=5,  # the most idempotence allows while keeping order
        # The constructor and metadata waits run on the connector thread, never on publish().
        bootstrap_timeout_ms=2000,
        max_block_ms=5000,
        # After a broker restart, reconnect within a second rather than backing off for 30 s.
        reconnect_backoff_max_ms=1000,
        max_request_size=4 << 20,
        batch_size=256 << 10,
    )
    cfg.update(overrides)
    return cfg


def abandon_client(client: KafkaProducer) -> None:
    """Close a client that may hold stuck batches, on a daemon thread, without raising.

    kafka-python's close() flushes first and raises on incomplete batches before it reaches its own
    force-close, so the sender is force-closed through its (private) handle first.
    """

    def run() -> None:
        try:
            sender = getattr(client, "_sender", None)
            if sender is not None:
                sender.force_close()
            client.close(timeout=1)
        except Exception:  # noqa: BLE001 - best effort; the client is being thrown away
            log.debug("closing an abandoned Kafka client", exc_info=True)

    threading.Thread(target=run, name="spectutor-kafka-abandon", daemon=True).start()


class KafkaEventProducer(BaseProducer):
    """Non-blocking, spill-backed producer of encoded records to one Kafka topic."""

    def __init__(self, bootstrap: str, config: ProducerConfig | None = None) -> None:
        super().__init__(config or ProducerConfig())
        self.bootstrap = bootstrap
        self._spill = SpillFile(self.config.resolved_spill_path(), self.config.max_spill_bytes)
        # Guarded by self._cv's lock (shared with the queue and counters):
        self._inflight: collections.OrderedDict[int, _Pending] = collections.OrderedDict()
        self._direct_inflight = 0  # entries of _inflight sent straight from the queue
        self._spill_pending = self._spill.recovered
        self._n["recovered"] = self._spill.recovered
        self._gen = 0  # bumped when a client is abandoned: its late callbacks are ignored
        self._problem = False  # a callback saw a broker-level error
        self._ready: KafkaProducer | None = None  # handed over by the connector
        self._acked_spill: list[int] = []  # spill positions acknowledged since the pump last looked
        self._stopped = False
        # Pump-only state:
        self._client: KafkaProducer | None = None
        self._ever_connected = False
        self._started = time.monotonic()
        self._seq = 0
        self._replay_pos = self._spill.cursor  # next spill record to send
        self._replay_done: set[int] = set()  # spill positions acknowledged (skipped after a rewind)
        self._last_sync = 0.0
        if self._spill.torn_bytes:
            log.warning("spill %s: cut a torn last record (%d bytes)", self._spill.path, self._spill.torn_bytes)
        if self._spill.recovered:
            log.info("spill %s: %d records from a previous run will be replayed", self._spill.path, self._spill.recovered)
        self._start_connector()
        self._thread.start()

    def _extra_stats(self) -> dict[str, object]:
        return dict(in_flight=self._direct_inflight, spill_pending=self._spill_pending,
                    connected=self._client is not None)

    # ---- connector thread

    def _start_connector(self) -> None:
        threading.Thread(target=self._connect_loop, args=(self._gen,), name="spectutor-kafka-connect",
                         daemon=True).start()

    def _connect_loop(self, gen: int) -> None:
        warned_at = 0.0
        while not self._stopped:
            client = None
            try:
                client = KafkaProducer(**kafka_client_config(
                    self.bootstrap, self.config.client_id, linger_ms=self.config.linger_ms,
                    compression_type=self.config.kafka_compression))
                client.partitions_for(self.config.topic)  # metadata now, so send() never waits for it
            except Exception as exc:  # noqa: BLE001 - any failure means "not reachable yet"
                if client is not None:
                    abandon_client(client)
                if time.monotonic() - warned_at > 30:
                    log.warning("Kafka %s unreachable (%s); events spill to %s", self.bootstrap, exc, self._spill.path)
                    warned_at = time.monotonic()
                time.sleep(self.config.reconnect_interval_s)
                continue
            with self._cv:
                if gen != self._gen or self._stopped:
                    abandon_client(client)
                    return
                self._ready = client
                self._cv.notify_all()
            return

    # ---- broker callbacks (kafka-python's I/O thread)

    def _pop_locked(self, seq: int) -> _Pending | None:
        p = self._inflight.pop(seq, None)
        if p is not None and p.spill_pos is None:
            self._direct_inflight -= 1
        return p

    def _on_ack(self, seq: int, gen: int, _meta: object) -> None:
        with self._cv:
            if gen != self._gen:
                return
            p = self._pop_locked(seq)
            if p is None:
                return
            if p.spill_pos is None:
                self._n["acked"] += 1
            else:
                self._n["replayed"] += 1
                self._spill_pending -= 1
                self._acked_spill.append(p.spill_pos)
            self._cv.notify_all()

    def _on_error(self, seq: int, gen: int, exc: BaseException) -> None:
        with self._cv:
            if gen != self._gen or seq not in self._inflight:
                return
            if isinstance(exc, _RECORD_ERRORS):
                self._fail_locked(self._pop_locked(seq), exc)
            else:
                self._problem = True
            self._cv.notify_all()

    def _fail_locked(self, p: _Pending | None, exc: BaseException) -> None:
        if p is None:
            return
        log.error("Kafka refused record key=%r (%d bytes): %s", p.key, len(p.value), exc)
        self._n["failed"] += 1
        if p.spill_pos is not None:
            self._spill_pending -= 1
            self._acked_spill.append(p.spill_pos)  # done with it, as far as replay is concerned

    # ---- pump thread

    def _send(self, key: bytes, value: bytes, spill_pos: int | None) -> None:
        assert self._client is not None
        self._seq += 1
        p = _Pending(self._seq, key, value, time.monotonic(), spill_pos)
        with self._cv:
            self._inflight[p.seq] = p  # before send(): a callback may fire at once
            if spill_pos is None:
                self._holding -= 1
                self._direct_inflight += 1
            gen = self._gen
        try:
            fut = self._client.send(self.config.topic, key=key, value=value)
        except _RECORD_ERRORS as exc:
            with self._cv:
                self._fail_locked(self._pop_locked(p.seq), exc)
            return
        except Exception:  # noqa: BLE001 - e.g. a metadata timeout: treat as an outage
            log.debug("send raised", exc_info=True)
            with self._cv:
                self._problem = True
            return
        fut.add_callback(self._on_ack, p.seq, gen)
        fut.add_errback(self._on_error, p.seq, gen)

    def _spill_records(self, records: list[tuple[bytes, bytes]]) -> None:
        """Append records the pump holds (from the queue, or abandoned in flight) to the spill."""
        for key, value in records:
            try:
                ok = self._spill.append(key, value)
            except OSError:
                log.exception("spill %s: append failed; record dropped", self._spill.path)
                ok = False
            with self._cv:
                self._holding -= 1
                if ok:
                    self._n["spilled"] += 1
                    self._spill_pending += 1
                else:
                    self._n["dropped"] += 1

    def _drain_acks(self) -> None:
        """Fold acknowledged spill positions into the skip set (before any replay or rewind)."""
        with self._cv:
            done, self._acked_spill = self._acked_spill, []
        self._replay_done.update(done)

    def _advance_cursor(self) -> None:
        """Move the persisted replay cursor up to the first unacknowledged spilled record."""
        self._drain_acks()
        with self._cv:
            first = min((p.spill_pos for p in self._inflight.values() if p.spill_pos is not None), default=None)
        self._spill.advance(self._replay_pos if first is None else first)

    def _declare_outage(self, why: str) -> None:
        self._advance_cursor()
        with self._cv:
            self._gen += 1
            self._problem = False
            stuck = list(self._inflight.values())  # insertion order = send order
            self._inflight.clear()
            direct = [p for p in stuck if p.spill_pos is None]
            self._direct_inflight = 0
            self._holding += len(direct)
        log.warning("Kafka %s: %s; %d unacknowledged records go to the spill file", self.bootstrap, why, len(stuck))
        client, self._client = self._client, None
        if client is not None:
            abandon_client(client)
        # Direct sends happen only while the spill is empty, so these are older than anything in it.
        self._spill_records([(p.key, p.value) for p in direct])
        replays = [p.spill_pos for p in stuck if p.spill_pos is not None]
        if replays:
            self._replay_pos = min(replays)  # acknowledged ones after it are skipped via _replay_done
        self._start_connector()

    def _replay(self, room: int) -> None:
        self._drain_acks()
        for rec in self._spill.read(self._replay_pos, min(room, _BATCH)):
            self._replay_pos = rec.end
            if rec.pos not in self._replay_done:
                self._send(rec.key, rec.value, rec.pos)

    def _pump(self) -> None:
        while True:
            try:
                if self._step():
                    break
            except Exception:  # noqa: BLE001 - a bug here must not stop event delivery for good
                log.exception("producer pump step failed; retrying")
                time.sleep(0.1)
        self._shutdown()

    def _step(self) -> bool:
        """One pump iteration; True when closing is complete."""
        cfg, now = self.config, time.monotonic()
        with self._cv:
            adopted, self._ready = self._ready, None
            oldest = next(iter(self._inflight.values()), None)
            problem, closing, deadline = self._problem, self._closing, self._close_deadline
            room = cfg.max_in_flight - len(self._inflight)
            spill_pending, queued, inflight = self._spill_pending, len(self._queue), len(self._inflight)
        if adopted is not None:
            self._client, self._ever_connected = adopted, True
            self._drain_acks()
            self._replay_pos = self._spill.cursor  # everything before it is acknowledged
            self._replay_done = {p for p in self._replay_done if p >= self._replay_pos}
        if self._client is not None and (problem or (oldest and now - oldest.sent_at > cfg.stall_timeout_s)):
            self._declare_outage("send failed" if problem else f"no ack for {now - oldest.sent_at:.1f}s")
            return False
        if now - self._last_sync > cfg.spill_fsync_s:
            self._advance_cursor()
            self._spill.sync()
            self._last_sync = now
        if closing and (now > deadline or (queued == 0 and inflight == 0 and (spill_pending == 0 or self._client is None))):
            return True
        if self._client is not None and spill_pending == 0:
            if self._spill.end:  # fully replayed: free the disk, send directly again
                self._drain_acks()
                self._spill.reset()
                self._replay_pos, self._replay_done = 0, set()
            if room <= 0:
                self._wait(0.005)
                return False
            # Idle with nothing in flight, there is nothing to watch: sleep until publish() wakes us.
            idle_wait = 0.0 if closing else (0.02 if inflight else 0.5)
            for key, value in self._take(min(room, _BATCH), idle_wait):
                self._send(key, value, None)
            return False
        # Spill mode: the broker is unreachable, or older records still wait in the spill file.
        if self._ever_connected or closing or now - self._started >= cfg.stall_timeout_s:
            self._spill_records(self._take(_BATCH, 0.0))  # (at start-up, wait a little for a connection)
        if self._client is not None and room > 0 and self._replay_pos < self._spill.end:
            self._replay(room)
        else:
            self._wait(0.02)
        return False

    def _wait(self, seconds: float) -> None:
        with self._cv:
            self._cv.wait(seconds)

    def _shutdown(self) -> None:
        self._advance_cursor()  # before in-flight replays are forgotten: the cursor stops at them
        with self._cv:
            self._stopped = True
            self._gen += 1  # late callbacks no longer count: what is left goes to disk
            leftover = [p for p in self._inflight.values() if p.spill_pos is None]
            self._inflight.clear()
            self._direct_inflight = 0
            queued = list(self._queue)
            self._queue.clear()
            self._queue_bytes = 0
            self._holding += len(leftover) + len(queued)
        if leftover or queued or self._spill_pending:
            log.warning("closing with %d records undelivered; they stay in %s for the next start",
                        len(leftover) + len(queued) + self._spill_pending, self._spill.path)
        # Unacknowledged ones first: they were published before anything still queued.
        self._spill_records([(p.key, p.value) for p in leftover] + queued)
        if self._spill_pending == 0 and self._spill.end:
            self._spill.reset()
        self._spill.close()
        client, self._client = self._client, None
        if client is not None:
            if leftover:
                abandon_client(client)
            else:
                try:
                    client.close(timeout=2)
                except Exception:  # noqa: BLE001
                    abandon_client(client)
        with self._cv:
            ready, self._ready = self._ready, None
        if ready is not None:
            abandon_client(ready)
