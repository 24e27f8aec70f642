"""The online distillation recipe: setup / train / checkpoint / cleanup.

Events -> samples (trainer.samples) -> per-lineage hold-out (newest, never trained on) and
recency-weighted buffer -> gradient steps on the student while serving is idle (trainer.idle)
-> every `gate_every` steps the student is scored against the champion on the hold-out
(trainer.distill.decide); a winner is registered in MLflow (`challenger`, then `champion`) and
announced on Redis -> checkpoint (trainer.checkpoint) -> commit the consumer.

A lineage is one drafter: the general one, or one per traffic domain. Each has its own student,
optimiser, buffer, hold-out, champion and MLflow run.

Exactly once across crashes: a checkpoint holds the consumer positions and de-dup window, the
buffered events and the student; the consumer is committed only after it. On restart, records
before the checkpoint's positions (or in its window) are dropped, so none is absorbed twice.
Set SPECTUTOR_TRAINER_FAULT=after_checkpoint[:N] to stop right after the Nth checkpoint is durable
and before its commit: the process SIGKILLs itself, or, with SPECTUTOR_TRAINER_FAULT_MARKER=<path>,
writes that file and waits to be killed (the crash test kills it from outside).

An MLflow outage does not stop training: a winner MLflow cannot take is kept as the lineage's
pending registration (a snapshot of its weights and tags) and retried with backoff from the loop;
only the newest winner waits. Pending registrations are not checkpointed: a restarted trainer
re-gates its (checkpointed) student against the registry's champion instead.
"""
from __future__ import annotations

import base64
import copy
import dataclasses
import logging
import math
import os
import shutil
import signal
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, TypeVar

import numpy as np
import torch

from torch import nn

from streams import Delivery, TokenEvent, decode_event, default_url, encode, open_consumer
from trainer import checkpoint as ckpt
from trainer.config import GENERAL, TrainerConfig
from trainer.distill import EvalMetrics, decide
from trainer.drift import DriftMonitor
from trainer.idle import LoadWatcher, Preempted
from trainer.lineage import PendingRegistration
from trainer.router import Router
from trainer.samples import Holdout, RecencyBuffer, sample_from_event
from trainer.students import student_kind
from trainer.tracking import NullTracker, Tracker

T = TypeVar("T")
log = logging.getLogger(__name__)


@dataclass
class LineageState:
    """One drafter being distilled."""

    key: str
    name: str
    student: nn.Module            # a DraftModel or an EagleHead (trainer.students)
    optimizer: torch.optim.Optimizer
    champion: nn.Module
    champion_version: int | None
    buffer: RecencyBuffer
    holdout: Holdout
    tracker: Tracker
    step: int = 0                 # global MLflow step of this lineage
    new_since_train: int = 0
    promotions: int = 0
    offsets: dict[str, list[int]] = field(default_factory=dict)  # "topic:partition" -> [first, last] absorbed
    last: dict[str, float] = field(default_factory=dict)
    pending: PendingRegistration | None = None  # a winner MLflow could not take yet (not checkpointed)


@dataclass
class TrainerStats:
    """Plain counters; the CLI display and tests read them."""

    events_consumed: int = 0
    events_skipped: int = 0       # no usable sample (no top-k, empty output, a chunk)
    already_trained: int = 0      # redelivered below the checkpoint's positions
    duplicates: int = 0           # redelivered and dropped by the consumer's de-dup window
    steps: int = 0
    preemptions: int = 0
    promotions: int = 0
    rejections: int = 0
    checkpoints: int = 0
    busy: bool = False
    lag_s: float = 0.0
    collapsed: tuple[str, ...] = ()
    last_decision: str = ""
    registration_failures: int = 0  # register/promote attempts (first or retry) failed by an MLflow outage
    commit_failures: int = 0  # consumer commits that failed after a durable checkpoint (retried at the next)
    registration_retries: int = 0  # attempts on a pending registration (after a failure, once its backoff passed)
    pending_registrations: int = 0  # lineages whose winner waits for MLflow now
    registry_waits: int = 0  # MLflow calls at start that found it unreachable and were retried


