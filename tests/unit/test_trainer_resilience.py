"""The trainer through an MLflow outage (a flaky fake registry, an unreachable tracking URI) and its status file."""
from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import requests
import torch
from mlflow.exceptions import MlflowException

from drafters.draft_lm import save_draft
from streams import open_producer
from trainer.distill import EvalMetrics, GateConfig
from trainer.lineage import CHAMPION, DrafterVersion, PendingRegistration, weights_sha256
from trainer.recipe import Trainer, TrainerConfig
from trainer.testing import served_events
from trainer.tracking import MlflowTracker, StatusFile

STATUS_KEYS = {"pid", "updated_at", "events_consumed", "steps", "promotions", "rejections", "checkpoints",
               "preemptions", "busy", "registration_failures", "registration_retries", "pending_registrations",
               "commit_failures", "last_decision", "lineages"}


class FlakyRegistry:
    """The slice of trainer.lineage.Lineage the trainer promotes through; the listed calls (1-based, per
    method) fail as an unreachable server would. Records every call."""

    def __init__(self, fail_register: set[int] = frozenset(), fail_promote: set[int] = frozenset(),
                 fail_alias: set[int] = frozenset()):
        self.fail_register, self.fail_promote, self.fail_alias = set(fail_register), set(fail_promote), set(fail_alias)
        self.calls: list[tuple[str, object, bool]] = []  # (method, sha256 or version, succeeded)
        self.versions: list[DrafterVersion] = []
        self.champion: int | None = None

    def _n(self, method: str) -> int:
        return sum(c[0] == method for c in self.calls) + 1

    def register(self, name, folder, *, run_id=None, tags=None, alias=None) -> DrafterVersion:
        sha = weights_sha256(folder)  # the snapshot folder must still be whole when retried
        assert tags["sha256"] == sha
        if self._n("register") in self.fail_register:
            self.calls.append(("register", sha, False))
            raise requests.ConnectionError("[Errno 111] Connection refused")
        self.calls.append(("register", sha, True))
        v = DrafterVersion(name, len(self.versions) + 1, f"models:/m-{len(self.versions)}", sha, (alias,),
                           {k: str(x) for k, x in tags.items()}, run_id)
        self.versions.append(v)
        return v

    def promote(self, name, version) -> DrafterVersion:
        if self._n("promote") in self.fail_promote:
            self.calls.append(("promote", version, False))
            # What MlflowClient raises for a refused connection: a plain MlflowException (HTTP 500).
            raise MlflowException(f"API request to http://127.0.0.1:9/api/2.0/mlflow/registered-models/alias "
                                  f"failed with exception ConnectionError")
        self.calls.append(("promote", version, True))
        self.champion = version
        return DrafterVersion(name, version, "", self.versions[version - 1].sha256, (CHAMPION,))

    def by_alias(self, name, alias=CHAMPION) -> DrafterVersion | None:
        if self._n("by_alias") in self.fail_alias:
            self.calls.append(("by_alias", alias, False))
            raise MlflowException("API request to http://127.0.0.1:9/api/2.0/mlflow/registered-models/alias "
                                  "failed with exception ConnectionError")
        self.calls.append(("by_alias", alias, True))
        return self.versions[self.champion - 1] if self.champion else None

    def fetch(self, version: DrafterVersion, root: Path) -> Path:
        return Path(version.source_uri)

    def ok(self, method: str) -> list[object]:
        return [arg for m, arg, done in self.calls if m == method and done]


def _cfg(tmp: Path, target: Path, **kw) -> TrainerConfig:
    base = dict(target=str(target), events_url=(tmp / "log").resolve().as_uri(), state_dir=str(tmp / "state"),
                draft_layers=2, registry=False, batch_size=4, holdout_size=8, train_every=2, steps_per_sample=1.0,
                gate_every=4, lr=1e-3, gate=GateConfig(min_samples=8, min_positions=64, margin=0.01, spec_len=3),
                stop_when_drained_s=0.5, checkpoint_every_s=0.0, registration_retry_s=0.01,
                registration_retry_cap_s=0.02)
    base.update(kw)
    return TrainerConfig(**base)


def _sha(model, tmp: Path) -> str:
    return save_draft(model, tmp, "check")


@pytest.fixture(scope="module")
def events(tiny_model):
    return served_events(tiny_model("llama"), 40, seed=3, pool=6)


def _publish(cfg: TrainerConfig, events) -> None:
    prod = open_producer(cfg.events_url)
    for ev in events:
        prod.publish(ev)
    prod.close()


