"""The OpenAI HTTP edge in-process (no Ray): a tiny Llama with the SmolLM2 tokenizer behind real
HTTP (uvicorn on loopback), driven by the unchanged openai client; bad input; disconnects; overload.

`chat_model(folder)` is shared with tests/integration/test_serving_app.py.
"""
from __future__ import annotations

import asyncio
import json
import shutil
import socket
import threading
import time
from pathlib import Path
from typing import Iterator

import httpx
import pytest
import torch

MAX_LEN = 128


def chat_model(folder: Path, seed: int = 0) -> Path:
    """A tiny random Llama with SmolLM2's tokenizer and chat template (vocabulary 49152)."""
    import transformers

    from moe.loader import DEFAULT_MODEL, resolve_model

    src = resolve_model(DEFAULT_MODEL)
    cfg = transformers.LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   initializer_range=0.2, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (src / name).exists():
            shutil.copy(src / name, folder / name)
    return folder


def target_alone(folder: Path, prompts: list[list[int]], max_tokens: int, max_len: int = MAX_LEN) -> list[list[int]]:
    """Greedy output ids of the target with no drafter (plain decoding through the same engine)."""
    from drafters.base import NoDrafter
    from moe.generate import SamplingParams
    from moe.loader import load_model
    from serving.engine import Engine, EngineConfig, Request

    loaded = load_model(str(folder))
    engine = Engine(loaded.model, NoDrafter(), EngineConfig(max_batch=4, max_len=max_len, speculation=0),
                    loaded.eos_token_ids)
    for i, ids in enumerate(prompts):
        engine.add_request(Request(str(i), tuple(ids), SamplingParams(max_new_tokens=max_tokens)))
    done = {f.request_id: list(f.output_ids) for f in engine.run_to_completion()}
    return [done[str(i)] for i in range(len(prompts))]


class Server:
    """uvicorn serving an ASGI app on a free loopback port, in a thread."""

    def __init__(self, app):
        import uvicorn

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.02)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> Path:
    return chat_model(tmp_path_factory.mktemp("chat"))


@pytest.fixture(scope="module")
def replica(model_folder: Path):
    from serving.config import ServeConfig
    from serving.service import Replica

    r = Replica(ServeConfig(model=str(model_folder), served_model_name="tiny", drafter="draft-lm", draft_layers=1,
                            max_batch=4, max_len=MAX_LEN, max_waiting=16, speculation=3, calibrate=False,
                            default_max_tokens=8,
                            events_url="", redis_url="", mlflow_uri=""))
    yield r
    r.close()


@pytest.fixture(scope="module")
def server(replica) -> Iterator[Server]:
    from serving.openai_api import build_app

    s = Server(build_app(replica.completer, "tiny"))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server: Server):
    import openai

    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


