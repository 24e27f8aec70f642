"""Token events from serving replicas to the trainer, and the Redis channel for swaps and load.

Pick a backend by URL:
    kafka://host:port[,host:port...]   a Kafka cluster (kafka-python)
    file:///abs/path[?partitions=N&segment_bytes=B]   the embedded durable log (no broker)

    producer = open_producer(url, topic="spectutor.token_events.v1", client_id=replica_id)
    producer.publish(event)          # serving path: never blocks on I/O
    consumer = open_consumer(url, group="trainer", dedup_state=state_from_checkpoint)
    for d in consumer.poll(): ...    # then make it durable, then consumer.commit()
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse

from streams.consumer import BaseConsumer, ConsumerConfig, ConsumerStats, DedupWindow, Delivery
from streams.producer import DEFAULT_TOPIC, BaseProducer, ProducerConfig, ProducerStats
from streams.schema import (
    SCHEMA_VERSION,
    DeadLetter,
    DeadLetterReason,
    Heartbeat,
    ModelRef,
    Promotion,
    Sampling,
    SchemaError,
    TokenEvent,
    decode,
    decode_event,
    encode,
    join_chunks,
)

__all__ = [
    "SCHEMA_VERSION", "DEFAULT_TOPIC", "BaseConsumer", "BaseProducer", "ConsumerConfig", "ConsumerStats",
    "DeadLetter", "DeadLetterReason", "DedupWindow", "Delivery", "Heartbeat", "ModelRef", "ProducerConfig",
    "ProducerStats", "Promotion", "Sampling", "SchemaError", "TokenEvent", "decode", "decode_event", "default_url",
    "encode", "join_chunks", "open_consumer", "open_producer",
]


def default_url() -> str:
    """kafka://$SPECTUTOR_KAFKA_BOOTSTRAP when a broker is configured, else the embedded log under
    $SPECTUTOR_HOME/log (the design's "embedded default")."""
    bootstrap = os.environ.get("SPECTUTOR_KAFKA_BOOTSTRAP")
    if bootstrap:
        return f"kafka://{bootstrap}"
    home = Path(os.environ.get("SPECTUTOR_HOME", Path.home() / ".cache" / "spectutor"))
    return (home / "log").resolve().as_uri()


def _parse(url: str) -> tuple[str, str, dict[str, str]]:
    parsed = urlparse(url)
    query = {k: v[-1] for k, v in parse_qs(parsed.query).items()}
    if parsed.scheme == "kafka":
        if not parsed.netloc:
            raise ValueError(f"url={url!r}: expected kafka://host:port[,host:port]")
        return "kafka", parsed.netloc, query
    if parsed.scheme == "file":
        if not parsed.path or parsed.netloc not in ("", "localhost"):
            raise ValueError(f"url={url!r}: expected file:///absolute/path")
        return "file", unquote(parsed.path), query
    raise ValueError(f"url={url!r}: scheme must be kafka:// or file://")


def _embedded(path: str, query: dict[str, str]):
    from streams.embedded import EmbeddedLog

    known = {"partitions", "segment_bytes"}
    if set(query) - known:
        raise ValueError(f"unknown file:// options {sorted(set(query) - known)}; known: {sorted(known)}")
    return EmbeddedLog(path, **{k: int(v) for k, v in query.items()})


def open_producer(url: str, config: ProducerConfig | None = None, **overrides: object) -> BaseProducer:
    """A started producer for `url`; `overrides` replace fields of `config` (e.g. topic=, client_id=)."""
    cfg = dataclasses.replace(config or ProducerConfig(), **overrides)
    kind, where, query = _parse(url)
    if kind == "kafka":
        from streams.kafka_producer import KafkaEventProducer

        if query:
            raise ValueError(f"kafka:// takes no options (got {sorted(query)}); use ProducerConfig")
        return KafkaEventProducer(where, cfg)
    from streams.embedded import LogEventProducer

    return LogEventProducer(_embedded(where, query), cfg)


def open_consumer(url: str, group: str | None = None, config: ConsumerConfig | None = None,
                  dedup_state: bytes | None = None, **overrides: object) -> BaseConsumer:
    """A consumer for `url` in consumer group `group`; `dedup_state` is what an earlier consumer's
    dedup_state() returned and your durable state kept (see streams.consumer for the commit steps)."""
    if group is not None:
        overrides["group"] = group
    cfg = dataclasses.replace(config or ConsumerConfig(), **overrides)
    kind, where, query = _parse(url)
    if kind == "kafka":
        from streams.kafka_consumer import KafkaEventConsumer

        if query:
            raise ValueError(f"kafka:// takes no options (got {sorted(query)}); use ConsumerConfig")
        return KafkaEventConsumer(where, cfg, dedup_state)
    from streams.embedded import LogEventConsumer

    return LogEventConsumer(_embedded(where, query), cfg, dedup_state)
