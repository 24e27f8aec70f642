"""The Ray Serve application: a thin shim over serving.service.Replica.

Two deployments:
  - `EngineServer` (N replicas): one Replica each (engine thread, hot swap, events, heartbeats);
    `generate()` streams a Head then SSE lines through a DeploymentHandle.
  - `OpenAIRouter` (the HTTP ingress): the FastAPI app of serving.openai_api, relaying to the
    engine replicas. It outlives a replica, so a replica killed mid-stream still gets its client
    an error chunk and [DONE] instead of a silently truncated stream.

`serve run deploy/serve.yaml` builds it through `build_app(args)`; `spectutor serve` calls
`serve.run(build_app(...))` on a local Ray cluster. Ray Serve calls `reconfigure(user_config)` on
the replica's event loop, and a raise there kills the replica: only a malformed policy raises, a
drafter that fails to load is counted and the old one keeps serving.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any, AsyncIterator

from ray import serve
from ray.serve.handle import DeploymentHandle

from serving.config import ServeConfig, SwapPolicy
from serving.metrics import MetricsSink, snapshot
from serving.openai_api import Head, build_app as build_http_app

log = logging.getLogger(__name__)

METRICS_PERIOD_S = 2.0


@serve.deployment(name="engine", max_ongoing_requests=64, health_check_period_s=5, health_check_timeout_s=30,
                  graceful_shutdown_timeout_s=60)
class EngineServer:
    """One serving replica: the engine, its drafter swaps, events and heartbeats."""

    def __init__(self, config: dict[str, Any]):
        from serving.service import Replica

        self.cfg = ServeConfig.from_dict(config)
        replica_id = serve.get_replica_context().replica_id.unique_id
        self.replica = Replica(self.cfg, f"{self.cfg.model_id.rsplit('/', 1)[-1]}-{replica_id}")
        st = self.replica.service.stats
        swap_stats = self.replica.swapper.stats if self.replica.swapper else None
        self.metrics = MetricsSink(lambda: snapshot(st, swap_stats, self.replica.publisher),
                                   lambda: [st.latencies.popleft() for _ in range(len(st.latencies))],
                                   drafter_name=self.cfg.lineage)
        self._metrics_task: asyncio.Task | None = None

    def _ensure_metrics_task(self) -> None:
        if self._metrics_task is None:
            self._metrics_task = asyncio.get_running_loop().create_task(self._push_metrics())

    async def _push_metrics(self) -> None:
        while True:
            try:
                self.metrics.update()
            except Exception:  # noqa: BLE001 - metrics must never take the replica down
                log.exception("metrics update failed")
            await asyncio.sleep(METRICS_PERIOD_S)

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Ray Serve user_config -> SwapPolicy. Never raises: a raise here would stop this replica and
        crash-loop its replacements, so a malformed policy is logged and counted and the previous one
        stays (build_app already refuses a malformed user_config at deploy time)."""
        self._ensure_metrics_task()
        try:
            policy = SwapPolicy.from_dict(user_config or {})
        except ValueError as exc:
            self.replica.config_errors += 1
            log.error("ignoring user_config %r: %s", user_config, exc)
            return
        self.replica.reconfigure(policy)  # never raises; loads happen on the swapper's thread

    async def generate(self, kind: str, body: dict[str, Any]) -> AsyncIterator[Head | str]:
        """Head, then SSE lines (see serving.openai_api.Completer.generate)."""
        self._ensure_metrics_task()
        async for item in self.replica.completer.generate(kind, body):
            yield item

    async def info(self) -> dict[str, Any]:
        """Replica id, drafter serving, swap and service counters (tests and operators)."""
        sw = self.replica.swapper
        st = self.replica.service.stats
        import torch

        return {"replica_id": self.replica.replica_id, "drafter": self.replica.service.drafter.name,
                "threads": torch.get_num_threads(), "kernels": self.replica.loaded.kernels.summary(),
                "drafter_version": self.replica.service.drafter.version,
                "swaps": sw.stats.swaps if sw else 0, "swap_failures": sw.stats.failures if sw else 0,
                "swap_history": sw.stats.history if sw else [], "last_swap_error": sw.stats.last_error if sw else "",
                "finished": st.finished, "aborted": st.aborted, "steps": st.steps,
                "config_errors": self.replica.config_errors,
                "events_published": self.replica.publisher.published if self.replica.publisher else 0,
                "events_dropped": self.replica.publisher.dropped if self.replica.publisher else 0}

    def check_health(self) -> None:
        """Unhealthy only when a restart fixes it: the engine thread died (not Kafka/Redis/MLflow down)."""
        if not self.replica.service.alive:
            raise RuntimeError(f"engine thread is dead: {self.replica.service.error!r}")

    def __del__(self) -> None:
        replica = getattr(self, "replica", None)
        if replica is not None:
            replica.close()


