"""The engine thread and its streams without HTTP: swaps between steps, engine failure mid-stream,
drafter checks, the metrics sink's formulas, config validation."""
from __future__ import annotations

import asyncio
from collections import defaultdict
from pathlib import Path

import pytest
import torch

from drafters.base import NoDrafter
from moe.generate import SamplingParams
from serving.config import ServeConfig, SwapPolicy
from serving.engine import Engine, EngineConfig, Request
from serving.service import Done, EngineService, Failed, Tokens


@pytest.fixture(scope="module")
def target(tiny_model):
    from moe.loader import load_model

    folder = tiny_model("llama")
    return folder, load_model(str(folder), with_tokenizer=False).model


def _draft(folder: Path, version: str):
    from drafters.draft_lm import DraftLMDrafter, draft_from_target

    return DraftLMDrafter(draft_from_target(str(folder), 1, max_len=256), version, max_batch=4, max_len=256)


async def _collect(service: EngineService, requests: list[Request], during=None) -> dict[str, list]:
    streams = [service.submit(r) for r in requests]
    out: dict[str, list] = defaultdict(list)
    if during is not None:
        await during()

    async def drain(s):
        while True:
            item = await s.get()
            out[s.request_id].append(item)
            if isinstance(item, (Done, Failed)):
                return

    await asyncio.gather(*(drain(s) for s in streams))
    return out


def test_swaps_land_between_steps_and_greedy_output_is_unchanged(target):
    folder, model = target
    prompts = [tuple(range(3 + i, 12 + i)) for i in range(4)]
    params = SamplingParams(max_new_tokens=24)
    plain = Engine(model, NoDrafter(), EngineConfig(max_batch=4, max_len=256, speculation=0))
    for i, p in enumerate(prompts):
        plain.add_request(Request(str(i), p, params))
    ref = {f.request_id: f.output_ids for f in plain.run_to_completion()}

    service = EngineService(Engine(model, _draft(folder, "1"), EngineConfig(max_batch=4, max_len=256,
                                                                             speculation=2)))
    try:
        async def swap_twice():
            for v in ("2", "3"):
                await asyncio.sleep(0.01)
                await asyncio.wrap_future(service.swap_drafter(lambda _cur, v=v: _draft(folder, v)))

        out = asyncio.run(_collect(service, [Request(str(i), p, params) for i, p in enumerate(prompts)],
                                   swap_twice))
    finally:
        service.close()
    pairs = []
    for rid, items in out.items():
        done = items[-1]
        assert isinstance(done, Done)
        assert done.finished.output_ids == ref[rid]                      # lossless across swaps
        assert sum(len(i.tokens) for i in items if isinstance(i, Tokens)) == len(ref[rid])
        assert len(done.step_numbers) == len(done.finished.steps)
        pairs += [(n, int(s.drafter_version)) for n, s in zip(done.step_numbers, done.finished.steps)]
    versions = [v for _, v in sorted(pairs)]
    assert versions == sorted(versions) and versions[-1] == 3            # never backwards, swaps happened


class _Exploding(NoDrafter):
    name, version = "boom", "9"

    def budgets(self):
        return (1,)

    def propose(self, requests):
        raise RuntimeError("drafter exploded")


def test_engine_failure_ends_streams_with_an_error_chunk_and_later_requests_get_503(target):
    from serving.openai_api import Completer, Head

    folder, model = target

    class Tok:
        def encode(self, text):
            return [ord(c) % 200 + 1 for c in text]

        def decode(self, ids, skip_special_tokens=True):
            return "".join(chr(65 + i % 26) for i in ids)

    service = EngineService(Engine(model, NoDrafter(), EngineConfig(max_batch=2, max_len=256, speculation=1)))
    completer = Completer(service, Tok(), "tiny")

    async def run():
        gen = completer.generate("completion", {"model": "tiny", "prompt": "abc", "max_tokens": 200,
                                                "temperature": 0, "stream": True})
        head = await gen.__anext__()
        lines = [await gen.__anext__()]
        service.swap_drafter(lambda _cur: _Exploding())  # the next step raises inside the engine
        async for line in gen:
            lines.append(line)
        later = [x async for x in completer.generate("completion", {"model": "tiny", "prompt": "abc"})]
        return head, lines, later

    try:
        head, lines, later = asyncio.run(run())
    finally:
        service.close()
    assert isinstance(head, Head) and head.status == 200
    assert '"error"' in lines[-2] and lines[-1] == "data: [DONE]\n\n"
    assert not any('"finish_reason":"' in line for line in lines)
    assert later[0].status == 503 and later[0].body["error"]["code"] == "engine_failed"
    assert not service.alive


