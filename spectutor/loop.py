"""The whole online loop on one machine: the Ray Serve app on a local Ray cluster and the trainer as a
child process, wired to the running Kafka, Redis and MLflow (deploy/local/). The demo and the
full-loop tests drive it; neither serving nor the trainer knows it exists.

    loop = LocalLoop(LoopConfig(model=..., work_dir=..., tag="demo-1", kafka=..., redis_url=..., mlflow_uri=...))
    loop.start()            # topic, Serve app (waits for /v1/models), trainer
    ...                     # send traffic to loop.url; read loop.trainer_status(), loop.replica_infos()
    loop.kill_trainer(); loop.start_trainer()   # a crash and a restart (same state dir: it resumes)
    loop.stop()             # trainer, Serve, Ray; idempotent, also after a failed start

Everything a run creates is named after `tag`: the Kafka topic `spectutor.loop-<tag>`, the consumer
group, the registered drafter `spectutor-draft-<tag>` or `spectutor-eagle-<tag>` (which the replicas
follow), the state folder.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from serving.swap import numeric_version

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class LoopConfig:
    """One local loop: the target, where the services are, how serving and training are sized."""

    model: str
    """Target: model name, Hugging Face folder or .gguf (served and distilled from)."""
    work_dir: Path
    """Trainer state, downloads, logs."""
    tag: str
    """Names this run's topic, consumer group and registered drafter."""
    kafka: str
    """Kafka bootstrap host:port."""
    redis_url: str
    mlflow_uri: str
    served_model_name: str = "spectutor"
    port: int = 8000
    replicas: int = 1
    replica_cpus: float = 1.0
    """Ray CPUs per engine replica (the router takes none)."""
    ray_cpus: int = 2
    replica_threads: int = 1
    """torch threads per replica (OMP_NUM_THREADS in the replicas)."""
    drafter: str = "draft-lm"
    """What replicas draft with and the trainer trains: draft-lm (a cut of the target) or eagle (the
    warm-start head at first, `hybrid` while none exists; the trainer needs one to start from)."""
    draft_layers: int = 4
    """draft-lm: the draft at start is the target's first `draft_layers` layers; the trainer cuts the same."""
    speculation: int = 3
    """Draft tokens per step (fixed, so acceptance is comparable across versions)."""
    max_batch: int = 4
    max_len: int = 1024
    poll_interval_s: float = 10.0
    """MLflow alias poll period of the replicas (the fallback when Redis is silent)."""
    trainer_args: dict[str, Any] = field(default_factory=dict)
    """Extra `spectutor train` flags: {"--batch-size": 8, "--max-busy": 2, ...}."""

    @property
    def lineage(self) -> str:
        from trainer.lineage import registered_name

        return registered_name(None, self.tag, self.drafter)

    @property
    def topic(self) -> str:
        return f"spectutor.loop-{self.tag}"


