"""`spectutor demo`: the whole loop on the local stack for a bounded time.

Ray Serve serves the target with a draft cut from it; every answered request becomes a token event
on Kafka; the trainer distills the draft from those events, registers winners in MLflow and
announces them on Redis; the replicas swap to each new champion between engine steps. Traffic is
real and shifts half-way: ShareGPT chats first, then HumanEval problems, so the draft has something
new to learn while it serves. A live line shows requests, acceptance per domain, the drafter
version in service and the promotions; at the end: summary.json, requests.jsonl and acceptance.png.

Kafka, Redis and MLflow must be running (`make demo` starts them through deploy/local/).
"""
from __future__ import annotations

import argparse
import asyncio
import os
import random
import time
from collections import deque
from datetime import datetime
from itertools import cycle, islice
from pathlib import Path
from typing import Any, Iterator

from serving.replay import Outcome, Replayer, RequestSpec, acceptance

SERVICES = ("SPECTUTOR_KAFKA_BOOTSTRAP", "SPECTUTOR_REDIS_URL", "MLFLOW_TRACKING_URI")


def _minutes(value: str) -> float:
    try:
        m = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--minutes must be a number of minutes, got {value!r}") from None
    if not 1 <= m <= 24 * 60:
        raise argparse.ArgumentTypeError(f"--minutes must be between 1 and 1440, got {value!r}")
    return m


def _fraction(value: str) -> float:
    try:
        f = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shift-at must be a fraction, got {value!r}") from None
    if not 0 < f < 1:
        raise argparse.ArgumentTypeError(f"--shift-at must be strictly between 0 and 1, got {value!r}")
    return f