class _HandleBackend:
    """serving.openai_api.Backend over a DeploymentHandle to the engine replicas."""

    def __init__(self, handle: DeploymentHandle):
        self.handle = handle.options(stream=True)

    def generate(self, kind: str, body: dict[str, Any]) -> Any:
        return self.handle.generate.remote(kind, body)


@serve.deployment(name="router", max_ongoing_requests=1024)
@serve.ingress()
class OpenAIRouter:
    """The HTTP ingress: OpenAI routes, validation, error shapes; relays generation to EngineServer."""

    def __init__(self, engine: DeploymentHandle, model_id: str):
        self.backend = _HandleBackend(engine)
        self.model_id = model_id

    def __serve_build_asgi_app__(self) -> Any:
        from ray.serve.exceptions import BackPressureError

        return build_http_app(self.backend, self.model_id, overload_errors=(BackPressureError,))


def replica_infos(handle: DeploymentHandle, replicas: int, tries: int = 100,
                  timeout_s: float = 30) -> dict[str, dict[str, Any]]:
    """EngineServer.info() of every engine replica, by replica id (routing is random: ask until each
    of `replicas` has answered, at most `tries` times)."""
    out: dict[str, dict[str, Any]] = {}
    for _ in range(tries):
        info = handle.info.remote().result(timeout_s=timeout_s)
        out[info["replica_id"]] = info
        if len(out) == replicas:
            break
    return out


def engine_deployment(args: dict[str, Any]) -> tuple[ServeConfig, dict[str, Any], dict[str, Any]]:
    """(the replica's ServeConfig, its config mapping, the engine deployment's options) from build_app's args.

    Validates everything a replica would refuse, so a bad config fails at deploy time.
    """
    args = dict(args or {})
    num_replicas = int(args.pop("num_replicas", 1))
    user_config = args.pop("user_config", None)
    max_queued = int(args.pop("max_queued_requests", -1))
    num_cpus = float(args.pop("num_cpus", 1.0))
    num_gpus = args.pop("num_gpus", None)
    # Torch threads follow the CPUs Ray reserves for the replica, explicitly: left alone, torch would
    # take whatever OMP_NUM_THREADS Ray happened to set, and nothing would say so.
    args.setdefault("threads", max(1, int(num_cpus)))
    cfg = ServeConfig.from_dict(args)
    gpus = float(num_gpus) if num_gpus is not None else (1.0 if cfg.device.startswith("cuda") else 0.0)
    if gpus < 0 or (gpus == 0 and cfg.device.startswith("cuda")):
        raise ValueError(f"num_gpus must be > 0 for device {cfg.device!r}, got {num_gpus}")
    actor: dict[str, Any] = {"num_cpus": num_cpus}
    if gpus:
        actor["num_gpus"] = gpus
    engine_opts: dict[str, Any] = {"num_replicas": num_replicas, "max_queued_requests": max_queued,
                                   "max_ongoing_requests": cfg.max_batch + cfg.max_waiting,
                                   "ray_actor_options": actor}
    if user_config is not None:
        SwapPolicy.from_dict(user_config)  # fail at deploy time, not in every replica
        engine_opts["user_config"] = user_config
    return cfg, args, engine_opts


def check_resources(engine_opts: dict[str, Any], cluster: dict[str, float]) -> None:
    """Refuse, naming what is missing, a deployment the cluster cannot place (Serve would wait for it
    forever); `cluster` is ray.cluster_resources()."""
    n = engine_opts["num_replicas"]
    actor = engine_opts["ray_actor_options"]
    for resource, key in (("GPU", "num_gpus"), ("CPU", "num_cpus")):
        need = n * float(actor.get(key, 0.0))
        have = float(cluster.get(resource, 0.0))
        if need > have + 1e-9:
            raise ValueError(f"{n} engine replica(s) x {key} {actor.get(key)} need {need:g} {resource}(s); "
                             f"the Ray cluster has {have:g}")


def build_app(args: dict[str, Any]) -> Any:
    """Application builder for `serve run serving.app:build_app` / deploy/serve.yaml.

    `args` is a ServeConfig mapping, plus optional engine deployment options: `num_replicas`,
    `num_cpus` and `num_gpus` (per replica; num_gpus defaults to 1 with a cuda device),
    `max_queued_requests` (beyond it: 503 + Retry-After) and `user_config` (a SwapPolicy mapping).
    """
    cfg, replica_args, engine_opts = engine_deployment(args)
    engine = EngineServer.options(**engine_opts).bind(replica_args)
    # The router only parses and relays: it asks Ray for no CPU so a 2-core laptop fits two engines.
    return OpenAIRouter.options(ray_actor_options={"num_cpus": 0}).bind(engine, cfg.model_id)
