"""Does the eagle head pay, and does online training make it pay more? Tokens/s at batch 1, per domain.

Target SmolLM2-135M-Instruct, greedy, batch 1, `--new-tokens` per request, held-out prompts of each
domain. For each domain, in one run:
1. Baselines on the held-out prompts: the engine without speculation (the reference every ratio is
   taken against), transformers `generate`, and transformers prompt-lookup decoding.
2. The warm-start eagle head (`spectutor draft init`), then the champion of an eagle lineage trained
   online by the real trainer (trainer.recipe with drafter "eagle": its buffer, hold-out, gate and
   training-time-test steps) after each of `--points` requests of that domain's train-split traffic.
   The traffic is the target's own greedy answers, as serving logs them (bench/online.py's cached
   teacher events), published to an embedded log the trainer consumes.
3. Each eagle row: tokens/s and its ratio to no speculation (re-measured at each point: this
   machine's speed drifts), tokens per target forward, draft time
   over target time, and the share of steps that accepted more than i draft tokens, by position i.
Every output is checked token-identical to the engine without speculation.

    python bench/online_speedup.py [--points 0,50,100,200,300] [--heldout 4] [--quick]
Writes bench/results/online_speedup.{json,png}.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
import uuid
from pathlib import Path

import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.machine_info import torch_machine  # noqa: E402
from bench.online import prompts as split_prompts, teacher_events  # noqa: E402
from bench.speculative import _Counter, run_hf  # noqa: E402
from drafters.base import NoDrafter  # noqa: E402
from drafters.eagle import is_eagle_checkpoint, load_eagle, serving_drafter, warm_start_dir  # noqa: E402
from moe.generate import SamplingParams  # noqa: E402
from moe.loader import DEFAULT_MODEL, load_model  # noqa: E402
from serving.engine import Engine, EngineConfig, Request  # noqa: E402
from streams import open_producer  # noqa: E402
from streams.schema import decode_event  # noqa: E402
from trainer.distill import GateConfig  # noqa: E402
from trainer.idle import IdleConfig  # noqa: E402
from trainer.recipe import Trainer, TrainerConfig  # noqa: E402

TARGETS = {"humaneval": 2.5, "sharegpt": 1.8}  # the speed-up targets


def decode_all(lm, drafter, prompts: list[list[int]], new_tokens: int, speculation) -> dict:
    """Batch-1 runs of every prompt through one engine: outputs, time, forwards, acceptance by position."""
    engine = Engine(lm.model, drafter, EngineConfig(max_batch=1, max_len=2048, speculation=speculation,
                                                    calibrate=speculation == "adaptive"))
    outs, seconds = [], 0.0
    for ids in prompts:
        engine.add_request(Request("r", tuple(ids), SamplingParams(max_new_tokens=new_tokens)))
        t = time.perf_counter()
        [done] = engine.run_to_completion()
        seconds += time.perf_counter() - t
        outs.append(done.output_ids)
    st = engine.stats
    tokens = sum(len(o) for o in outs)
    steps = max(st.steps, 1)
    return {"outputs": outs, "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
            "tokens_per_forward": st.emitted_tokens / steps, "draft_tokens": st.draft_tokens,
            "accepted_tokens": st.accepted_tokens,
            "accepted_beyond_position": [n / steps for n in st.accepted_per_position],
            "draft_over_target_time": st.draft_seconds / max(st.target_seconds, 1e-9)}


def baselines(lm, hf, counter, prompts: list[list[int]], new_tokens: int) -> dict:
    decode_all(lm, NoDrafter(), [prompts[0][:32]], 16, 0)  # warm-up (first-call allocations), not timed
    run_hf(hf, counter, prompts[0][:32], 16)
    rows = {"none": decode_all(lm, NoDrafter(), prompts, new_tokens, 0)}
    for name, kw in (("hf-generate", {}), ("hf-prompt-lookup", {"prompt_lookup_num_tokens": 10})):
        tokens = seconds = forwards = 0
        for ids in prompts:
            out, s, fwd = run_hf(hf, counter, ids, new_tokens, **kw)
            tokens, seconds, forwards = tokens + len(out), seconds + s, forwards + fwd
        rows[name] = {"tokens_per_s": tokens / seconds, "tokens_per_forward": tokens / max(forwards, 1)}
    return rows


def eagle_row(lm, head, version: str, prompts, new_tokens: int, reference: list, speculation,
              tree_topk: int = 0) -> dict:
    drafter = serving_drafter(head, version, lm.model, max_batch=1, max_len=2048, tree_topk=tree_topk)
    row = decode_all(lm, drafter, prompts, new_tokens, speculation)
    row["identical"] = sum(a == b for a, b in zip(row.pop("outputs"), reference))
    return row


def run_domain(lm, hf, counter, domain: str, args, cache: Path, warm: Path) -> dict:
    held = [ids for _, ids in split_prompts(lm.tokenizer, domain, "heldout", args.heldout, 512)]
    base = baselines(lm, hf, counter, held, args.new_tokens)
    reference = base["none"].pop("outputs")
    ref_tps = base["none"]["tokens_per_s"]
    train = split_prompts(lm.tokenizer, domain, "train", max(args.points), 512)
    events = teacher_events(lm, [(domain, i, ids) for i, ids in train], args.new_tokens, cache)
    while len(train) < max(args.points):  # HumanEval's train split is 123 problems: traffic repeats
        train += train[: max(args.points) - len(train)]
    work = Path(tempfile.mkdtemp(prefix=f"online-speedup-{domain}-"))
    cfg = TrainerConfig(target=DEFAULT_MODEL, drafter="eagle", eagle_base=str(warm), registry=False,
                        events_url=(work / "log").as_uri(), state_dir=str(work / "state"),
                        stop_when_drained_s=0.5, checkpoint_every_s=1e9, lr=args.lr, batch_size=8,
                        holdout_size=16, gate=GateConfig(min_samples=8, min_positions=256, margin=0.005, spec_len=4),
                        idle=IdleConfig(threads=torch.get_num_threads()))  # the engine rows keep every thread
    trainer = Trainer(cfg)
    trainer.setup()
    producer = open_producer(cfg.events_url)
    rows, sent = [], 0
    try:
        for point in args.points:
            for i, _ in train[sent:point]:
                # Each publish is a request of its own (HumanEval's train problems repeat): a fresh event id.
                producer.publish(dataclasses.replace(decode_event(events[i]), event_id=uuid.uuid4().hex))
            producer.flush(10)
            sent = max(sent, point)
            if point:
                trainer.train()
            lin = trainer.lineages["general"]
            # This machine's speed drifts by tens of percent within minutes: each point's ratio is taken
            # against the engine without speculation measured right before it.
            now_tps = decode_all(lm, NoDrafter(), held, args.new_tokens, 0)["tokens_per_s"]
            for spec, topk in ((s, k) for k in args.tree_topk for s in args.speculation):
                row = eagle_row(lm, lin.champion, f"after-{point}", held, args.new_tokens, reference, spec, topk)
                row.update(requests=point, speculation=spec, tree_topk=topk, speedup=row["tokens_per_s"] / now_tps,
                           none_tokens_per_s=now_tps,
                           promotions=lin.promotions, steps=lin.step, last_decision=trainer.stats.last_decision)
                rows.append(row)
                print(f"{domain}: after {point} requests ({lin.promotions} promotions), speculation {spec}, "
                      f"{f'top-{topk} trees' if topk else 'chains'}: "
                      f"{row['tokens_per_s']:.1f} tok/s = {row['speedup']:.2f}x no speculation, "
                      f"{row['tokens_per_forward']:.2f} tokens/forward, draft/target time "
                      f"{row['draft_over_target_time']:.3f}", flush=True)
    finally:
        producer.close()
        trainer.cleanup()
    for name, b in base.items():
        b["speedup"] = b["tokens_per_s"] / ref_tps
    return {"heldout_prompts": len(held), "baselines": base, "eagle": rows, "target_speedup": TARGETS[domain]}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    domains = list(result["domains"])
    fig, axes = plt.subplots(1, len(domains), figsize=(6 * len(domains), 4.2), squeeze=False)
    for ax, domain in zip(axes[0], domains):
        d = result["domains"][domain]
        for spec, topk in sorted({(r["speculation"], r.get("tree_topk", 0)) for r in d["eagle"]}, key=str):
            pts = [r for r in d["eagle"] if r["speculation"] == spec and r.get("tree_topk", 0) == topk]
            shape = f"top-{topk} trees" if topk else "chains"
            ax.plot([r["requests"] for r in pts], [r["speedup"] for r in pts], "o-",
                    label=f"eagle {shape}, speculation {spec}")
        for name, style in (("hf-generate", ":"), ("hf-prompt-lookup", "--")):
            ax.axhline(d["baselines"][name]["speedup"], linestyle=style, color="grey", label=name)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.axhline(d["target_speedup"], color="red", linestyle="-.", label=f"target {d['target_speedup']}x")
        ax.set_title(f"{domain}: tokens/s over the engine without speculation")
        ax.set_xlabel("requests of online training")
        ax.set_ylabel("speed-up (batch 1, greedy)")
        ax.legend(fontsize=7)
    fig.suptitle(f"{result['model']} on {result['machine']['cpu']}, {result['machine']['torch_threads']} threads", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--points", default="0,50,100,200,300", help="requests of online training to measure after")
    p.add_argument("--domains", default="humaneval,sharegpt")
    p.add_argument("--heldout", type=int, default=4, help="held-out prompts per domain")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--speculation", default="adaptive,4", help="engine speculation settings of the eagle rows")
    p.add_argument("--tree-topk", default="0,4",
                   help="eagle draft shapes: 0 for chains, k >= 2 for trees of each node's k likeliest children")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--quick", action="store_true",
                   help="2 held-out prompts, 64 tokens, points 0,48 (the first 16 requests fill the hold-out)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "online_speedup"))
    args = p.parse_args()
    if args.quick:
        args.heldout, args.new_tokens, args.points = 2, 64, "0,48"
    try:
        args.points = sorted({int(x) for x in args.points.split(",")})
        args.speculation = [x if x == "adaptive" else int(x) for x in args.speculation.split(",")]
        args.tree_topk = sorted({int(x) for x in args.tree_topk.split(",")})
    except ValueError:
        raise SystemExit(f"--points, --speculation and --tree-topk must be comma-separated integers (or adaptive), "
                         f"got {args.points!r}, {args.speculation!r}, {args.tree_topk!r}") from None
    from drafters.eagle import check_tree_topk

    try:
        for k in args.tree_topk:
            check_tree_topk(k, "--tree-topk")
    except ValueError as e:
        raise SystemExit(str(e)) from None
    domains = [d for d in args.domains.split(",") if d]
    bad = [d for d in domains if d not in TARGETS]
    if bad:
        raise SystemExit(f"--domains: unknown {bad}; choose from {', '.join(TARGETS)}")
    warm = warm_start_dir(DEFAULT_MODEL)
    if not is_eagle_checkpoint(warm):
        raise SystemExit(f"no warm-start eagle head in {warm}: run `spectutor draft init` first")
    torch.manual_seed(0)
    lm = load_model(DEFAULT_MODEL)
    load_eagle(warm, lm.config, lm.model.embed)  # refuse a head that does not fit before any work
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(lm.folder, dtype=torch.float32).eval()
    counter = _Counter(hf)
    cache = ROOT / "bench" / "results" / f"online-teacher-{args.new_tokens}.bin"
    result = {"model": DEFAULT_MODEL, "machine": torch_machine(), "settings": {k: v for k, v in vars(args).items()},
              "domains": {}}
    for domain in tqdm(domains, desc="domains"):
        result["domains"][domain] = run_domain(lm, hf, counter, domain, args, cache, warm)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    plot(result, out.with_suffix(".png"))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
