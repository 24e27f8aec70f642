"""The online loop on real services: Kafka -> trainer -> MLflow registry -> Redis, and a killed trainer.

Kafka topic, Redis prefix and registered names are unique per test, so the shared services are
never disturbed. Events are real: a tiny target served by the engine (trainer.testing).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import redis

from streams import open_producer
from streams.schema import Promotion, decode
from trainer import checkpoint as ckpt
from trainer.distill import GateConfig
from trainer.lineage import Lineage, registered_name
from trainer.recipe import Trainer, TrainerConfig
from trainer.testing import served_events
from trainer.tracking import MlflowTracker

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def events(tiny_model):
    return served_events(tiny_model("llama"), 48, seed=5, pool=6)


def _publish(services, events, topic: str, spill: Path) -> str:
    from streams.kafka_consumer import ensure_topic

    bootstrap = services["SPECTUTOR_KAFKA_BOOTSTRAP"]
    ensure_topic(bootstrap, topic, partitions=2)
    url = f"kafka://{bootstrap}"
    prod = open_producer(url, topic=topic, client_id=f"it-{topic}", spill_path=str(spill))
    for ev in events:
        assert prod.publish(ev)
    assert prod.flush(60), prod.stats()
    prod.close()
    return url


def _cfg(tmp: Path, target: Path, url: str, topic: str, tag: str, prefix: str, redis_url: str) -> TrainerConfig:
    return TrainerConfig(target=str(target), events_url=url, topic=topic, group=f"g-{tag}", state_dir=str(tmp / "state"),
                         draft_layers=2, lineage_tag=tag, batch_size=4, holdout_size=8, train_every=2,
                         steps_per_sample=1.0, gate_every=4, lr=1e-3, redis_url=redis_url, redis_prefix=prefix,
                         gate=GateConfig(min_samples=8, min_positions=64, margin=0.01, spec_len=3),
                         stop_when_drained_s=3.0, checkpoint_every_s=0.0)


def test_better_challenger_is_registered_promoted_and_announced_worse_one_is_not(
        tmp_path, tiny_model, events, services, capsys) -> None:
    tag = f"it{uuid.uuid4().hex[:8]}"
    topic, prefix = f"trainer-{tag}", f"tr{tag}"
    url = _publish(services, events, topic, tmp_path / "spill")
    cfg = _cfg(tmp_path, tiny_model("llama"), url, topic, tag, prefix, services["SPECTUTOR_REDIS_URL"])
    r = redis.Redis.from_url(services["SPECTUTOR_REDIS_URL"])
    sub = r.pubsub()
    sub.subscribe(f"{prefix}:promotions")
    t = Trainer(cfg, MlflowTracker)
    t.setup()
    try:
        stats = t.train()
        assert stats.events_consumed == 48 and stats.promotions >= 1, stats.last_decision
        name = registered_name(None, tag)
        reg = Lineage()
        champion = reg.by_alias(name)
        assert champion is not None and champion.version == t.lineages["general"].champion_version
        tags = champion.tags
        assert tags["sha256"] == champion.sha256 and len(champion.sha256) == 64
        assert json.loads(tags["domains"]) == ["general"] and "parent_version" in tags
        offsets = json.loads(tags["kafka_offsets"])
        assert offsets and all(k.startswith(topic) for k in offsets)
        gate = json.loads(tags["gate"])
        assert gate["acceptance"] >= gate["champion_acceptance"] + 0.01
        reg.fetch(champion, tmp_path / "dl")  # sha256-checked download
        # The announcement on the Redis channel.
        seen = []
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not seen:
            msg = sub.get_message(timeout=0.5)
            if msg and msg["type"] == "message":
                seen.append(decode(msg["data"]))
        assert seen and isinstance(seen[0], Promotion) and seen[0].name == name
        assert r.get(f"{prefix}:blob:router") is not None  # the router, for serving
        # Metrics per step in the lineage's run.
        run_id = t.lineages["general"].tracker.run_id
        steps = [m.step for m in reg.client.get_metric_history(run_id, "train/loss")]
        assert steps == sorted(steps) and len(steps) == stats.steps
        assert reg.client.get_metric_history(run_id, "eval/acceptance")
        # A worse challenger (the untrained cut) is not promoted: no new version, champion unchanged.
        lin = t.lineages["general"]
        lin.student.load_state_dict(t.kind.base().state_dict())
        before = [v.version for v in reg.versions(name)]
        assert not t.gate(lin)
        assert [v.version for v in reg.versions(name)] == before
        assert reg.by_alias(name).version == champion.version
        # The CLI lists versions with aliases and gate metrics, and rolls the champion back.
        from spectutor.cli import main as cli

        assert cli(["drafters", "list", name]) == 0
        listed = capsys.readouterr().out
        assert f"v{champion.version}" in listed and "champion" in listed and "acc " in listed
        if stats.promotions >= 2:
            assert cli(["drafters", "rollback", name, "--redis-url", services["SPECTUTOR_REDIS_URL"],
                        "--redis-prefix", prefix]) == 0
            assert reg.by_alias(name).version < champion.version
        assert cli(["drafters", "rollback", "no-such-drafter"]) == 2
        assert "no-such-drafter" in capsys.readouterr().err
    finally:
        t.cleanup()
        sub.close()
        keys = list(r.scan_iter(match=f"{prefix}:*"))
        if keys:
            r.delete(*keys)


def _train_proc(cfg: TrainerConfig, env: dict[str, str]) -> subprocess.Popen:
    args = [sys.executable, "-m", "spectutor", "train", "--no-progress", "--model", cfg.target,
            "--events-url", cfg.events_url, "--topic", cfg.topic, "--group", cfg.group, "--state-dir", cfg.state_dir,
            "--draft-layers", "2", "--lineage-tag", cfg.lineage_tag, "--batch-size", "4", "--holdout-size", "8",
            "--train-every", "2", "--steps-per-sample", "1", "--gate-every", "4", "--lr", "1e-3",
            "--gate-min-samples", "8", "--gate-min-positions", "64", "--spec-len", "3", "--threads", "1",
            "--checkpoint-every-s", "0", "--redis-url", cfg.redis_url, "--redis-prefix", cfg.redis_prefix,
            # Longer than the Kafka session timeout (10 s): the killed member holds its partitions until then.
            "--stop-when-drained", "15", "--poll-records", "8"]
    return subprocess.Popen(args, cwd=ROOT, env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def test_trainer_killed_between_checkpoint_and_commit_resumes_exactly_once(
        tmp_path, tiny_model, events, services) -> None:
    tag = f"it{uuid.uuid4().hex[:8]}"
    topic, prefix = f"trainer-{tag}", f"tr{tag}"
    url = _publish(services, events, topic, tmp_path / "spill")
    cfg = _cfg(tmp_path, tiny_model("llama"), url, topic, tag, prefix, services["SPECTUTOR_REDIS_URL"])
    trace, marker = tmp_path / "trace.txt", tmp_path / "fault"
    proc = _train_proc(cfg, {"SPECTUTOR_TRAINER_FAULT": "after_checkpoint:2", "SPECTUTOR_TRAINER_FAULT_MARKER": str(marker),
                             "SPECTUTOR_TRAINER_TRACE": str(trace)})
    try:
        deadline = time.monotonic() + 120
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert marker.exists(), proc.communicate(timeout=5)[1][-3000:] if proc.poll() is not None else "no fault point"
        proc.send_signal(signal.SIGKILL)  # between the durable checkpoint and the consumer commit
        assert proc.wait(timeout=10) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
    _, first = ckpt.latest(Path(cfg.state_dir))
    consumed_before = first["events_consumed"]
    assert 0 < consumed_before == int(marker.read_text())
    reg = Lineage()
    exp = reg.client.get_experiment_by_name(f"spectutor/{registered_name(None, tag)}")
    run1 = reg.client.search_runs([exp.experiment_id])[0].info.run_id
    steps1 = [m.step for m in reg.client.get_metric_history(run1, "train/loss")]

    proc = _train_proc(cfg, {"SPECTUTOR_TRAINER_TRACE": str(trace)})
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    summary = json.loads(out.strip().splitlines()[-1])
    ids = trace.read_text().split()
    assert len(ids) == len(set(ids)) == 48  # every event absorbed exactly once, across the crash
    assert sorted(ids) == sorted(ev.event_id for ev in events)
    assert summary["events_consumed"] == 48
    # The uncommitted records came again and were dropped (by the de-dup window or the positions).
    assert summary["already_trained"] + summary["duplicates"] >= 1
    # MLflow steps keep increasing across the two runs.
    runs = reg.client.search_runs([exp.experiment_id])
    run2 = next(r.info.run_id for r in runs if r.info.run_id != run1)
    steps2 = [m.step for m in reg.client.get_metric_history(run2, "train/loss")]
    assert steps1 and steps2 and min(steps2) > max(steps1)
    # Every registered version is whole: its download matches its sha256.
    for v in reg.versions(registered_name(None, tag)):
        reg.fetch(v, tmp_path / "dl")
    r = redis.Redis.from_url(cfg.redis_url)
    keys = list(r.scan_iter(match=f"{prefix}:*"))
    if keys:
        r.delete(*keys)


def test_redis_heartbeats_pause_training_within_one_second(services) -> None:
    from streams.redis_bus import RedisBus, RedisConfig
    from streams.schema import Heartbeat
    from trainer.idle import IdleConfig, LoadWatcher

    prefix = f"tr{uuid.uuid4().hex[:8]}"
    bus = RedisBus(services["SPECTUTOR_REDIS_URL"], RedisConfig(prefix=prefix, heartbeat_ttl_s=2.0))
    watcher = LoadWatcher(bus.heartbeats, IdleConfig(max_busy=1, poll_s=0.2))
    try:
        assert not watcher.busy
        assert bus.heartbeat(Heartbeat("replica-0", running=1, tokens_per_s=20.0, queue_depth=0))
        time.sleep(0.5)
        assert not watcher.busy  # within the threshold: keep training
        assert bus.heartbeat(Heartbeat("replica-1", running=2, tokens_per_s=20.0, queue_depth=1))
        start = time.monotonic()
        while not watcher.busy and time.monotonic() - start < 2:
            time.sleep(0.01)
        assert watcher.busy and time.monotonic() - start < 1.0
        assert watcher.wait_idle(timeout_s=5.0)  # heartbeats expire (TTL): idle again
    finally:
        watcher.close()
        bus.close()
        r = redis.Redis.from_url(services["SPECTUTOR_REDIS_URL"])
        keys = list(r.scan_iter(match=f"{prefix}:*"))
        if keys:
            r.delete(*keys)
