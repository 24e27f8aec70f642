"""`spectutor serve`: the Ray Serve app of deploy/serve.yaml on a local Ray cluster, until Ctrl-C."""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "deploy" / "serve.yaml"


def add_parser(sub: Any) -> None:
    """Register the `serve` subcommand."""
    p = sub.add_parser("serve", help="serve the OpenAI-compatible API with Ray Serve on a local Ray cluster")
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="Serve config YAML (default: deploy/serve.yaml)")
    p.add_argument("--model", default=None, help="override the config's target model")
    p.add_argument("--drafter", default=None, help="override the config's starting drafter")
    p.add_argument("--replicas", type=int, default=None, help="override the number of engine replicas")
    from spectutor.cli import _device_args, _kernels_arg

    _device_args(p, None, None)
    _kernels_arg(p, None)
    p.add_argument("--host", default=None)
    p.add_argument("--port", type=int, default=None)
    p.add_argument("--num-cpus", type=int, default=None,
                   help="CPUs of the local Ray cluster (default: all; ignored when RAY_ADDRESS names a cluster)")
    p.set_defaults(func=main)


def load_app_args(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(http_options, the first application's args) from a Serve config YAML."""
    import yaml

    raw = yaml.safe_load(Path(path).read_text())
    apps = raw.get("applications") or []
    if not apps:
        raise ValueError(f"{path}: no applications")
    return dict(raw.get("http_options") or {}), dict(apps[0].get("args") or {})


def main(args: argparse.Namespace) -> int:
    """Start Ray locally, run the app, block until interrupted, shut down."""
    import ray
    from ray import serve

    from serving.app import build_app, check_resources, engine_deployment

    http, app_args = load_app_args(args.config)
    for key, value in (("model", args.model), ("drafter", args.drafter), ("num_replicas", args.replicas),
                       ("kernels", args.kernels), ("device", args.device), ("dtype", args.dtype)):
        if value is not None:
            app_args[key] = value
    if args.model is not None and "served_model_name" in app_args:
        app_args["served_model_name"] = args.model
    host = args.host or http.get("host", "127.0.0.1")
    port = args.port or int(http.get("port", 8000))
    app = build_app(app_args)  # validates the config before Ray starts
    if os.environ.get("RAY_ADDRESS"):
        ray.init()  # join the cluster `ray start --head` made (compose, KubeRay); it owns resources and ports
    else:
        ray.init(num_cpus=args.num_cpus, include_dashboard=False)
    try:
        # Serve would wait forever for replicas the cluster cannot place: say so and stop instead.
        # (An autoscaling cluster may add nodes; there, RAY_ADDRESS users deploy with `serve deploy`.)
        check_resources(engine_deployment(app_args)[2], ray.cluster_resources())
        serve.start(http_options={"host": host, "port": port})
        serve.run(app, name="spectutor", route_prefix="/")
        _print_replicas(int(app_args.get("num_replicas", 1)))
        print(f"spectutor serving on http://{host}:{port}/v1 (Ctrl-C to stop)", flush=True)
        while True:
            time.sleep(3600)
    finally:
        serve.shutdown()
        ray.shutdown()


def _print_replicas(replicas: int) -> None:
    """One line per engine replica: the torch threads and CPU kernels it got."""
    from ray import serve

    from serving.app import replica_infos

    handle = serve.get_deployment_handle("engine", app_name="spectutor")
    for rid, info in sorted(replica_infos(handle, replicas, timeout_s=60).items()):
        print(f"replica {rid}: {info['threads']} torch thread(s) (num_cpus), {info['kernels']}", flush=True)