class LocalLoop:
    """Starts and stops the loop's processes; reads their state for progress lines and tests."""

    def __init__(self, cfg: LoopConfig):
        self.cfg = cfg
        self.url = f"http://127.0.0.1:{cfg.port}"
        self.work_dir = Path(cfg.work_dir)
        self.status_file = self.work_dir / "trainer-status.json"
        self.trainer_log = self.work_dir / "trainer.log"
        self.trainer: subprocess.Popen | None = None
        self.trainer_starts = 0
        self._ray = False
        self._handle = None

    # ---- whole loop ----------------------------------------------------------------------------
    def start(self, serve_timeout_s: float = 300.0) -> None:
        """Topic, then the Serve app (ready when /v1/models answers), then the trainer."""
        from streams.kafka_consumer import ensure_topic

        self.work_dir.mkdir(parents=True, exist_ok=True)
        ensure_topic(self.cfg.kafka, self.cfg.topic, partitions=2)
        self.start_serving(serve_timeout_s)
        self.start_trainer()

    def stop(self) -> None:
        """Trainer (interrupt, then kill), Serve, Ray. Safe to call twice or after a failed start."""
        self.stop_trainer()
        if self._ray:
            import ray
            from ray import serve

            try:
                serve.shutdown()
            finally:
                ray.shutdown()
                self._ray = False

    # ---- serving -------------------------------------------------------------------------------
    def serve_args(self) -> dict[str, Any]:
        """The app's args (a ServeConfig mapping + deployment options), as deploy/serve.yaml has them."""
        c = self.cfg
        return dict(model=c.model, served_model_name=c.served_model_name, drafter=c.drafter, fallback="hybrid",
                    draft_layers=c.draft_layers, draft_mode="chain", speculation=c.speculation,
                    max_batch=c.max_batch, max_len=c.max_len, calibrate=False,
                    events_url=f"kafka://{c.kafka}", events_topic=c.topic, redis_url=c.redis_url,
                    mlflow_uri=c.mlflow_uri, lineage=c.lineage, num_replicas=c.replicas, num_cpus=c.replica_cpus,
                    user_config={"poll_interval_s": c.poll_interval_s},
                    download_dir=str(self.work_dir / "downloads"))

    def start_serving(self, timeout_s: float = 300.0) -> None:
        import ray
        from ray import serve

        from serving.app import build_app

        app = build_app(self.serve_args())  # a bad config fails here, before Ray starts
        threads = str(self.cfg.replica_threads)
        ray.init(num_cpus=self.cfg.ray_cpus, include_dashboard=False, configure_logging=False, log_to_driver=False,
                 runtime_env={"env_vars": {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}})
        self._ray = True
        serve.start(http_options={"host": "127.0.0.1", "port": self.cfg.port})
        serve.run(app, name="spectutor", route_prefix="/", blocking=False)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if httpx.get(f"{self.url}/v1/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"the Serve app did not answer on {self.url} within {timeout_s:.0f}s "
                                   "(replica logs: /tmp/ray/session_latest/logs/worker-*.err)")
            time.sleep(0.5)
        self._handle = serve.get_deployment_handle("engine", app_name="spectutor")

    def replica_infos(self, tries: int = 100) -> dict[str, dict]:
        """EngineServer.info() of every replica, by replica id."""
        from serving.app import replica_infos

        return replica_infos(self._handle, self.cfg.replicas, tries)

    def wait_replicas_on(self, version: str, timeout_s: float) -> bool:
        """Until every replica serves registry version `version` or a later one (True), or the time is
        up (False). Later counts: the trainer may promote again before every replica is asked."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            infos = self.replica_infos()
            if len(infos) == self.cfg.replicas and all(
                    numeric_version(i["drafter_version"]) >= int(version) for i in infos.values()):
                return True
            time.sleep(0.5)
        return False

    # ---- trainer -------------------------------------------------------------------------------
    def trainer_command(self) -> list[str]:
        c = self.cfg
        args = {"--model": c.model, "--events-url": f"kafka://{c.kafka}", "--topic": c.topic,
                "--group": f"trainer-{c.tag}", "--state-dir": str(self.work_dir / "trainer"),
                "--lineage-tag": c.tag, "--drafter": c.drafter, "--draft-layers": c.draft_layers, "--spec-len": c.speculation,
                "--redis-url": c.redis_url, "--status-file": str(self.status_file), **c.trainer_args}
        cmd = [sys.executable, "-m", "spectutor", "train", "--no-progress"]
        for flag, value in args.items():
            cmd += [flag] if value is True else [flag, str(value)]
        return cmd

    def start_trainer(self, env: dict[str, str] | None = None) -> None:
        """Start (or restart: same state folder, so it resumes) `spectutor train`; output in trainer.log."""
        if self.trainer is not None and self.trainer.poll() is None:
            raise RuntimeError(f"the trainer is already running (pid {self.trainer.pid})")
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.status_file.unlink(missing_ok=True)
        cmd = self.trainer_command()
        full_env = {**os.environ, "MLFLOW_TRACKING_URI": self.cfg.mlflow_uri, **(env or {})}
        with open(self.trainer_log, "a") as log:
            log.write(f"\n=== start {self.trainer_starts + 1}: {' '.join(cmd)}\n")
            log.flush()
            self.trainer = subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        self.trainer_starts += 1

    def kill_trainer(self) -> int | None:
        """SIGKILL (a crash: no cleanup runs); the exit status, or None if it was not running."""
        if self.trainer is None or self.trainer.poll() is not None:
            return None
        self.trainer.send_signal(signal.SIGKILL)
        return self.trainer.wait(30)

    def stop_trainer(self, timeout_s: float = 30.0) -> int | None:
        """SIGINT (the trainer leaves its consumer group and ends its MLflow runs), then SIGKILL."""
        if self.trainer is None or self.trainer.poll() is not None:
            return None if self.trainer is None else self.trainer.returncode
        self.trainer.send_signal(signal.SIGINT)
        try:
            return self.trainer.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.trainer.kill()
            return self.trainer.wait(10)

    def trainer_alive(self) -> bool:
        return self.trainer is not None and self.trainer.poll() is None

    def trainer_status(self) -> dict | None:
        """The trainer's last status (`spectutor train --status-file`), or None before its first one."""
        try:
            return json.loads(self.status_file.read_text())
        except (OSError, ValueError):
            return None

    def trainer_log_tail(self, chars: int = 3000) -> str:
        try:
            return self.trainer_log.read_text()[-chars:]
        except OSError:
            return ""

    def wait_trainer(self, predicate, timeout_s: float, what: str = "") -> dict:
        """Until predicate(status) is true; raises TimeoutError naming `what` (with the log's tail)."""
        deadline = time.monotonic() + timeout_s
        status = None
        while time.monotonic() < deadline:
            status = self.trainer_status()
            if status is not None and predicate(status):
                return status
            if not self.trainer_alive():
                raise RuntimeError(f"the trainer exited ({self.trainer.returncode}) waiting for {what}:\n"
                                   f"{self.trainer_log_tail()}")
            time.sleep(0.3)
        raise TimeoutError(f"waited {timeout_s:.0f}s for the trainer: {what}; last status {status}\n"
                           f"{self.trainer_log_tail()}")
