"""Other replicas' outputs into this replica's suffix tries: online adaptation with no gradient step.

A thread reads the token-event topic the trainer reads (its own consumer group, from the oldest
retained event: a replica that starts is seeded with what the fleet served, then follows it) and
hands the outputs of other replicas to the engine thread between two steps, where every suffix
drafter of the replica adds them to its shared trie. The replica's own outputs are already there
(they join at release), so its events are skipped. Only the most recent `keep_tokens` are kept
while catching up (the trie holds no more), and a hand-over carries at most `batch_tokens`, so a
long backlog never stalls a step for long. Nothing is committed: the feed holds no durable state,
and a restart seeds again from the topic.
"""
from __future__ import annotations

import logging
import threading
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

log = logging.getLogger(__name__)


@dataclass
class FeedStats:
    """Counters of the feed thread (plain values; read by tests and logs)."""

    events: int = 0          # events read from the topic
    own: int = 0             # of them, this replica's (skipped)
    dropped_tokens: int = 0  # older tokens dropped while catching up (past what the trie holds)
    fed_tokens: int = 0      # tokens handed to the suffix tries
    failures: int = 0        # polls or hand-overs that raised (retried)


class SuffixFeed:
    """Follows the token-event topic and feeds other replicas' outputs to `service`'s suffix drafters."""

    def __init__(self, service: Any, open_consumer: Callable[[], Any], replica_id: str,
                 keep_tokens: int = 16384, batch_tokens: int = 4096, poll_s: float = 1.0):
        if keep_tokens < 1 or batch_tokens < 1:
            raise ValueError(f"keep_tokens and batch_tokens must be >= 1, got {keep_tokens}, {batch_tokens}")
        self.service, self.replica_id = service, replica_id
        self.keep_tokens, self.batch_tokens, self.poll_s = keep_tokens, batch_tokens, poll_s
        self.stats = FeedStats()
        self._open = open_consumer
        self._pending: deque[list[int]] = deque()
        self._pending_tokens = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"suffix-feed-{replica_id}", daemon=True)
        self._thread.start()

    def close(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    # ---- the feed thread ---------------------------------------------------------------------------
    def _run(self) -> None:
        consumer = None
        while not self._stop.is_set():
            try:
                if consumer is None:
                    consumer = self._open()
                deliveries = consumer.poll(timeout_s=self.poll_s)
                for d in deliveries:
                    self._take(d.event)
                if self._pending and (not deliveries or self._pending_tokens >= self.keep_tokens):
                    self._hand_over()
            except Exception as exc:  # noqa: BLE001 - a broker outage or a closing service: retry
                self.stats.failures += 1
                log.warning("suffix feed: %r; retrying", exc)
                if consumer is not None:
                    try:
                        consumer.close()
                    except Exception:  # noqa: BLE001
                        pass
                    consumer = None
                self._stop.wait(min(5.0, self.poll_s * 2))
        if consumer is not None:
            consumer.close()

    def _take(self, event: Any) -> None:
        self.stats.events += 1
        if event.replica_id == self.replica_id:
            self.stats.own += 1
            return
        tokens = [int(t) for t in event.output_ids]
        if not tokens:
            return
        self._pending.append(tokens)
        self._pending_tokens += len(tokens)
        while self._pending_tokens - len(self._pending[0]) >= self.keep_tokens:
            old = self._pending.popleft()
            self._pending_tokens -= len(old)
            self.stats.dropped_tokens += len(old)

    def _hand_over(self) -> None:
        from drafters.suffix import suffix_drafters

        while self._pending and not self._stop.is_set():
            batch, n = [], 0
            while self._pending and n < self.batch_tokens:
                batch.append(self._pending.popleft())
                n += len(batch[-1])
            self._pending_tokens -= n

            def feed(engine: Any, outputs: list[list[int]] = batch) -> int:
                tries = suffix_drafters(engine.drafter)
                for out in outputs:
                    for s in tries:
                        s.add_output(out)
                return len(tries)

            self.service.call(feed).result(timeout=60)
            self.stats.fed_tokens += n
