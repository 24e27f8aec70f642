"""Experiment tracking behind a small protocol: MLflow in production, a null sink in tests and offline.

One experiment per drafter lineage (`spectutor/<registered name>`), one run per trainer start
(tagged with the run it resumed from). Steps are global: a restarted trainer continues after the
highest step any earlier run of the lineage logged, so curves never go back in time, even when a
crash lost steps that came after the last checkpoint.
"""
from __future__ import annotations

from typing import Mapping, Protocol


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

    def __init__(self, tracking_uri: str | None = None, step_metric: str = "train/loss"):
        from mlflow import MlflowClient

        from trainer.lineage import default_tracking_uri

        self.tracking_uri = tracking_uri or default_tracking_uri()
        self.client = MlflowClient(tracking_uri=self.tracking_uri)
        self.run_id = None
        self.step_metric = step_metric
        self.last: dict[str, float] = {}

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

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric
        import time

        self.last.update(metrics)
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def end(self, status: str = "FINISHED") -> None:
        if self.run_id is not None:
            self.client.set_terminated(self.run_id, status)
