"""The OSD effect on real traffic: does online distillation raise the draft's acceptance?

Target SmolLM2-135M-Instruct; the draft is the default draft LM (its first 4 layers, cut).
1. Teacher outputs: every request of the stream and every held-out prompt is answered once by the
   real target (greedy, the engine, batched plain decoding) with its top-8
   log-probabilities logged, exactly as serving would emit it (serving.events). Cached on disk.
2. The stream: ShareGPT requests, then a switch to HumanEval requests (train splits; HumanEval's
   123 train problems repeat once exhausted, as real traffic repeats). Three drafts see it:
   static (never trained), one online draft, and per-domain online drafts (one per domain, routed
   by the request's label). Online drafts train as trainer.recipe does: a recency-weighted buffer,
   `steps_per_sample` gradient steps per new request, FKL on the top-k + tail support.
3. Every `eval_every` requests each draft is scored teacher-forced on held-out prompts of each
   domain (trainer.distill.evaluate): acceptance (greedy draft token == target token) and
   expected accepted length at chain length 4.
4. End to end: the engine decodes held-out HumanEval prompts with no drafter, the static draft and
   the trained per-domain draft; tokens/s and the speed-up over no drafter.

    python bench/online.py [--sharegpt 100] [--humaneval 300] [--quick]
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import sys
import time
from itertools import islice
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.machine_info import torch_machine  # noqa: E402
from drafters.draft_lm import DraftLMDrafter, draft_from_target  # noqa: E402
from drafters.base import NoDrafter  # noqa: E402
from moe.generate import SamplingParams  # noqa: E402
from moe.loader import DEFAULT_MODEL, encode_prompt, load_model  # noqa: E402
from serving.engine import Engine, EngineConfig, Request  # noqa: E402
from serving.events import event_from_finished  # noqa: E402
from serving.traffic import humaneval_prompts, sharegpt_prompts  # noqa: E402
from streams.schema import ModelRef, decode_event, encode  # noqa: E402
from trainer.checkpoint import frame, unframe  # noqa: E402
from trainer.distill import evaluate, student_logprobs  # noqa: E402
from trainer.losses import loss_fn  # noqa: E402
from trainer.samples import RecencyBuffer, Sample, coarsen, collate, sample_from_event  # noqa: E402

OSD_PUBLISHED = {"acceptance_gain": [0.10, 0.65], "latency_speedup": [1.42, 2.17]}


def prompts(tok, domain: str, split: str, n: int, max_tokens: int) -> list[tuple[str, list[int]]]:
    """(id, token ids) of the first n prompts of a domain's split that fit max_tokens."""
    if domain == "sharegpt":
        src = ((p.id, encode_prompt(tok, p.text)) for p in sharegpt_prompts(split) if len(p.text) < 1500)
    else:
        src = ((p.id, tok.encode(p.text)) for p in humaneval_prompts(split))
    return list(islice(((i, ids) for i, ids in src if len(ids) <= max_tokens), n))


def teacher_events(lm, todo: list[tuple[str, str, list[int]]], new_tokens: int, cache: Path) -> dict[str, bytes]:
    """Wire events of the target answering each (domain, id, prompt) once; cached by prompt and settings."""
    have: dict[str, bytes] = {}
    index = cache.with_suffix(".json")
    if cache.exists() and index.exists():
        have = dict(zip(json.loads(index.read_text()), unframe(cache.read_bytes())))
    missing = [(d, i, ids) for d, i, ids in todo if i not in have]
    if missing:
        # Plain batched decoding: at batch 8 on a CPU, drafting costs more than it saves.
        engine = Engine(lm.model, NoDrafter(), EngineConfig(max_batch=8, max_len=1024, speculation=0, topk_log=8),
                        eos_ids=lm.eos_token_ids)
        bar = tqdm(total=len(missing), desc="teacher outputs (target, greedy)")
        for at in range(0, len(missing), 8):
            for d, i, ids in missing[at: at + 8]:
                engine.add_request(Request(i, tuple(ids), SamplingParams(max_new_tokens=new_tokens), domain=d))
            for fin in engine.run_to_completion():
                have[fin.request_id] = encode(event_from_finished(fin, "bench", ModelRef(DEFAULT_MODEL, "1")))
                bar.update(1)
            cache.write_bytes(frame(list(have.values())))
            index.write_text(json.dumps(list(have)))
        bar.close()
    return have


