"""The Ray Serve app on a local Ray cluster (127.0.0.1, 2 CPUs) with the real Redis, Kafka and MLflow:
openai client, hot swap under load (>= 10 promotions, >= 200 requests at concurrency 8), a corrupt
promotion refused, events on Kafka, a replica killed mid-stream.

One Ray cluster and one Serve app for the module (2 engine replicas of a tiny Llama with the
SmolLM2 tokenizer); drafter versions are `save_draft` checkpoints registered in MLflow under a
fresh lineage name, promoted with trainer.lineage and announced on Redis.
"""
from __future__ import annotations

import asyncio
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Iterator

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
from test_serving_api import chat_model, target_alone  # noqa: E402

pytestmark = pytest.mark.integration

PORT = int(os.environ.get("SPECTUTOR_TEST_SERVE_PORT", "8765"))
URL = f"http://127.0.0.1:{PORT}"
METRICS_PORT = PORT + 1
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def stack(tmp_path_factory, services) -> Iterator[dict]:
    kafka, redis_url, mlflow_uri = (services["SPECTUTOR_KAFKA_BOOTSTRAP"], services["SPECTUTOR_REDIS_URL"],
                                    services["MLFLOW_TRACKING_URI"])
    import ray
    from ray import serve

    from drafters.draft_lm import draft_from_target, save_draft
    from serving.app import build_app
    from trainer.lineage import Lineage, promotion_message
    from streams.redis_bus import RedisBus

    root = tmp_path_factory.mktemp("serving")
    folder = chat_model(root / "target")
    lineage_name = f"spectutor-draft-it{uuid.uuid4().hex[:8]}"
    lineage = Lineage(mlflow_uri)
    # Version 1 is champion before the replicas start; more versions are promoted under load.
    versions = []
    for i in range(12):
        draft = draft_from_target(str(folder), 1)
        for j, p in enumerate(draft.parameters()):  # each version different weights, same shapes
            p.data.add_(0.001 * (i + 1) * ((j % 3) - 1))
        d = root / f"draft{i}"
        save_draft(draft, d, str(i))
        versions.append(lineage.register(lineage_name, d, alias="champion" if i == 0 else None))
    bus = RedisBus(redis_url)
    topic = f"spectutor.it-serving-{uuid.uuid4().hex[:8]}"
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False,
             _metrics_export_port=METRICS_PORT, runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    args = dict(model=str(folder), served_model_name="tiny", drafter="draft-lm", draft_layers=1, max_batch=8,
                max_len=128, speculation=3, calibrate=False, events_url=f"kafka://{kafka}", events_topic=topic,
                redis_url=redis_url, mlflow_uri=mlflow_uri, lineage=lineage_name, num_replicas=2, num_cpus=0.5,
                user_config={"poll_interval_s": 2.0}, download_dir=str(root / "downloads"))
    serve.run(build_app(args), name="spectutor", route_prefix="/", blocking=False)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{URL}/v1/models", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    handle = serve.get_deployment_handle("engine", app_name="spectutor")
    yield dict(folder=folder, lineage=lineage, lineage_name=lineage_name, versions=versions, bus=bus, topic=topic,
               handle=handle, kafka=kafka, promotion_message=promotion_message)
    serve.shutdown()
    ray.shutdown()
    bus.close()


def _infos(handle, n: int = 40) -> dict[str, dict]:
    """Replica info of both replicas by replica id."""
    from serving.app import replica_infos

    return replica_infos(handle, 2, n)


def _wait_version(handle, version: str, timeout_s: float = 60) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        infos = _infos(handle)
        if len(infos) == 2 and all(i["drafter_version"] == version for i in infos.values()):
            return True
        time.sleep(0.5)
    return False


def test_each_replica_runs_the_threads_its_cpus_give_and_says_which_kernels(stack):
    infos = _infos(stack["handle"])
    assert len(infos) == 2
    for info in infos.values():  # num_cpus 0.5 per replica: one torch thread (at least 1)
        assert info["threads"] == 1, info
        assert info["kernels"].startswith(("kernels default (", "kernels onednn (", "kernels avx2 (")), info