def test_completions_chat_and_streams_are_token_identical_to_the_target_alone(client, replica, model_folder):
    tok = replica.loaded.tokenizer
    prompt = "The quick brown fox"
    chat_ids = tok.apply_chat_template([{"role": "user", "content": "Say hi"}], add_generation_prompt=True,
                                       tokenize=True, return_dict=False)
    ref_completion, ref_chat = target_alone(model_folder, [tok.encode(prompt), list(chat_ids)], 12)

    c = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0)
    assert c.choices[0].text == tok.decode(ref_completion, skip_special_tokens=True)
    assert c.usage.completion_tokens == len(ref_completion)
    spec = c.usage.model_extra["speculative"]
    assert spec["drafter"] == "draft-lm" and spec["drafter_version"] == "cut-1"
    assert spec["draft_tokens"] > 0 and 0 <= spec["accepted_tokens"] <= spec["draft_tokens"]
    assert spec["mean_accepted_length"] == pytest.approx(len(ref_completion) / spec["steps"], abs=1e-3)

    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Say hi"}],
                                          max_tokens=12, temperature=0)
    assert chat.choices[0].message.content == tok.decode(ref_chat, skip_special_tokens=True)
    assert chat.system_fingerprint.endswith("drf-cut-1")

    chunks = list(client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Say hi"}],
                                                 max_tokens=12, temperature=0, stream=True))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == chat.choices[0].message.content
    finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finishes == ["length"]
    assert len({ch.id for ch in chunks}) == 1
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12  # the final usage chunk

    with client.completions.with_streaming_response.create(model="tiny", prompt=prompt, max_tokens=12,
                                                           temperature=0, stream=True) as raw:
        assert raw.headers["x-drafter-version"] == "cut-1"
        lines = [line for line in raw.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    streamed = "".join(json.loads(l[6:])["choices"][0]["text"] for l in lines[:-1] if json.loads(l[6:])["choices"])
    assert streamed == c.choices[0].text


def test_models_and_health(client, server):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    r = httpx.get(f"{server.url}/v1/models/other")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_concurrent_requests_are_decoded_together_and_stay_exact(server, replica, model_folder):
    tok = replica.loaded.tokenizer
    prompts = [f"Story number {i} begins" for i in range(6)]
    refs = target_alone(model_folder, [tok.encode(p) for p in prompts], 16)
    steps_before = replica.service.stats.steps

    async def run() -> list[dict]:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:
            rs = await asyncio.gather(*(http.post("/v1/completions", json={
                "model": "tiny", "prompt": p, "max_tokens": 16, "temperature": 0}) for p in prompts))
        return [r.json() for r in rs]

    outs = asyncio.run(run())
    for out, ref in zip(outs, refs):
        assert out["choices"][0]["text"] == tok.decode(ref, skip_special_tokens=True)
    per_request = sum(o["usage"]["speculative"]["steps"] for o in outs)
    # Batched: the engine took far fewer steps than the requests' steps added up.
    assert replica.service.stats.steps - steps_before < per_request * 0.75


@pytest.mark.parametrize("body,status,param", [
    ({"model": "tiny"}, 422, "prompt"),
    ({"model": "tiny", "prompt": "x", "max_tokens": 0}, 422, "max_tokens"),
    ({"model": "tiny", "prompt": "x", "temperature": -1}, 422, "temperature"),
    ({"model": "tiny", "prompt": "x", "top_p": 0}, 422, "top_p"),
    ({"model": "tiny", "prompt": "x", "n": 5}, 422, "n"),
    ({"model": "tiny", "prompt": "x", "stream": "yes"}, 422, "stream"),
    ({"model": "tiny", "prompt": "x", "seed": 2**70}, 422, "seed"),
    ({"model": "tiny", "prompt": "x", "stop": ["", "a"]}, 422, "stop"),
    ({"model": "tiny", "prompt": "x", "speculate": "no"}, 422, "speculate"),
    ({"model": "nope", "prompt": "x"}, 404, "model"),
    ({"model": "tiny", "prompt": []}, 400, "prompt"),
    ({"model": "tiny", "prompt": [1, 2, 10**9]}, 400, "prompt"),
    ({"model": "tiny", "prompt": ["a", "b"]}, 400, "prompt"),
    ({"model": "tiny", "prompt": "word " * 400}, 400, "prompt"),
])
def test_bad_completion_bodies_get_openai_errors(server, body, status, param):
    r = httpx.post(f"{server.url}/v1/completions", json=body, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert param in (err["param"] or "") or param in err["message"]


def test_bad_bodies_of_other_kinds(server):
    url = f"{server.url}/v1/chat/completions"
    assert httpx.post(url, content=b"{not json", headers={"content-type": "application/json"}).status_code == 400
    assert httpx.post(url, content=b"\xff\xfe{}", headers={"content-type": "application/json"}).status_code in (400, 422)
    assert httpx.post(url, json={"model": "tiny", "messages": []}).status_code == 422
    assert httpx.post(url, json={"model": "tiny", "messages": [{"role": "robot", "content": "x"}]}).status_code == 422
    long = [{"role": "user", "content": "word " * 400}]
    r = httpx.post(url, json={"model": "tiny", "messages": long})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    r = httpx.post(url, content=b"{" + b" " * (2 << 20) + b"}", headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
    assert httpx.get(f"{server.url}/v1/nothing").json()["error"]["code"] == "not_found"


def test_client_disconnect_cancels_the_sequence(server, replica):
    before = replica.service.stats.aborted
    with httpx.stream("POST", f"{server.url}/v1/completions", timeout=30,
                      json={"model": "tiny", "prompt": "Go on", "max_tokens": 100, "temperature": 0,
                            "stream": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                break  # one chunk, then hang up
    deadline = time.monotonic() + 10
    while replica.service.stats.aborted == before and time.monotonic() < deadline:
        time.sleep(0.02)
    assert replica.service.stats.aborted == before + 1
    assert not replica.service.engine.running


def test_overload_answers_429_with_retry_after(server, replica):
    saved = replica.service.max_waiting
    replica.service.max_waiting = 0  # every new request finds the waiting room full
    try:
        r = httpx.post(f"{server.url}/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2})
    finally:
        replica.service.max_waiting = saved
    assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
    assert r.json()["error"]["type"] == "rate_limit_error"
    assert httpx.post(f"{server.url}/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2}).is_success


def test_speculate_false_decodes_without_drafts_and_says_the_same(server):
    body = {"model": "tiny", "prompt": "a b a b a b a b", "max_tokens": 12, "temperature": 0}
    on = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60).json()
    off = httpx.post(f"{server.url}/v1/completions", json={**body, "speculate": False}, timeout=60).json()
    assert off["choices"][0]["text"] == on["choices"][0]["text"]
    spec = off["usage"]["speculative"]
    assert spec["draft_tokens"] == 0 and spec["steps"] == off["usage"]["completion_tokens"]


def test_domain_from_metadata_reaches_the_engine(server, replica):
    seen = []
    replica.service.on_finished = seen.append
    try:
        httpx.post(f"{server.url}/v1/completions", json={"model": "tiny", "prompt": "def f(", "max_tokens": 2,
                                                        "metadata": {"domain": "code"}}).raise_for_status()
    finally:
        replica.service.on_finished = None
    assert [f.domain for f in seen] == ["code"]


def test_schemathesis_finds_no_server_error(replica):
    """>= 500 generated cases against the app's own OpenAPI schema: never a 5xx."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis.checks import not_a_server_error

    from serving.openai_api import build_app

    app = build_app(replica.completer, "tiny")
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    counts: dict[str, int] = {}
    statuses: list[int] = []
    budgets = {"POST": 240, "GET": 20}
    for op in schema.get_all_operations():
        operation = op.ok()
        n = budgets[operation.method.upper()]

        @settings(max_examples=n, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy())
        def check(case) -> None:
            if isinstance(case.body, dict) and "model" in case.body and len(statuses) % 2:
                case.body["model"] = "tiny"  # half the cases get past the model check into generation
                for key in ("max_tokens", "max_completion_tokens"):  # bounded work: validation is under test
                    if isinstance(case.body.get(key), int) and case.body[key] > 4:
                        case.body[key] = 4
            response = case.call()
            case.validate_response(response, checks=[not_a_server_error])
            counts[operation.label] = counts.get(operation.label, 0) + 1
            statuses.append(response.status_code)

        check()
    assert sum(counts.values()) >= 500, counts
    assert statuses.count(200) >= 20 and {400, 404, 422} <= set(statuses), sorted(set(statuses))
    assert replica.service.alive


def test_reconfigure_switches_speculation_off_and_on_without_raising(client, replica):
    from serving.config import SwapPolicy

    def draft_tokens() -> int:
        c = client.completions.create(model="tiny", prompt="Switch", max_tokens=6, temperature=0)
        return c.usage.model_extra["speculative"]["draft_tokens"]

    replica.reconfigure(SwapPolicy(follow=False, speculation=0))
    assert draft_tokens() == 0
    replica.reconfigure(SwapPolicy(follow=False, speculation=3))
    assert draft_tokens() > 0
    replica.reconfigure(None)  # a policy it cannot apply: logged, never raised (Ray would kill the replica)
    assert draft_tokens() > 0