def test_a_winner_survives_failed_register_and_promote_and_is_registered_once(tmp_path, tiny_model) -> None:
    t = Trainer(_cfg(tmp_path, tiny_model("llama")))
    t.setup()
    try:
        t.registry = reg = FlakyRegistry(fail_register={1, 4}, fail_promote={1})
        lin = t.lineages["general"]
        champ, chall = EvalMetrics(0.1, 1.2, 0.1, 8, 64), EvalMetrics(0.5, 2.0, 0.5, 8, 64)
        winner = _sha(lin.student, tmp_path / "w1")
        t._promote(lin, champ, chall)  # register refused: kept pending, nothing raised
        assert t.stats.registration_failures == 1 and t.stats.pending_registrations == 1
        assert lin.pending.version is None and lin.champion_version is None and t.stats.promotions == 0
        with torch.no_grad():  # training goes on meanwhile; the snapshot must not follow it
            next(lin.student.parameters()).add_(1.0)
        t._retry_registrations(force=True)  # registered as v1, promote refused
        assert lin.pending.version == 1 and t.stats.registration_failures == 2 and lin.champion_version is None
        t._retry_registrations(force=True)  # promotes v1, does not register it again
        assert reg.ok("register") == [winner] and reg.ok("promote") == [1]
        assert [c[:2] for c in reg.calls if c[0] == "promote"] == [("promote", 1), ("promote", 1)]
        assert lin.pending is None and t.stats.pending_registrations == 0
        assert lin.champion_version == reg.champion == 1 and t.stats.promotions == lin.promotions == 1
        assert _sha(lin.champion, tmp_path / "c1") == winner  # the champion is the snapshot, not today's student
        assert t.stats.registration_retries == 2 and t.stats.checkpoints >= 1
        # A newer winner replaces one still pending: only the newest is registered.
        t._promote(lin, champ, chall)  # MLflow is back: registered (v2) and promoted at once
        assert lin.champion_version == 2
        with torch.no_grad():
            next(lin.student.parameters()).add_(1.0)
        stale = _sha(lin.student, tmp_path / "w3")
        t._promote(lin, champ, chall)  # register call 4 refused
        first_folder = lin.pending.folder
        lin.pending.next_try = float("inf")  # still backing off when the next winner comes
        with torch.no_grad():
            next(lin.student.parameters()).add_(1.0)
        newest = _sha(lin.student, tmp_path / "w4")
        t._promote(lin, champ, chall)  # replaces it, keeps its backoff: no call yet
        assert not first_folder.exists() and lin.pending.folder.exists() and len(reg.calls) == 7
        assert lin.pending.attempts == 1 and t.stats.pending_registrations == 1
        t._retry_registrations(force=True)  # registers the newest (call 5), promotes it
        assert lin.pending is None and t.stats.registration_retries == 3
        assert stale not in reg.ok("register") and reg.ok("register")[-1] == newest
        assert lin.champion_version == reg.champion == 3 and t.stats.promotions == 3
        assert not list(Path(t.cfg.state_dir).glob("challenger-*"))  # snapshots are removed once registered
    finally:
        t.cleanup()


def test_programming_errors_still_raise(tmp_path, tiny_model) -> None:
    t = Trainer(_cfg(tmp_path, tiny_model("llama")))
    t.setup()
    try:
        t.registry = FlakyRegistry()
        t.registry.register = lambda *a, **k: (_ for _ in ()).throw(TypeError("bad call"))
        with pytest.raises(TypeError, match="bad call"):
            t._promote(t.lineages["general"], EvalMetrics(0.1, 1.2, 0.1, 8, 64), EvalMetrics(0.5, 2.0, 0.5, 8, 64))
    finally:
        t.cleanup()


class FlakyTracker:
    """A tracker whose first `fails` start() calls find MLflow unreachable."""

    def __init__(self, fails: int):
        self.fails, self.starts, self.run_id, self.last = fails, 0, None, {}

    def start(self, lineage, params, tags) -> int:
        self.starts += 1
        if self.starts <= self.fails:
            raise requests.ConnectionError("[Errno 111] Connection refused")
        self.run_id = "run-1"
        return 0

    def log(self, metrics, step) -> None:
        self.last.update(metrics)

    def end(self, status: str = "FINISHED") -> None:
        pass


