"""The suffix feed against the real local Kafka broker and the embedded log: other replicas' outputs
reach this replica's shared suffix trie (seeded from what was published before it started, then
followed), its own are skipped, and the engine drafts the fed continuations.

    deploy/local/with-services.sh kafka -- .venv/bin/python -m pytest -q tests/integration/test_suffix_feed.py
"""
from __future__ import annotations

import os
import time
import uuid

import pytest
import torch

from drafters.base import DraftRequest
from drafters.controller import Controller
from drafters.lookup import PromptLookup
from drafters.suffix import SuffixDrafter, suffix_drafters
from moe.generate import SamplingParams
from moe.loader import load_model
from serving.engine import Engine, EngineConfig
from serving.service import EngineService
from serving.suffix_feed import SuffixFeed
from streams import TokenEvent, open_consumer, open_producer

pytestmark = pytest.mark.integration


@pytest.fixture(params=["kafka", "file"])
def url_topic(request, tmp_path) -> tuple[str, str]:
    topic = f"it-suffix-{uuid.uuid4().hex[:12]}"
    if request.param == "kafka":
        bootstrap = os.environ.get("SPECTUTOR_KAFKA_BOOTSTRAP")
        if not bootstrap:
            pytest.skip("SPECTUTOR_KAFKA_BOOTSTRAP is not set; run under deploy/local/with-services.sh kafka")
        from streams.kafka_consumer import ensure_topic

        ensure_topic(bootstrap, topic, partitions=2)
        return f"kafka://{bootstrap}", topic
    return f"file://{tmp_path}/log?partitions=2", topic


def _event(replica: str, seed: int, n: int = 24) -> TokenEvent:
    return TokenEvent.make_dummy(n, 2, 4, request_id=f"{replica}-{seed}", seed=seed, vocab=256, replica_id=replica)


def _wait(cond, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.1)


def test_other_replicas_outputs_reach_the_shared_trie(tiny_model, url_topic, tmp_path):
    url, topic = url_topic
    target = load_model(str(tiny_model("llama")), with_tokenizer=False).model
    suffix = SuffixDrafter(global_tokens=4096)
    service = EngineService(Engine(target, Controller([suffix, PromptLookup()]),
                                   EngineConfig(max_batch=2, max_len=128, speculation=8)))
    producer = open_producer(url, topic=topic, client_id="it-suffix", spill_path=str(tmp_path / "p.spill"))
    before = [_event("replica-b", s) for s in range(5)]   # published before the feed starts: the seed
    for ev in before + [_event("replica-a", 100)]:        # replica-a is this replica: skipped
        assert producer.publish(ev)
    producer.flush(30)
    feed = SuffixFeed(service, lambda: open_consumer(url, group=f"it-suffix-{uuid.uuid4().hex[:6]}", topic=topic,
                                                     session_timeout_s=3.0), "replica-a", poll_s=0.5)
    try:
        _wait(lambda: feed.stats.fed_tokens == 5 * 24)
        after = [_event("replica-c", s, 16) for s in range(200, 203)]  # published while it follows
        for ev in after:
            assert producer.publish(ev)
        producer.flush(30)
        _wait(lambda: feed.stats.fed_tokens == 5 * 24 + 3 * 16)
        assert feed.stats.own == 1 and feed.stats.events == 9 and feed.stats.failures == 0

        def probe(engine):
            [s] = suffix_drafters(engine.drafter)
            out = []
            for ev in before + after + [_event("replica-a", 100)]:
                ids = ev.output_ids.tolist()
                # A history that ends with the first 10 tokens of that output: the trie knows what came next.
                r = DraftRequest(0, [1, 2] + ids[:10], 8, SamplingParams(), torch.Generator())
                out.append((s.draft_for(r).tokens.tolist(), ids[10:18]))
                s.release(0)
            return s.global_tokens, out

        tokens, drafts = service.call(probe).result(timeout=30)
        assert tokens == 5 * 24 + 3 * 16           # every other replica's token, none of this one's
        for got, want in drafts[:-1]:
            assert got == want                     # fed outputs are drafted exactly
        assert drafts[-1][0] != drafts[-1][1]      # this replica's own event was not fed
    finally:
        feed.close()
        producer.close()
        service.close()


def test_the_feed_needs_suffix_tries_and_events():
    from serving.config import ServeConfig

    assert ServeConfig(drafter="auto", suffix_feed=True).suffix_feed
    with pytest.raises(ValueError, match="suffix_feed"):
        ServeConfig(drafter="prompt-lookup", suffix_feed=True)
    with pytest.raises(ValueError, match="suffix_feed"):
        ServeConfig(drafter="suffix", suffix_feed=True, events_url="")
