"""The engine in a thread, requests as asyncio streams: the I/O wrapper around `Engine.step()`.

One thread owns the engine and calls `step()` whenever there is work; nothing else touches the
engine. Everything that changes it (new requests, aborts, drafter swaps, speculation on/off) goes
through an inbox the thread drains between two steps, so a swap is one reference replaced between
steps and no step ever sees half a change. Each request gets an asyncio.Queue on the caller's event
loop; the thread hands each step's outputs over with one `call_soon_threadsafe`. Concurrent
requests share steps: that is the continuous batching.

Finished requests go to an EventPublisher (its own thread, bounded queue): conversion to the wire
event and the producer call happen off both the event loop and the engine thread; drops are counted.
No Ray here: the Ray Serve shim (serving/app.py), the tests and the benchmark all drive this class.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import queue
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

from drafters.base import Drafter
from drafters.suffix import suffix_drafters
from serving.engine import Engine, FinishedRequest, Request, RequestOutput

log = logging.getLogger(__name__)


class Overloaded(RuntimeError):
    """Too many requests are waiting for a slot; the caller should answer 429 with Retry-After."""

    def __init__(self, waiting: int, retry_after_s: float = 1.0):
        super().__init__(f"{waiting} requests are already waiting for this replica")
        self.retry_after_s = retry_after_s


class EngineFailed(RuntimeError):
    """The engine thread died; requests in flight end with an error, the replica reports unhealthy."""


@dataclass(frozen=True)
class Tokens:
    """Tokens one engine step produced for one request."""

    tokens: list[int]
    step: int          # the service's step counter when they were produced (orders swaps and outputs)
    drafter_version: str


@dataclass(frozen=True)
class Done:
    """The request finished (stop, length or abort); the last item of its stream."""

    finished: FinishedRequest
    step_numbers: tuple[int, ...]  # service step of each entry of finished.steps


@dataclass(frozen=True)
class Failed:
    """The request could not complete (the engine failed, or it was refused at admission)."""

    error: BaseException


@dataclass
class ServiceStats:
    """Counters the engine thread adds to and the metrics sink reads; plain values only."""

    submitted: int = 0
    rejected: int = 0            # refused with Overloaded
    finished: int = 0            # finished with stop or length
    aborted: int = 0             # cancelled (client gone, replica draining)
    failed: int = 0              # ended by an engine error
    output_tokens: int = 0
    drafts: int = 0              # sequence-steps that verified at least one draft token (vLLM num_drafts)
    draft_tokens: int = 0
    accepted_tokens: int = 0
    accepted_per_position: list[int] = field(default_factory=list)  # [i]: drafts that accepted > i tokens
    suffix_nodes: int = 0
    """Nodes the suffix drafters' tries hold now (per-sequence and shared): their memory, bounded."""
    by_drafter: dict[str, list[int]] = field(default_factory=dict)
    """drafter name -> [drafts, draft tokens, accepted tokens] (the controller names the part that drafted)."""
    running: int = 0
    waiting: int = 0
    steps: int = 0
    latencies: deque = field(default_factory=lambda: deque(maxlen=4096))
    """(ttft_s, time_per_output_token_s | None, output tokens) per finished request; a sink drains it."""


class RequestStream:
    """One request's outputs on the caller's event loop: iterate for Tokens, then Done or Failed."""

    def __init__(self, service: "EngineService", request: Request):
        self.service = service
        self.request = request
        self.queue: asyncio.Queue = asyncio.Queue()
        self.step_numbers: list[int] = []
        self.closed = False

    @property
    def request_id(self) -> str:
        return self.request.request_id

    async def get(self) -> Tokens | Done | Failed:
        """The next item; after Done or Failed there is nothing more."""
        item = await self.queue.get()
        if isinstance(item, (Done, Failed)):
            self.closed = True
        return item

    def cancel(self) -> None:
        """The client went away: abort the sequence (idempotent)."""
        if not self.closed:
            self.closed = True
            self.service.abort(self.request_id)


