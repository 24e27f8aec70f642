"""The OpenAI-compatible HTTP edge: pydantic request models, the FastAPI routes, and the Completer
that turns one validated request into engine tokens and OpenAI JSON / server-sent events.

Two halves so a dead replica can still be reported to its client:
  - `build_app(backend, ...)` (the router side) parses and validates HTTP, then relays what the
    backend yields; if the backend dies mid-stream the router, still alive, ends the stream with an
    error chunk and [DONE] (never a finish_reason).
  - `Completer` (the replica side) tokenizes, submits to the EngineService and formats chunks.
    It yields a `Head` first (status, headers, and the whole body when not streaming), then SSE
    lines. In-process the backend is the Completer itself; under Ray Serve it is a handle to it.

Errors are OpenAI objects, {"error": {"message", "type", "param", "code"}}: 400 bad values or a
prompt past the context, 404 unknown model or route, 413 body too large, 422 wrong types/shapes,
429/503 with Retry-After when overloaded. Never a 5xx for bad input.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Literal, Protocol

from fastapi import FastAPI, Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

MAX_BODY_BYTES = 1 << 20  # 1 MiB: far above any prompt that fits a context; larger bodies get 413
GREEDY_BELOW = 1e-3       # temperatures under this decode greedily (dividing logits by ~0 overflows)
MIN_TOP_P = 1e-6          # smaller top_p values are raised to this (same result: the top token only)


# ---- request models ------------------------------------------------------------------------------

class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")  # unknown OpenAI fields (user, logit_bias, ...) are ignored

    model: str = Field(min_length=1, max_length=256)
    max_tokens: int | None = Field(None, ge=1, le=1_000_000)
    temperature: float = Field(1.0, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    top_k: int = Field(0, ge=0, le=1_000_000, description="extension: keep the k most likely tokens (0 = all)")
    n: int = Field(1, ge=1, le=1, description="only one choice per request")
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stop: str | list[str] | None = None
    stream: StrictBool = False
    stream_options: dict[str, Any] | None = None
    metadata: dict[str, str] | None = Field(None, description='{"domain": "code"} labels the traffic')
    speculate: StrictBool = Field(True, description="extension: false decodes this request without drafts "
                                                    "(the same output; a baseline to measure speculation against)")

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> str | list[str] | None:
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > 4 or any(not s or len(s) > 256 for s in stops):
            raise ValueError("stop: at most 4 non-empty strings of at most 256 characters")
        return v

    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())


class CompletionRequest(_Common):
    """POST /v1/completions."""

    prompt: str | list[int] | list[str] = Field(description="text, token ids, or a list of one text")
    echo: StrictBool = False


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(_Common):
    """POST /v1/chat/completions (the prompt is the model's chat template over `messages`)."""

    messages: list[ChatMessage] = Field(min_length=1, max_length=1024)
    max_completion_tokens: int | None = Field(None, ge=1, le=1_000_000)


class ApiError(Exception):
    """An error the client should see as an OpenAI error object with this HTTP status."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    """The OpenAI error object."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def sse(obj: Any) -> str:
    """One server-sent event carrying `obj` as JSON (or the literal [DONE])."""
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, separators=(',', ':'))}\n\n"


@dataclass(frozen=True)
class Head:
    """First item a backend yields: the status and headers, and the whole body when not streaming."""

    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: dict[str, Any] | None = None


class Backend(Protocol):
    """What the router needs: a stream of Head then SSE lines for one validated request."""

    def generate(self, kind: str, body: dict[str, Any]) -> AsyncIterator[Head | str]:
        ...


# ---- the router side ------------------------------------------------------------------------------

