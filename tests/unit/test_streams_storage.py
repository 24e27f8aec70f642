"""Framed files, the spill file (replay, torn tail, limits), the de-dup window, config checks."""

from __future__ import annotations

import io
import struct

import pytest

from streams import ConsumerConfig, DedupWindow, ProducerConfig, TokenEvent, open_consumer, open_producer
from streams.framing import FRAME_OVERHEAD, Tail, frame, read_records, recover
from streams.spill import SpillFile


def _file(*payloads: bytes, tail: bytes = b"") -> io.BytesIO:
    return io.BytesIO(b"".join(frame(p) for p in payloads) + tail)


def test_framing_reads_good_records_and_names_the_tail() -> None:
    good = [b"a", b"", b"x" * 1000]
    scan = read_records(_file(*good), 0)
    assert [p for _, p in scan.records] == good and scan.tail is Tail.END
    partial_payload = frame(b"hello")[:-2]
    partial_header = frame(b"hello")[:5]
    corrupt = bytearray(frame(b"hello"))
    corrupt[-1] ^= 0xFF
    for tail, kind in ((partial_payload, Tail.PARTIAL), (partial_header, Tail.PARTIAL), (bytes(corrupt), Tail.CORRUPT),
                       (struct.pack("<II", 1 << 30, 0), Tail.CORRUPT)):
        scan = read_records(_file(*good, tail=tail), 0)
        assert [p for _, p in scan.records] == good
        assert scan.tail is kind
        assert scan.end == sum(FRAME_OVERHEAD + len(p) for p in good)


def test_framing_limits_resume_where_they_stopped() -> None:
    f = _file(*[bytes([i]) * 10 for i in range(10)])
    first = read_records(f, 0, max_records=3)
    rest = read_records(f, first.end)
    assert [p[0] for _, p in first.records + rest.records] == list(range(10))


def test_recover_cuts_only_the_torn_tail(tmp_path) -> None:
    path = tmp_path / "f"
    path.write_bytes(frame(b"one") + frame(b"two") + frame(b"three")[:-1])
    with open(path, "a+b") as f:
        n, end, cut = recover(f)
    assert (n, cut) == (2, len(frame(b"three")) - 1)
    assert path.stat().st_size == end


def _spill(tmp_path, max_bytes: int = 1 << 20) -> SpillFile:
    return SpillFile(tmp_path / "p.spill", max_bytes)


def test_spill_replays_in_order_after_reopen(tmp_path) -> None:
    s = _spill(tmp_path)
    for i in range(20):
        assert s.append(f"k{i}".encode(), f"v{i}".encode())
    s.close()
    s = _spill(tmp_path)
    assert s.recovered == 20
    recs = s.read(s.cursor, 100)
    assert [(r.key, r.value) for r in recs] == [(f"k{i}".encode(), f"v{i}".encode()) for i in range(20)]
    # Acknowledge the first 7: a restart replays only the rest.
    s.advance(recs[6].end)
    s.close()
    s = _spill(tmp_path)
    assert s.recovered == 13
    assert [r.key for r in s.read(s.cursor, 100)] == [f"k{i}".encode() for i in range(7, 20)]
    s.close()


def test_spill_cuts_a_torn_last_record_and_keeps_appending(tmp_path) -> None:
    s = _spill(tmp_path)
    for i in range(3):
        s.append(b"k", bytes([i]) * 50)
    s.close()
    with open(tmp_path / "p.spill", "ab") as f:
        f.write(frame(b"\x01\x00k" + b"torn" * 20)[:30])  # the process died mid-append
    s = _spill(tmp_path)
    assert s.recovered == 3 and s.torn_bytes == 30
    s.append(b"k", b"after")
    assert [r.value for r in s.read(0, 10)] == [bytes([0]) * 50, bytes([1]) * 50, bytes([2]) * 50, b"after"]
    s.close()


def test_spill_refuses_beyond_its_limit_and_reset_frees_it(tmp_path) -> None:
    one = len(frame(b"\x01\x00k" + b"v" * 100))
    s = _spill(tmp_path, max_bytes=3 * one)
    assert [s.append(b"k", b"v" * 100) for _ in range(4)] == [True, True, True, False]
    s.advance(s.end)
    s.reset()
    assert s.size == 0 and s.append(b"k", b"v" * 100)
    s.close()
    assert _spill(tmp_path).recovered == 1


def test_spill_path_is_exclusive(tmp_path) -> None:
    s = _spill(tmp_path)
    with pytest.raises(RuntimeError, match="in use"):
        _spill(tmp_path)
    s.close()
    _spill(tmp_path).close()


def test_dedup_window_remembers_the_newest_capacity_ids() -> None:
    ids = [TokenEvent.make_dummy(1, 1, 0).event_id for _ in range(6)]
    w = DedupWindow(capacity=4)
    assert [w.seen(i) for i in ids] == [False] * 6
    assert [w.seen(i) for i in ids[2:]] == [True] * 4  # the newest 4 ...
    assert not w.seen(ids[0])  # ... and the oldest was forgotten (and is now remembered again)
    restored = DedupWindow.from_bytes(w.to_bytes(), capacity=4)
    assert len(restored) == 4 and restored.seen(ids[0]) and restored.seen(ids[5])
    smaller = DedupWindow.from_bytes(w.to_bytes(), capacity=2)
    assert smaller.seen(ids[0]) and not smaller.seen(ids[3])
    with pytest.raises(ValueError):
        DedupWindow.from_bytes(b"DDW1\x05\x00\x00\x00" + b"x" * 16, 4)


@pytest.mark.parametrize("bad, field", [
    (dict(topic="has space"), "topic"), (dict(max_queue_events=0), "max_queue_events"),
    (dict(stall_timeout_s=0), "stall_timeout_s"), (dict(kafka_compression="brotli"), "kafka_compression"),
    (dict(linger_ms=-1), "linger_ms"),
])
def test_producer_config_names_the_bad_field(bad: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        ProducerConfig(**bad)


def test_consumer_config_and_urls_are_checked(tmp_path) -> None:
    with pytest.raises(ValueError, match="dedup_capacity"):
        ConsumerConfig(dedup_capacity=0)
    with pytest.raises(ValueError, match="group"):
        ConsumerConfig(group="")
    for url in ("redis://x", "kafka://", "file://host/path"):
        with pytest.raises(ValueError, match="url"):
            open_producer(url)
    with pytest.raises(ValueError, match="unknown file:// options"):
        open_consumer(f"file://{tmp_path}?color=red", group="g")