class EngineService:
    """Runs `engine` on its own thread; `submit()` from any asyncio loop returns a RequestStream."""

    def __init__(self, engine: Engine, *, max_waiting: int = 64,
                 on_finished: Callable[[FinishedRequest], None] | None = None, name: str = "engine"):
        self.engine = engine
        self.max_waiting = max_waiting
        self.on_finished = on_finished
        self.stats = ServiceStats()
        self.error: BaseException | None = None
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, RequestStream]] = {}
        self._inbox: deque[tuple[str, Any]] = deque()
        self._pending_adds = 0
        self._wake = threading.Condition()
        self._stop = False
        self._step_no = 0
        self._thread = threading.Thread(target=self._run, name=f"spectutor-{name}", daemon=True)
        self._thread.start()

    # ---- the caller's side (event loop) ------------------------------------------------------------
    def submit(self, request: Request) -> RequestStream:
        """Queue `request`; raises Overloaded when max_waiting requests already wait for a slot.

        Bad requests (empty, too long, ids out of range) come back as a Failed item first, with the
        engine's own ContextTooLongError / ValueError, before any token.
        """
        with self._wake:  # the engine thread sets `error` under this lock: no stream is left unanswered
            if self.error is not None or self._stop:
                raise EngineFailed(f"the engine is not running: {self.error!r}")
            waiting = self.stats.waiting + self._pending_adds
            if waiting >= self.max_waiting:
                self.stats.rejected += 1
                raise Overloaded(waiting)
            stream = RequestStream(self, request)
            self._streams[request.request_id] = (asyncio.get_running_loop(), stream)
            self._pending_adds += 1
            self.stats.submitted += 1
            self._inbox.append(("add", request))
            self._wake.notify()
        return stream

    def abort(self, request_id: str) -> None:
        """Cancel a request; its stream ends with Done(finish_reason="abort")."""
        self._post("abort", request_id)

    def swap_drafter(self, make: Callable[[Drafter], Drafter]) -> concurrent.futures.Future:
        """Between two steps, replace the engine's drafter by `make(current)`; the future gets the new one.

        `make` runs on the engine thread and must be instant (a reference change such as
        DomainDrafter.replace): everything slow (download, load, smoke test) happens before.
        """
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._post("swap", (make, fut))
        return fut

    def call(self, fn: Callable[[Engine], Any]) -> concurrent.futures.Future:
        """Between two steps, run `fn(engine)` on the engine thread; the future gets its result or its error.

        For instant state changes that must not race a step (feeding outputs to a drafter's tries).
        """
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._post("call", (fn, fut))
        return fut

    def set_speculation(self, speculation: str | int) -> concurrent.futures.Future:
        """Between two steps, switch speculation ("adaptive", a draft size, 0 = off)."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._post("speculation", (speculation, fut))
        return fut

    @property
    def drafter(self) -> Drafter:
        """The drafter the next step will use (a reference read; swaps replace it atomically)."""
        return self.engine.drafter

    @property
    def queued(self) -> int:
        """Requests waiting for a slot (submitted but not yet decoding)."""
        return self.stats.waiting + self._pending_adds

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.error is None

    def close(self, timeout: float = 5.0) -> None:
        """Stop the engine thread; streams still open end with Failed."""
        with self._wake:
            self._stop = True
            self._wake.notify()
        self._thread.join(timeout)
        self._fail_all(EngineFailed("the replica is shutting down"))

    # ---- the engine thread ------------------------------------------------------------------------
    def _post(self, kind: str, payload: Any) -> None:
        with self._wake:
            self._inbox.append((kind, payload))
            self._wake.notify()

    def _run(self) -> None:
        try:
            while True:
                with self._wake:
                    while not self._stop and not self._inbox and not self.engine.has_work():
                        self._wake.wait(0.5)
                    if self._stop:
                        return
                    inbox, self._inbox = self._inbox, deque()
                self._apply(inbox)
                if self.engine.has_work():
                    self._step()
        except BaseException as exc:  # noqa: BLE001 - report it to every waiter, then die
            log.exception("engine thread failed")
            with self._wake:
                self.error = exc
            self._fail_all(EngineFailed(f"the engine failed: {exc!r}"))

    def _apply(self, inbox: deque[tuple[str, Any]]) -> None:
        for kind, payload in inbox:
            if kind == "add":
                with self._wake:
                    self._pending_adds -= 1
                try:
                    self.engine.add_request(payload)
                except (ValueError, RuntimeError) as exc:  # ContextTooLongError is a ValueError too
                    self._deliver_one(payload.request_id, Failed(exc), last=True)
            elif kind == "abort":
                self.engine.abort(payload)
            elif kind == "swap":
                make, fut = payload
                try:
                    new = make(self.engine.drafter)
                    self.engine.set_drafter(new)
                except Exception as exc:  # noqa: BLE001 - a failed swap keeps the old drafter
                    fut.set_exception(exc)
                else:
                    fut.set_result(new)
            elif kind == "call":
                fn, fut = payload
                try:
                    fut.set_result(fn(self.engine))
                except Exception as exc:  # noqa: BLE001 - the caller gets it; the engine carries on
                    fut.set_exception(exc)
            elif kind == "speculation":
                spec, fut = payload
                self.engine.cfg = dataclasses.replace(self.engine.cfg, speculation=spec)
                fut.set_result(spec)

    def _step(self) -> None:
        outputs = self.engine.step()
        self._step_no += 1
        version = self.engine.drafter.version
        st = self.stats
        st.steps = self._step_no
        st.running, st.waiting = len(self.engine.running), len(self.engine.waiting)
        st.suffix_nodes = sum(s.nodes for s in suffix_drafters(self.engine.drafter))
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[RequestStream, Any]]] = {}
        for out in outputs:
            entry = self._streams.get(out.request_id)
            if out.finished is not None:
                self._account(out.finished)
                if self.on_finished is not None:
                    self.on_finished(out.finished)
                self._streams.pop(out.request_id, None)
            if entry is None:
                continue
            loop, stream = entry
            by_loop.setdefault(loop, []).append((stream, self._item(stream, out, version)))
        for loop, items in by_loop.items():
            _call_soon(loop, _put_all, items)

    def _item(self, stream: RequestStream, out: RequestOutput, version: str) -> Any:
        fin = out.finished
        if fin is None or len(fin.steps) > len(stream.step_numbers):
            stream.step_numbers.append(self._step_no)
        if fin is None:
            return Tokens(out.new_tokens, self._step_no, version)
        return [Tokens(out.new_tokens, self._step_no, version),
                Done(fin, tuple(stream.step_numbers[: len(fin.steps)]))]

    def _account(self, fin: FinishedRequest) -> None:
        st = self.stats
        if fin.finish_reason == "abort":
            st.aborted += 1
        else:
            st.finished += 1
        n = len(fin.output_ids)
        st.output_tokens += n
        for rec in fin.steps:
            if rec.proposed > 0:
                st.drafts += 1
                st.draft_tokens += rec.proposed
                st.accepted_tokens += rec.accepted
                mine = st.by_drafter.setdefault(rec.drafter, [0, 0, 0])
                mine[0] += 1
                mine[1] += rec.proposed
                mine[2] += rec.accepted
                while len(st.accepted_per_position) < rec.accepted:
                    st.accepted_per_position.append(0)
                for i in range(rec.accepted):
                    st.accepted_per_position[i] += 1
        if fin.finish_reason != "abort" and n:
            tpot = (fin.total_s - fin.ttft_s) / (n - 1) if n > 1 else None
            st.latencies.append((fin.ttft_s, tpot, n))

    def _deliver_one(self, request_id: str, item: Any, last: bool) -> None:
        entry = self._streams.pop(request_id, None) if last else self._streams.get(request_id)
        if entry is not None:
            loop, stream = entry
            _call_soon(loop, _put_all, [(stream, item)])

    def _fail_all(self, exc: BaseException) -> None:
        with self._wake:
            streams, self._streams = self._streams, {}
        for loop, stream in streams.values():
            self.stats.failed += 1
            _call_soon(loop, _put_all, [(stream, Failed(exc))])


def _put_all(items: list[tuple[RequestStream, Any]]) -> None:
    for stream, item in items:
        for one in item if isinstance(item, list) else [item]:
            stream.queue.put_nowait(one)


def _call_soon(loop: asyncio.AbstractEventLoop, fn: Callable, *args: Any) -> None:
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:  # the caller's loop is closed: nobody is listening any more
        pass


def new_request_id(prefix: str = "cmpl") -> str:
    """A fresh request id (also the Kafka key of its event)."""
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


class EventPublisher:
    """Publishes finished requests as TokenEvents from its own thread; never blocks the caller.

    `offer()` is a put on a bounded queue: when the queue is full (the producer thread is behind)
    the event is dropped and counted, as are events the producer itself refuses.
    """

    def __init__(self, producer: Any, to_event: Callable[[FinishedRequest], Any], max_queue: int = 1024):
        self.producer = producer
        self.to_event = to_event
        self.published = 0
        self.dropped = 0
        self.errors = 0
        self._queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self._thread = threading.Thread(target=self._run, name="spectutor-events", daemon=True)
        self._thread.start()

    def offer(self, fin: FinishedRequest) -> None:
        """Hand a finished request over (engine thread); drops and counts if the queue is full."""
        try:
            self._queue.put_nowait(fin)
        except queue.Full:
            self.dropped += 1

    def _run(self) -> None:
        while True:
            fin = self._queue.get()
            if fin is None:
                return
            try:
                ok = self.producer.publish(self.to_event(fin))
            except Exception:  # noqa: BLE001 - a bad event must not stop the publisher
                log.exception("could not publish the event of %s", fin.request_id)
                self.errors += 1
                ok = False
            if ok:
                self.published += 1
            else:
                self.dropped += 1

    def close(self, flush_timeout_s: float = 5.0) -> None:
        """Publish what is queued, flush the producer, close it."""
        self._queue.put(None)
        self._thread.join(flush_timeout_s)
        deadline = time.monotonic() + flush_timeout_s
        try:
            self.producer.flush(max(0.0, deadline - time.monotonic()))
        finally:
            self.producer.close()


class Replica:
    """Everything one serving replica runs, built from a ServeConfig (Ray-free: tests and the
    benchmark use it directly; serving/app.py wraps it in a Ray Serve deployment)."""

    def __init__(self, cfg: Any, replica_id: str | None = None):
        import os
        from pathlib import Path

        from drafters.registry import DrafterConfig, build_drafter
        from moe.loader import load_model, spectutor_home
        from serving.engine import EngineConfig
        from serving.openai_api import Completer

        self.cfg = cfg
        self.replica_id = replica_id or f"replica-{uuid.uuid4().hex[:8]}"
        self.config_errors = 0  # user_configs refused by reconfigure()
        if cfg.threads is not None:  # before the load: the kernel choice is measured at this thread count
            import torch

            torch.set_num_threads(cfg.threads)
        self.loaded = loaded = load_model(cfg.model, dtype=cfg.dtype, kernels=cfg.kernels, device=cfg.device)
        max_len = min(cfg.max_len or loaded.model.max_len, loaded.model.max_len)
        policy = cfg.policy
        spec = policy.speculation if policy.speculation is not None else cfg.speculation
        ecfg = EngineConfig(max_batch=cfg.max_batch, max_len=max_len, speculation=spec,
                            calibrate=cfg.calibrate and spec == "adaptive", prefill_chunk=cfg.prefill_chunk,
                            prefill_stall=cfg.prefill_stall)
        dcfg = DrafterConfig(cfg.drafter, draft_layers=min(cfg.draft_layers, loaded.config.num_layers),
                             draft_mode=cfg.draft_mode, eagle_min_confidence=cfg.eagle_min_confidence,
                             eagle_tree_topk=cfg.eagle_tree_topk,
                             fallback=cfg.fallback, kernels=cfg.kernels)
        drafter = build_drafter(dcfg, cfg.model, loaded.config.vocab_size, cfg.max_batch, max_len, loaded.config,
                                target=loaded.model)
        if cfg.domain_lineages:
            from drafters.by_domain import DomainDrafter

            # Every domain starts on the default drafter; its lineage's champion replaces it there.
            drafter = DomainDrafter(drafter)
        tok = loaded.tokenizer
        engine = Engine(loaded.model, drafter, ecfg, loaded.eos_token_ids,
                        detokenize=lambda ids: tok.decode(ids, skip_special_tokens=True))
        self.publisher = self._publisher(cfg)
        self.suffix_feed = self._suffix_feed(cfg, drafter) if cfg.suffix_feed else None
        self.service = EngineService(engine, max_waiting=cfg.max_waiting, name=self.replica_id,
                                     on_finished=self.publisher.offer if self.publisher else None)
        redis_url = os.environ.get("SPECTUTOR_REDIS_URL", "") if cfg.redis_url is None else cfg.redis_url
        self.bus = None
        if redis_url:
            from streams.redis_bus import RedisBus

            self.bus = RedisBus(redis_url)
        # Requests without metadata.domain are routed by the trainer's learned router (Redis blob).
        self.router = RouterFromBus(self.bus) if self.bus is not None and cfg.domain_lineages else None
        self.completer = Completer(self.service, tok, cfg.model_id, default_max_tokens=cfg.default_max_tokens,
                                   replica_id=self.replica_id, target_version=loaded.name, route=self.router,
                                   stream_interval=cfg.stream_interval)
        self.heartbeats = self._heartbeats(cfg) if self.bus is not None else None
        mlflow_uri = os.environ.get("MLFLOW_TRACKING_URI", "") if cfg.mlflow_uri is None else cfg.mlflow_uri
        self.swapper = None
        self.domain_swappers: dict[str, Any] = {}
        if mlflow_uri:
            from serving.swap import DrafterLoader, DrafterSwapper
            from trainer.lineage import Lineage, bound_http_retries

            root = Path(cfg.download_dir) if cfg.download_dir else spectutor_home() / "drafters" / self.replica_id
            bound_http_retries()  # a poll made during an MLflow outage must not sleep through its end
            loader = DrafterLoader(Lineage(mlflow_uri), root, self._draft_builder(max_len), loaded.config.vocab_size)
            self.swapper = DrafterSwapper(self.service, loader, cfg.lineage, policy, domain=cfg.swap_domain,
                                          bus=self.bus, initial_version=drafter.version)
            self.domain_swappers = {
                domain: DrafterSwapper(self.service, loader, name, _unpinned(policy), domain=domain, bus=self.bus)
                for domain, name in sorted(cfg.domain_lineages.items())}

    def _suffix_feed(self, cfg: Any, drafter: Drafter) -> Any:
        """The thread that feeds other replicas' outputs (from the event topic) to the suffix tries."""
        from drafters.suffix import suffix_drafters
        from serving.suffix_feed import SuffixFeed
        from streams import default_url, open_consumer

        tries = suffix_drafters(drafter)
        if not tries:
            raise ValueError(f"suffix_feed needs a drafter with suffix tries (suffix or auto), not {cfg.drafter!r}")
        url = default_url() if cfg.events_url is None else cfg.events_url
        if not url:
            raise ValueError("suffix_feed needs the event topic, but events_url is \"\" (events off)")
        overrides: dict[str, Any] = {"client_id": f"{self.replica_id}-suffix"}
        if cfg.events_topic:
            overrides["topic"] = cfg.events_topic
        # Its own group, new at every start: the feed reads the topic from the oldest retained event.
        group = f"spectutor-suffix-{self.replica_id}-{uuid.uuid4().hex[:6]}"
        keep = max(s.global_limit for s in tries) or 1
        return SuffixFeed(self.service, lambda: open_consumer(url, group=group, **overrides), self.replica_id,
                          keep_tokens=keep)

    def _publisher(self, cfg: Any) -> EventPublisher | None:
        from serving.events import event_from_finished
        from streams import ModelRef, default_url, open_producer

        url = default_url() if cfg.events_url is None else cfg.events_url
        if not url:
            return None
        overrides: dict[str, Any] = {"client_id": self.replica_id}
        if cfg.events_topic:
            overrides["topic"] = cfg.events_topic
        producer = open_producer(url, **overrides)
        target = ModelRef(cfg.model_id, self.loaded.name)
        return EventPublisher(producer, lambda fin: event_from_finished(fin, self.replica_id, target))

    def _heartbeats(self, cfg: Any) -> Any:
        from streams.redis_bus import HeartbeatSender
        from streams.schema import Heartbeat

        window: deque[tuple[float, int]] = deque(maxlen=16)

        def sample() -> Heartbeat:
            st = self.service.stats
            now = time.monotonic()
            window.append((now, st.output_tokens))
            t0, n0 = window[0]
            rate = (st.output_tokens - n0) / (now - t0) if now > t0 else 0.0
            return Heartbeat(self.replica_id, running=st.running, tokens_per_s=rate, queue_depth=self.service.queued)

        return HeartbeatSender(self.bus, sample, interval_s=cfg.heartbeat_interval_s)

    def _draft_builder(self, max_len: int) -> Callable[[Any, str], Drafter]:
        """(downloaded folder, version) -> drafter: an EagleDrafter for an eagle checkpoint (checked
        against this replica's target: a head that does not fit raises ValueError naming the mismatch,
        and the swapper keeps the current drafter), else a DraftLMDrafter."""
        from drafters.draft_lm import DraftLMDrafter, load_draft
        from drafters.eagle import is_eagle_checkpoint, load_eagle, serving_drafter

        cfg, tcfg, target = self.cfg, self.loaded.config, self.loaded.model

        def build(folder: Any, version: str) -> Drafter:
            if is_eagle_checkpoint(folder):
                head, _ = load_eagle(folder, tcfg, target.embed, max_len)
                return serving_drafter(head, version, target, cfg.max_batch, max_len, cfg.eagle_min_confidence,
                                       cfg.eagle_tree_topk)
            model, _ = load_draft(folder, max_len=max_len)
            model.to(target.embed.weight.device)
            return DraftLMDrafter(model, version, mode=cfg.draft_mode, max_batch=cfg.max_batch, max_len=max_len,
                                  cost_hint=model.cost_ratio(tcfg), kernels=cfg.kernels)

        return build

    def reconfigure(self, policy: Any) -> None:
        """Apply a new SwapPolicy; never raises (a failure is logged and counted by the swapper)."""
        try:
            self.cfg = dataclasses.replace(self.cfg, policy=policy)
            if policy.speculation is not None:
                self.service.set_speculation(policy.speculation)
            if self.swapper is not None:
                self.swapper.set_policy(policy)
            for swapper in self.domain_swappers.values():
                swapper.set_policy(_unpinned(policy))
        except Exception:  # noqa: BLE001 - reconfigure must not kill the replica
            log.exception("reconfigure failed; keeping the previous policy")

    def close(self) -> None:
        """Stop swaps and heartbeats, finish the engine, flush events."""
        for part in (self.suffix_feed, self.swapper, *self.domain_swappers.values(), self.heartbeats, self.router):
            if part is not None:
                part.close() if hasattr(part, "close") else part.stop()
        self.service.close()
        if self.publisher is not None:
            self.publisher.close()
        if self.bus is not None:
            self.bus.close()