def test_openai_client_completions_chat_and_stream(stack):
    import openai

    assert _wait_version(stack["handle"], "1"), _infos(stack["handle"])  # the champion at start
    client = openai.OpenAI(base_url=f"{URL}/v1", api_key="unused", max_retries=0, timeout=60)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(stack["folder"]))
    chat_ids = tok.apply_chat_template([{"role": "user", "content": "hello"}], add_generation_prompt=True,
                                       tokenize=True, return_dict=False)
    ref_text, ref_chat = target_alone(stack["folder"], [tok.encode("Once upon"), list(chat_ids)], MAX_TOKENS)
    c = client.completions.create(model="tiny", prompt="Once upon", max_tokens=MAX_TOKENS, temperature=0)
    assert c.choices[0].text == tok.decode(ref_text, skip_special_tokens=True)
    assert c.usage.model_extra["speculative"]["drafter_version"] == "1"
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hello"}],
                                          max_tokens=MAX_TOKENS, temperature=0)
    assert chat.choices[0].message.content == tok.decode(ref_chat, skip_special_tokens=True)
    stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hello"}],
                                            max_tokens=MAX_TOKENS, temperature=0, stream=True)
    chunks = list(stream)
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == chat.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == MAX_TOKENS
    assert [m.id for m in client.models.list().data] == ["tiny"]
    r = httpx.post(f"{URL}/v1/completions", json={"model": "tiny", "prompt": "x", "temperature": 9})
    assert r.status_code == 422 and r.json()["error"]["param"] == "temperature"
    # Both replicas tell the trainer their load through Redis heartbeats.
    replicas = set(_infos(stack["handle"]))
    deadline = time.monotonic() + 10
    while not replicas <= {b.replica_id for b in stack["bus"].heartbeats()} and time.monotonic() < deadline:
        time.sleep(0.2)
    assert replicas <= {b.replica_id for b in stack["bus"].heartbeats()}


def test_hot_swap_under_load_fails_nothing_and_stays_exact(stack):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(stack["folder"]))
    prompts = [f"Request {i}: tell me about topic {i % 17}" for i in range(200)]
    refs = target_alone(stack["folder"], [tok.encode(p) for p in prompts], MAX_TOKENS)
    lineage, name, bus = stack["lineage"], stack["lineage_name"], stack["bus"]
    results: list[dict | BaseException] = [None] * len(prompts)  # type: ignore[list-item]

    async def one(http: httpx.AsyncClient, sem: asyncio.Semaphore, i: int) -> None:
        async with sem:
            try:
                r = await http.post("/v1/completions", json={"model": "tiny", "prompt": prompts[i],
                                                             "max_tokens": MAX_TOKENS, "temperature": 0})
                r.raise_for_status()
                results[i] = {**r.json(), "header_version": r.headers["x-drafter-version"]}
            except Exception as exc:  # noqa: BLE001 - counted below
                results[i] = exc

    async def promote_all() -> int:
        n = 0
        for k, v in enumerate(stack["versions"][1:11]):
            await asyncio.sleep(0.4)
            promoted = await asyncio.to_thread(lineage.promote, name, v.version)
            if k < 9:  # the last one is not announced: Redis stays silent, replicas find it by polling MLflow
                assert await asyncio.to_thread(bus.publish_promotion, stack["promotion_message"](promoted))
            n += 1
        return n

    async def run() -> int:
        sem = asyncio.Semaphore(8)
        async with httpx.AsyncClient(base_url=URL, timeout=120) as http:
            load = asyncio.gather(*(one(http, sem, i) for i in range(len(prompts))))
            promoted, _ = await asyncio.gather(promote_all(), load)
        return promoted

    promoted = asyncio.run(run())
    assert promoted == 10
    failed = [r for r in results if isinstance(r, BaseException)]
    assert not failed, failed[:3]
    for out, ref in zip(results, refs):
        assert out["choices"][0]["text"] == tok.decode(ref, skip_special_tokens=True)  # lossless across swaps
        assert out["usage"]["speculative"]["served_by"] and out["header_version"]
    # Per replica, the versions in step order never go backwards.
    by_replica: dict[str, list[tuple[int, int]]] = {}
    for out in results:
        spec = out["usage"]["speculative"]
        for seg in spec["served_by"]:
            by_replica.setdefault(spec["replica_id"], []).append((seg["first_step"], int(seg["version"])))
            by_replica[spec["replica_id"]].append((seg["last_step"], int(seg["version"])))
    assert len(by_replica) == 2
    for steps in by_replica.values():
        versions = [v for _, v in sorted(steps)]
        assert versions == sorted(versions)
    seen = {int(seg["version"]) for out in results for seg in out["usage"]["speculative"]["served_by"]}
    assert len(seen) >= 3  # swaps really happened while requests ran
    assert _wait_version(stack["handle"], str(stack["versions"][10].version))  # via the MLflow alias poll
    infos = _infos(stack["handle"])
    assert all(i["swap_failures"] == 0 for i in infos.values()), infos
    # Every finished request became one event on Kafka, off the request path.
    ids = {out["id"] for out in results}
    assert _consume_ids(stack, ids) == ids


def _consume_ids(stack, wanted: set[str], timeout_s: float = 60) -> set[str]:
    from streams import open_consumer

    consumer = open_consumer(f"kafka://{stack['kafka']}", group=f"it-{uuid.uuid4().hex[:6]}", topic=stack["topic"])
    got: set[str] = set()
    deadline = time.monotonic() + timeout_s
    try:
        while not wanted <= got and time.monotonic() < deadline:
            for d in consumer.poll():
                ev = getattr(d, "event", d)
                if ev.request_id in wanted:
                    got.add(ev.request_id)
                    assert all(ref.version.isdigit() or ref.version.startswith("cut") for ref in ev.drafters)
    finally:
        consumer.close()
    return got


