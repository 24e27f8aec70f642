"""Redis coordination: drafter promotions, replica heartbeats, an optional shared blob.

Keys and channel (prefix defaults to "spectutor"; values are streams.schema envelopes):
    {prefix}:promotion:{drafter}   latest Promotion per drafter name (no TTL): the durable truth
    {prefix}:promotions            pub/sub channel carrying each Promotion: a fast nudge only,
                                   since pub/sub drops messages while a subscriber is disconnected
    {prefix}:heartbeat:{replica}   latest Heartbeat of a replica, expiring after heartbeat_ttl_s
    {prefix}:blob:{name}           opaque bytes (the shared Token Recycling matrix; format is the engine's)

Nothing here raises because Redis is down: each call returns a neutral value (False / None / []),
adds one to `redis_errors`, and for `retry_after_s` later calls skip Redis at once (counted in
`skipped`) so a dead server costs a caller microseconds, not socket timeouts. The first call after
that window tries again, so everything resumes by itself when Redis is back.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable, TypeVar

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from streams.schema import Heartbeat, Promotion, SchemaError, decode, encode

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class RedisConfig:
    """Where the keys live and how impatient the client is."""

    prefix: str = "spectutor"
    """Namespace of every key and channel."""
    socket_timeout_s: float = 0.5
    """Connect and read timeout of one call."""
    retry_after_s: float = 1.0
    """After a failed call, skip Redis this long before trying again."""
    heartbeat_ttl_s: float = 10.0
    """A replica whose heartbeat is older than this is considered gone."""

    def __post_init__(self) -> None:
        if not self.prefix or ":" in self.prefix:
            raise ValueError(f"prefix={self.prefix!r}: non-empty, without ':'")
        for name in ("socket_timeout_s", "heartbeat_ttl_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)}: must be > 0")
        if self.retry_after_s < 0:
            raise ValueError(f"retry_after_s={self.retry_after_s}: must be >= 0")


@dataclass(frozen=True)
class RedisStats:
    """Counters of the bus."""

    ok: int = 0  # calls that reached Redis
    redis_errors: int = 0  # calls that failed (connection, timeout, server error)
    skipped: int = 0  # calls not tried because Redis failed less than retry_after_s ago
    bad_messages: int = 0  # values that did not decode (another writer, another schema major)
    available: bool = True  # the last call reached Redis


class RedisBus:
    """Promotions, heartbeats and blobs over one Redis; never raises for Redis being unavailable."""

    def __init__(self, url: str, config: RedisConfig | None = None) -> None:
        self.config = config or RedisConfig()
        self.url = url
        timeout = self.config.socket_timeout_s
        # No client-side retries: a down server should fail this call now, the breaker does the rest.
        self._client = redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout,
                                            retry=Retry(NoBackoff(), 0), health_check_interval=0)
        self._lock = threading.Lock()
        self._down_until = 0.0
        self._n = dict(ok=0, redis_errors=0, skipped=0, bad_messages=0)
        self._available = True

    # ---- keys

    def _key(self, *parts: str) -> str:
        return ":".join((self.config.prefix, *parts))

    @property
    def promotions_channel(self) -> str:
        """The pub/sub channel promotions are announced on."""
        return self._key("promotions")

    # ---- the breaker

    def _call(self, what: str, fn: Callable[[redis.Redis], T], default: T) -> T:
        now = time.monotonic()
        with self._lock:
            if now < self._down_until:
                self._n["skipped"] += 1
                return default
        try:
            result = fn(self._client)
        except (redis.RedisError, OSError) as exc:
            with self._lock:
                self._n["redis_errors"] += 1
                self._down_until = time.monotonic() + self.config.retry_after_s
                if self._available:
                    log.warning("Redis %s unavailable (%s: %s); carrying on without it", self.url, what, exc)
                self._available = False
            return default
        with self._lock:
            self._n["ok"] += 1
            if not self._available:
                log.info("Redis %s is back", self.url)
            self._available = True
        return result

    def _decode(self, raw: bytes | None, cls: type[T]) -> T | None:
        if raw is None:
            return None
        try:
            msg = decode(raw)
        except SchemaError as exc:
            log.warning("ignoring an unreadable %s in Redis: %s", cls.__name__, exc)
            with self._lock:
                self._n["bad_messages"] += 1
            return None
        if not isinstance(msg, cls):
            with self._lock:
                self._n["bad_messages"] += 1
            return None
        return msg

    # ---- promotions

    def publish_promotion(self, promotion: Promotion) -> bool:
        """Store `promotion` as the drafter's latest and announce it; True if Redis took it."""
        data = encode(promotion)
        key = self._key("promotion", promotion.name)

        def run(r: redis.Redis) -> bool:
            pipe = r.pipeline(transaction=True)  # key and announcement together, or neither
            pipe.set(key, data)
            pipe.publish(self.promotions_channel, data)
            pipe.execute()
            return True

        return self._call("publish_promotion", run, False)

    def latest_promotion(self, name: str) -> Promotion | None:
        """The last promotion stored for drafter `name`, or None (none yet, or Redis down)."""
        raw = self._call("latest_promotion", lambda r: r.get(self._key("promotion", name)), None)
        return self._decode(raw, Promotion)

    # ---- heartbeats

    def heartbeat(self, beat: Heartbeat) -> bool:
        """Store a replica's load; it expires after heartbeat_ttl_s unless refreshed."""
        ttl_ms = int(self.config.heartbeat_ttl_s * 1000)
        return self._call("heartbeat", lambda r: bool(r.set(self._key("heartbeat", beat.replica_id), encode(beat),
                                                            px=ttl_ms)), False)

    def heartbeats(self) -> list[Heartbeat]:
        """Heartbeats of every live replica (the trainer reads load from these); [] if Redis is down."""

        def run(r: redis.Redis) -> list[bytes | None]:
            keys = list(r.scan_iter(match=self._key("heartbeat", "*"), count=500))
            return r.mget(keys) if keys else []

        beats = (self._decode(raw, Heartbeat) for raw in self._call("heartbeats", run, []))
        return sorted((b for b in beats if b is not None), key=lambda b: b.replica_id)

    # ---- blobs

    def put_blob(self, name: str, data: bytes, ttl_s: float | None = None) -> bool:
        """Store opaque bytes under `name` (optionally expiring); True if Redis took them."""
        px = int(ttl_s * 1000) if ttl_s else None
        return self._call("put_blob", lambda r: bool(r.set(self._key("blob", name), data, px=px)), False)

    def get_blob(self, name: str) -> bytes | None:
        """The bytes stored under `name`, or None (absent, or Redis down)."""
        return self._call("get_blob", lambda r: r.get(self._key("blob", name)), None)

    # ---- the rest

    def stats(self) -> RedisStats:
        """A snapshot of the counters."""
        with self._lock:
            return RedisStats(**self._n, available=self._available)

    def close(self) -> None:
        """Close the connection pool."""
        self._client.close()