def test_check_drafter_refuses_non_finite_weights(target):
    from serving.swap import SwapRefused, check_drafter

    folder, _ = target
    good = _draft(folder, "1")
    check_drafter(good, 256)
    bad = _draft(folder, "2")
    with torch.no_grad():
        next(bad.model.parameters()).view(-1)[0] = float("nan")
    with pytest.raises(SwapRefused, match="non-finite"):
        check_drafter(bad, 256)
    with pytest.raises(SwapRefused, match="outside"):
        check_drafter(good, 8)  # a drafter whose tokens fall outside the target's vocabulary


def test_metrics_sink_follows_vllm_formulas():
    from serving.metrics import MetricsSink
    from serving.service import ServiceStats

    class Metric:
        def __init__(self, name, description="", tag_keys=(), boundaries=None):
            self.name, self.values = name, defaultdict(float)

        def inc(self, v=1.0, tags=None):
            self.values[tuple(sorted((tags or {}).items()))] += v

        def set(self, v, tags=None):
            self.values[tuple(sorted((tags or {}).items()))] = v

        def observe(self, v, tags=None):
            self.values[()] += 1

    class Module:
        Counter = Gauge = Histogram = Metric

    st = ServiceStats(drafts=10, draft_tokens=30, accepted_tokens=12, accepted_per_position=[7, 4, 1],
                      output_tokens=22, finished=3, by_drafter={"suffix": [6, 20, 10], "prompt-lookup": [4, 10, 2]})
    st.latencies.extend([(0.1, 0.01, 8), (0.2, None, 1)])
    sink = MetricsSink(lambda: {**{k: getattr(st, k) for k in ("drafts", "draft_tokens", "accepted_tokens",
                                                                 "output_tokens", "finished", "aborted", "rejected",
                                                                 "failed", "running", "waiting")},
                                "accepted_per_position": list(st.accepted_per_position), "swaps": 2,
                                "by_drafter": {k: list(v) for k, v in st.by_drafter.items()},
                                "swap_failures": 1, "drafter_version": "4", "event_drops": 0},
                       lambda: [st.latencies.popleft() for _ in range(len(st.latencies))], Module, "draft")
    sink.update()
    per_pos = {dict(k)["position"]: v for k, v in sink.per_pos.values.items()}
    assert sum(per_pos.values()) == sink.counters["spec_decode_num_accepted_tokens"].values[()] == 12
    assert sink.mean_acceptance.values[()] == pytest.approx(1 + 12 / 10)
    assert sink.version_info.values[(("drafter", "draft"), ("version", "4"))] == 1
    assert sink.ttft.values[()] == 2 and sink.tpot.values[()] == 1
    per_drafter = sink.per_drafter[2].values  # accepted tokens, per drafter
    assert per_drafter[(("drafter", "suffix"),)] == 10 and per_drafter[(("drafter", "prompt-lookup"),)] == 2
    st.accepted_tokens += 3
    st.accepted_per_position[0] += 3
    st.by_drafter["suffix"][2] += 3
    delta = sink.update()
    assert delta["accepted_tokens"] == 3 and sink.counters["spec_decode_num_accepted_tokens"].values[()] == 15
    assert delta["by_drafter"] == {"suffix": [0, 0, 3], "prompt-lookup": [0, 0, 0]}
    assert per_drafter[(("drafter", "suffix"),)] == 13


