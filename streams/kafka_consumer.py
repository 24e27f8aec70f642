"""Kafka event consumer: a consumer group with manual commits, dead letters on their own topic.

The commit steps a caller follows are in streams.consumer's module docstring.
"""

from __future__ import annotations

import logging

from kafka import ConsumerRebalanceListener, KafkaConsumer, KafkaProducer, OffsetAndMetadata, TopicPartition
from kafka.admin import KafkaAdminClient
from kafka import errors as kerr

from streams.consumer import BaseConsumer, ConsumerConfig, RawRecord
from streams.kafka_producer import kafka_client_config

log = logging.getLogger(__name__)


class _ForgetRevoked(ConsumerRebalanceListener):
    """Positions of partitions we lose cannot be committed by us any more: forget them."""

    def __init__(self, owner: "KafkaEventConsumer") -> None:
        self.owner = owner

    def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        for tp in revoked:
            self.owner._positions.pop((tp.topic, tp.partition), None)

    def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        if self.owner._paused and assigned:
            self.owner._consumer.pause(*assigned)


class KafkaEventConsumer(BaseConsumer):
    """Token events from a Kafka topic (see streams.consumer for the commit protocol)."""

    def __init__(self, bootstrap: str, config: ConsumerConfig | None = None, dedup_state: bytes | None = None) -> None:
        super().__init__(config or ConsumerConfig(), dedup_state)
        cfg = self.config
        self.bootstrap = bootstrap
        session_ms = int(cfg.session_timeout_s * 1000)
        # The constructor bootstraps eagerly and raises when no broker answers: a trainer that
        # cannot reach Kafka should fail loudly at start, not idle silently.
        self._consumer = KafkaConsumer(
            bootstrap_servers=bootstrap,
            group_id=cfg.group,
            client_id=cfg.client_id,
            enable_auto_commit=False,  # commits happen only in commit(), after the caller's work is durable
            auto_offset_reset="earliest",  # a new group starts from the oldest retained event
            max_poll_records=cfg.max_poll_records,
            session_timeout_ms=session_ms,
            heartbeat_interval_ms=max(100, session_ms // 3),
            bootstrap_timeout_ms=15000,
        )
        self._consumer.subscribe([cfg.topic], listener=_ForgetRevoked(self))
        self._dlq: KafkaProducer | None = None
        self._dead_letters: list[tuple[bytes | None, bytes]] = []

    def _fetch(self, timeout_s: float, max_records: int) -> list[RawRecord]:
        batches = self._consumer.poll(timeout_ms=int(timeout_s * 1000), max_records=max_records)
        out = []
        for tp, records in batches.items():
            out.extend(RawRecord(tp.topic, tp.partition, r.offset, r.key, r.value) for r in records)
        return out

    def _keepalive(self, timeout_s: float) -> None:
        # Partitions assigned since pause() are paused by the listener, so this returns nothing;
        # it keeps the member in the group while the caller is busy.
        batches = self._consumer.poll(timeout_ms=int(min(timeout_s, 0.1) * 1000))
        for tp, records in batches.items():  # pragma: no cover - only if a pause raced an assignment
            self._consumer.seek(tp, records[0].offset)

    def _set_paused(self, paused: bool) -> None:
        parts = self._consumer.assignment()
        if not parts:
            return
        if paused:
            self._consumer.pause(*parts)
        else:
            self._consumer.resume(*parts)

    def _commit_positions(self, positions: dict[tuple[str, int], int]) -> None:
        offsets = {TopicPartition(t, p): OffsetAndMetadata(o, "", -1) for (t, p), o in positions.items()}
        self._consumer.commit(offsets)

    def _send_dead_letter(self, key: bytes | None, value: bytes) -> None:
        # Held until commit(): poll() never touches the network for them, so it cannot fail half-way.
        self._dead_letters.append((key, value))

    def _flush_dead_letters(self) -> None:
        if not self._dead_letters:
            return
        if self._dlq is None:
            self._dlq = KafkaProducer(**kafka_client_config(self.bootstrap, f"{self.config.client_id}-dlq", linger_ms=0))
        futures = [self._dlq.send(self.config.dead_letter_topic, key=k, value=v) for k, v in self._dead_letters]
        self._dlq.flush(timeout=30)
        for fut in futures:
            fut.get(timeout=0)  # raises the broker's error: then nothing is committed, and they come again
        self._dead_letters.clear()

    def close(self) -> None:
        """Leave the group without committing (commit first if your work is durable)."""
        try:
            self._consumer.close(autocommit=False)
        finally:
            if self._dlq is not None:
                try:
                    self._dlq.close(timeout=5)
                except kerr.KafkaError:
                    log.warning("dead-letter producer closed with records unsent", exc_info=True)


def ensure_topic(bootstrap: str, topic: str, partitions: int = 1, replication_factor: int = 1,
                 timeout_s: float = 15.0) -> bool:
    """Create `topic` unless it exists, and wait until every partition has a leader; True if it
    was created. (Auto-created topics get the broker's default partition count, often 1.)"""
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="spectutor-admin",
                             request_timeout_ms=int(timeout_s * 1000), bootstrap_timeout_ms=int(timeout_s * 1000))
    try:
        admin.create_topics({topic: {"num_partitions": partitions, "replication_factor": replication_factor}},
                            timeout_ms=int(timeout_s * 1000), wait_for_metadata=True)
        return True
    except kerr.TopicAlreadyExistsError:
        return False
    finally:
        admin.close()
