"""Experiment tracking behind a small protocol: MLflow in production, a null sink in tests and offline.

One experiment per drafter lineage (`spectutor/<registered name>`), one run per trainer start
(tagged with the run it resumed from). Steps are global: a restarted trainer continues after the
highest step any earlier run of the lineage logged, so curves never go back in time, even when a
crash lost steps that came after the last checkpoint.

Tracking must never stop training: while the MLflow server is down, `MlflowTracker.log` keeps the
points it could not send (the newest `max_pending`) and sends them, in step order, once it is back.
The trainer's live status goes to a JSON file (`StatusFile`) that a supervisor can read.
"""
from __future__ import annotations

import collections
import json
import logging
import os
import time
from pathlib import Path
from typing import Mapping, Protocol

log = logging.getLogger(__name__)


class Tracker(Protocol):
    """Where a lineage's parameters and per-step metrics go."""

    run_id: str | None

    def start(self, lineage: str, params: Mapping[str, object], tags: Mapping[str, str]) -> int:
        """Open this start's run; returns the first step to log (after every step logged before)."""
        ...

    def log(self, metrics: Mapping[str, float], step: int) -> None: ...

    def end(self, status: str = "FINISHED") -> None: ...


class NullTracker:
    """Records nothing; keeps the last metrics for the progress display and tests."""

    run_id: str | None = None

    def __init__(self) -> None:
        self.last: dict[str, float] = {}

    def start(self, lineage: str, params: Mapping[str, object], tags: Mapping[str, str]) -> int:
        return 0

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        self.last.update(metrics)

    def end(self, status: str = "FINISHED") -> None:
        pass


class MlflowTracker:
    """An MLflow run per trainer start in the lineage's experiment; metrics logged with explicit steps."""

    def __init__(self, tracking_uri: str | None = None, step_metric: str = "train/loss", max_pending: int = 10_000,
                 retry_first_s: float = 2.0, retry_cap_s: float = 15.0):
        from mlflow import MlflowClient

        from trainer.lineage import default_tracking_uri

        self.tracking_uri = tracking_uri or default_tracking_uri()
        self.client = MlflowClient(tracking_uri=self.tracking_uri)
        self.run_id = None
        self.step_metric = step_metric
        self.last: dict[str, float] = {}
        self.queue: collections.deque = collections.deque(maxlen=max_pending)  # Metric points not sent yet
        self.dropped = 0  # points lost: pushed out of the full queue, or refused by the server (4xx)
        self.retry_first_s, self.retry_cap_s = retry_first_s, retry_cap_s
        self._failures = 0  # consecutive failed sends
        self._retry_at = 0.0  # time.monotonic() before which log() only queues (a down server costs no time)

    def start(self, lineage: str, params: Mapping[str, object], tags: Mapping[str, str]) -> int:
        name = f"spectutor/{lineage}"
        found = self.client.get_experiment_by_name(name)
        exp = found.experiment_id if found is not None else self.client.create_experiment(name)
        first = 0
        for run in self.client.search_runs([exp], max_results=50, order_by=["attributes.start_time DESC"]):
            for key in (self.step_metric, "data/events_consumed"):
                hist = self.client.get_metric_history(run.info.run_id, key)
                if hist:
                    first = max(first, max(m.step for m in hist) + 1)
        run = self.client.create_run(exp, tags=dict(tags), run_name=f"{lineage}-from-step-{first}")
        self.run_id = run.info.run_id
        from mlflow.entities import Param

        self.client.log_batch(self.run_id, params=[Param(k, str(v)[:500]) for k, v in params.items()])
        return first

    @property
    def pending(self) -> int:
        """Points waiting for the server."""
        return len(self.queue)

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        """Queue the points and send everything queued; never raises when the server is down or failing."""
        from mlflow.entities import Metric

        self.last.update(metrics)
        now = int(time.time() * 1000)
        points = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        self.dropped += max(0, len(self.queue) + len(points) - self.queue.maxlen)
        self.queue.extend(points)
        if time.monotonic() >= self._retry_at:
            self._flush()

    def _flush(self) -> bool:
        """Send the queue oldest step first, in batches MLflow accepts; False if the server is unreachable."""
        from mlflow.exceptions import MlflowException

        from trainer.lineage import backoff_s, unreachable

        ordered = sorted(self.queue, key=lambda m: m.step)  # stable: a step's points keep their order
        self.queue.clear()
        while ordered:
            batch = ordered[:1000]  # MLflow's per-request metric limit
            try:
                self.client.log_batch(self.run_id, metrics=batch)
            except Exception as exc:
                if unreachable(exc):
                    self.queue.extend(ordered)
                    self._failures += 1
                    delay = backoff_s(self._failures, self.retry_first_s, self.retry_cap_s)
                    self._retry_at = time.monotonic() + delay
                    log.warning("MLflow unreachable (%s); %d metric points kept, next try in %.0f s",
                                type(exc).__name__, len(self.queue), delay)
                    return False
                if not isinstance(exc, MlflowException):
                    self.queue.extend(ordered)
                    raise
                self.dropped += len(batch)  # refused as malformed: sending it again would fail again
                log.warning("MLflow refused %d metric points: %s", len(batch), exc)
            ordered = ordered[len(batch):]
        if self._failures:
            log.info("MLflow reachable again; metrics caught up")
        self._failures, self._retry_at = 0, 0.0
        return True

    def end(self, status: str = "FINISHED") -> None:
        """Send what is queued and close the run, best effort: an unreachable server is logged, not raised."""
        from trainer.lineage import unreachable

        if self.run_id is None:
            return
        try:
            if self.queue and not self._flush():
                log.warning("run %s ends with %d metric points never sent", self.run_id, len(self.queue))
            self.client.set_terminated(self.run_id, status)
        except Exception as exc:
            if not unreachable(exc):
                raise
            log.warning("could not close MLflow run %s: %s", self.run_id, exc)


class StatusFile:
    """The trainer's live status as one JSON object in a file, replaced atomically at most every `every_s`.

    A reader never sees a partial file: each write goes to a temporary sibling that os.replace
    moves over the old one.
    """

    def __init__(self, path: str | Path, every_s: float = 1.0):
        self.path = Path(path)
        self.every_s = every_s
        self._last = float("-inf")

    def write(self, status: Mapping[str, object], force: bool = False) -> bool:
        """Write `status` unless the last write was under every_s ago (force: always); True if written."""
        now = time.monotonic()
        if not force and now - self._last < self.every_s:
            return False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(status, sort_keys=True))
        os.replace(tmp, self.path)
        self._last = now
        return True