def _every(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--baseline-every must be a whole number, got {value!r}") from None
    if n < 0 or n == 1:
        raise argparse.ArgumentTypeError(f"--baseline-every must be 0 (no baseline) or at least 2, got {value!r}")
    return n


def add_parser(sub: Any) -> None:
    from moe.loader import DEFAULT_MODEL

    p = sub.add_parser("demo", help="the whole loop on the local stack: serve, log, distill, promote, hot-swap")
    p.add_argument("--minutes", type=_minutes, default=_minutes(os.environ.get("DEMO_MINUTES", "10")),
                   help="how long traffic runs (default: $DEMO_MINUTES or 10)")
    p.add_argument("--shift-at", type=_fraction, default=0.3,
                   help="fraction of the time after which traffic shifts from ShareGPT to HumanEval (default 0.3)")
    p.add_argument("--model", default=DEFAULT_MODEL, help="target model (default: %(default)s)")
    p.add_argument("--users", type=int, default=2, help="concurrent clients (default 2)")
    p.add_argument("--think-s", type=float, default=0.5, help="mean pause of a client between requests (s)")
    p.add_argument("--baseline-every", type=_every, default=6,
                   help="send every Nth request of a domain without speculation, the baseline the plot's "
                        "tokens/s ratio is taken against (0: none; default 6)")
    p.add_argument("--max-tokens", type=int, default=48, help="tokens generated per request (default 48)")
    p.add_argument("--drafter", default="eagle", choices=["eagle", "draft-lm"],
                   help="eagle: the warm-start head, trained once on first use (`spectutor draft init`), then "
                        "online; draft-lm: a cut of the target distilled online (default %(default)s)")
    p.add_argument("--draft-layers", type=int, default=4, help="draft-lm: target layers the draft starts from (default 4)")
    p.add_argument("--speculation", type=int, default=3, help="draft tokens per step (default 3)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port of the Serve app (default 8000)")
    p.add_argument("--out", default="demo-results", help="results folder (a subfolder per run)")
    p.set_defaults(func=main)


def traffic(shift_s: float, t0: float, seed: int = 0, baseline_every: int = 0) -> Iterator[RequestSpec]:
    """ShareGPT chats until `shift_s` after t0 (time.monotonic()), then HumanEval problems (train splits, cycled).

    Every `baseline_every`-th request of a domain (0: none) is sent without speculation: the baseline
    that the demo's tokens/s are compared with, measured on the same replicas at the same time.
    """
    from serving.traffic import humaneval_prompts, sharegpt_prompts

    rng = random.Random(seed)
    chats = list(islice((p for p in sharegpt_prompts("train") if len(p.text) <= 800), 400))
    code = list(humaneval_prompts("train"))
    rng.shuffle(chats)
    rng.shuffle(code)
    chats_it, code_it = cycle(chats), cycle(code)
    sent = {"sharegpt": 0, "humaneval": 0}
    while True:
        domain = "sharegpt" if time.monotonic() - t0 < shift_s else "humaneval"
        p = next(chats_it if domain == "sharegpt" else code_it)
        sent[domain] += 1
        baseline = bool(baseline_every) and sent[domain] % baseline_every == 0
        yield RequestSpec(domain, p.text, "chat" if domain == "sharegpt" else "completion", domain,
                          speculate=not baseline)


class Progress:
    """The live line: requests, acceptance per domain (recent), drafter in service, promotions."""

    def __init__(self, total_s: float, shift_s: float):
        self.total_s, self.shift_s = total_s, shift_s
        self.t0 = time.monotonic()
        self.recent: dict[str, deque[Outcome]] = {}
        self.ok = self.failed = 0
        self.version = "-"
        self.promotions: list[dict] = []
        self.trainer: dict = {}
        self.outcomes: list[Outcome] = []

    def add(self, o: Outcome) -> None:
        self.outcomes.append(o)
        if o.ok:
            self.ok += 1
            self.recent.setdefault(o.domain, deque(maxlen=8)).append(o)
            self.version = o.drafter_version or self.version
        else:
            self.failed += 1

    def trainer_status(self, status: dict | None) -> None:
        if not status:
            return
        self.trainer = status
        for lin in status.get("lineages", {}).values():
            v = lin.get("champion_version")
            if v is not None and all(p["version"] != str(v) for p in self.promotions):
                self.promotions.append({"version": str(v), "at_s": round(time.monotonic() - self.t0, 1)})

    def line(self, in_flight: int) -> str:
        now = time.monotonic() - self.t0
        phase = "sharegpt" if now < self.shift_s else "humaneval"
        acc = "  ".join(f"{d} {a:.2f}" if (a := acceptance(list(q))) is not None else f"{d} -"
                        for d, q in sorted(self.recent.items()))
        t = self.trainer
        trainer = (f"trainer: {t.get('events_consumed', 0)} events, {t.get('steps', 0)} steps"
                   + (" (paused: serving busy)" if t.get("busy") else "")) if t else "trainer: starting"
        return (f"[{_mmss(now)}/{_mmss(self.total_s)}] {phase:9s} | served {self.ok} ok, {self.failed} failed, "
                f"{in_flight} in flight | acceptance (last 8) {acc or '-'} | drafter v{self.version} | "
                f"promotions {len(self.promotions)} | {trainer}")


def _mmss(s: float) -> str:
    return f"{int(s // 60):02d}:{int(s % 60):02d}"


def _services() -> dict[str, str]:
    missing = [k for k in SERVICES if not os.environ.get(k)]
    if missing:
        raise ValueError(f"{', '.join(missing)} not set: start the local stack first "
                         "(`make demo` does; or deploy/local/with-services.sh kafka redis mlflow -- spectutor demo)")
    return {k: os.environ[k] for k in SERVICES}


def _stop_on_signals() -> None:
    """SIGTERM and SIGHUP (a closed terminal, `kill`, a supervisor) end the demo like Ctrl-C does:
    through KeyboardInterrupt, so the trainer, Ray and the services are stopped, not orphaned."""
    import signal

    def interrupt(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, interrupt)


def _port_free(port: int) -> None:
    import socket

    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            raise ValueError(f"--port {port}: 127.0.0.1:{port} is already in use (another spectutor serve "
                             "or demo?); pick a free port with --port") from None


def main(args: argparse.Namespace) -> int:
    from moe.loader import resolve_model, spectutor_home
    from spectutor.loop import LocalLoop, LoopConfig

    env = _services()
    for name in ("users", "max_tokens", "draft_layers", "speculation"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    _port_free(args.port)
    resolve_model(args.model)  # converts or cuts a named target once, before replicas and trainer load it
    if args.drafter == "eagle":
        _warm_start(args.model)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    tag = f"demo-{stamp}"
    out_dir = Path(args.out) / stamp
    cfg = LoopConfig(model=args.model, work_dir=spectutor_home() / "demo" / stamp, tag=tag,
                     kafka=env["SPECTUTOR_KAFKA_BOOTSTRAP"], redis_url=env["SPECTUTOR_REDIS_URL"],
                     mlflow_uri=env["MLFLOW_TRACKING_URI"], served_model_name=Path(args.model).name,
                     port=args.port, drafter=args.drafter, draft_layers=args.draft_layers, speculation=args.speculation,
                     max_batch=max(2, args.users), max_len=1024, poll_interval_s=10.0,
                     trainer_args={"--batch-size": 8, "--holdout-size": 16, "--train-every": 4,
                                   "--steps-per-sample": 1, "--gate-every": 8, "--gate-min-samples": 8,
                                   "--gate-min-positions": 128, "--lr": 3e-4, "--threads": 1,
                                   # 2 cores: the replica has one, the trainer the other, so it trains
                                   # while up to `users` requests run (raise --users to see it pause).
                                   "--max-busy": args.users, "--checkpoint-every-s": 30})
    total_s, shift_s = args.minutes * 60, args.minutes * 60 * args.shift_at
    _stop_on_signals()
    loop = LocalLoop(cfg)
    print(f"spectutor demo: {args.minutes:g} min of traffic (ShareGPT, then HumanEval at {_mmss(shift_s)}); "
          f"target {args.model}, draft = {_draft_words(args)}, drafter lineage {cfg.lineage}",
          flush=True)
    progress = Progress(total_s, shift_s)
    interrupted = False
    try:
        started = time.monotonic()
        loop.start()
        print(f"serving on {loop.url}/v1 after {time.monotonic() - started:.0f}s; trainer pid {loop.trainer.pid} "
              f"(log {loop.trainer_log})", flush=True)
        asyncio.run(_run(loop, args, progress, total_s))
    except KeyboardInterrupt:
        interrupted = True
        print("\ninterrupted: stopping the trainer, Ray Serve and the services this run started", flush=True)
    finally:
        loop.stop()  # the trainer writes its last status as it exits
        status = loop.trainer_status()
    registry = _registry(cfg.lineage, env["MLFLOW_TRACKING_URI"])
    progress.trainer_status(status)
    return _report(args, cfg, loop, progress, shift_s, registry, status, interrupted, out_dir)


def _draft_words(args: argparse.Namespace) -> str:
    return "an eagle head" if args.drafter == "eagle" else f"a {args.draft_layers}-layer draft"


def _warm_start(model: str) -> None:
    """Train and cache the warm-start eagle head on first use (what `spectutor draft init` does)."""
    from tqdm import tqdm

    from drafters.eagle import is_eagle_checkpoint, warm_start_dir
    from trainer.eagle_init import build_warm_start

    folder = warm_start_dir(model)
    if is_eagle_checkpoint(folder):
        print(f"eagle: warm-start head {folder}", flush=True)
        return
    print(f"eagle: no warm-start head for {model} yet; training it once (cached in {folder}; "
          "a few tens of minutes on 2 cores; --drafter draft-lm skips it)", flush=True)
    build_warm_start(model, folder, progress=tqdm)


async def _run(loop: Any, args: argparse.Namespace, progress: Progress, total_s: float) -> None:
    """Traffic until the time is up, with the live line; outcomes land in `progress`."""
    from rich.console import Console
    from rich.live import Live

    progress.t0 = time.monotonic()
    requests = traffic(progress.shift_s, progress.t0, baseline_every=args.baseline_every)
    replayer = Replayer(loop.url, loop.cfg.served_model_name, lambda: next(requests), users=args.users,
                        think_s=args.think_s, max_tokens=args.max_tokens, on_outcome=progress.add)
    stop = lambda: time.monotonic() - progress.t0 >= total_s  # noqa: E731
    task = asyncio.create_task(replayer.run(stop))
    console = Console()
    if console.is_terminal:
        with Live(console=console, refresh_per_second=2, transient=False) as live:
            while not task.done():
                progress.trainer_status(loop.trainer_status())
                live.update(progress.line(replayer.in_flight))
                await asyncio.sleep(0.5)
    else:  # a log, not a terminal: a line every 15 s
        last = 0.0
        while not task.done():
            progress.trainer_status(loop.trainer_status())
            if time.monotonic() - last >= 15:
                print(progress.line(replayer.in_flight), flush=True)
                last = time.monotonic()
            await asyncio.sleep(0.5)
    await task
    progress.trainer_status(loop.trainer_status())
    print(progress.line(0), flush=True)


def _registry(name: str, uri: str) -> dict:
    """Versions and champion of the run's lineage, as the MLflow server has them (or why not)."""
    try:
        from trainer.lineage import Lineage

        reg = Lineage(uri)
        champion = reg.by_alias(name)
        versions = reg.versions(name)
        return {"tracking_uri": uri, "registered_model": name, "champion": champion.version if champion else None,
                "versions": [{"version": v.version, "aliases": list(v.aliases)} for v in versions],
                "ui": f"{uri.rstrip('/')}/#/models/{name}"}
    except Exception as exc:  # noqa: BLE001 - the report is written either way
        return {"tracking_uri": uri, "registered_model": name, "error": f"{type(exc).__name__}: {exc}"}


def _report(args: argparse.Namespace, cfg: Any, loop: Any, progress: Progress, shift_s: float, registry: dict,
            status: dict | None, interrupted: bool, out_dir: Path) -> int:
    from spectutor import demo_report

    outcomes = progress.outcomes
    config = {"minutes": args.minutes, "shift_at": args.shift_at, "model": args.model, "users": args.users,
              "think_s": args.think_s, "max_tokens": args.max_tokens, "drafter": args.drafter,
              "baseline_every": args.baseline_every,
              "draft_layers": args.draft_layers,
              "speculation": args.speculation, "lineage": cfg.lineage, "topic": cfg.topic,
              "trainer_args": cfg.trainer_args, "trainer_log": str(loop.trainer_log)}
    summary = demo_report.summarize(outcomes, shift_s, progress.promotions, registry, config, status, interrupted)
    title = (f"spectutor demo: {cfg.model} with {_draft_words(args)} distilled online "
             f"({demo_report.machine()['cpu']}, {os.cpu_count()} cores)")
    files = demo_report.write(summary, outcomes, out_dir, title)
    req = summary["requests"]
    print(f"\nrequests: {req['ok']} ok, {req['failed']} failed" + (f" ({req['errors'][0]})" if req["errors"] else ""))
    for domain, d in summary["domains"].items():
        first, last = d["acceptance_first_third"], d["acceptance_last_third"]
        if first is not None and last is not None:
            print(f"{domain}: acceptance {first:.3f} in its first third of requests -> {last:.3f} in its last "
                  f"({d['requests']} requests)")
        speed = d["tokens_per_s"]
        if speed["vs_baseline"] is not None:
            print(f"{domain}: {speed['speculative']:.1f} tokens/s per request, {speed['vs_baseline']:.2f}x the "
                  f"{speed['baseline_requests']} requests sent without speculation")
    print(f"promotions: {', '.join('v' + p['version'] for p in progress.promotions) or 'none'}; "
          f"versions that served: {', '.join(summary['versions_served']) or '-'}")
    if "ui" in registry:
        kept = "" if interrupted else "; `make demo` leaves the MLflow server running so you can look: `make services-down` stops it"
        champion = f"champion v{registry['champion']}" if registry["champion"] is not None else "no champion yet"
        print(f"MLflow: {registry['ui']}  ({champion}{kept})")
    else:
        print(f"MLflow: could not read the registry: {registry.get('error')}")
    print(f"results: {files['plot']}  {files['summary']}")
    if interrupted:
        return 130
    return 0 if req["failed"] == 0 else 1