def test_a_trainer_started_during_an_outage_waits_for_the_registry_and_loads_its_champion(
        tmp_path, tiny_model, monkeypatch) -> None:
    import trainer.lineage
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    target = tiny_model("llama")
    probe = Trainer(_cfg(tmp_path / "probe", target))
    probe.setup()
    try:  # a champion already in the registry, different from the base draft
        champion = probe.kind.clone(probe.lineages["general"].student)
        with torch.no_grad():
            next(champion.parameters()).add_(0.5)
        sha = _sha(champion, tmp_path / "v1")
    finally:
        probe.cleanup()
    reg = FlakyRegistry(fail_alias={1, 2})
    reg.versions.append(DrafterVersion("d", 1, str(tmp_path / "v1"), sha, (CHAMPION,)))
    reg.champion = 1
    monkeypatch.setattr(trainer.lineage, "Lineage", lambda *a, **k: reg)
    trackers = []
    t = Trainer(_cfg(tmp_path, target, registry=True),
                tracker_factory=lambda: trackers.append(FlakyTracker(fails=1)) or trackers[-1])
    t.setup()  # by_alias refused twice, the run's creation once: waited for, not raised
    try:
        lin = t.lineages["general"]
        assert [c[2] for c in reg.calls if c[0] == "by_alias"] == [False, False, True]
        assert t.stats.registry_waits == 3 and trackers[0].starts == 2 and lin.tracker.run_id == "run-1"
        assert lin.champion_version == 1 and _sha(lin.champion, tmp_path / "c") == sha
        assert _sha(lin.student, tmp_path / "s") == sha  # a fresh student starts from the champion
    finally:
        t.cleanup()
    # A call that is wrong rather than unreachable is raised at once.
    reg2 = FlakyRegistry()
    reg2.by_alias = lambda *a, **k: (_ for _ in ()).throw(MlflowException("bad name", error_code=INVALID_PARAMETER_VALUE))
    monkeypatch.setattr(trainer.lineage, "Lineage", lambda *a, **k: reg2)
    t2 = Trainer(_cfg(tmp_path / "t2", target, registry=True))
    with pytest.raises(MlflowException, match="bad name"):
        t2.setup()
    assert t2.stats.registry_waits == 0


def test_backoff_recovers_a_20s_outage_within_15s() -> None:
    p = PendingRegistration(None, Path("."), {}, None, 0.0, 0.0)
    assert [p.failed(0.0, 2.0, 15.0) for _ in range(6)] == [2.0, 4.0, 8.0, 15.0, 15.0, 15.0]
    p, now = PendingRegistration(None, Path("."), {}, None, 0.0, 0.0), 0.0
    while now < 20.0:  # the server is down for the first 20 s
        now += p.failed(now, 2.0, 15.0)
    assert now - 20.0 <= 15.0


def test_train_loop_retries_registration_through_an_outage(tmp_path, tiny_model, events) -> None:
    cfg = _cfg(tmp_path, tiny_model("llama"))
    _publish(cfg, events)
    t = Trainer(cfg)
    t.setup()
    try:
        t.registry = reg = FlakyRegistry(fail_register={1, 2}, fail_promote={1})
        stats = t.train()
    finally:
        t.cleanup()
    lin = t.lineages["general"]
    assert stats.events_consumed == 40 and stats.promotions >= 1, stats.last_decision
    assert stats.registration_failures == 3  # every refused call, once each
    assert stats.registration_retries >= 3  # the three attempts after the first failure (more if a winner came meanwhile)
    assert stats.pending_registrations == 0 and lin.pending is None
    registered = reg.ok("register")
    assert len(registered) == len(set(registered)) == len(reg.versions)  # no winner registered twice
    assert stats.promotions == lin.promotions == len(reg.ok("promote"))
    assert lin.champion_version == reg.champion == reg.ok("promote")[-1]
    assert _sha(lin.champion, tmp_path / "c") == reg.versions[reg.champion - 1].sha256


def test_tracker_keeps_metrics_while_mlflow_is_unreachable(monkeypatch) -> None:
    for var, value in {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "2"}.items():
        monkeypatch.setenv(var, value)
    tr = MlflowTracker("http://127.0.0.1:9", max_pending=5)  # port 9: nothing listens, refused at once
    tr.run_id = "run"
    tr.log({"train/loss": 2.0, "data/lag_s": 0.1}, 0)  # a real refused request
    assert tr.pending == 2 and tr.dropped == 0
    sent: list[list] = []
    monkeypatch.setattr(tr.client, "log_batch", lambda run_id, metrics: sent.append(list(metrics)))
    tr.log({"train/loss": 1.5, "data/lag_s": 0.1}, 1)  # within the backoff: queued, not sent
    assert sent == [] and tr.pending == 4
    tr.log({"train/loss": 1.0, "data/lag_s": 0.1}, 2)  # the queue holds 5: the oldest point goes
    assert tr.pending == 5 and tr.dropped == 1

    def refuse(run_id, metrics):
        raise MlflowException("API request to http://127.0.0.1:9/api/2.0/mlflow/runs/log-batch failed")

    monkeypatch.setattr(tr.client, "log_batch", refuse)
    tr._retry_at = 0.0
    tr.log({"train/loss": 0.5}, 3)  # fails again: still nothing raised
    assert tr.pending == 5 and tr.dropped == 2
    monkeypatch.setattr(tr.client, "log_batch", lambda run_id, metrics: sent.append(list(metrics)))
    tr._retry_at = 0.0
    tr.log({"train/loss": 0.25}, 4)  # back: everything kept goes, oldest step first
    assert tr.pending == 0 and [m.step for m in sent[0]] == [1, 2, 2, 3, 4]
    monkeypatch.setattr(tr.client, "log_batch", refuse)
    monkeypatch.setattr(tr.client, "set_terminated", lambda *a: refuse(None, None))
    tr._retry_at = 0.0
    tr.log({"train/loss": 0.1}, 5)
    tr.end()  # best effort: logs, does not raise
    assert tr.pending == 1