def build_app(backend: Backend, model_id: str, *, overload_errors: tuple[type[BaseException], ...] = (),
              created: int | None = None) -> FastAPI:
    """The FastAPI app: validation and error shapes here, generation in `backend`.

    `overload_errors`: exceptions the backend raises before its first item when it is saturated
    (Ray Serve's BackPressureError); they become 503 with Retry-After.
    """
    app = FastAPI(title="spectutor", version="1", description="OpenAI-compatible speculative decoding server")
    created = created or int(time.time())

    @app.middleware("http")
    async def limit_body(request: HttpRequest, call_next):
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY_BYTES):
            return _error(ApiError(413, f"request body over {MAX_BODY_BYTES} bytes", code="body_too_large"))
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def on_invalid(_request: HttpRequest, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        if first.get("type") == "json_invalid":
            return _error(ApiError(400, "the body is not valid JSON", code="invalid_json"))
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        message = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ())[1:]) or 'body'}: {e.get('msg')}"
                            for e in errors[:5])
        return _error(ApiError(422, message, param=param, code="invalid_value"))

    @app.exception_handler(StarletteHTTPException)
    async def on_http(_request: HttpRequest, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return _error(ApiError(exc.status_code, str(exc.detail), code=code))

    @app.exception_handler(ApiError)
    async def on_api_error(_request: HttpRequest, exc: ApiError) -> JSONResponse:
        return _error(exc)

    def model_card() -> dict[str, Any]:
        return {"id": model_id, "object": "model", "created": created, "owned_by": "spectutor", "root": model_id}

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model}")
    async def model(model: str) -> dict[str, Any]:
        if model != model_id:
            raise ApiError(404, f"the model {model!r} does not exist", param="model", code="model_not_found")
        return model_card()

    async def run(kind: str, req: _Common) -> Any:
        if req.model != model_id:
            raise ApiError(404, f"the model {req.model!r} does not exist; this server has {model_id!r}",
                           param="model", code="model_not_found")
        items = backend.generate(kind, req.model_dump())
        try:
            head = await items.__anext__()
        except overload_errors:
            raise ApiError(503, "the server is overloaded, retry later", "server_error", code="overloaded",
                           headers={"Retry-After": "1"})
        except StopAsyncIteration:
            raise ApiError(503, "the backend ended without an answer", "server_error", code="backend_error")
        assert isinstance(head, Head)
        if head.status != 200 or not req.stream:
            await _close(items)
            return JSONResponse(head.body, status_code=head.status, headers=head.headers)
        return StreamingResponse(_relay(items), media_type="text/event-stream", headers=head.headers)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest) -> Any:
        return await run("completion", req)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest) -> Any:
        return await run("chat", req)

    return app


async def _relay(items: AsyncIterator[Head | str]) -> AsyncIterator[str]:
    """Pass SSE lines through; a backend that dies mid-stream becomes an error chunk and [DONE]."""
    try:
        async for line in items:
            yield line
    except Exception as exc:  # noqa: BLE001 - replica died, engine failed: tell the client, never 200-and-silence
        yield sse(error_body(f"the stream was interrupted: {type(exc).__name__}: {exc}"[:2000],
                             "server_error", code="stream_interrupted"))
        yield sse("[DONE]")
    finally:
        await _close(items)


async def _close(items: Any) -> None:
    # An async generator in-process; a Ray DeploymentResponseGenerator (cancel) under Serve.
    if hasattr(items, "aclose"):
        await items.aclose()
    elif hasattr(items, "cancel"):
        items.cancel()


