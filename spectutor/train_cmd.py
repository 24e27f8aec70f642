"""`spectutor train` (the online distillation process) and `spectutor drafters list|rollback`."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import time

from trainer.distill import GateConfig
from trainer.idle import IdleConfig
from trainer.recipe import TrainerConfig


def _positive(kind: type, name: str):
    def parse(value: str):
        try:
            v = kind(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number, got {value!r}")
        if v <= 0:
            raise argparse.ArgumentTypeError(f"{name} must be > 0, got {value!r}")
        return v
    return parse


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register `train` and `drafters` on the main CLI."""
    from moe.loader import DEFAULT_MODEL

    d = TrainerConfig()
    p = sub.add_parser("train", help="distill drafters online from served traffic (long-lived)")
    p.add_argument("--model", default=DEFAULT_MODEL, help="target model the drafts are cut from")
    p.add_argument("--events-url", default=None, help="kafka://host:port or file:///path (default: the environment)")
    p.add_argument("--topic", default=d.topic)
    p.add_argument("--group", default=d.group)
    p.add_argument("--poll-records", type=_positive(int, "--poll-records"), default=d.poll_records)
    p.add_argument("--state-dir", default=d.state_dir)
    p.add_argument("--domains", default="", help="comma-separated domains with their own drafter (default: one)")
    p.add_argument("--no-general", action="store_true", help="with --domains: no general drafter")
    p.add_argument("--lineage-tag", default=None, help="inserted in registered model names")
    p.add_argument("--drafter", default=d.drafter, choices=["draft-lm", "eagle"],
                   help="what the lineages train: a cut of the target or an eagle head (default %(default)s)")
    p.add_argument("--draft-layers", type=_positive(int, "--draft-layers"), default=d.draft_layers)
    p.add_argument("--eagle-base", default=None, metavar="FOLDER",
                   help="eagle: the head a lineage starts from (default: the warm-start head of --model)")
    p.add_argument("--loss", default=d.loss, choices=["fkl", "rkl", "jsd", "osd_jsd", "tvd"])
    p.add_argument("--jsd-beta", type=float, default=d.jsd_beta)
    p.add_argument("--lr", type=_positive(float, "--lr"), default=d.lr)
    p.add_argument("--batch-size", type=_positive(int, "--batch-size"), default=d.batch_size)
    p.add_argument("--rejected-weight", type=float, default=d.rejected_weight)
    p.add_argument("--holdout-size", type=_positive(int, "--holdout-size"), default=d.holdout_size)
    p.add_argument("--train-every", type=_positive(int, "--train-every"), default=d.train_every)
    p.add_argument("--steps-per-sample", type=_positive(float, "--steps-per-sample"), default=d.steps_per_sample)
    p.add_argument("--gate-every", type=_positive(int, "--gate-every"), default=d.gate_every)
    p.add_argument("--gate-margin", type=float, default=d.gate.margin)
    p.add_argument("--gate-min-samples", type=_positive(int, "--gate-min-samples"), default=d.gate.min_samples)
    p.add_argument("--gate-min-positions", type=_positive(int, "--gate-min-positions"), default=d.gate.min_positions)
    p.add_argument("--spec-len", type=_positive(int, "--spec-len"), default=d.gate.spec_len)
    p.add_argument("--teacher", default=d.teacher, choices=["topk", "target"])
    p.add_argument("--max-busy", type=int, default=d.idle.max_busy,
                   help="train while running + queued sequences over all replicas are at most this")
    p.add_argument("--threads", type=_positive(int, "--threads"), default=d.idle.threads)
    p.add_argument("--checkpoint-every-s", type=float, default=d.checkpoint_every_s)
    p.add_argument("--redis-url", default=os.environ.get("SPECTUTOR_REDIS_URL"))
    p.add_argument("--redis-prefix", default=d.redis_prefix)
    p.add_argument("--no-registry", action="store_true", help="keep champions in memory (no MLflow)")
    p.add_argument("--max-steps", type=_positive(int, "--max-steps"), default=None)
    p.add_argument("--stop-when-drained", type=_positive(float, "--stop-when-drained"), default=None, metavar="SECONDS",
                   help="exit once no event came for this long and nothing is left to train")
    p.add_argument("--no-progress", action="store_true", help="print a JSON summary instead of a live display")
    p.add_argument("--status-file", default=None, metavar="PATH",
                   help="keep the live status here as JSON (replaced atomically, at most once a second, and at exit)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("drafters", help="registered drafter versions: list, rollback")
    dsub = p.add_subparsers(dest="action", required=True)
    q = dsub.add_parser("list", help="versions, aliases and gate metrics of every lineage (or NAME)")
    q.add_argument("name", nargs="?", default=None)
    q.set_defaults(func=cmd_drafters_list)
    q = dsub.add_parser("rollback", help="give `champion` back to the previous champion of NAME")
    q.add_argument("name")
    q.add_argument("--redis-url", default=os.environ.get("SPECTUTOR_REDIS_URL"))
    q.add_argument("--redis-prefix", default=d.redis_prefix)
    q.set_defaults(func=cmd_drafters_rollback)


def config_from_args(args: argparse.Namespace) -> TrainerConfig:
    domains = tuple(x.strip() for x in args.domains.split(",") if x.strip())
    return TrainerConfig(
        target=args.model, events_url=args.events_url, topic=args.topic, group=args.group, state_dir=args.state_dir,
        poll_records=args.poll_records,
        drafter=args.drafter, eagle_base=args.eagle_base, draft_layers=args.draft_layers, domains=domains, general=not args.no_general, lineage_tag=args.lineage_tag,
        loss=args.loss, jsd_beta=args.jsd_beta, lr=args.lr, batch_size=args.batch_size,
        rejected_weight=args.rejected_weight, holdout_size=args.holdout_size, train_every=args.train_every,
        steps_per_sample=args.steps_per_sample, gate_every=args.gate_every,
        gate=GateConfig(min_samples=args.gate_min_samples, min_positions=args.gate_min_positions,
                        margin=args.gate_margin, spec_len=args.spec_len),
        checkpoint_every_s=args.checkpoint_every_s, teacher=args.teacher,
        idle=IdleConfig(max_busy=args.max_busy, threads=args.threads), redis_url=args.redis_url,
        redis_prefix=args.redis_prefix, registry=not args.no_registry, max_steps=args.max_steps,
        stop_when_drained_s=args.stop_when_drained)


def _table(trainer):
    from rich.table import Table

    st = trainer.stats
    t = Table(title=f"spectutor train - {st.events_consumed} events, {st.steps} steps, {st.promotions} promoted, "
                    f"{'PAUSED (serving busy)' if st.busy else 'training'}, lag {st.lag_s:.1f}s")
    for col in ("lineage", "champion", "step", "buffer", "held out", "loss", "eval acc", "champion acc", "samples/s"):
        t.add_column(col)
    for lin in trainer.lineages.values():
        g = lin.last.get
        t.add_row(lin.key, "-" if lin.champion_version is None else f"v{lin.champion_version}", str(lin.step), str(len(lin.buffer)), str(len(lin.holdout)),
                  f"{g('train/loss', float('nan')):.4f}", f"{g('eval/acceptance', float('nan')):.3f}",
                  f"{g('eval/champion_acceptance', float('nan')):.3f}", f"{g('perf/samples_per_s', 0.0):.1f}")
    t.caption = st.last_decision + (f"  COLLAPSED: {', '.join(st.collapsed)}" if st.collapsed else "")
    return t


def cmd_train(args: argparse.Namespace) -> int:
    """Run the trainer until stopped (SIGINT/SIGTERM finish the current step, checkpoint and exit)."""
    from trainer.recipe import Trainer
    from trainer.tracking import MlflowTracker, NullTracker, StatusFile

    cfg = config_from_args(args)
    factory = NullTracker if args.no_registry else MlflowTracker
    live = None
    if not args.no_progress:
        from rich.live import Live

        live = Live(refresh_per_second=2)
    last = [0.0]
    status = StatusFile(args.status_file) if args.status_file else None

    def progress(trainer) -> None:
        if status is not None:
            status.write(trainer.status())
        if live is not None and time.monotonic() - last[0] > 0.5:
            last[0] = time.monotonic()
            live.update(_table(trainer))

    trainer = Trainer(cfg, factory, progress)
    trainer.setup()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: trainer.stop_event.set())
    try:
        if live is not None:
            with live:
                stats = trainer.train()
        else:
            stats = trainer.train()
    finally:
        trainer.cleanup()
        if status is not None:
            status.write(trainer.status(), force=True)
    summary = dataclasses.asdict(stats)
    summary["lineages"] = {k: {"name": lin.name, "champion_version": lin.champion_version, "step": lin.step}
                           for k, lin in trainer.lineages.items()}
    print(("\n" if live is not None else "") + json.dumps(summary))
    return 0


