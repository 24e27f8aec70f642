"""Hot swap of the draft model: learn of a new champion, load and check it off the event loop,
replace one reference between two engine steps.

Where promotions come from: the Redis channel (streams.redis_bus.PromotionWatcher, fast) and a
poll of the MLflow alias every `poll_interval_s` (certain: it works when Redis is silent or down).
Both only enqueue a job; ONE worker thread resolves, downloads and checks, so jobs apply in the
order they arrived and a poll can never undo a newer Redis promotion with a stale read.

The checks before a version may serve: the registry's sha256 matches the downloaded weights (and
the Promotion's sha256, when one came), the checkpoint loads and fits its config, its vocabulary is
the target's, every weight is finite, and a smoke proposal on a fixed prompt returns in-range
tokens within budget. Any failure keeps the old drafter and adds one to `failures`; nothing here
raises into Ray Serve's reconfigure().
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from queue import Empty, Queue
from typing import Any, Callable

import torch

from drafters.base import Drafter, DraftRequest
from moe.generate import SamplingParams
from serving.config import SwapPolicy

log = logging.getLogger(__name__)

SMOKE_PROMPT = tuple(range(1, 17))  # fixed token ids, valid for any vocabulary of >= 17 tokens


class SwapRefused(RuntimeError):
    """A drafter version failed a check; the old drafter keeps serving."""


@dataclass
class SwapStats:
    """Counters of the swapper (plain values; the metrics sink reads them)."""

    swaps: int = 0
    failures: int = 0
    last_error: str = ""
    version: str = ""                       # what serves now
    history: list[tuple[int, str]] = field(default_factory=list)  # (service step, version) at each swap


def numeric_version(version: str) -> int:
    """Registry versions are integers; anything else (a cut, "base") orders before all of them."""
    try:
        return int(version)
    except ValueError:
        return -1


def check_drafter(drafter: Drafter, vocab_size: int) -> None:
    """Smoke proposal on a fixed prompt: raises SwapRefused unless it returns in-range tokens in budget."""
    model = getattr(drafter, "model", None)
    if model is not None:
        for name, p in model.named_parameters():
            if not torch.isfinite(p).all():
                raise SwapRefused(f"weight {name} has non-finite values")
    budget = max(drafter.budgets(), default=0)
    gen = torch.Generator().manual_seed(0)
    seq_id = -1_000_001  # never a real engine sequence id
    try:
        [draft] = drafter.propose([DraftRequest(seq_id, list(SMOKE_PROMPT), budget, SamplingParams(), gen)])
    finally:
        drafter.release(seq_id)
    if draft.size > budget:
        raise SwapRefused(f"smoke proposal has {draft.size} nodes over a budget of {budget}")
    if draft.size and (int(draft.tokens.min()) < 0 or int(draft.tokens.max()) >= vocab_size):
        raise SwapRefused(f"smoke proposal has token ids outside [0, {vocab_size})")


class DrafterLoader:
    """Registry version -> checked Drafter, on the caller's thread (the swapper's worker)."""

    def __init__(self, lineage: Any, dest_root: str | Path, build: Callable[[Path, str], Drafter],
                 vocab_size: int):
        self.lineage = lineage
        self.dest_root = Path(dest_root)
        self.build = build          # (downloaded folder, version) -> drafter (load_draft + DraftLMDrafter)
        self.vocab_size = vocab_size

    def load(self, name: str, version: int, expected_sha256: str | None = None) -> Drafter:
        """Download, verify, load and smoke-test version `version` of `name`; raises on any failure."""
        from trainer.lineage import weights_sha256

        v = self.lineage.get(name, version)
        if expected_sha256 and v.sha256 != expected_sha256:
            # Not SwapRefused: the message is what is wrong, not the version, which a later poll may load.
            raise ValueError(f"{name} v{version}: promoted sha256 {expected_sha256[:12]} != registered {v.sha256[:12]}")
        folder = self.lineage.fetch(v, self.dest_root)   # raises ArtifactError on a sha256 mismatch
        got = weights_sha256(folder)
        if got != v.sha256:  # fetch checked it; a cached folder could have been altered since
            raise SwapRefused(f"{name} v{version}: weights sha256 {got[:12]} != {v.sha256[:12]}")
        try:
            drafter = self.build(folder, str(version))
        except Exception as exc:  # corrupt or misshapen checkpoint: final for this version
            raise SwapRefused(f"{name} v{version}: cannot load: {type(exc).__name__}: {exc}") from exc
        model = getattr(drafter, "model", None)
        if model is not None and model.cfg.vocab_size != self.vocab_size:
            raise SwapRefused(f"{name} v{version}: vocabulary {model.cfg.vocab_size} != target's {self.vocab_size}")
        check_drafter(drafter, self.vocab_size)
        return drafter


class DrafterSwapper:
    """Follows `lineage`'s alias and swaps the service's drafter; every entry point is non-raising."""

    def __init__(self, service: Any, loader: DrafterLoader, lineage_name: str, policy: SwapPolicy,
                 domain: str | None = None, bus: Any = None, initial_version: str = ""):
        self.service = service
        self.loader = loader
        self.name = lineage_name
        self.domain = domain
        self.policy = policy
        self.stats = SwapStats(version=initial_version)
        self._jobs: Queue = Queue()
        self._refused: set[int] = set()
        self._stop = threading.Event()
        self._watcher = None
        self._worker = threading.Thread(target=self._run, name="spectutor-swapper", daemon=True)
        self._worker.start()
        if bus is not None:
            from streams.redis_bus import PromotionWatcher

            # The watcher polls the Redis key too; the MLflow poll below covers Redis being down.
            self._watcher = PromotionWatcher(bus, lineage_name, self.on_promotion,
                                             poll_interval_s=policy.poll_interval_s)

    # ---- entry points (any thread; none raises) ----------------------------------------------------
    def on_promotion(self, promotion: Any) -> None:
        """A Redis Promotion arrived: queue a load of that version."""
        try:
            self._jobs.put(("version", int(promotion.version), promotion.sha256))
        except (TypeError, ValueError):
            self._fail(f"promotion with a non-numeric version {promotion.version!r}")

    def set_policy(self, policy: SwapPolicy) -> None:
        """Apply a new policy (pin, unpin, alias, poll period): re-resolve at once."""
        self.policy = policy
        self._jobs.put(("poll", None, None))

    def poll_now(self) -> None:
        """Resolve the alias (or pin) now instead of at the next poll."""
        self._jobs.put(("poll", None, None))

    def wait_idle(self, timeout: float = 30.0) -> bool:
        """Tests: wait until every queued job is done."""
        done = threading.Event()
        self._jobs.put(("mark", done, None))
        return done.wait(timeout)

    def close(self) -> None:
        """Stop the watcher and the worker."""
        self._stop.set()
        self._jobs.put(("stop", None, None))
        if self._watcher is not None:
            self._watcher.stop()
        self._worker.join(5)

    # ---- the worker --------------------------------------------------------------------------------
    def _run(self) -> None:
        self._jobs.put(("poll", None, None))  # the current champion (or pin) at start
        while not self._stop.is_set():
            try:
                kind, arg, sha = self._jobs.get(timeout=self.policy.poll_interval_s)
            except Empty:
                kind, arg, sha = "poll", None, None
            if kind == "stop":
                return
            if kind == "mark":
                arg.set()
                continue
            try:
                self._job(kind, arg, sha)
            except Exception as exc:  # noqa: BLE001 - the worker must outlive any bad version or outage
                self._fail(f"{type(exc).__name__}: {exc}")

    def _job(self, kind: str, version: int | None, sha: str | None) -> None:
        policy = self.policy
        if kind == "poll":
            if policy.pinned_version is not None:
                version, sha = policy.pinned_version, None
            elif not policy.follow:
                return
            else:
                v = self.loader.lineage.by_alias(self.name, policy.alias)
                if v is None:
                    return
                version, sha = v.version, v.sha256
        elif policy.pinned_version is not None and version != policy.pinned_version:
            log.info("ignoring promotion of %s v%s: pinned to v%s", self.name, version, policy.pinned_version)
            return
        elif not policy.follow:
            return
        assert version is not None
        if str(version) == self.stats.version or version in self._refused:
            return  # a refused version stays refused: polls must not re-download it every period
        try:
            self._swap_to(version, sha)
        except SwapRefused:
            self._refused.add(version)  # downloads and outages are retried; a bad artifact is not
            raise

    def _swap_to(self, version: int, sha: str | None) -> None:
        drafter = self.loader.load(self.name, version, sha)
        domain = self.domain

        def replace(current: Drafter) -> Drafter:
            if hasattr(current, "replace") and hasattr(current, "per_domain"):  # a DomainDrafter
                return current.replace(domain, drafter)
            if hasattr(current, "with_part"):  # the controller: the promoted head becomes (or replaces) one part
                return current.with_part(drafter)
            return drafter

        self.service.swap_drafter(replace).result(timeout=60)
        self.stats.swaps += 1
        self.stats.version = str(version)
        self.stats.history.append((getattr(self.service, "_step_no", 0), str(version)))
        log.info("drafter %s v%s serving (swap %d)", self.name, version, self.stats.swaps)

    def _fail(self, why: str) -> None:
        self.stats.failures += 1
        self.stats.last_error = why
        log.warning("drafter swap refused, keeping %s: %s", self.stats.version or "the current drafter", why)