def _error(exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


# ---- the replica side -----------------------------------------------------------------------------

class Completer:
    """One validated request -> engine -> OpenAI JSON or SSE lines (a Backend, run on the replica)."""

    def __init__(self, service: Any, tokenizer: Any, model_id: str, *, default_max_tokens: int = 256,
                 replica_id: str = "local", target_version: str = "",
                 route: Callable[[tuple[int, ...]], str | None] | None = None, stream_interval: int = 1):
        self.service = service
        self.stream_interval = stream_interval  # tokens per streamed chunk (serving.config.ServeConfig)
        self.route = route  # prompt ids -> traffic domain, for requests without metadata.domain
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.default_max_tokens = default_max_tokens
        self.replica_id = replica_id
        self.target_version = target_version

    async def generate(self, kind: str, body: dict[str, Any]) -> AsyncIterator[Head | str]:
        """Head first (with the whole body unless streaming), then SSE lines ending in [DONE]."""
        from serving.service import EngineFailed, Overloaded, new_request_id

        try:
            req = (ChatCompletionRequest if kind == "chat" else CompletionRequest).model_validate(body)
            request = self._engine_request(kind, req, new_request_id("chatcmpl" if kind == "chat" else "cmpl"))
            stream = self.service.submit(request)
        except ApiError as exc:
            yield Head(exc.status, exc.headers, exc.body())
            return
        except Overloaded as exc:
            yield Head(429, {"Retry-After": str(max(1, round(exc.retry_after_s)))},
                       error_body(str(exc), "rate_limit_error", code="overloaded"))
            return
        except EngineFailed as exc:
            yield Head(503, {"Retry-After": "5"}, error_body(str(exc)[:2000], "server_error", code="engine_failed"))
            return
        except ValueError as exc:  # SamplingParams, pydantic: the body's values
            yield Head(400, {}, error_body(str(exc)[:2000], code="invalid_value"))
            return
        out = _Output(self, kind, req, request, stream)
        try:
            first = await out.first()
            if isinstance(first, ApiError):
                yield Head(first.status, first.headers, first.body())
                return
            headers = {"x-completion-id": request.request_id, "x-drafter-version": first,
                       "x-replica-id": self.replica_id}
            if not req.stream:
                body_out = await out.whole()
                if isinstance(body_out, ApiError):
                    yield Head(body_out.status, body_out.headers, body_out.body())
                else:
                    yield Head(200, headers, body_out)
                return
            yield Head(200, headers)
            async for line in out.chunks():
                yield line
        finally:
            stream.cancel()  # no-op when it finished; the client went away otherwise

    def _engine_request(self, kind: str, req: _Common, request_id: str) -> Any:
        from moe.generate import SamplingParams
        from serving.engine import Request

        if kind == "chat":
            assert isinstance(req, ChatCompletionRequest)
            messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                        for m in req.messages]
            try:
                ids = list(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                              return_dict=False))
            except Exception as exc:  # noqa: BLE001 - a template that rejects this conversation
                raise ApiError(400, f"messages: the chat template rejected them: {exc}"[:2000], param="messages")
            max_tokens = req.max_completion_tokens or req.max_tokens
        else:
            assert isinstance(req, CompletionRequest)
            prompt = req.prompt
            if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
                if len(prompt) != 1:
                    raise ApiError(400, "prompt: only one prompt per request", param="prompt")
                prompt = prompt[0]
            ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
            max_tokens = req.max_tokens
        if not ids:
            raise ApiError(400, "the prompt is empty", param="prompt" if kind != "chat" else "messages")
        vocab = self.service.engine.target.cfg.vocab_size
        if min(ids) < 0 or max(ids) >= vocab:
            raise ApiError(400, f"prompt: token ids must be in [0, {vocab})", param="prompt")
        max_len = self.service.engine.max_len
        if len(ids) >= max_len:
            raise ApiError(400, f"the prompt has {len(ids)} tokens; this model's context is {max_len}",
                           param="messages" if kind == "chat" else "prompt", code="context_length_exceeded")
        temperature = req.temperature if req.temperature >= GREEDY_BELOW else 0.0
        # A top_p under float32's reach becomes 0 in the sampler and drops every token (NaN law);
        # any top_p this small keeps only the most likely token anyway.
        top_p = max(req.top_p, MIN_TOP_P)
        params = SamplingParams(temperature=temperature, top_k=req.top_k, top_p=top_p,
                                max_new_tokens=min(max_tokens or self.default_max_tokens, max_len - len(ids)),
                                seed=req.seed)
        domain = (req.metadata or {}).get("domain")
        if domain is None and self.route is not None:
            domain = self.route(tuple(ids))
        return Request(request_id, tuple(ids), params, req.stops(), domain, speculate=req.speculate)