def cmd_drafters_list(args: argparse.Namespace) -> int:
    """One line per version: aliases, sha256, parent, gate acceptance."""
    from trainer.lineage import Lineage

    lin = Lineage()
    names = [args.name] if args.name else lin.names()
    if args.name and not lin.versions(args.name):
        raise ValueError(f"no registered drafter named {args.name!r}; known: {', '.join(lin.names()) or 'none'}")
    for name in names:
        print(name)
        for v in lin.versions(name):
            gate = json.loads(v.tags.get("gate", "{}") or "{}")
            acc = f"acc {gate['acceptance']:.3f} (champion {gate.get('champion_acceptance', float('nan')):.3f}) " \
                  f"len {gate['accepted_length']:.2f}" if "acceptance" in gate else "no gate metrics"
            print(f"  v{v.version:<4} {','.join(v.aliases) or '-':<20} parent {v.tags.get('parent_version', '-'):<5} "
                  f"{acc}  sha256 {v.sha256[:12]}")
    return 0


def cmd_drafters_rollback(args: argparse.Namespace) -> int:
    """Move `champion` back and announce it, so replicas swap back."""
    from trainer.lineage import Lineage, LineageError, promotion_message

    lin = Lineage()
    if not lin.versions(args.name):
        raise ValueError(f"no registered drafter named {args.name!r}; known: {', '.join(lin.names()) or 'none'}")
    try:
        v = lin.rollback(args.name)
    except LineageError as exc:
        raise ValueError(str(exc)) from exc
    announced = False
    if args.redis_url:
        from streams.redis_bus import RedisBus, RedisConfig

        bus = RedisBus(args.redis_url, RedisConfig(prefix=args.redis_prefix))
        announced = bus.publish_promotion(promotion_message(v))
        bus.close()
    print(f"{args.name}: champion is now v{v.version} (sha256 {v.sha256[:12]})"
          f"{', announced on Redis' if announced else ''}")
    return 0
