"""The whole loop, small, on the real local services, and its fault drills.

Ray Serve (2 replicas of a tiny Llama with SmolLM2's tokenizer, a 1-layer draft cut from it) ->
token events on Kafka -> `spectutor train` (a child process) -> MLflow registry + Redis announcement
-> the replicas swap -> later answers name the new version. spectutor.loop.LocalLoop runs it, as
for `spectutor demo`. Then, on that same loop, each drill takes one part away and counts:

  - Kafka broker restarted mid-traffic: every answered request's event is on the topic, exactly;
    the trainer consumes each once;
  - trainer SIGKILLed mid-training: restarted on its state folder, it resumes and promotes later;
  - Redis down 20 s: no request fails, a promotion still reaches both replicas (MLflow poll);
  - MLflow down 20 s: no request fails, the trainer's registration fails, is retried, and lands.

Tests run in file order and share the loop (module fixture); all names (topic, group, lineage,
Redis keys are per lineage) are unique per run, so the shared services are left as they were.
"""
from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Iterator

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
from test_serving_api import chat_model  # noqa: E402

from serving.replay import Outcome, Replayer, RequestSpec, acceptance  # noqa: E402

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
PORT = int(os.environ.get("SPECTUTOR_TEST_LOOP_PORT", "8772"))
OUTAGE_S = 20.0


def pool(name: str, n: int = 6) -> list[str]:
    """n fixed prompts of one 'domain': what the draft can learn from one request carries to the next."""
    return [f"{name} question {i}: what comes after {name} number {i}?" for i in range(n)]


class Traffic:
    """Closed-loop clients in a background thread (spectutor.replay) over a prompt pool."""

    def __init__(self, url: str, prompts: list[str], users: int = 2, max_tokens: int = 12):
        self._i = 0
        self._prompts = prompts
        self._stop = threading.Event()
        self.replayer = Replayer(url, "tiny", self._next, users=users, think_s=0.0, max_tokens=max_tokens)
        self._thread = threading.Thread(target=lambda: asyncio.run(self.replayer.run(self._stop.is_set)), daemon=True)

    def _next(self) -> RequestSpec:
        self._i += 1
        return RequestSpec("loop", self._prompts[self._i % len(self._prompts)], "completion")

    def __enter__(self) -> "Traffic":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def outcomes(self) -> list[Outcome]:
        return list(self.replayer.outcomes)

    def stop(self) -> list[Outcome]:
        self._stop.set()
        self._thread.join(120)
        assert not self._thread.is_alive(), "traffic did not stop within 120 s"
        return self.outcomes

    def wait(self, n: int, timeout_s: float = 120) -> None:
        """Until n answers came back."""
        deadline = time.monotonic() + timeout_s
        while len(self.replayer.outcomes) < n:
            assert time.monotonic() < deadline, f"only {len(self.replayer.outcomes)}/{n} answers in {timeout_s}s"
            time.sleep(0.1)