def train_step(model, opt, samples: list[Sample], args) -> float:
    """One FKL step on the top-k + tail support; positions weighted all_weight + rejected_weight x
    [the draft's greedy token is wrong there] (teacher-forced stand-in for served rejections)."""
    batch = collate(samples)
    opt.zero_grad(set_to_none=True)
    s = student_logprobs(model, batch)                                     # [N, V]
    with torch.no_grad():
        wrong = (s.argmax(-1) != batch.output_ids).float()
    w = args.all_weight + args.rejected_weight * wrong
    student, teacher = coarsen(s, batch.topk_ids, batch.topk_logprobs)
    loss = loss_fn(args.loss)(student, teacher, w)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return float(loss)


class Online:
    """One online draft: its buffer, optimiser and the steps it owes."""

    def __init__(self, base, args, seed: int):
        self.model = copy.deepcopy(base).train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=args.lr, weight_decay=0.0)
        self.buffer = RecencyBuffer(args.buffer, args.half_life)
        self.owed = 0.0
        self.rng = np.random.default_rng(seed)
        self.steps = 0

    def see(self, sample: Sample, args) -> None:
        self.buffer.add(sample)
        self.owed += args.steps_per_sample
        while self.owed >= 1.0:
            train_step(self.model, self.opt, self.buffer.draw(args.batch_size, self.rng), args)
            self.owed -= 1.0
            self.steps += 1


def measure_speedup(lm, drafts: dict[str, object], prompts_he: list[list[int]], new_tokens: int) -> dict:
    """Engine tokens/s on held-out HumanEval prompts per drafter, EOS ignored (same work for all)."""
    out = {}
    for name, model in drafts.items():
        drafter = None if model is None else DraftLMDrafter(copy.deepcopy(model).eval(), name, max_batch=1,
                                                            max_len=1024, cost_hint=0.15)
        spec = 0 if drafter is None else "adaptive"
        engine = Engine(lm.model, drafter or NoDrafter(), EngineConfig(max_batch=1, max_len=1024, speculation=spec))
        tokens, seconds, forwards = 0, 0.0, 0
        for ids in prompts_he:
            engine.add_request(Request("s", tuple(ids), SamplingParams(max_new_tokens=new_tokens)))
            t = time.perf_counter()
            [fin] = engine.run_to_completion()
            seconds += time.perf_counter() - t
            tokens += len(fin.output_ids)
            forwards += len(fin.steps)
        out[name] = {"tokens_per_s": tokens / seconds, "mean_accepted_length": tokens / max(forwards, 1)}
    base = out["none"]["tokens_per_s"]
    for v in out.values():
        v["speedup_vs_none"] = v["tokens_per_s"] / base
    return out


def _trainer_proc(cache: Path, layers: int, gated: bool, redis_url: str | None, prefix: str, stop, steps) -> None:
    """Interference run: train the draft on cached teacher events in a loop, one thread, optionally
    gated by Redis heartbeats (trainer.idle) as `spectutor train` is."""
    import types

    from streams.redis_bus import RedisBus, RedisConfig
    from trainer.idle import IdleConfig, LoadWatcher, Preempted

    torch.set_num_threads(1)
    samples = [x for x in (sample_from_event(decode_event(b), 512) for b in unframe(cache.read_bytes())) if x]
    model = draft_from_target(DEFAULT_MODEL, layers, max_len=1024).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    args = types.SimpleNamespace(all_weight=1.0, rejected_weight=0.0, loss="fkl")
    watcher = LoadWatcher(RedisBus(redis_url, RedisConfig(prefix=prefix)).heartbeats if gated else None,
                          IdleConfig(max_busy=0, poll_s=0.1))
    watcher.guard(model)
    rng = np.random.default_rng(0)
    while not stop.is_set():
        try:
            train_step(model, opt, [samples[i] for i in rng.choice(len(samples), 4, replace=False)], args)
            steps.value += 1
        except Preempted:
            watcher.wait_idle()