class Trainer:
    """setup() -> train() -> cleanup(); checkpoint() whenever the state should become durable."""

    def __init__(self, cfg: TrainerConfig, tracker_factory: Callable[[], Tracker] | None = None,
                 on_progress: Callable[["Trainer"], None] | None = None):
        self.cfg = cfg
        self.tracker_factory = tracker_factory or NullTracker
        self.on_progress = on_progress
        self.stats = TrainerStats()
        self.lineages: dict[str, LineageState] = {}
        self.router = Router()
        self.drift = DriftMonitor(cfg.drift)
        self.rng = np.random.default_rng(cfg.seed)
        self.stop_event = threading.Event()
        self._events: dict[str, bytes] = {}  # wire bytes of every event held in a buffer or hold-out
        self._resume_offsets: dict[str, int] = {}
        self._positions: dict[str, int] = {}
        self._pending_ids: list[str] = []
        self._faults = 0

    # ---- setup ---------------------------------------------------------------------------------
    def setup(self) -> None:
        """Threads, registry, Redis, lineages (from the last checkpoint if any), consumer, load watcher."""
        cfg = self.cfg
        from trainer.lineage import bound_http_retries

        bound_http_retries()
        torch.set_num_threads(cfg.idle.threads)
        torch.manual_seed(cfg.seed)
        from trainer.lineage import registered_name

        self.registry = None
        if cfg.registry:
            from trainer.lineage import Lineage

            self.registry = Lineage()
        self.bus = None
        if cfg.redis_url:
            from streams.redis_bus import RedisBus, RedisConfig

            self.bus = RedisBus(cfg.redis_url, RedisConfig(prefix=cfg.redis_prefix))
        Path(cfg.state_dir).mkdir(parents=True, exist_ok=True)
        for stale in Path(cfg.state_dir).glob("challenger-*"):  # snapshots of a previous process's pending winners
            shutil.rmtree(stale, ignore_errors=True)
        found = ckpt.latest(Path(cfg.state_dir))
        state = found[1] if found else {}
        self.kind = student_kind(cfg)
        for key in cfg.lineage_keys:
            name = registered_name(None if key == GENERAL else key, cfg.lineage_tag, cfg.drafter)
            info = state.get("lineages", {}).get(key)
            self.lineages[key] = self._open_lineage(key, name, found[0] / key if found and info else None, info)
        if found:
            self._restore(found[0], state)
        self.consumer = open_consumer(cfg.events_url or default_url(), cfg.group, topic=cfg.topic,
                                      max_poll_records=cfg.poll_records,
                                      dedup_state=base64.b64decode(state["dedup"]) if state.get("dedup") else None)
        self.watcher = LoadWatcher(self.bus.heartbeats if self.bus else None, cfg.idle)
        self._unguard = [self.watcher.guard(lin.student) for lin in self.lineages.values()]
        self._last_ckpt = time.monotonic()

    def _open_lineage(self, key: str, name: str, folder: Path | None, info: dict | None) -> LineageState:
        cfg = self.cfg
        version = info.get("champion_version") if info else None
        champion = None
        if self.registry is not None:
            current = self._while_unreachable(f"{name}: reading the champion", lambda: (
                self.registry.by_alias(name) if info is None else
                self.registry.get(name, version) if version is not None else None))
            if current is not None:
                folder_ = self._while_unreachable(f"{name}: fetching v{current.version}", lambda: (
                    self.registry.fetch(current, Path(cfg.state_dir) / "registry")))
                champion = self.kind.load(folder_)
                version = current.version
        champion = champion or self.kind.base()
        student = self.kind.load(folder) if folder is not None else self.kind.clone(champion)
        student.train()
        champion.eval()
        opt = torch.optim.AdamW(self.kind.parameters(student), lr=cfg.lr, weight_decay=0.0)
        if folder is not None and (folder / "optim.pt").is_file():
            opt.load_state_dict(torch.load(folder / "optim.pt", weights_only=True))
        tracker = self.tracker_factory()
        params = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("gate", "idle", "drift")}
        params.update({f"gate.{k}": v for k, v in dataclasses.asdict(cfg.gate).items()})
        first = self._while_unreachable(f"{name}: opening its MLflow run", lambda: tracker.start(
            name, params, {"lineage": key, "target": cfg.target, "champion_version": str(version)}))
        lin = LineageState(key, name, student, opt, champion, version, RecencyBuffer(cfg.buffer_size, cfg.half_life),
                           Holdout(cfg.holdout_size), tracker)
        if info:
            lin.new_since_train, lin.promotions = info["new_since_train"], info["promotions"]
            lin.offsets = info["offsets"]
        lin.step = max(first, info["step"] + 1 if info else 0)
        return lin

    def _while_unreachable(self, what: str, call: Callable[[], T]) -> T:
        """call(), retried with backoff while MLflow is unreachable (trainer.lineage.unreachable).

        A trainer that starts during an MLflow outage waits for it rather than exiting: without the
        registry it cannot know which champion to gate against. Any other error is raised; a stop
        request (stop_event) ends the wait with the last outage error.
        """
        from trainer.lineage import backoff_s, unreachable

        failures = 0
        while True:
            try:
                return call()
            except Exception as exc:
                if not unreachable(exc) or self.stop_event.is_set():
                    raise
                failures += 1
                self.stats.registry_waits += 1
                delay = backoff_s(failures, self.cfg.registration_retry_s, self.cfg.registration_retry_cap_s)
                log.warning("%s: MLflow unreachable (%s: %s); try %d failed, next in %.1f s", what,
                            type(exc).__name__, exc, failures, delay)
                self.stop_event.wait(delay)

    def _restore(self, folder: Path, state: dict) -> None:
        self.stats.events_consumed = state["events_consumed"]
        self.stats.steps = state["steps"]
        self._resume_offsets = dict(state["positions"])
        self._positions = dict(state["positions"])
        if state.get("router"):
            self.router = Router.from_json(state["router"])
        raw = list(ckpt.unframe((folder / "events.bin").read_bytes()))
        for (key, where), data in zip(state["held"], raw):
            ev = decode_event(data)
            sample = sample_from_event(ev, self.cfg.max_len)
            lin = self.lineages.get(key)
            if sample is None or lin is None:
                continue
            self._events[ev.event_id] = data
            (lin.holdout.items.append(sample) if where == "holdout" else lin.buffer.add(sample))

    # ---- consuming -----------------------------------------------------------------------------
    def _lineage_for(self, ev: TokenEvent) -> LineageState | None:
        domain = ev.domain if ev.domain in self.cfg.domains else None
        if domain is None and self.cfg.domains:
            routed = self.router.route(ev.prompt_ids)
            domain = routed if routed in self.cfg.domains else None
        return self.lineages.get(domain or GENERAL)

    def absorb(self, d: Delivery) -> None:
        """Take one delivered event into the state (hold-out first; what it pushes out goes to training)."""
        where = f"{d.topic}:{d.partition}"
        if d.offset < self._resume_offsets.get(where, 0):
            self.stats.already_trained += 1
            return
        self._positions[where] = d.offset + 1
        ev = d.event
        self.stats.events_consumed += 1
        self._pending_ids.append(ev.event_id)
        self.stats.lag_s = max(0.0, time.time() - ev.created_at)
        if ev.domain:
            self.router.learn(ev.prompt_ids, ev.domain)
            self.drift.observe(ev.domain, int(ev.step_accepted.sum()), int(ev.step_proposed.sum()))
        lin = self._lineage_for(ev)
        sample = sample_from_event(ev, self.cfg.max_len) if lin is not None else None
        if sample is None:
            self.stats.events_skipped += 1
            return
        span = lin.offsets.setdefault(where, [d.offset, d.offset])
        span[1] = d.offset
        self._events[ev.event_id] = encode(ev)
        out = lin.holdout.push(sample)
        if out is not None:
            lin.buffer.add(out)
            lin.new_since_train += 1

    # ---- training ------------------------------------------------------------------------------
    def _ready(self, lin: LineageState) -> bool:
        if len(lin.buffer) == 0:
            return False
        drifting = lin.key != GENERAL and self.drift.drifting(lin.key) and lin.new_since_train > 0
        return lin.new_since_train >= self.cfg.train_every or drifting

    def train_step(self, lin: LineageState) -> bool:
        """One gradient step on a recency-weighted draw; False if serving load preempted it."""
        cfg = self.cfg
        samples = lin.buffer.draw(cfg.batch_size, self.rng)
        start = time.perf_counter()
        lin.optimizer.zero_grad(set_to_none=True)
        try:
            loss, metrics = self.kind.loss(lin.student, samples)
            loss.backward()
        except Preempted:
            lin.optimizer.zero_grad(set_to_none=True)
            self.stats.preemptions += 1
            return False
        torch.nn.utils.clip_grad_norm_(self.kind.parameters(lin.student), 1.0)  # as OSD (HF max_grad_norm)
        lin.optimizer.step()
        took = time.perf_counter() - start
        self.stats.steps += 1
        metrics.update({"data/events_consumed": float(self.stats.events_consumed), "data/lag_s": self.stats.lag_s,
                        "data/buffer": float(len(lin.buffer)), "perf/samples_per_s": len(samples) / took,
                        "perf/tokens_per_s": metrics.pop("train/tokens") / took,
                        "idle/preemptions": float(self.stats.preemptions)})
        if lin.key in self.drift.domains:
            metrics["serving/acceptance"] = self.drift.value(lin.key)
        lin.tracker.log(metrics, lin.step)
        lin.last.update(metrics)
        lin.step += 1
        return True

    def gate(self, lin: LineageState) -> bool:
        """Score student vs champion on the hold-out; register, promote and announce a winner."""
        held = list(lin.holdout.items)
        if len(held) < self.cfg.gate.min_samples:
            return False
        champ = self.kind.evaluate(lin.champion, held, self.cfg.gate.spec_len)
        chall = self.kind.evaluate(lin.student, held, self.cfg.gate.spec_len)
        verdict = decide(champ, chall, self.cfg.gate)
        self.stats.last_decision = f"{lin.key}: {'promote' if verdict.promote else 'keep'} ({verdict.reason})"
        metrics = {**chall.as_dict("eval/"), **champ.as_dict("eval/champion_"), "eval/promoted": float(verdict.promote)}
        lin.tracker.log(metrics, max(lin.step - 1, 0))
        lin.last.update(metrics)
        if not verdict.promote:
            self.stats.rejections += 1
            return False
        self._promote(lin, champ, chall)
        return True

    def _promote(self, lin: LineageState, champ: EvalMetrics, chall: EvalMetrics) -> None:
        """Make the student champion: at once without a registry, else through MLflow (see _register)."""
        if self.registry is None:
            self._crown(lin, self.kind.clone(lin.student).eval(), None, champ.acceptance, chall.acceptance)
            return
        before = lin.pending
        if before is not None:
            log.warning("%s: a newer winner replaces the one still waiting for MLflow%s", lin.name,
                        "" if before.version is None else f" (registered as v{before.version}, left challenger)")
            shutil.rmtree(before.folder, ignore_errors=True)
        folder = Path(tempfile.mkdtemp(prefix="challenger-", dir=self.cfg.state_dir))
        sha = self.kind.save(lin.student, folder, f"{lin.name}@step{lin.step}")
        tags = {"drafter": self.kind.name, "parent_version": str(lin.champion_version),
                "kafka_offsets": copy.deepcopy(lin.offsets),
                "domains": [lin.key], "sha256": sha, "trained_steps": lin.step,
                "gate": {**chall.as_dict(""), "champion_acceptance": champ.acceptance,
                         "champion_accepted_length": champ.accepted_length}}
        lin.pending = PendingRegistration(self.kind.clone(lin.student).eval(), folder, tags, lin.tracker.run_id,
                                          champ.acceptance, chall.acceptance)
        if before is not None:  # the outage is not over because a new winner came: keep its backoff
            lin.pending.attempts, lin.pending.next_try = before.attempts, before.next_try
        if time.monotonic() >= lin.pending.next_try:
            self._register(lin)

    def _register(self, lin: LineageState) -> bool:
        """Register lin.pending as challenger, promote it to champion, announce it; True once done.

        An MLflow outage (trainer.lineage.unreachable) is counted and scheduled for a retry, never
        raised; any other error is. A version registered by an earlier attempt is promoted, not
        registered again.
        """
        from trainer.lineage import CHALLENGER, promotion_message, unreachable

        p = lin.pending
        if p.attempts:
            self.stats.registration_retries += 1
        try:
            if p.version is None:
                p.version = self.registry.register(lin.name, p.folder, run_id=p.run_id, tags=p.tags,
                                                   alias=CHALLENGER).version
            v = self.registry.promote(lin.name, p.version)
        except Exception as exc:
            if not unreachable(exc):
                raise
            self.stats.registration_failures += 1
            self.stats.pending_registrations = sum(x.pending is not None for x in self.lineages.values())
            delay = p.failed(time.monotonic(), self.cfg.registration_retry_s, self.cfg.registration_retry_cap_s)
            log.warning("%s: MLflow unreachable (%s: %s); %s retried in %.1f s", lin.name, type(exc).__name__, exc,
                        "registration" if p.version is None else f"promotion of v{p.version}", delay)
            return False
        if self.bus is not None and not self.bus.publish_promotion(promotion_message(v)):
            log.warning("%s: v%s is champion but Redis did not take the announcement", lin.name, v.version)
        lin.pending = None
        self.stats.pending_registrations = sum(x.pending is not None for x in self.lineages.values())
        shutil.rmtree(p.folder, ignore_errors=True)
        self._crown(lin, p.model, v.version, p.champion_acceptance, p.acceptance)
        return True

    def _retry_registrations(self, force: bool = False) -> None:
        """Retry each pending registration whose backoff has passed (force: every one, now)."""
        now = time.monotonic()
        for lin in self.lineages.values():
            if lin.pending is not None and (force or now >= lin.pending.next_try):
                self._register(lin)

    def _crown(self, lin: LineageState, model: nn.Module, version: int | None, before: float, after: float) -> None:
        lin.champion = model
        lin.champion_version = version
        lin.promotions += 1
        self.stats.promotions += 1
        log.info("%s: promoted version %s (acceptance %.4f -> %.4f)", lin.name, version, before, after)
        self.checkpoint()

    def train(self) -> TrainerStats:
        """Consume and train until stopped, max_steps, or drained (stop_when_drained_s)."""
        cfg = self.cfg
        last_event = time.monotonic()
        while not self.stop_event.is_set():
            work = any(self._ready(lin) for lin in self.lineages.values())
            deliveries = self.consumer.poll(timeout_s=0.05 if work else 0.5)
            for d in deliveries:
                self.absorb(d)
            if deliveries:
                last_event = time.monotonic()
            self.stats.busy = self.watcher.busy
            self.stats.duplicates = self.consumer.stats().duplicates
            collapsed = tuple(k for k in self.drift.domains if self.drift.collapsed(k))
            for k in set(collapsed) - set(self.stats.collapsed):
                log.warning("domain %s: served acceptance collapsed to %.3f (best %.3f)", k, self.drift.value(k),
                            self.drift.domains[k].best)
            self.stats.collapsed = collapsed
            self._retry_registrations()
            if not self.watcher.busy:
                for lin in self.lineages.values():
                    if self._ready(lin) and not self._round(lin):
                        break
            if self._pending_ids and time.monotonic() - self._last_ckpt >= cfg.checkpoint_every_s:
                self.checkpoint()
            if self.on_progress:
                self.on_progress(self)
            if cfg.max_steps is not None and self.stats.steps >= cfg.max_steps:
                break
            idle_for = time.monotonic() - last_event
            drained = cfg.stop_when_drained_s is not None and idle_for >= cfg.stop_when_drained_s and not work
            # A winner waiting for MLflow holds the stop a while: the server may be back soon.
            if drained and (not self.stats.pending_registrations
                            or idle_for >= cfg.stop_when_drained_s + 4 * cfg.registration_retry_cap_s):
                break
        if self.stats.pending_registrations:
            self._retry_registrations(force=True)  # last chance; what still fails is re-gated after a restart
        self.checkpoint()
        return self.stats

    def _round(self, lin: LineageState) -> bool:
        """ceil(new samples x steps_per_sample) steps (gating every gate_every); False if preempted."""
        for _ in range(max(1, math.ceil(lin.new_since_train * self.cfg.steps_per_sample))):
            if not self.train_step(lin):
                self.watcher.wait_idle(self.stop_event)
                return False
            if lin.step % self.cfg.gate_every == 0:
                self.gate(lin)
            if self.on_progress:
                self.on_progress(self)  # a round can take minutes on a real model; the display and status follow it
            if self.cfg.max_steps is not None and self.stats.steps >= self.cfg.max_steps:
                break
        lin.new_since_train = 0
        return True

    def status(self) -> dict[str, object]:
        """The live status a supervisor follows (spectutor train --status-file): counters and the lineages."""
        st = self.stats
        out: dict[str, object] = {"pid": os.getpid(), "updated_at": time.time()}
        for key in ("events_consumed", "steps", "promotions", "rejections", "checkpoints", "preemptions", "busy",
                    "registration_failures", "registration_retries", "pending_registrations", "commit_failures",
                    "last_decision"):
            out[key] = getattr(st, key)
        out["lineages"] = {k: {"name": lin.name, "champion_version": lin.champion_version, "step": lin.step,
                               "buffer": len(lin.buffer), "holdout": len(lin.holdout)}
                           for k, lin in self.lineages.items()}
        return out

    # ---- checkpoint / cleanup ------------------------------------------------------------------
    def checkpoint(self) -> Path:
        """Make the state durable (atomic), then commit the consumer (see the module docstring)."""
        d = ckpt.begin(Path(self.cfg.state_dir), self.stats.steps)
        held, records, lineages = [], [], {}
        for key, lin in self.lineages.items():
            sha = self.kind.save(lin.student, d / key, f"{lin.name}@step{lin.step}")
            torch.save(lin.optimizer.state_dict(), d / key / "optim.pt")
            lineages[key] = {"name": lin.name, "student_sha256": sha, "champion_version": lin.champion_version,
                             "step": lin.step, "new_since_train": lin.new_since_train, "promotions": lin.promotions,
                             "offsets": lin.offsets}
            for where, samples in (("buffer", [s for _, s in lin.buffer.items]), ("holdout", lin.holdout.items)):
                for s in samples:
                    held.append((key, where))
                    records.append(self._events[s.event_id])
        alive = {s.event_id for lin in self.lineages.values()
                 for s in [x for _, x in lin.buffer.items] + list(lin.holdout.items)}
        self._events = {k: v for k, v in self._events.items() if k in alive}
        (d / "events.bin").write_bytes(ckpt.frame(records))
        state = {"events_consumed": self.stats.events_consumed, "steps": self.stats.steps,
                 "positions": self._positions, "dedup": base64.b64encode(self.consumer.dedup_state()).decode(),
                 "router": self.router.to_json(), "lineages": lineages, "held": held}
        final = ckpt.commit(Path(self.cfg.state_dir), d, self.stats.steps, state)
        self.stats.checkpoints += 1
        trace = os.environ.get("SPECTUTOR_TRAINER_TRACE")
        if trace and self._pending_ids:
            with open(trace, "a") as fh:
                fh.write("".join(f"{i}\n" for i in self._pending_ids))
                fh.flush()
                os.fsync(fh.fileno())
        self._pending_ids = []
        self._fault_point()
        try:
            self.consumer.commit()
        except Exception as exc:  # noqa: BLE001 - broker restarting, group rebalancing, disk full for file://
            # The checkpoint already holds the positions and the de-dup window: an uncommitted offset
            # only means those records come again after a restart, and restart drops them. The next
            # checkpoint commits again.
            self.stats.commit_failures += 1
            log.warning("consumer commit failed (the checkpoint holds the positions; retried at the next "
                        "checkpoint): %s: %s", type(exc).__name__, exc)
        if self.bus is not None:
            self.bus.put_blob("router", self.router.to_json().encode())
        self._last_ckpt = time.monotonic()
        return final

    def _fault_point(self) -> None:
        """Test hook between a durable checkpoint and its commit (see the module docstring)."""
        fault = os.environ.get("SPECTUTOR_TRAINER_FAULT", "")
        if not fault.startswith("after_checkpoint"):
            return
        self._faults += 1
        if self._faults < (int(fault.split(":")[1]) if ":" in fault else 1):
            return
        marker = os.environ.get("SPECTUTOR_TRAINER_FAULT_MARKER")
        if not marker:
            os.kill(os.getpid(), signal.SIGKILL)
        Path(marker).write_text(str(self.stats.events_consumed))
        time.sleep(3600)  # wait for the test to SIGKILL this process

    def cleanup(self) -> None:
        """Stop the watcher, end the runs, leave the consumer group (state is already durable)."""
        self.watcher.close()
        for undo in self._unguard:
            undo()
        for lin in self.lineages.values():
            lin.tracker.end()
        self.consumer.close()
        if self.bus is not None:
            self.bus.close()


def run(cfg: TrainerConfig, tracker_factory: Callable[[], Tracker] | None = None,
        on_progress: Callable[[Trainer], None] | None = None) -> TrainerStats:
    """The whole recipe, cleanup guaranteed."""
    trainer = Trainer(cfg, tracker_factory, on_progress)
    trainer.setup()
    try:
        return trainer.train()
    finally:
        trainer.cleanup()
