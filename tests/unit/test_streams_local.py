"""The embedded log's files (segments, torn tails, group positions) and the Kafka producer with no
broker at all (everything spills, nothing blocks, nothing is lost across a restart)."""

from __future__ import annotations

import socket
import time

import pytest

from streams import TokenEvent, open_consumer, open_producer
from streams.embedded import EmbeddedLog
from streams.framing import frame
from streams.kafka_producer import KafkaEventProducer
from streams.producer import ProducerConfig


def _records(n: int, start: int = 0) -> list[tuple[bytes, bytes]]:
    return [(b"k", f"value-{i:05d}".encode() * 5) for i in range(start, start + n)]


def test_segments_roll_and_readers_start_anywhere(tmp_path) -> None:
    log = EmbeddedLog(tmp_path, segment_bytes=1500)
    for i in range(0, 120, 10):
        assert log.append("t", 0, _records(10, i)) == i
    segs = sorted((tmp_path / "topics" / "t" / "0").glob("*.seg"))
    assert len(segs) >= 4  # a batch never splits across segments
    for start in (0, 57, 119, 120):
        reader = log.reader("t", 0, start)
        got = []
        while batch := reader.read(7):
            got.extend(batch)
        assert [o for o, _, _ in got] == list(range(start, 120))
        assert [v for _, _, v in got] == [v for _, v in _records(120)][start:]
    log.close()


def test_a_dead_writers_torn_record_is_never_read_and_is_cut_by_the_next_writer(tmp_path) -> None:
    log = EmbeddedLog(tmp_path)
    log.append("t", 0, _records(3))
    seg = next((tmp_path / "topics" / "t" / "0").glob("*.seg"))
    with open(seg, "ab") as f:
        f.write(frame(b"x" * 100)[:40])
    reader = log.reader("t", 0, 0)
    assert [o for o, _, _ in reader.read(10)] == [0, 1, 2]
    assert reader.read(10) == []  # waits at the torn record
    other = EmbeddedLog(tmp_path)  # a fresh writer (another process, after the crash)
    assert other.append("t", 0, _records(2, 3)) == 3
    assert [(o, v) for o, _, v in reader.read(10)] == [(3, _records(1, 3)[0][1]), (4, _records(1, 4)[0][1])]
    other.close()
    log.close()


def test_embedded_consumer_resumes_from_commit_and_holds_the_group(tmp_path) -> None:
    url = f"file://{tmp_path}?partitions=3"
    producer = open_producer(url, topic="ev")
    events = [TokenEvent.make_dummy(3, 2, 2, request_id=f"r{i}", seed=i) for i in range(30)]
    for ev in events:
        assert producer.publish(ev)
    final = producer.close()
    assert final.acked == 30 and final.unaccounted == 0
    c = open_consumer(url, group="g", topic="ev")
    with pytest.raises(RuntimeError, match="live consumer"):
        open_consumer(url, group="g", topic="ev")
    first = c.poll(1.0, max_records=12)
    assert len(first) == 12
    c.commit()
    c.poll(1.0, max_records=5)  # read, never committed: must come again
    c.close()
    c = open_consumer(url, group="g", topic="ev")
    rest = []
    while batch := c.poll(0.2):
        rest.extend(batch)
    assert {d.event.event_id for d in first + rest} == {e.event_id for e in events}
    assert len(first) + len(rest) == 30
    c.close()


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens here: connects are refused at once
    return port


def test_kafka_producer_without_a_broker_spills_everything_and_recovers_it(tmp_path) -> None:
    bootstrap = f"127.0.0.1:{_closed_port()}"
    cfg = ProducerConfig(topic="t", spill_path=str(tmp_path / "p.spill"), stall_timeout_s=0.3)
    producer = KafkaEventProducer(bootstrap, cfg)
    events = [TokenEvent.make_dummy(16, 8, 16, seed=i) for i in range(400)]
    latencies = []
    for ev in events:
        t0 = time.perf_counter()
        assert producer.publish(ev)
        latencies.append(time.perf_counter() - t0)
        assert producer.stats().unaccounted == 0  # the books balance at every instant
    # no call waits for the broker: a wait would last the 0.3 s stall timeout; tail latency lives in bench/streams.py
    assert max(latencies) < cfg.stall_timeout_s / 2
    deadline = time.monotonic() + 10
    while producer.stats().spilled < 400 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not producer.flush(0.1)  # nothing can be delivered
    final = producer.close(timeout=0.5)
    assert (final.spilled, final.spill_pending, final.acked, final.dropped, final.unaccounted) == (400, 400, 0, 0, 0)
    again = KafkaEventProducer(bootstrap, cfg)
    assert again.stats().recovered == 400 and again.stats().spill_pending == 400
    assert again.close(timeout=0.2).unaccounted == 0


def test_spill_limit_drops_and_counts(tmp_path) -> None:
    cfg = ProducerConfig(topic="t", spill_path=str(tmp_path / "p.spill"), stall_timeout_s=0.1, max_spill_bytes=20_000)
    producer = KafkaEventProducer(f"127.0.0.1:{_closed_port()}", cfg)
    for i in range(50):
        producer.publish(TokenEvent.make_dummy(16, 8, 16, seed=i))
    final = producer.close(timeout=1.0)
    assert final.dropped > 0 and final.spilled + final.dropped == 50 and final.unaccounted == 0