def test_configs_name_the_bad_field():
    assert SwapPolicy.from_dict({"pinned_version": 3}).pinned_version == 3
    with pytest.raises(ValueError, match="pinned_version"):
        SwapPolicy.from_dict({"pinned_version": 0})
    with pytest.raises(ValueError, match="poll_intervall_s"):
        SwapPolicy.from_dict({"poll_intervall_s": 1})
    with pytest.raises(ValueError, match="max_batch"):
        ServeConfig.from_dict({"max_batch": 0})
    cfg = ServeConfig.from_dict({"policy": {"speculation": 0}})
    assert cfg.policy.speculation == 0


class _Registry:
    """An in-memory stand-in for trainer.lineage.Lineage over real save_draft folders (the MLflow
    path itself is exercised in tests/integration/test_serving_app.py)."""

    def __init__(self, folders: dict[int, Path]):
        from trainer.lineage import DrafterVersion, weights_sha256

        self.folders = folders
        self.versions = {v: DrafterVersion("lin", v, str(f), weights_sha256(f)) for v, f in folders.items()}
        self.champion: int | None = None

    def get(self, name, version):
        return self.versions[version]

    def by_alias(self, name, alias="champion"):
        return self.versions.get(self.champion)

    def fetch(self, v, dest_root):
        return self.folders[v.version]