class PromotionWatcher:
    """Calls `on_promotion(p)` once per new promotion of drafter `name`, on its own thread.

    The pub/sub channel makes it fast; reading the key every `poll_interval_s` makes it certain
    (pub/sub loses messages while disconnected). At start the current promotion, if any, is
    reported too. A promotion older (promoted_at) than the one last reported is ignored. The
    callback should hand work off quickly (the replica loads weights on its own thread).
    """

    def __init__(self, bus: RedisBus, name: str, on_promotion: Callable[[Promotion], None],
                 poll_interval_s: float = 5.0) -> None:
        self.bus, self.name, self.on_promotion = bus, name, on_promotion
        self.poll_interval_s = poll_interval_s
        self.current: Promotion | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"spectutor-promotions-{name}", daemon=True)
        self._thread.start()

    def _consider(self, p: Promotion | None) -> None:
        if p is None or p.name != self.name:
            return
        cur = self.current
        if cur is not None and (p.version == cur.version or p.promoted_at < cur.promoted_at):
            return
        self.current = p
        try:
            self.on_promotion(p)
        except Exception:  # noqa: BLE001 - a bad callback must not kill the watcher
            log.exception("promotion callback failed for %s v%s", p.name, p.version)

    def _subscribe(self) -> redis.client.PubSub | None:
        def run(r: redis.Redis) -> redis.client.PubSub:
            ps = r.pubsub(ignore_subscribe_messages=True)
            ps.subscribe(self.bus.promotions_channel)
            return ps

        return self.bus._call("subscribe", run, None)

    def _run(self) -> None:
        pubsub = None
        next_poll = 0.0
        while not self._stop.is_set():
            if time.monotonic() >= next_poll:
                # Poll first: a subscription opened after a promotion would never hear of it.
                self._consider(self.bus.latest_promotion(self.name))
                next_poll = time.monotonic() + self.poll_interval_s
            if pubsub is None:
                pubsub = self._subscribe()
                if pubsub is None:
                    self._stop.wait(min(0.5, self.poll_interval_s))
                    continue
            wait = max(0.0, min(0.5, next_poll - time.monotonic()))
            msg = self.bus._call("get_message", lambda _r: pubsub.get_message(timeout=wait), ...)
            if msg is ...:  # the subscription broke: resubscribe (and poll) once Redis answers
                pubsub.close()
                pubsub, next_poll = None, 0.0
                continue
            if msg and msg.get("type") == "message":
                self._consider(self.bus._decode(msg["data"], Promotion))
        if pubsub is not None:
            pubsub.close()

    def stop(self) -> None:
        """Stop watching (joins the thread)."""
        self._stop.set()
        self._thread.join(5)


class HeartbeatSender:
    """Sends `sample()` every interval_s on a thread until stopped; Redis outages only count."""

    def __init__(self, bus: RedisBus, sample: Callable[[], Heartbeat], interval_s: float = 2.0) -> None:
        if interval_s * 2 > bus.config.heartbeat_ttl_s:
            raise ValueError(f"interval_s={interval_s}: must be at most half of heartbeat_ttl_s "
                             f"({bus.config.heartbeat_ttl_s}) or live replicas flicker out")
        self.bus, self.sample, self.interval_s = bus, sample, interval_s
        self.sent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="spectutor-heartbeat", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                if self.bus.heartbeat(self.sample()):
                    self.sent += 1
            except Exception:  # noqa: BLE001 - a failing sampler must not stop the heartbeats
                log.exception("heartbeat sample failed")
            self._stop.wait(self.interval_s)

    def stop(self) -> None:
        """Stop sending (joins the thread)."""
        self._stop.set()
        self._thread.join(5)