def test_prometheus_metrics_are_exported(stack):
    """The replicas' metrics reach Ray's Prometheus endpoint under vLLM-like names."""
    wanted = ["ray_spectutor_spec_decode_num_draft_tokens", "ray_spectutor_spec_decode_num_accepted_tokens_per_pos",
              "ray_spectutor_drafter_swaps", "ray_spectutor_time_to_first_token_seconds_bucket",
              "ray_spectutor_num_requests_running", "ray_spectutor_drafter_version_info"]
    text = ""
    deadline = time.monotonic() + 40
    while time.monotonic() < deadline:
        try:
            text = httpx.get(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=5).text
        except httpx.HTTPError:
            text = ""
        if all(w in text for w in wanted):
            break
        time.sleep(1)
    assert all(w in text for w in wanted), [w for w in wanted if w not in text]


def test_corrupt_promotion_is_refused_and_counted(stack, tmp_path):
    from drafters.draft_lm import draft_from_target, save_draft

    lineage, name, bus = stack["lineage"], stack["lineage_name"], stack["bus"]
    before = {rid: i["swap_failures"] for rid, i in _infos(stack["handle"]).items()}
    serving_version = str(stack["versions"][10].version)
    d = tmp_path / "bad"
    save_draft(draft_from_target(str(stack["folder"]), 1), d, "bad")
    raw = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(raw[: len(raw) // 2])  # truncated: registered sha matches, load fails
    bad = lineage.register(name, d)
    promoted = lineage.promote(name, bad.version)
    assert bus.publish_promotion(stack["promotion_message"](promoted))
    deadline = time.monotonic() + 60
    infos = {}
    while time.monotonic() < deadline:
        infos = _infos(stack["handle"])
        if len(infos) == 2 and all(i["swap_failures"] > before.get(rid, 0) for rid, i in infos.items()):
            break
        time.sleep(0.5)
    assert all(i["swap_failures"] > before.get(rid, 0) for rid, i in infos.items()), infos
    assert all(i["drafter_version"] == serving_version for i in infos.values())
    r = httpx.post(f"{URL}/v1/completions", json={"model": "tiny", "prompt": "still fine", "max_tokens": 4,
                                                  "temperature": 0}, timeout=60)
    assert r.status_code == 200 and r.headers["x-drafter-version"] == serving_version
    lineage.promote(name, stack["versions"][10].version)  # leave a loadable champion behind


def test_client_disconnect_cancels_the_sequence_on_the_replica(stack):
    def aborted() -> int:
        return sum(i["aborted"] for i in _infos(stack["handle"]).values())

    before = aborted()
    with httpx.stream("POST", f"{URL}/v1/completions", timeout=60, json={
            "model": "tiny", "prompt": "never mind", "max_tokens": 110, "temperature": 0, "stream": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                break  # one chunk, then hang up: Serve cancels the router, the router cancels the replica
    deadline = time.monotonic() + 20
    while aborted() == before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert aborted() == before + 1


def test_replica_killed_mid_stream(stack):
    import ray

    async def stream_one(http: httpx.AsyncClient, i: int) -> tuple[str, list[str]]:
        lines: list[str] = []
        replica = ""
        try:
            async with http.stream("POST", "/v1/completions", json={
                    "model": "tiny", "prompt": f"long story {i}", "max_tokens": 120, "temperature": 0,
                    "stream": True}) as r:
                replica = r.headers.get("x-replica-id", "")
                async for line in r.aiter_lines():
                    if line:
                        lines.append(line)
        except httpx.HTTPError as exc:
            lines.append(f"transport error: {exc!r}")
        return replica, lines

    victim_info = next(iter(_infos(stack["handle"]).values()))
    victim = victim_info["replica_id"]
    actor_name = next(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                      if a["name"].startswith("SERVE_REPLICA::spectutor#engine#") and a["name"].endswith(
                          victim.rsplit("-", 1)[-1]))

    async def run() -> list[tuple[str, list[str]]]:
        async with httpx.AsyncClient(base_url=URL, timeout=120) as http:
            tasks = [asyncio.create_task(stream_one(http, i)) for i in range(8)]
            await asyncio.sleep(1.0)
            ray.kill(ray.get_actor(actor_name, namespace="serve"), no_restart=True)
            return await asyncio.gather(*tasks)

    outcomes = asyncio.run(run())
    killed = [lines for rid, lines in outcomes if rid == victim]
    others = [lines for rid, lines in outcomes if rid and rid != victim]
    assert killed and others, [rid for rid, _ in outcomes]
    for lines in killed:
        assert not any('"finish_reason":"length"' in l or '"finish_reason":"stop"' in l for l in lines)
        assert any('"error"' in l for l in lines), lines[-3:]
    for lines in others:
        assert lines[-1] == "data: [DONE]" and any('"finish_reason":"length"' in l for l in lines)
    # Serve replaces the replica.
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        infos = _infos(stack["handle"])
        if len(infos) == 2 and victim not in infos:
            break
        time.sleep(1)
    assert len(infos) == 2 and victim not in infos, infos
