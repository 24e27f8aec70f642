"""Speculative decoding benchmark: this engine's drafters against Hugging Face, same model, prompts, threads.

1. Batch 1, greedy, held-out HumanEval and ShareGPT prompts (fixed hash split), 128 new tokens, EOS
   ignored so every configuration does the same work. Configurations run one after another on each
   prompt, so they share the machine's noise: HF `generate`, HF assisted generation with the same
   draft weights as `draft-lm`, HF prompt lookup, and the engine with each drafter (adaptive size).
   Reported per domain: tokens/s, speed-up over HF `generate`, mean accepted length (tokens per
   target forward, bonus included), acceptance rate, and whether the output equals the target's.
2. Throughput at 4 and 16 concurrent requests, per domain, for no speculation, each drafter alone
   and the controller ("auto"; draft-lm is left out there: at batch 1 it already loses).
3. Memory: peak RSS of a process serving with each drafter, the draft LM's and the Token Recycling
   matrix's own bytes.

    python bench/speculative.py [--prompts 30] [--new-tokens 128] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from itertools import islice
from pathlib import Path

import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.machine_info import torch_machine  # noqa: E402
from drafters.registry import DrafterConfig, build_drafter  # noqa: E402
from moe.generate import SamplingParams  # noqa: E402
from moe.loader import DEFAULT_MODEL, encode_prompt, load_model  # noqa: E402
from serving.engine import Engine, EngineConfig, Request  # noqa: E402
from serving.traffic import humaneval_prompts, sharegpt_prompts  # noqa: E402

ENGINE_DRAFTERS = ("none", "prompt-lookup", "token-recycling", "suffix", "hybrid", "draft-lm", "auto")
CONCURRENT_DRAFTERS = ("none", "prompt-lookup", "token-recycling", "suffix", "hybrid", "auto")
HF_CONFIGS = ("hf-generate", "hf-assisted", "hf-prompt-lookup")


class _Counter:
    """Counts forward calls of a Hugging Face model (its target forwards)."""

    def __init__(self, module: torch.nn.Module):
        self.calls = 0
        module.register_forward_pre_hook(self._hook)

    def _hook(self, *_):
        self.calls += 1


def load_prompts(tok, n: int) -> dict[str, list[list[int]]]:
    sg = [encode_prompt(tok, p.text)[-512:] for p in islice((p for p in sharegpt_prompts("heldout")
                                                             if len(p.text) < 1500), n)]
    he = [tok.encode(p.text) for p in islice(humaneval_prompts("heldout"), n)]
    if len(he) < n:
        raise SystemExit(f"only {len(he)} held-out HumanEval prompts, {n} asked")
    return {"humaneval": he, "sharegpt": sg}


def make_engine(lm, drafter: str, max_batch: int, draft_layers: int, speculation="adaptive") -> Engine:
    cfg = EngineConfig(max_batch=max_batch, max_len=2048, speculation=speculation)
    d = build_drafter(DrafterConfig(drafter, draft_layers=draft_layers), DEFAULT_MODEL, lm.config.vocab_size,
                      max_batch, cfg.max_len, lm.config)
    return Engine(lm.model, d, cfg)  # no EOS: every run makes exactly new_tokens


def run_engine(engine: Engine, ids: list[int], new_tokens: int) -> tuple[tuple[int, ...], float, int, int, int]:
    """(output, seconds, target forwards, draft tokens, accepted draft tokens) of one request."""
    engine.add_request(Request("bench", tuple(ids), SamplingParams(max_new_tokens=new_tokens)))
    t = time.perf_counter()
    [done] = engine.run_to_completion()
    return done.output_ids, time.perf_counter() - t, len(done.steps), done.draft_tokens, done.accepted_tokens


def run_hf(hf, counter: _Counter, ids: list[int], new_tokens: int, **kw) -> tuple[tuple[int, ...], float, int]:
    counter.calls = 0
    t = time.perf_counter()
    with torch.inference_mode():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                          do_sample=False, eos_token_id=None, pad_token_id=0, **kw)
    return tuple(out[0, len(ids):].tolist()), time.perf_counter() - t, counter.calls


def bench_batch1(lm, prompts: dict[str, list[list[int]]], new_tokens: int, draft_layers: int) -> dict:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(lm.folder, dtype=torch.float32).eval()
    # The assistant holds exactly the draft-lm's weights: the target's first `draft_layers` layers.
    assistant = AutoModelForCausalLM.from_pretrained(lm.folder, dtype=torch.float32,
                                                     num_hidden_layers=draft_layers).eval()
    counter = _Counter(hf)
    engines = {d: make_engine(lm, d, 1, draft_layers) for d in ENGINE_DRAFTERS}
    warm = prompts["sharegpt"][0][:32]
    run_hf(hf, counter, warm, 8)
    for e in engines.values():
        run_engine(e, warm, 8)
    rows: dict[str, dict[str, dict]] = {}
    for domain, plist in prompts.items():
        acc = {name: {"seconds": 0.0, "tokens": 0, "forwards": 0, "draft": 0, "accepted": 0, "identical": 0}
               for name in HF_CONFIGS + ENGINE_DRAFTERS}
        for ids in tqdm(plist, desc=f"batch 1, {domain}"):
            reference = None
            for name in HF_CONFIGS + ENGINE_DRAFTERS:
                if name == "hf-generate":
                    out, s, fwd = run_hf(hf, counter, ids, new_tokens)
                    reference, draft, accepted = out, 0, 0
                elif name == "hf-assisted":
                    out, s, fwd = run_hf(hf, counter, ids, new_tokens, assistant_model=assistant)
                    draft = accepted = None
                elif name == "hf-prompt-lookup":
                    out, s, fwd = run_hf(hf, counter, ids, new_tokens, prompt_lookup_num_tokens=10)
                    draft = accepted = None
                else:
                    out, s, fwd, draft, accepted = run_engine(engines[name], ids, new_tokens)
                a = acc[name]
                a["seconds"] += s
                a["tokens"] += len(out)
                a["forwards"] += fwd
                a["identical"] += out == reference
                if draft is not None:
                    a["draft"] += draft
                    a["accepted"] += accepted
        base = acc["hf-generate"]["tokens"] / acc["hf-generate"]["seconds"]
        rows[domain] = {name: {
            "tokens_per_s": a["tokens"] / a["seconds"],
            "speedup_vs_hf_generate": a["tokens"] / a["seconds"] / base,
            "mean_accepted_length": a["tokens"] / max(a["forwards"], 1),
            "acceptance_rate": (a["accepted"] / a["draft"] if a["draft"] else None)
            if name not in ("hf-assisted", "hf-prompt-lookup") else None,
            "identical_to_hf_generate": a["identical"], "prompts": len(plist)} for name, a in acc.items()}
    return rows


def bench_concurrency(lm, prompts: dict[str, list[list[int]]], new_tokens: int, draft_layers: int,
                      levels: tuple[int, ...] = (4, 16)) -> dict:
    """domain -> concurrency -> drafter -> tokens/s of all its requests together (and the ratio to none)."""
    out: dict[str, dict[str, dict]] = {}
    for domain, plist in prompts.items():
        out[domain] = {}
        for conc in levels:
            row = {}
            for name in tqdm(CONCURRENT_DRAFTERS, desc=f"concurrency {conc}, {domain}"):
                engine = make_engine(lm, name, conc, draft_layers)
                for i, ids in enumerate(plist):
                    engine.add_request(Request(str(i), tuple(ids), SamplingParams(max_new_tokens=new_tokens),
                                               domain=domain))
                t = time.perf_counter()
                done = engine.run_to_completion()
                row[name] = {"tokens_per_s": sum(len(f.output_ids) for f in done) / (time.perf_counter() - t),
                             "draft_tokens": sum(f.draft_tokens for f in done),
                             "accepted_tokens": sum(f.accepted_tokens for f in done)}
            for r in row.values():
                r["vs_none"] = r["tokens_per_s"] / row["none"]["tokens_per_s"]
            out[domain][str(conc)] = row
            print(f"{domain} concurrency {conc}: " + ", ".join(f"{k} {v['tokens_per_s']:.1f} tok/s ({v['vs_none']:.2f}x)"
                                                             for k, v in row.items()), flush=True)
    return out


def peak_rss_mb(drafter: str, draft_layers: int, threads: int) -> float:
    """Peak RSS of a fresh process that loads the model, builds the engine with `drafter` and decodes."""
    code = (
        "import sys, torch; sys.path.insert(0, %r); torch.set_num_threads(%d)\n"
        "from bench.speculative import make_engine, run_engine\n"
        "from moe.loader import load_model\n"
        "lm = load_model()\n"
        "e = make_engine(lm, %r, 1, %d)\n"
        "run_engine(e, lm.tokenizer.encode('def fibonacci(n):\\n    \"\"\"Return the n-th number.\"\"\"'), 32)\n"
        "print(next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')))\n"
    ) % (str(ROOT), threads, drafter, draft_layers)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(res.stdout.strip().splitlines()[-1]) / 1024


def _forward_ms(model, repeats: int = 20) -> float:
    """Median ms of one single-token forward after a 128-token context."""
    from moe.tree import TreeBatch

    cache = model.new_cache(1, 256)
    slot = cache.allocate()
    model(TreeBatch.chains([list(range(100, 228))]), [slot], cache, logits_for="last")
    cache.commit([slot], [list(range(128))])
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        model(TreeBatch.chains([[7]]), [slot], cache, logits_for="last")
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2] * 1000


def drafter_costs(lm, draft_layers: int) -> dict:
    """Bytes each drafter adds, and the draft LM's cost per token relative to the target (computed and measured)."""
    from drafters.draft_lm import DraftLMDrafter, draft_from_target
    from drafters.recycling import TokenRecycling

    tr = TokenRecycling(lm.config.vocab_size)
    draft = draft_from_target(DEFAULT_MODEL, draft_layers)
    weights = sum(p.numel() * p.element_size() for p in {id(p): p for p in draft.parameters()}.values())
    ratio = draft.cost_ratio(lm.config)
    packed = DraftLMDrafter(draft, max_batch=1, max_len=256).model.decoder  # packs like serving does
    target_ms, draft_ms = _forward_ms(lm.model), _forward_ms(packed)
    return {"token_recycling_matrix_bytes": tr.matrix.numel() * tr.matrix.element_size(),
            "draft_lm_weight_bytes": weights, "draft_lm_cost_ratio_macs": ratio,
            "target_forward_ms": target_ms, "draft_forward_ms": draft_ms,
            "draft_lm_cost_ratio_measured": draft_ms / target_ms}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(15, 9))
    names = list(HF_CONFIGS + ENGINE_DRAFTERS)
    for ax, (domain, rows) in zip(axes[0], result["batch1"].items()):
        vals = [rows[n]["tokens_per_s"] for n in names]
        colors = ["#999"] * len(HF_CONFIGS) + ["#2a7" if n != "auto" else "#c50" for n in ENGINE_DRAFTERS]
        ax.barh(names, vals, color=colors)
        none = rows["none"]["tokens_per_s"]
        for i, n in enumerate(names):
            ax.text(vals[i], i, f" {rows[n]['speedup_vs_hf_generate']:.2f}x HF, {vals[i] / none:.2f}x none, "
                                f"MAT {rows[n]['mean_accepted_length']:.2f}", va="center", fontsize=8)
        ax.set_xlabel("tokens / s (greedy, batch 1)")
        ax.set_title(f"{domain}, batch 1 ({rows['hf-generate']['prompts']} held-out prompts)")
        ax.invert_yaxis()
    for ax, (domain, levels) in zip(axes[1], result["concurrency"].items()):
        conc = list(levels)
        x = range(len(CONCURRENT_DRAFTERS))
        width = 0.8 / len(conc)
        for j, c in enumerate(conc):
            vals = [levels[c][n]["vs_none"] for n in CONCURRENT_DRAFTERS]
            ax.bar([i + j * width for i in x], vals, width, label=f"{c} concurrent")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.axhline(0.98, color="r", lw=0.8, ls="--", label="0.98x (the controller's floor)")
        ax.set_xticks([i + width * (len(conc) - 1) / 2 for i in x], CONCURRENT_DRAFTERS, fontsize=8, rotation=15)
        ax.set_ylabel("throughput / no speculation")
        ax.set_title(f"{domain}, {result['concurrency_prompts'][domain]} requests, at most this many at once")
        ax.legend(fontsize=8, loc="lower right")
    fig.suptitle(f"{result['model']} fp32, {result['threads']} threads, {result['new_tokens']} new tokens — "
                 f"{result['machine']['cpu']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=30, help="held-out prompts per domain")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--draft-layers", type=int, default=2, help="layers of the target kept in the draft LM")
    ap.add_argument("--concurrency-prompts", type=int, default=16)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    lm = load_model(DEFAULT_MODEL, dtype="fp32")
    prompts = load_prompts(lm.tokenizer, args.prompts)
    result = {"model": DEFAULT_MODEL, "threads": args.threads, "new_tokens": args.new_tokens,
              "draft_layers": args.draft_layers, "machine": torch_machine()}
    result["batch1"] = bench_batch1(lm, prompts, args.new_tokens, args.draft_layers)
    for domain, rows in result["batch1"].items():
        for name, r in rows.items():
            rate = "-" if r["acceptance_rate"] is None else f"{r['acceptance_rate']:.2f}"
            print(f"{domain:10s} {name:17s} {r['tokens_per_s']:6.1f} tok/s {r['speedup_vs_hf_generate']:5.2f}x "
                  f"MAT {r['mean_accepted_length']:.2f} acc {rate} identical {r['identical_to_hf_generate']}/"
                  f"{r['prompts']}", flush=True)
    many = load_prompts(lm.tokenizer, args.concurrency_prompts)
    result["concurrency_prompts"] = {d: len(p) for d, p in many.items()}
    result["concurrency"] = bench_concurrency(lm, many, args.new_tokens, args.draft_layers)
    result["memory"] = {"peak_rss_mb": {d: peak_rss_mb(d, args.draft_layers, args.threads) for d in ENGINE_DRAFTERS},
                        **drafter_costs(lm, args.draft_layers)}
    print(f"memory: {result['memory']}")
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / "speculative-cpu-fp32"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2))
    plot(result, stem.with_suffix(".png"))
    print(f"wrote {stem}.json and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