def _service(action: str, name: str) -> None:
    subprocess.run([str(ROOT / "deploy" / "local" / "stack.sh"), action, name], check=True, timeout=180,
                   stdout=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def loop(tmp_path_factory, services) -> Iterator[dict]:
    kafka, redis_url, mlflow_uri = (services["SPECTUTOR_KAFKA_BOOTSTRAP"], services["SPECTUTOR_REDIS_URL"],
                                    services["MLFLOW_TRACKING_URI"])
    from spectutor.loop import LocalLoop, LoopConfig

    root = tmp_path_factory.mktemp("loop")
    folder = chat_model(root / "target")
    cfg = LoopConfig(model=str(folder), work_dir=root / "work", tag=f"it{uuid.uuid4().hex[:8]}", kafka=kafka,
                     redis_url=redis_url, mlflow_uri=mlflow_uri, served_model_name="tiny", port=PORT, replicas=2,
                     replica_cpus=0.5, draft_layers=1, speculation=3, max_batch=8, max_len=128, poll_interval_s=2.0,
                     # Half a step per event and a gate every 8 steps keep the trainer (one core)
                     # level with the traffic, so "caught up" waits are short.
                     trainer_args={"--batch-size": 4, "--holdout-size": 8, "--train-every": 2,
                                   "--steps-per-sample": 0.5, "--gate-every": 8, "--lr": 1e-3,
                                   "--gate-min-samples": 8, "--gate-min-positions": 64, "--threads": 1,
                                   "--max-busy": 1000, "--checkpoint-every-s": 2, "--poll-records": 32})
    loop = LocalLoop(cfg)
    state: dict = {"loop": loop, "answered": []}  # every successful Outcome of the module
    try:
        loop.start(serve_timeout_s=180)
        yield state
    finally:
        loop.stop()
        # Whatever a drill stopped is running again for the tests after this module.
        for name in ("kafka", "redis", "mlflow"):
            if subprocess.run([str(ROOT / "deploy" / "local" / f"{name}.sh"), "status"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode != 0:
                _service("start", name)


def _keep(state: dict, outcomes: list[Outcome]) -> list[Outcome]:
    failed = [o for o in outcomes if not o.ok]
    assert not failed, f"{len(failed)} of {len(outcomes)} requests failed: {[o.error for o in failed[:3]]}"
    state["answered"] += outcomes
    return outcomes


def _champion(status: dict) -> int | None:
    return status["lineages"]["general"]["champion_version"]


def _topic_request_ids(loop, timeout_s: float, wanted: set[str]) -> list[str]:
    """Request ids of every event on the loop's topic (a fresh group reads from the start)."""
    from streams import open_consumer

    consumer = open_consumer(f"kafka://{loop.cfg.kafka}", group=f"count-{uuid.uuid4().hex[:6]}",
                             topic=loop.cfg.topic)
    ids: list[str] = []
    deadline = time.monotonic() + timeout_s
    quiet_until = None
    try:
        while time.monotonic() < deadline:
            got = consumer.poll()
            ids += [d.event.request_id for d in got]
            if wanted <= set(ids):
                quiet_until = quiet_until or time.monotonic() + 3  # a little longer: anything extra shows
                if time.monotonic() > quiet_until:
                    break
    finally:
        consumer.close()
    return ids


def test_traffic_trains_a_drafter_that_replicas_swap_to_and_acceptance_rises(loop) -> None:
    lp = loop["loop"]
    prompts = pool("alpha")
    with Traffic(lp.url, prompts) as before:
        before.wait(24)
    first = _keep(loop, before.outcomes)
    start_versions = {v for o in first for v in o.versions}
    assert start_versions and all(not v.isdigit() for v in start_versions), start_versions  # the untrained cut
    with Traffic(lp.url, prompts) as more:  # until the trainer promotes a version
        status = lp.wait_trainer(lambda s: _champion(s) is not None, 180, "a first promotion")
        version = str(_champion(status))
        assert lp.wait_replicas_on(version, 30), lp.replica_infos()
    _keep(loop, more.outcomes)
    with Traffic(lp.url, prompts) as after:
        after.wait(24)
    later = _keep(loop, after.outcomes)
    served_new = [o for o in later if o.versions and all(v.isdigit() and int(v) >= int(version) for v in o.versions)]
    assert len(served_new) == len(later), [o.versions for o in later]  # every later answer names it
    assert len({o.replica_id for o in later}) == lp.cfg.replicas  # both replicas answered with it
    a0, a1 = acceptance(first), acceptance(later)
    print(f"acceptance on the replayed prompts: {a0:.3f} with the cut -> {a1:.3f} with v{version}")
    assert a1 > a0, (a0, a1)


def test_kafka_broker_restart_mid_traffic_loses_no_acked_event_and_the_trainer_catches_up(loop) -> None:
    lp = loop["loop"]
    with Traffic(lp.url, pool("beta")) as t:
        t.wait(8)
        t0 = time.monotonic()
        _service("restart", "kafka")
        n = len(t.outcomes)
        print(f"[timing] kafka restarted in {time.monotonic() - t0:.1f}s, {n} answers so far")
        t.wait(n + 16, timeout_s=120)  # answers keep coming with the broker back
        print(f"[timing] 16 more answers after {time.monotonic() - t0:.1f}s")
    _keep(loop, t.outcomes)
    answered = {o.request_id for o in loop["answered"]}
    t0 = time.monotonic()
    ids = _topic_request_ids(lp, 120, answered)
    print(f"[timing] topic read back in {time.monotonic() - t0:.1f}s")
    assert set(ids) == answered, (len(answered - set(ids)), "lost", len(set(ids) - answered), "unknown")
    print(f"events on the topic: {len(ids)} records, {len(set(ids))} distinct, {len(answered)} answered requests")
    # The trainer absorbs each event exactly once (its consumer de-duplicates redeliveries).
    t0 = time.monotonic()
    lp.wait_trainer(lambda s: s["events_consumed"] >= len(answered), 120, f"{len(answered)} events consumed")
    print(f"[timing] trainer caught up in {time.monotonic() - t0:.1f}s: {lp.trainer_status()}")
    assert lp.trainer_status()["events_consumed"] == len(answered)


def test_trainer_killed_mid_training_resumes_and_promotes_later(loop) -> None:
    from trainer import checkpoint as ckpt

    lp = loop["loop"]
    before = lp.trainer_status()
    with Traffic(lp.url, pool("gamma")) as t:  # new prompts: room for the draft to improve
        lp.wait_trainer(lambda s: s["steps"] > before["steps"] + 4, 120, "training on new traffic")
        champion = _champion(lp.trainer_status())
        assert lp.kill_trainer() == -9
        _, durable = ckpt.latest(lp.work_dir / "trainer")  # what survived the crash
        assert durable["events_consumed"] > 0
        lp.start_trainer()
        resumed = lp.wait_trainer(lambda s: True, 120, "the restarted trainer's first status")
        # It resumed from its last checkpoint, not from scratch (work after that checkpoint is redone).
        assert resumed["steps"] >= durable["steps"] and resumed["events_consumed"] >= durable["events_consumed"]
        status = lp.wait_trainer(lambda s: (_champion(s) or 0) > (champion or 0), 180,
                                 f"a promotion after the restart (champion was v{champion})")
        assert lp.wait_replicas_on(str(_champion(status)), 30), lp.replica_infos()
    _keep(loop, t.outcomes)
    answered = len({o.request_id for o in loop["answered"]})
    lp.wait_trainer(lambda s: s["events_consumed"] >= answered, 120, f"{answered} events consumed")
    assert lp.trainer_status()["events_consumed"] == answered  # none twice across the crash
    assert lp.trainer_starts == 2
    print(f"trainer killed at {before['steps']}+ steps; resumed from a checkpoint at {durable['steps']} steps / "
          f"{durable['events_consumed']} events; promoted v{_champion(status)} after the restart; "
          f"{answered} events absorbed once each")


def test_redis_down_serving_unaffected_and_a_promotion_arrives_by_mlflow_polling(loop, tmp_path) -> None:
    from trainer.lineage import Lineage

    lp = loop["loop"]
    reg = Lineage(lp.cfg.mlflow_uri)
    current = reg.by_alias(lp.cfg.lineage)
    swaps_before = {r: i["swaps"] for r, i in lp.replica_infos().items()}
    with Traffic(lp.url, pool("delta")) as t:
        t.wait(4)
        _service("stop", "redis")
        down_at, n0 = time.monotonic(), len(t.outcomes)
        try:
            # An operator re-registers the champion's weights as a new version and promotes it; nobody
            # can announce it, so the replicas must find it by polling the MLflow alias.
            copy = reg.register(lp.cfg.lineage, reg.fetch(current, tmp_path / "dl"), alias="champion")
            assert lp.wait_replicas_on(str(copy.version), OUTAGE_S - 3), lp.replica_infos()
            while time.monotonic() - down_at < OUTAGE_S:
                time.sleep(0.2)
            during = len(t.outcomes) - n0
        finally:
            _service("start", "redis")
        t.wait(len(t.outcomes) + 8)
    _keep(loop, t.outcomes)
    assert during >= 10, during  # requests kept being answered while Redis was down
    swaps_after = {r: i["swaps"] for r, i in lp.replica_infos().items()}
    assert all(swaps_after[r] >= swaps_before[r] + 1 for r in swaps_before), (swaps_before, swaps_after)
    assert lp.trainer_alive()
    print(f"Redis down {OUTAGE_S:.0f}s: {during} requests answered meanwhile, 0 failed; both replicas reached "
          f"v{copy.version} by polling MLflow")


def test_mlflow_down_serving_unaffected_and_the_trainer_retries_registration(loop) -> None:
    from trainer.lineage import Lineage

    lp = loop["loop"]
    # A trainer that is still starting waits for MLflow (tests/unit/test_trainer_resilience.py); this
    # drill is about one that is running, so it waits for the trainer's first status.
    before = lp.wait_trainer(lambda s: True, 180, "the trainer's first status")
    with Traffic(lp.url, pool("epsilon")) as t:  # new prompts: the trainer will soon have a winner
        t.wait(4)
        _service("stop", "mlflow")
        down_at, n0 = time.monotonic(), len(t.outcomes)
        try:
            lp.wait_trainer(lambda s: s["registration_failures"] > before["registration_failures"], OUTAGE_S,
                            "a registration failing while MLflow is down")
            while time.monotonic() - down_at < OUTAGE_S:
                time.sleep(0.2)
            during = len(t.outcomes) - n0
        finally:
            t0 = time.monotonic()
            _service("start", "mlflow")
            print(f"[timing] mlflow started in {time.monotonic() - t0:.1f}s")
        status = lp.wait_trainer(lambda s: s["pending_registrations"] == 0 and
                                 s["promotions"] > before["promotions"], 90, "the retried registration")
        print(f"[timing] registration landed {time.monotonic() - t0:.1f}s after the restart began")
        assert lp.wait_replicas_on(str(_champion(status)), 30), lp.replica_infos()
    _keep(loop, t.outcomes)
    print(f"[timing] replicas on it {time.monotonic() - t0:.1f}s after the restart began")
    assert during >= 10, during
    assert status["registration_retries"] >= 1
    print(f"MLflow down {OUTAGE_S:.0f}s: {during} requests answered meanwhile, 0 failed; registration failed "
          f"{status['registration_failures'] - before['registration_failures']} times, retried "
          f"{status['registration_retries'] - before['registration_retries']} times, then v{_champion(status)} landed")
    champion = Lineage(lp.cfg.mlflow_uri).by_alias(lp.cfg.lineage)
    assert champion is not None and champion.version >= _champion(status)  # it may have promoted again since
    # Every answered request, across every drill, was absorbed exactly once.
    answered = len({o.request_id for o in loop["answered"]})
    lp.wait_trainer(lambda s: s["events_consumed"] >= answered, 120, f"{answered} events consumed")
    assert lp.trainer_status()["events_consumed"] == answered