class RouterFromBus:
    """route(prompt_ids) with the router the trainer last published as the Redis blob "router".

    A daemon thread refreshes it every `refresh_s`, so the request path never waits on Redis; until
    a router arrives (or while Redis is down) the last one loaded is used, or none (domain None).
    """

    def __init__(self, bus: Any, refresh_s: float = 10.0, blob: str = "router"):
        self.bus, self.refresh_s, self.blob = bus, refresh_s, blob
        self.router: Any = None
        self.loads = 0  # routers loaded
        self.errors = 0  # blobs that did not parse
        self._raw: bytes | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="spectutor-router", daemon=True)
        self._thread.start()

    def __call__(self, prompt_ids: tuple[int, ...]) -> str | None:
        router = self.router  # one reference read: the refresher swaps whole routers
        return router.route(prompt_ids) if router is not None else None

    def refresh(self) -> None:
        """Load the published router if it changed; never raises."""
        from trainer.router import Router

        raw = self.bus.get_blob(self.blob)
        if raw is None or raw == self._raw:
            return
        try:
            self.router = Router.from_json(raw.decode())
            self.loads += 1
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            self.errors += 1
            log.warning("ignoring a malformed router blob (%d bytes)", len(raw))
        self._raw = raw

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.refresh()
            except Exception:  # noqa: BLE001 - the refresher must outlive anything Redis returns
                log.exception("router refresh failed")
            self._stop.wait(self.refresh_s)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)


def _unpinned(policy: Any) -> Any:
    """The policy for a per-domain lineage: an emergency pin names a version of the default lineage."""
    return dataclasses.replace(policy, pinned_version=None)
