"""Replay traffic against the OpenAI routes and keep one Outcome per request (the demo's load and the
full-loop tests' load).

`users` closed-loop clients each send a request, wait for the answer, think for an exponential time
(mean `think_s`) and send the next; the request comes from whatever the `next_request` callback
returns at that moment, so a caller can switch the traffic (ShareGPT, then HumanEval) mid-run.
Responses are not streamed: what is kept is the usage block (`usage.speculative`: draft and
accepted tokens, drafter version, replica), the latency and, for failures, the error.
"""
from __future__ import annotations

import asyncio
import random
import time
from dataclasses import asdict, dataclass
from typing import Callable

import httpx


@dataclass(frozen=True)
class RequestSpec:
    """One request to send: a chat turn (ShareGPT) or a text to complete (HumanEval)."""

    domain: str
    text: str
    kind: str = "chat"  # "chat" -> /v1/chat/completions, "completion" -> /v1/completions
    phase: str = ""
    speculate: bool = True  # False: sent with `"speculate": false`, a no-speculation baseline


@dataclass
class Outcome:
    """What one request got."""

    index: int
    domain: str
    phase: str
    started_s: float              # since the replayer started
    latency_s: float
    ok: bool
    request_id: str = ""          # the completion id (= the token event's request_id)
    status: int = 0               # HTTP status (0: no response)
    error: str = ""
    text: str = ""
    completion_tokens: int = 0
    draft_tokens: int = 0
    accepted_tokens: int = 0
    drafter_version: str = ""     # the version that drafted its last step
    versions: tuple[str, ...] = ()  # every version that drafted for it, in order
    replica_id: str = ""
    speculate: bool = True        # False: a no-speculation baseline request

    @property
    def tokens_per_s(self) -> float | None:
        """Completion tokens over the request's whole latency, as its client saw it."""
        return self.completion_tokens / self.latency_s if self.ok and self.latency_s > 0 else None

    @property
    def acceptance(self) -> float | None:
        """Accepted / proposed draft tokens (None when nothing was drafted)."""
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else None

    def as_dict(self) -> dict:
        out = asdict(self)
        out["acceptance"] = self.acceptance
        out["tokens_per_s"] = self.tokens_per_s
        return out


def request_body(spec: RequestSpec, model: str, max_tokens: int) -> tuple[str, dict]:
    """(path, JSON body) of a greedy request for `spec`."""
    body: dict = {"model": model, "max_tokens": max_tokens, "temperature": 0, "metadata": {"domain": spec.domain}}
    if not spec.speculate:
        body["speculate"] = False
    if spec.kind == "chat":
        body["messages"] = [{"role": "user", "content": spec.text}]
        return "/v1/chat/completions", body
    if spec.kind == "completion":
        body["prompt"] = spec.text
        return "/v1/completions", body
    raise ValueError(f"RequestSpec.kind must be 'chat' or 'completion', got {spec.kind!r}")


def outcome_of(index: int, spec: RequestSpec, started: float, latency: float, response: httpx.Response) -> Outcome:
    """Parse one response (any status) into an Outcome."""
    out = Outcome(index, spec.domain, spec.phase, started, latency, ok=False, status=response.status_code,
                  speculate=spec.speculate)
    try:
        body = response.json()
    except ValueError:
        out.error = f"HTTP {response.status_code}: not JSON: {response.text[:200]}"
        return out
    if response.status_code != 200:
        err = body.get("error") if isinstance(body, dict) else None
        out.error = f"HTTP {response.status_code}: {err.get('message') if isinstance(err, dict) else body}"
        return out
    choice = body["choices"][0]
    out.text = choice.get("text") if "text" in choice else choice["message"]["content"]
    usage = body["usage"]
    spec_usage = usage.get("speculative") or {}
    out.ok = True
    out.request_id = body.get("id", "")
    out.completion_tokens = usage["completion_tokens"]
    out.draft_tokens = spec_usage.get("draft_tokens", 0)
    out.accepted_tokens = spec_usage.get("accepted_tokens", 0)
    out.drafter_version = str(spec_usage.get("drafter_version", ""))
    out.versions = tuple(str(s["version"]) for s in spec_usage.get("served_by", []))
    out.replica_id = spec_usage.get("replica_id", "")
    return out


class Replayer:
    """Closed-loop clients against `base_url`; `outcomes` grows as answers come back."""

    def __init__(self, base_url: str, model: str, next_request: Callable[[], RequestSpec | None],
                 users: int = 2, think_s: float = 1.0, max_tokens: int = 48, timeout_s: float = 300.0,
                 seed: int = 0, on_outcome: Callable[[Outcome], None] | None = None):
        if users < 1:
            raise ValueError(f"users must be >= 1, got {users}")
        if think_s < 0:
            raise ValueError(f"think_s must be >= 0, got {think_s}")
        self.base_url = base_url
        self.model = model
        self.next_request = next_request
        self.users = users
        self.think_s = think_s
        self.max_tokens = max_tokens
        self.timeout_s = timeout_s
        self.rng = random.Random(seed)
        self.on_outcome = on_outcome
        self.outcomes: list[Outcome] = []
        self.in_flight = 0
        self._sent = 0
        self._t0 = 0.0

    async def run(self, stop: Callable[[], bool]) -> list[Outcome]:
        """Send until `stop()` is true or `next_request` returns None; in-flight requests finish."""
        self._t0 = time.monotonic()
        async with httpx.AsyncClient(base_url=self.base_url, timeout=self.timeout_s) as http:
            await asyncio.gather(*(self._user(http, stop) for _ in range(self.users)))
        return self.outcomes

    async def _user(self, http: httpx.AsyncClient, stop: Callable[[], bool]) -> None:
        while not stop():
            spec = self.next_request()
            if spec is None:
                return
            index, self._sent = self._sent, self._sent + 1
            path, body = request_body(spec, self.model, self.max_tokens)
            started = time.monotonic()
            self.in_flight += 1
            try:
                response = await http.post(path, json=body)
                out = outcome_of(index, spec, started - self._t0, time.monotonic() - started, response)
            except (httpx.HTTPError, OSError) as exc:
                out = Outcome(index, spec.domain, spec.phase, started - self._t0, time.monotonic() - started,
                              ok=False, error=f"{type(exc).__name__}: {exc}", speculate=spec.speculate)
            finally:
                self.in_flight -= 1
            self.outcomes.append(out)
            if self.on_outcome is not None:
                self.on_outcome(out)
            if self.think_s:
                wait = self.rng.expovariate(1.0 / self.think_s)
                end = time.monotonic() + wait
                while time.monotonic() < end and not stop():
                    await asyncio.sleep(min(0.2, end - time.monotonic()))


def acceptance(outcomes: list[Outcome]) -> float | None:
    """Pooled acceptance (accepted / drafted tokens) over successful outcomes; None if none drafted."""
    drafted = sum(o.draft_tokens for o in outcomes if o.ok)
    return sum(o.accepted_tokens for o in outcomes if o.ok) / drafted if drafted else None