def test_status_file_follows_the_trainer(tmp_path, tiny_model, events) -> None:
    cfg = _cfg(tmp_path, tiny_model("llama"))
    _publish(cfg, events)
    path = tmp_path / "run" / "status.json"
    sink = StatusFile(path, every_s=0.0)
    seen: list[dict] = []

    def progress(trainer: Trainer) -> None:
        sink.write(trainer.status())
        seen.append(json.loads(path.read_text()))

    t = Trainer(cfg, on_progress=progress)
    t.setup()
    try:
        t.registry = FlakyRegistry(fail_register={1})
        stats = t.train()
    finally:
        t.cleanup()
    sink.write(t.status(), force=True)
    final = json.loads(path.read_text())
    assert set(final) == STATUS_KEYS and all(set(s) == STATUS_KEYS for s in seen)
    assert [s["events_consumed"] for s in seen] == sorted(s["events_consumed"] for s in seen)
    for key in STATUS_KEYS - {"pid", "updated_at", "lineages"}:
        assert final[key] == getattr(stats, key), key
    assert final["registration_failures"] == 1 and final["pending_registrations"] == 0
    gen = final["lineages"]["general"]
    lin = t.lineages["general"]
    assert gen == {"name": lin.name, "champion_version": lin.champion_version, "step": lin.step,
                   "buffer": len(lin.buffer), "holdout": len(lin.holdout)}
    assert gen["buffer"] + gen["holdout"] == 40 and isinstance(final["busy"], bool)
    assert not list(path.parent.glob(".*.tmp"))  # each write replaced the file; no temporary left behind
    # At most once per `every_s`; force writes regardless.
    slow = StatusFile(path, every_s=60.0)
    assert slow.write({"a": 1}) and not slow.write({"a": 2}) and slow.write({"a": 3}, force=True)


def test_cli_writes_the_status_file(tmp_path, tiny_model, events, capsys) -> None:
    from spectutor.cli import main as cli

    cfg = _cfg(tmp_path, tiny_model("llama"))
    _publish(cfg, events[:12])
    path = tmp_path / "status.json"
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        assert cli(["train", "--model", cfg.target, "--events-url", cfg.events_url, "--state-dir", cfg.state_dir,
                    "--draft-layers", "2", "--no-registry", "--no-progress", "--stop-when-drained", "0.3",
                    "--batch-size", "4", "--holdout-size", "4", "--status-file", str(path)]) == 0
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    status = json.loads(path.read_text())
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(status) == STATUS_KEYS and status["events_consumed"] == summary["events_consumed"] == 12
    assert status["steps"] == summary["steps"] and status["checkpoints"] == summary["checkpoints"]
    assert summary["registration_failures"] == 0 and summary["pending_registrations"] == 0


def test_a_failed_consumer_commit_is_counted_and_retried_at_the_next_checkpoint(tmp_path, tiny_model, events) -> None:
    """A broker restart makes the commit after a durable checkpoint time out: the trainer goes on,
    and the next checkpoint commits (the fault drill in test_full_loop.py found this on real Kafka)."""
    cfg = _cfg(tmp_path, tiny_model("llama"))
    _publish(cfg, events)
    t = Trainer(cfg)
    t.setup()
    real_commit, calls = t.consumer.commit, []

    def commit() -> None:
        calls.append(len(calls))
        if len(calls) == 1:
            raise TimeoutError("commit timed out: the group coordinator is restarting")
        real_commit()

    t.consumer.commit = commit
    try:
        stats = t.train()
    finally:
        t.cleanup()
    assert stats.commit_failures == 1 and len(calls) >= 2 and stats.events_consumed == 40
    assert t.status()["commit_failures"] == 1


def test_mlflow_requests_are_bounded_unless_the_operator_chose_otherwise(monkeypatch) -> None:
    """Trainer and replica swapper both call this: a request made during an outage fails in seconds."""
    from trainer.lineage import MLFLOW_HTTP_DEFAULTS, bound_http_retries

    for var in MLFLOW_HTTP_DEFAULTS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "42")
    bound_http_retries()
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "1"
    assert os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"] == "1"
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "42"
