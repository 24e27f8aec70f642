"""Redis coordination against real Redis: promotions (key + channel + watcher), heartbeats with
TTL, blobs, and an outage that callers never notice except in a counter.

The shared Redis at SPECTUTOR_REDIS_URL serves the happy paths (keys under a unique prefix). The
outage test stops and restarts a private redis-server on a free loopback port, so the shared one
(and anything else using it) is never disturbed.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import uuid
from typing import Callable, Iterator

import pytest
import redis

from streams.redis_bus import HeartbeatSender, PromotionWatcher, RedisBus, RedisConfig
from streams.schema import Heartbeat, Promotion

pytestmark = pytest.mark.integration


def _wait_for(cond: Callable[[], bool], timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


@pytest.fixture
def bus() -> Iterator[RedisBus]:
    url = os.environ.get("SPECTUTOR_REDIS_URL")
    if not url:
        pytest.skip("SPECTUTOR_REDIS_URL is not set (no Redis configured); run under deploy/local/with-services.sh redis")
    prefix = f"it{uuid.uuid4().hex[:10]}"
    b = RedisBus(url, RedisConfig(prefix=prefix, heartbeat_ttl_s=1.0))
    yield b
    client = redis.Redis.from_url(url)
    keys = list(client.scan_iter(match=f"{prefix}:*"))
    if keys:
        client.delete(*keys)
    client.close()
    b.close()
    assert b.stats().redis_errors == 0


def test_promotion_is_stored_announced_and_watched(bus: RedisBus) -> None:
    first = Promotion("drafter-a", "3", "models:/drafter-a/3", "a" * 64)
    assert bus.publish_promotion(first)
    seen: list[Promotion] = []
    watcher = PromotionWatcher(bus, "drafter-a", seen.append, poll_interval_s=30.0)
    try:
        assert _wait_for(lambda: len(seen) == 1)  # the current champion, read from the key at start
        # The next one arrives over pub/sub: the poll interval is far longer than the wait.
        second = Promotion("drafter-a", "4", "models:/drafter-a/4", "b" * 64)
        other = Promotion("drafter-b", "9", "models:/drafter-b/9", "c" * 64)
        client = redis.Redis.from_url(bus.url)
        assert _wait_for(lambda: client.pubsub_numsub(bus.promotions_channel)[0][1] >= 1)  # watcher subscribed
        client.close()
        assert bus.publish_promotion(other) and bus.publish_promotion(second)
        assert _wait_for(lambda: len(seen) == 2, timeout_s=5.0)
        assert [p.version for p in seen] == ["3", "4"]
        assert bus.latest_promotion("drafter-a") == second
        assert bus.latest_promotion("drafter-b") == other
        assert bus.latest_promotion("nobody") is None
    finally:
        watcher.stop()


def test_heartbeats_list_live_replicas_and_expire(bus: RedisBus) -> None:
    assert bus.heartbeat(Heartbeat("r-1", running=3, tokens_per_s=24.6, queue_depth=1))
    sender = HeartbeatSender(bus, lambda: Heartbeat("r-2", running=0, tokens_per_s=0.0, queue_depth=0), interval_s=0.2)
    try:
        assert _wait_for(lambda: [h.replica_id for h in bus.heartbeats()] == ["r-1", "r-2"])
        # r-1 stops beating: gone after the 1 s TTL; r-2 keeps beating and stays.
        assert _wait_for(lambda: [h.replica_id for h in bus.heartbeats()] == ["r-2"], timeout_s=3.0)
    finally:
        sender.stop()
    assert bus.heartbeats()[0].running == 0


def test_blob_round_trip(bus: RedisBus) -> None:
    matrix = os.urandom(256 * 1024)
    assert bus.put_blob("token-recycling", matrix)
    assert bus.get_blob("token-recycling") == matrix
    assert bus.get_blob("absent") is None


# ------------------------------------------------------------------------------------ outage


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class PrivateRedis:
    """A throwaway redis-server on a loopback port, stopped and started by the test."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=self.port)
        assert _wait_for(lambda: self._pings(client)), "private redis-server did not start"
        client.close()

    @staticmethod
    def _pings(client: redis.Redis) -> bool:
        try:
            return bool(client.ping())
        except redis.ConnectionError:
            return False

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None


def test_redis_down_nothing_raises_and_everything_resumes() -> None:
    if not shutil.which("redis-server"):
        pytest.skip("redis-server is not installed (make system-deps)")
    server = PrivateRedis(_free_port())
    server.start()
    bus = RedisBus(f"redis://127.0.0.1:{server.port}/0", RedisConfig(retry_after_s=0.2, heartbeat_ttl_s=5.0))
    seen: list[Promotion] = []
    watcher = PromotionWatcher(bus, "d", seen.append, poll_interval_s=0.5)
    beat = Heartbeat("r-1", running=1, tokens_per_s=10.0, queue_depth=0)
    try:
        assert bus.publish_promotion(Promotion("d", "1", "u", "s")) and bus.heartbeat(beat)
        assert _wait_for(lambda: [p.version for p in seen] == ["1"])

        server.stop()
        t0 = time.perf_counter()
        results = [bus.publish_promotion(Promotion("d", "2", "u", "s")), bus.heartbeat(beat),
                   bus.latest_promotion("d"), bus.heartbeats(), bus.put_blob("m", b"x"), bus.get_blob("m")]
        assert time.perf_counter() - t0 < 1.0  # refused at once, or skipped by the breaker
        assert results == [False, False, None, [], False, None]
        stats = bus.stats()
        assert stats.redis_errors >= 1 and not stats.available
        time.sleep(1.0)  # the watcher keeps trying against a dead server without raising

        server.start()
        assert _wait_for(lambda: bus.heartbeat(beat), timeout_s=5.0)
        assert bus.publish_promotion(Promotion("d", "3", "u", "s"))
        assert _wait_for(lambda: [p.version for p in seen] == ["1", "3"], timeout_s=5.0)
        assert [h.replica_id for h in bus.heartbeats()] == ["r-1"]
        assert bus.stats().available
    finally:
        watcher.stop()
        bus.close()
        server.stop()
