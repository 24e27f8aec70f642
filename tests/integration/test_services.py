"""The local services answer the way the rest of spectutor relies on: Kafka, Redis, MLflow.

Run with the services up, e.g.:

    deploy/local/with-services.sh kafka redis mlflow -- .venv/bin/python -m pytest -q tests/integration/test_services.py

Each test skips only when its service's variable is unset (no service configured). When the
variable is set, the service is expected to be there: a connection failure fails the test, so a
broken stack cannot pass CI as a row of skips.
"""

from __future__ import annotations

import os
import time
import uuid

import pytest


def _service_env(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        pytest.skip(
            f"{name} is not set (no service configured); run under "
            "deploy/local/with-services.sh or source deploy/local/env.sh with the services started"
        )
    return value


def _unique(prefix: str) -> str:
    # Unique per run, so reruns against a long-lived stack never see each other's leftovers.
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


@pytest.mark.integration
def test_kafka_roundtrip_in_order() -> None:
    bootstrap = _service_env("SPECTUTOR_KAFKA_BOOTSTRAP")
    from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition

    topic = _unique("spectutor-it")
    keys = [b"req-0", b"req-1", b"req-2"]
    values = [b"event-0", b"event-1", b"event-2"]

    # Constructors bootstrap eagerly and raise when no broker answers: that is a failure here.
    admin = KafkaAdminClient(
        bootstrap_servers=bootstrap, client_id="spectutor-it", request_timeout_ms=15000, bootstrap_timeout_ms=15000
    )
    created = False
    try:
        admin.create_topics(
            {topic: {"num_partitions": 1, "replication_factor": 1}}, timeout_ms=15000, wait_for_metadata=True
        )
        created = True

        # Both set explicitly: with only the defaults, a conflicting setting would silently turn
        # idempotence off instead of raising.
        producer = KafkaProducer(
            bootstrap_servers=bootstrap,
            acks="all",
            enable_idempotence=True,
            bootstrap_timeout_ms=15000,
            max_block_ms=15000,
        )
        try:
            futures = [producer.send(topic, key=k, value=v) for k, v in zip(keys, values)]
            metas = [f.get(timeout=30) for f in futures]
            producer.flush(timeout=30)
        finally:
            producer.close(timeout=10)
        assert [m.partition for m in metas] == [0, 0, 0]
        assert [m.offset for m in metas] == [0, 1, 2]

        consumer = KafkaConsumer(
            bootstrap_servers=bootstrap,
            group_id=_unique("spectutor-it-group"),
            auto_offset_reset="earliest",
            enable_auto_commit=False,
            bootstrap_timeout_ms=15000,
        )
        try:
            consumer.subscribe([topic])
            records = []
            deadline = time.monotonic() + 60
            while len(records) < len(values) and time.monotonic() < deadline:
                for batch in consumer.poll(timeout_ms=1000).values():
                    records.extend(batch)
            # One more short poll: "exactly three" also means nothing after them.
            for batch in consumer.poll(timeout_ms=500).values():
                records.extend(batch)
            assert [r.value for r in records] == values
            assert [r.key for r in records] == keys
            assert [r.offset for r in records] == [0, 1, 2]

            consumer.commit()
            tp = TopicPartition(topic, 0)
            # Committed offset is the next one to read (last + 1).
            assert consumer.committed(tp) == len(values)
        finally:
            consumer.close()
    finally:
        try:
            if created:
                admin.delete_topics([topic], timeout_ms=15000)
        finally:
            admin.close()


@pytest.mark.integration
def test_redis_set_get_expire_delete() -> None:
    url = _service_env("SPECTUTOR_REDIS_URL")
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=5)
    key = _unique("spectutor:it")
    try:
        assert client.set(key, b"champion=3", ex=60) is True
        assert client.get(key) == b"champion=3"
        assert 0 < client.ttl(key) <= 60
        assert client.delete(key) == 1
        assert client.get(key) is None
    finally:
        client.delete(key)
        client.close()


@pytest.mark.integration
def test_mlflow_server_metric_history(monkeypatch: pytest.MonkeyPatch) -> None:
    uri = _service_env("MLFLOW_TRACKING_URI")
    # MLflow's client retries a refused connection for minutes by default; fail fast instead.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment_id = client.create_experiment(_unique("spectutor-it"))
    try:
        run = client.create_run(experiment_id)
        run_id = run.info.run_id
        values = [1.0 / (step + 1) for step in range(5)]
        for step, value in enumerate(values):
            client.log_metric(run_id, "acceptance_length", value, step=step)
        client.set_terminated(run_id)

        history = sorted(client.get_metric_history(run_id, "acceptance_length"), key=lambda m: m.step)
        assert [m.step for m in history] == [0, 1, 2, 3, 4]
        assert [m.value for m in history] == pytest.approx(values)
        assert client.get_run(run_id).info.status == "FINISHED"
    finally:
        client.delete_experiment(experiment_id)