def test_swapper_follows_the_alias_obeys_a_pin_and_refuses_a_corrupt_version_once(target, tmp_path):
    from drafters.draft_lm import DraftLMDrafter, draft_from_target, load_draft, save_draft
    from serving.swap import DrafterLoader, DrafterSwapper

    folder, model = target
    folders = {}
    for v in (1, 2, 3):
        folders[v] = tmp_path / f"v{v}"
        save_draft(draft_from_target(str(folder), 1), folders[v], str(v))
    raw = (folders[3] / "model.safetensors").read_bytes()
    (folders[3] / "model.safetensors").write_bytes(raw[: len(raw) // 3])  # corrupt, but its sha is "registered"
    registry = _Registry(folders)
    registry.champion = 1

    def build(f, version):
        return DraftLMDrafter(load_draft(f, max_len=256)[0], version, max_batch=2, max_len=256)

    service = EngineService(Engine(model, NoDrafter(), EngineConfig(max_batch=2, max_len=256, speculation=2)))
    swapper = DrafterSwapper(service, DrafterLoader(registry, tmp_path / "dl", build, 256), "lin",
                             SwapPolicy(poll_interval_s=30))
    try:
        assert swapper.wait_idle()
        assert service.drafter.version == "1" and swapper.stats.swaps == 1
        swapper.on_promotion(type("P", (), {"version": "2", "sha256": registry.versions[2].sha256})())
        assert swapper.wait_idle() and service.drafter.version == "2"
        swapper.set_policy(SwapPolicy(pinned_version=1, poll_interval_s=30))  # emergency pin: back to v1
        assert swapper.wait_idle() and service.drafter.version == "1"
        swapper.on_promotion(type("P", (), {"version": "2", "sha256": registry.versions[2].sha256})())
        assert swapper.wait_idle() and service.drafter.version == "1"  # pinned: promotions wait
        swapper.set_policy(SwapPolicy(poll_interval_s=30))
        registry.champion = 3
        swapper.poll_now()
        swapper.poll_now()
        assert swapper.wait_idle()
        assert service.drafter.version == "1" and swapper.stats.failures == 1  # refused once, not per poll
        assert "cannot load" in swapper.stats.last_error
        wrong_sha = type("P", (), {"version": "2", "sha256": "0" * 64})()
        swapper.on_promotion(wrong_sha)
        assert swapper.wait_idle() and service.drafter.version == "1" and swapper.stats.failures == 2
        registry.champion = 2
        swapper.poll_now()  # a bad message did not blacklist the good version it named
        assert swapper.wait_idle() and service.drafter.version == "2"
    finally:
        swapper.close()
        service.close()


def test_with_redis_down_promotions_arrive_by_polling_the_registry(target, tmp_path):
    import socket
    import time

    from drafters.draft_lm import DraftLMDrafter, draft_from_target, load_draft, save_draft
    from serving.swap import DrafterLoader, DrafterSwapper
    from streams.redis_bus import RedisBus, RedisConfig

    with pytest.raises(ValueError, match="domain_lineages"):
        ServeConfig.from_dict({"domain_lineages": {"code": ""}})
    assert ServeConfig.from_dict({"domain_lineages": {"code": "x"}}).domain_lineages == {"code": "x"}
    folder, model = target
    folders = {}
    for v in (1, 2):
        folders[v] = tmp_path / f"v{v}"
        save_draft(draft_from_target(str(folder), 1), folders[v], str(v))
    registry = _Registry(folders)
    registry.champion = 1
    with socket.socket() as s:  # a port nothing listens on: Redis is down
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    bus = RedisBus(f"redis://127.0.0.1:{dead}/0", RedisConfig(socket_timeout_s=0.1))

    def build(f, version):
        return DraftLMDrafter(load_draft(f, max_len=256)[0], version, max_batch=2, max_len=256)

    service = EngineService(Engine(model, NoDrafter(), EngineConfig(max_batch=2, max_len=256, speculation=2)))
    swapper = DrafterSwapper(service, DrafterLoader(registry, tmp_path / "dl", build, 256), "lin",
                             SwapPolicy(poll_interval_s=0.3), bus=bus)
    try:
        assert swapper.wait_idle() and service.drafter.version == "1"
        registry.champion = 2  # promoted in the registry; no message can arrive
        deadline = time.monotonic() + 10
        while service.drafter.version != "2" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert service.drafter.version == "2" and swapper.stats.failures == 0
        assert bus.stats().redis_errors > 0
    finally:
        swapper.close()
        service.close()
        bus.close()


def test_per_domain_lineages_swap_only_their_domain(target, tmp_path):
    """ServeConfig.domain_lineages: one swapper per domain lineage, each replacing its domain's drafter."""
    from drafters.by_domain import DomainDrafter
    from drafters.draft_lm import DraftLMDrafter, draft_from_target, load_draft, save_draft
    from serving.swap import DrafterLoader, DrafterSwapper

    with pytest.raises(ValueError, match="domain_lineages"):
        ServeConfig.from_dict({"domain_lineages": {"code": ""}})
    assert ServeConfig.from_dict({"domain_lineages": {"code": "x"}}).domain_lineages == {"code": "x"}
    folder, model = target
    folders = {}
    for v in (1, 2):
        folders[v] = tmp_path / f"v{v}"
        save_draft(draft_from_target(str(folder), v), folders[v], str(v))
    general, code = _Registry({1: folders[1]}), _Registry({2: folders[2]})
    general.champion, code.champion = 1, 2

    def build(f, version):
        return DraftLMDrafter(load_draft(f, max_len=256)[0], version, max_batch=4, max_len=256)

    prompts = {"c": (tuple(range(5, 14)), "code"), "g": (tuple(range(7, 16)), None), "o": (tuple(range(9, 18)), "chat")}
    params = SamplingParams(max_new_tokens=12)
    plain = Engine(model, NoDrafter(), EngineConfig(max_batch=4, max_len=256, speculation=0))
    for rid, (p, _) in prompts.items():
        plain.add_request(Request(rid, p, params))
    ref = {f.request_id: f.output_ids for f in plain.run_to_completion()}

    service = EngineService(Engine(model, DomainDrafter(NoDrafter()),
                                   EngineConfig(max_batch=4, max_len=256, speculation=2)))
    policy = SwapPolicy(poll_interval_s=30)
    swappers = [DrafterSwapper(service, DrafterLoader(general, tmp_path / "dl", build, 256), "lin", policy),
                DrafterSwapper(service, DrafterLoader(code, tmp_path / "dl2", build, 256), "lin-code", policy,
                               domain="code")]
    try:
        assert all(s.wait_idle() for s in swappers)
        assert service.drafter.version == "default=1,code=2"
        out = asyncio.run(_collect(service, [Request(r, p, params, domain=d) for r, (p, d) in prompts.items()]))
        for rid, items in out.items():
            fin = items[-1].finished
            assert fin.output_ids == ref[rid], rid
            want = "2" if prompts[rid][1] == "code" else "1"
            assert {s.drafter_version for s in fin.steps} == {want}, rid
    finally:
        for s in swappers:
            s.close()
        service.close()


def test_unlabelled_requests_are_routed_by_the_router_the_trainer_published(target):
    """RouterFromBus loads the trainer's Redis blob off the request path; the Completer uses it only
    when a request has no metadata.domain. (The blob's trip through real Redis is the streams tests'.)"""
    from serving.openai_api import CompletionRequest, Completer
    from serving.service import RouterFromBus
    from trainer.router import Router, Rule

    class Bus:
        blobs: dict[str, bytes] = {}

        def get_blob(self, name):
            return self.blobs.get(name)

    _, model = target
    bus = Bus()
    holder = RouterFromBus(bus, refresh_s=3600)
    try:
        assert holder((5, 6)) is None  # nothing published yet: the general drafter
        bus.blobs["router"] = b"{not json"
        holder.refresh()
        assert holder.errors == 1 and holder.router is None
        bus.blobs["router"] = Router([Rule("code", frozenset({5}))]).to_json().encode()
        holder.refresh()
        assert holder.loads == 1 and holder((5, 6)) == "code" and holder((7, 8)) is None
        service = EngineService(Engine(model, NoDrafter(), EngineConfig(max_batch=2, max_len=256, speculation=0)))
        try:
            completer = Completer(service, None, "tiny", route=holder)
            routed = completer._engine_request("completion", CompletionRequest(model="tiny", prompt=[5, 6, 7]), "a")
            labelled = completer._engine_request(
                "completion", CompletionRequest(model="tiny", prompt=[5, 6], metadata={"domain": "chat"}), "b")
            other = completer._engine_request("completion", CompletionRequest(model="tiny", prompt=[7, 8]), "c")
            assert (routed.domain, labelled.domain, other.domain) == ("code", "chat", None)
        finally:
            service.close()
    finally:
        holder.close()


@pytest.mark.parametrize("interval", [1, 4])
def test_stream_interval_groups_tokens_per_chunk_and_loses_none(target, interval):
    """A chunk once `interval` tokens are ready (the first never held): with plain decoding, one
    token per step, 13 tokens make 1 + ceil(12 / interval) content chunks, and their text is the
    non-streamed completion's."""
    import json

    from serving.openai_api import Completer

    _, model = target

    class Tok:
        def decode(self, ids, skip_special_tokens=True):
            return "".join(chr(65 + i % 26) for i in ids)

    service = EngineService(Engine(model, NoDrafter(), EngineConfig(max_batch=2, max_len=256, speculation=0)))
    completer = Completer(service, Tok(), "tiny", stream_interval=interval)
    body = {"model": "tiny", "prompt": [5, 6, 7], "max_tokens": 13, "temperature": 0}

    async def run():
        lines = [x async for x in completer.generate("completion", {**body, "stream": True})][1:]
        whole = [x async for x in completer.generate("completion", body)][0].body
        return lines, whole

    try:
        lines, whole = asyncio.run(run())
    finally:
        service.close()
    chunks = [json.loads(line[len("data: "):]) for line in lines if line != "data: [DONE]\n\n"]
    texts = [c["choices"][0]["text"] for c in chunks if c.get("choices") and c["choices"][0]["finish_reason"] is None]
    assert len(texts) == 1 + -(-12 // interval)
    assert "".join(c["choices"][0]["text"] for c in chunks if c.get("choices")) == whole["choices"][0]["text"]
    assert len(whole["choices"][0]["text"]) == 13