class _Output:
    """Collects one request's engine items and renders them as OpenAI objects."""

    def __init__(self, completer: Completer, kind: str, req: _Common, request: Any, stream: Any):
        self.c, self.kind, self.req, self.request, self.stream = completer, kind, req, request, stream
        self.created = int(time.time())
        self.ids: list[int] = []
        self.sent = 0            # characters of text already sent
        self.pending: list[Any] = []
        self.hold = max((len(s) for s in req.stops()), default=1) - 1

    async def first(self) -> str | ApiError:
        """Wait for the first engine item; the drafter version serving it, or the admission error."""
        from serving.service import Failed

        item = await self.stream.get()
        if isinstance(item, Failed):
            return self._error(item)
        self.pending.append(item)
        return item.drafter_version  # a request's first item is always Tokens (maybe empty) or Failed

    async def _items(self) -> AsyncIterator[Any]:
        while self.pending:
            yield self.pending.pop(0)
        while not self.stream.closed:
            yield await self.stream.get()

    def _error(self, failed: Any) -> ApiError:
        exc = failed.error
        if isinstance(exc, ValueError):  # the engine refused the request (context, ids)
            return ApiError(400, str(exc)[:2000], param="prompt", code="invalid_prompt")
        return ApiError(503, f"generation failed: {exc}"[:2000], "server_error", code="engine_error",
                        headers={"Retry-After": "1"})

    def _text(self, final: bool, reason: str | None) -> str:
        text = self.c.tokenizer.decode(self.ids, skip_special_tokens=True)
        if final and reason == "stop":
            cuts = [text.find(s) for s in self.req.stops() if s in text]
            text = text[: min(cuts)] if cuts else text
        elif not final:
            text = text[: len(text) - self.hold] if self.hold else text
            if text.endswith("\ufffd"):  # a multi-byte character split across tokens: wait for the rest
                text = text[:-1]
        delta, self.sent = text[self.sent:], max(self.sent, len(text))
        return delta

    async def whole(self) -> dict[str, Any] | ApiError:
        from serving.service import Done, Failed

        async for item in self._items():
            if isinstance(item, Failed):
                return self._error(item)
            if isinstance(item, Done):
                return self._object(self._text(True, item.finished.finish_reason), item, chunk=False)
            self.ids += item.tokens
        return ApiError(503, "the request ended without a result", "server_error")

    async def chunks(self) -> AsyncIterator[str]:
        from serving.service import Done, Failed

        if self.kind == "chat":
            yield sse(self._chunk({"role": "assistant", "content": ""}, None))
        held = 0  # tokens received since the last chunk sent (held back below the stream interval)
        sent_any = False
        async for item in self._items():
            if isinstance(item, Failed):
                err = self._error(item)
                yield sse({"error": err.body()["error"]})
                break
            if isinstance(item, Done):
                fin = item.finished
                if fin.finish_reason == "abort":  # cancelled under us (replica draining): an error, not an end
                    yield sse(error_body("the request was cancelled", "server_error", code="cancelled"))
                    break
                delta = self._text(True, fin.finish_reason)
                yield sse(self._chunk({"content": delta} if self.kind == "chat" else delta, fin.finish_reason))
                yield sse({**self._object("", item, chunk=True, choices=False)})
                break
            self.ids += item.tokens
            held += len(item.tokens)
            if sent_any and held < self.c.stream_interval:
                continue
            delta = self._text(False, None)
            if delta:
                yield sse(self._chunk({"content": delta} if self.kind == "chat" else delta, None))
                held, sent_any = 0, True
        yield sse("[DONE]")

    # ---- OpenAI shapes -------------------------------------------------------------------------
    def _chunk(self, delta: Any, finish: str | None) -> dict[str, Any]:
        if self.kind == "chat":
            choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
            obj = "chat.completion.chunk"
        else:
            choice = {"index": 0, "text": delta, "finish_reason": finish, "logprobs": None}
            obj = "text_completion"
        return {"id": self.request.request_id, "object": obj, "created": self.created, "model": self.c.model_id,
                "system_fingerprint": None, "choices": [choice], "usage": None}

    def _object(self, text: str, done: Any, chunk: bool, choices: bool = True) -> dict[str, Any]:
        fin = done.finished
        usage = usage_of(fin, done.step_numbers, self.c.replica_id)
        if self.kind == "chat":
            obj = "chat.completion.chunk" if chunk else "chat.completion"
            choice = {"index": 0, "message": {"role": "assistant", "content": text},
                      "finish_reason": fin.finish_reason, "logprobs": None}
        else:
            obj = "text_completion"
            if getattr(self.req, "echo", False) and isinstance(self.req.prompt, str):
                text = self.req.prompt + text
            choice = {"index": 0, "text": text, "finish_reason": fin.finish_reason, "logprobs": None}
        spec = usage["speculative"]
        return {"id": self.request.request_id, "object": obj, "created": self.created, "model": self.c.model_id,
                "system_fingerprint": f"tgt-{self.c.target_version or self.c.model_id}/drf-{spec['drafter_version']}",
                "choices": [choice] if choices else [], "usage": usage}


def usage_of(fin: Any, step_numbers: tuple[int, ...], replica_id: str) -> dict[str, Any]:
    """OpenAI usage plus `speculative`: draft/accepted tokens, mean accepted length, the drafter
    versions in the order they served (with the replica's step range and the tokens of each), the
    totals per drafter (`by_drafter`: with the controller, which of its parts drafted what; steps on
    which nothing was drafted count under "none"), the replica."""
    served: list[dict[str, Any]] = []
    by_drafter: dict[str, dict[str, int]] = {}
    for rec, step in zip(fin.steps, step_numbers):
        if served and served[-1]["drafter"] == rec.drafter and served[-1]["version"] == rec.drafter_version:
            seg = served[-1]
            seg["last_step"], seg["steps"] = step, seg["steps"] + 1
        else:
            seg = {"drafter": rec.drafter, "version": rec.drafter_version, "first_step": step, "last_step": step,
                   "steps": 1, "draft_tokens": 0, "accepted_tokens": 0}
            served.append(seg)
        seg["draft_tokens"] += rec.proposed
        seg["accepted_tokens"] += rec.accepted
        mine = by_drafter.setdefault(rec.drafter, {"steps": 0, "draft_tokens": 0, "accepted_tokens": 0})
        mine["steps"] += 1
        mine["draft_tokens"] += rec.proposed
        mine["accepted_tokens"] += rec.accepted
    last = served[-1] if served else {"drafter": "none", "version": "0"}
    n = len(fin.output_ids)
    return {"prompt_tokens": len(fin.prompt_ids), "completion_tokens": n, "total_tokens": len(fin.prompt_ids) + n,
            "speculative": {"draft_tokens": fin.draft_tokens, "accepted_tokens": fin.accepted_tokens,
                            "steps": len(fin.steps), "mean_accepted_length": round(fin.mean_accepted_length, 4),
                            "drafter": last["drafter"], "drafter_version": last["version"],
                            "served_by": served, "by_drafter": by_drafter, "replica_id": replica_id}}