def measure_interference(lm, cache: Path, prompt_ids: list[list[int]], new_tokens: int, gap_s: float,
                         layers: int) -> dict:
    """Serving latency p50/p99 (batch 1, `gap_s` idle between requests) with no trainer, a trainer that
    ignores load, and a trainer gated by the replica's heartbeats (Redis at $SPECTUTOR_REDIS_URL)."""
    import multiprocessing as mp
    import os
    import uuid

    from drafters.base import NoDrafter
    from streams.redis_bus import RedisBus, RedisConfig
    from streams.schema import Heartbeat

    redis_url = os.environ.get("SPECTUTOR_REDIS_URL")
    prefix = f"bench{uuid.uuid4().hex[:6]}"
    bus = RedisBus(redis_url, RedisConfig(prefix=prefix, heartbeat_ttl_s=5.0)) if redis_url else None
    engine = Engine(lm.model, NoDrafter(), EngineConfig(max_batch=1, max_len=1024, speculation=0))
    out = {}
    modes = ["none", "ungated"] + (["gated"] if bus else [])
    ctx = mp.get_context("spawn")
    for mode in modes:
        stop, steps = ctx.Event(), ctx.Value("i", 0)
        proc = None
        if mode != "none":
            proc = ctx.Process(target=_trainer_proc, args=(cache, layers, mode == "gated", redis_url, prefix, stop, steps))
            proc.start()
            time.sleep(25)  # model load and first steps
        lat = []
        start_steps = steps.value
        for ids in tqdm(prompt_ids, desc=f"serving latency, trainer: {mode}"):
            if bus:
                bus.heartbeat(Heartbeat("bench", running=1, tokens_per_s=0.0, queue_depth=0))
            engine.add_request(Request("lat", tuple(ids), SamplingParams(max_new_tokens=new_tokens)))
            t = time.perf_counter()
            engine.run_to_completion()
            lat.append(time.perf_counter() - t)
            if bus:
                bus.heartbeat(Heartbeat("bench", running=0, tokens_per_s=0.0, queue_depth=0))
            time.sleep(gap_s)
        trained = steps.value - start_steps
        stop.set()
        if proc is not None:
            proc.join(30)
        out[mode] = {"p50_s": float(np.percentile(lat, 50)), "p99_s": float(np.percentile(lat, 99)),
                     "mean_s": float(np.mean(lat)), "trainer_steps_during": trained}
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, domain in zip(axes, ("sharegpt", "humaneval")):
        for variant, style in (("static", "k--"), ("online", "b-"), ("per_domain", "g-")):
            pts = [(p["requests"], p[variant][domain]["acceptance"]) for p in result["curve"]]
            ax.plot([x for x, _ in pts], [y for _, y in pts], style, label=variant.replace("_", "-"), marker=".")
        ax.axvline(result["switch_at"], color="gray", lw=0.8)
        ax.set_title(f"held-out {domain}: teacher-forced acceptance")
        ax.set_xlabel("requests seen (ShareGPT, then HumanEval after the line)")
        ax.set_ylabel("acceptance (draft greedy token == target token)")
        ax.legend()
    fig.suptitle(f"Online distillation of the SmolLM2 draft ({result['machine']['cpu']}, {result['config']['note']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sharegpt", type=int, default=100, help="ShareGPT requests before the switch")
    ap.add_argument("--humaneval", type=int, default=300, help="HumanEval requests after it")
    ap.add_argument("--heldout", type=int, default=16, help="held-out prompts per domain")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--max-prompt", type=int, default=384)
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--draft-layers", type=int, default=4)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--loss", default="fkl", choices=["fkl", "rkl", "jsd", "osd_jsd", "tvd"])
    ap.add_argument("--all-weight", type=float, default=1.0)
    ap.add_argument("--rejected-weight", type=float, default=0.0)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--steps-per-sample", type=float, default=0.5)
    ap.add_argument("--buffer", type=int, default=512)
    ap.add_argument("--half-life", type=float, default=128.0)
    ap.add_argument("--speedup-prompts", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="24 + 48 requests, 6 held-out, 32 tokens: a smoke run")
    ap.add_argument("--interference", action="store_true",
                    help="only measure serving latency with and without a trainer (needs the teacher cache)")
    ap.add_argument("--latency-requests", type=int, default=12)
    ap.add_argument("--gap-s", type=float, default=1.0)
    ap.add_argument("--tag", default="cpu-fp32")
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "spectutor" / "bench")
    args = ap.parse_args()
    if args.quick:
        args.sharegpt, args.humaneval, args.heldout, args.new_tokens, args.eval_every = 24, 48, 6, 32, 12
        args.max_prompt = 256
        args.speedup_prompts = 2
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    lm = load_model(DEFAULT_MODEL)
    tok = lm.tokenizer
    he_train = prompts(tok, "humaneval", "train", 10_000, args.max_prompt)
    stream = [("sharegpt", i, ids) for i, ids in prompts(tok, "sharegpt", "train", args.sharegpt, args.max_prompt)]
    stream += [("humaneval",) + he_train[k % len(he_train)] for k in range(args.humaneval)]
    held = {d: prompts(tok, d, "heldout", args.heldout, args.max_prompt) for d in ("sharegpt", "humaneval")}
    todo = {i: (d, i, ids) for d, i, ids in stream}
    todo.update({i: (d, i, ids) for d in held for i, ids in held[d]})
    args.cache.mkdir(parents=True, exist_ok=True)
    key = hashlib.sha256(f"{DEFAULT_MODEL}-{args.new_tokens}-{args.max_prompt}".encode()).hexdigest()[:12]
    t0 = time.perf_counter()
    cache = args.cache / f"online-teacher-{key}.bin"
    wire = teacher_events(lm, list(todo.values()), args.new_tokens, cache)
    teacher_s = time.perf_counter() - t0
    if args.interference:
        ids = [ids for _, ids in (held["sharegpt"] + held["humaneval"])][: args.latency_requests]
        res = {"machine": torch_machine(), "requests": len(ids), "new_tokens": args.new_tokens, "gap_s": args.gap_s,
               "latency": measure_interference(lm, cache, ids, args.new_tokens, args.gap_s, args.draft_layers)}
        (ROOT / "bench" / "results" / f"online-interference-{args.tag}.json").write_text(json.dumps(res, indent=1))
        print(json.dumps(res, indent=1))
        return 0
    sample = {i: sample_from_event(decode_event(b), 1024) for i, b in wire.items()}
    held_samples = {d: [sample[i] for i, _ in held[d] if sample[i] is not None] for d in held}

    base = draft_from_target(DEFAULT_MODEL, args.draft_layers, max_len=1024)
    online = Online(base, args, 1)
    per_domain = {d: Online(base, args, 2 + k) for k, d in enumerate(("sharegpt", "humaneval"))}

    def score(model) -> dict:
        return {d: vars(evaluate(model, held_samples[d], 4)) for d in held_samples}

    static = score(base)
    curve = [{"requests": 0, "static": static, "online": static, "per_domain": static}]
    t1 = time.perf_counter()
    for n, (d, i, _) in enumerate(tqdm(stream, desc="stream (train + eval)"), start=1):
        s = sample[i]
        if s is None:
            continue
        online.see(s, args)
        per_domain[d].see(s, args)
        if n % args.eval_every == 0 or n == len(stream):
            curve.append({"requests": n, "static": static, "online": score(online.model),
                          "per_domain": {dom: vars(evaluate(per_domain[dom].model, held_samples[dom], 4))
                                         for dom in held_samples}})
    train_s = time.perf_counter() - t1
    he_ids = [ids for _, ids in held["humaneval"][: args.speedup_prompts]]
    speed = measure_speedup(lm, {"none": None, "static-draft": base, "online-per-domain": per_domain["humaneval"].model},
                            he_ids, args.new_tokens)

    switch = args.sharegpt
    he_pts = [p for p in curve if p["requests"] > switch]
    he_gain = max((p["per_domain"]["humaneval"]["acceptance"] for p in he_pts), default=0.0) - \
        static["humaneval"]["acceptance"]
    sg_best = max(p["per_domain"]["sharegpt"]["acceptance"] for p in curve)
    sg_end = curve[-1]["per_domain"]["sharegpt"]["acceptance"]
    sg_online_end = curve[-1]["online"]["sharegpt"]["acceptance"]
    sg_online_best = max(p["online"]["sharegpt"]["acceptance"] for p in curve)
    result = {
        "machine": torch_machine(), "config": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                                         "note": f"{args.sharegpt} ShareGPT + {args.humaneval} HumanEval requests, "
                                                 f"{args.new_tokens} tokens"},
        "switch_at": switch, "curve": curve, "timings_s": {"teacher": teacher_s, "stream": train_s},
        "steps": {"online": online.steps, **{f"per_domain_{d}": o.steps for d, o in per_domain.items()}},
        "targets": {
            "humaneval_gain_over_static": he_gain, "humaneval_gain_target": 0.15,
            "humaneval_requests_seen": args.humaneval,
            "sharegpt_per_domain_end_vs_best": sg_end - sg_best, "sharegpt_target": -0.02,
            "sharegpt_single_online_end_vs_its_best": sg_online_end - sg_online_best,
        },
        "end_to_end": speed, "osd_published": OSD_PUBLISHED,
    }
    out = ROOT / "bench" / "results" / f"online-{args.tag}.json"
    out.write_text(json.dumps(result, indent=1))
    plot(result, out.with_suffix(".png"))
    print(json.dumps({"targets": result["targets"], "end_to_end": speed, "timings_s": result["timings_s"]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
