"""Repetitive traffic replayed through the engine: where suffix decoding and prompt lookup should pay most.

Two replays built from the datasets, batch 1, greedy, EOS ignored (every request makes exactly
`--new-tokens`), one engine per drafter kept across the whole replay (so the suffix drafter's shared
trie holds the earlier answers, as a replica's would):
- chat: held-out ShareGPT conversations with at least `--turns` human turns, sent turn by turn, each
  turn with the whole conversation so far (the earlier answers are the model's own);
- code: held-out HumanEval problems asked again `--rounds` - 1 times, as an agent's refinement loop
  would: the previous attempt's code, then the same problem with its function renamed and a comment
  line added.
The prompts are fixed by a first pass without speculation (greedy outputs do not depend on the
drafter, so every drafter sees the same traffic). Reported per replay and drafter: tokens/s, the
ratio to no speculation, acceptance. JSON + PNG in bench/results/.

    python bench/replay.py [--conversations 4] [--problems 4] [--turns 3] [--rounds 3] [--new-tokens 96]
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from itertools import islice
from pathlib import Path

import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.machine_info import torch_machine  # noqa: E402
from bench.speculative import make_engine  # noqa: E402
from moe.generate import SamplingParams  # noqa: E402
from moe.loader import DEFAULT_MODEL, load_model  # noqa: E402
from serving.engine import Engine, Request  # noqa: E402
from serving.traffic import humaneval_prompts, sharegpt_conversations  # noqa: E402

DRAFTERS = ("none", "prompt-lookup", "suffix", "token-recycling", "auto")


def _generate(engine: Engine, ids: list[int], new_tokens: int, domain: str) -> tuple[list[int], float, int, int]:
    engine.add_request(Request("replay", tuple(ids), SamplingParams(max_new_tokens=new_tokens), domain=domain))
    t = time.perf_counter()
    [done] = engine.run_to_completion()
    return list(done.output_ids), time.perf_counter() - t, done.draft_tokens, done.accepted_tokens


def chat_replay(tok, engine: Engine, conversations: list[list[str]], turns: int, new_tokens: int) -> list[list[int]]:
    """Prompts of every turn of every conversation, the answers made by `engine` (no speculation)."""
    prompts = []
    for conv in tqdm(conversations, desc="chat replay, building"):
        messages: list[dict[str, str]] = []
        for text in conv[:turns]:
            messages.append({"role": "user", "content": text})
            ids = list(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))
            prompts.append(ids)
            out, *_ = _generate(engine, ids, new_tokens, "chat")
            messages.append({"role": "assistant", "content": tok.decode(out, skip_special_tokens=True)})
    return prompts


def _revise(problem: str, round_no: int) -> str:
    """The problem with its (last) function renamed and a comment line added below the signature."""
    names = re.findall(r"^def (\w+)\(", problem, flags=re.M)
    if not names:
        return problem
    name = names[-1]
    text = re.sub(rf"^def {name}\(", f"def {name}_v{round_no}(", problem, flags=re.M)
    return re.sub(rf"^(def {name}_v{round_no}\(.*:)$", rf"\1\n    # revision {round_no}: same behaviour, clearer code",
                  text, count=1, flags=re.M)


def code_replay(tok, engine: Engine, problems: list[str], rounds: int, new_tokens: int) -> list[list[int]]:
    """Prompts of every round of every problem: round k shows the attempt of round k - 1, then the revised problem."""
    prompts = []
    for problem in tqdm(problems, desc="code replay, building"):
        previous = ""
        for k in range(rounds):
            asked = problem if k == 0 else _revise(problem, k)
            text = asked if not previous else previous + "\n\n\n" + asked
            ids = tok.encode(text)
            prompts.append(ids)
            out, *_ = _generate(engine, ids, new_tokens, "code")
            previous = asked + tok.decode(out, skip_special_tokens=True)
    return prompts


def measure(lm, prompts: list[list[int]], domain: str, new_tokens: int) -> dict:
    rows = {}
    reference = None
    for name in DRAFTERS:
        engine = make_engine(lm, name, 1, 2)
        _generate(engine, prompts[0][:32], 4, domain)  # warm-up
        seconds, tokens, draft, accepted, outs = 0.0, 0, 0, 0, []
        for ids in tqdm(prompts, desc=f"{domain} replay, {name}"):
            out, s, d, a = _generate(engine, ids, new_tokens, domain)
            seconds, tokens, draft, accepted = seconds + s, tokens + len(out), draft + d, accepted + a
            outs.append(out)
        reference = reference or outs
        rows[name] = {"tokens_per_s": tokens / seconds, "draft_tokens": draft, "accepted_tokens": accepted,
                      "acceptance_rate": accepted / draft if draft else None,
                      "identical_to_none": sum(o == r for o, r in zip(outs, reference)), "requests": len(prompts)}
    for r in rows.values():
        r["vs_none"] = r["tokens_per_s"] / rows["none"]["tokens_per_s"]
    return rows


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, (domain, rows) in zip(axes, result["replays"].items()):
        vals = [rows[n]["vs_none"] for n in DRAFTERS]
        ax.bar(DRAFTERS, vals, color=["#999" if n == "none" else "#c50" if n == "auto" else "#2a7" for n in DRAFTERS])
        for i, n in enumerate(DRAFTERS):
            ax.text(i, vals[i], f"{vals[i]:.2f}x\n{rows[n]['tokens_per_s']:.1f} tok/s", ha="center", va="bottom",
                    fontsize=8)
        ax.axhline(3.0, color="r", lw=0.8, ls="--", label="3x (target with suffix)")
        ax.set_ylabel("tokens / s over no speculation")
        ax.set_title(f"{domain} replay: {result['requests'][domain]} requests, batch 1, greedy")
        ax.set_ylim(0, max(3.3, max(vals) * 1.2))
        ax.legend(fontsize=8)
    fig.suptitle(f"{result['model']} fp32, {result['threads']} threads, {result['new_tokens']} new tokens per request "
                 f"— {result['machine']['cpu']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--conversations", type=int, default=4, help="held-out ShareGPT conversations")
    ap.add_argument("--turns", type=int, default=3, help="human turns replayed per conversation")
    ap.add_argument("--problems", type=int, default=4, help="held-out HumanEval problems")
    ap.add_argument("--rounds", type=int, default=3, help="times each problem is asked (1 + revisions)")
    ap.add_argument("--new-tokens", type=int, default=96)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args()
    for flag in ("conversations", "turns", "problems", "rounds", "new_tokens", "threads"):
        if getattr(args, flag) < 1:
            ap.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")

    torch.set_num_threads(args.threads)
    lm = load_model(DEFAULT_MODEL, dtype="fp32")
    tok = lm.tokenizer
    builder = make_engine(lm, "none", 1, 2)
    convs = list(islice(sharegpt_conversations("heldout", args.turns), args.conversations))
    problems = [p.text for p in islice(humaneval_prompts("heldout"), args.problems)]
    prompts = {"chat": chat_replay(tok, builder, convs, args.turns, args.new_tokens),
               "code": code_replay(tok, builder, problems, args.rounds, args.new_tokens)}
    result = {"model": DEFAULT_MODEL, "threads": args.threads, "new_tokens": args.new_tokens,
              "machine": torch_machine(), "requests": {d: len(p) for d, p in prompts.items()},
              "prompt_tokens": {d: sum(map(len, p)) for d, p in prompts.items()}, "replays": {}}
    for domain, plist in prompts.items():
        result["replays"][domain] = rows = measure(lm, plist, domain, args.new_tokens)
        for name, r in rows.items():
            rate = "-" if r["acceptance_rate"] is None else f"{r['acceptance_rate']:.2f}"
            print(f"{domain} replay {name:15s} {r['tokens_per_s']:6.1f} tok/s {r['vs_none']:5.2f}x acc {rate} "
                  f"identical {r['identical_to_none']}/{r['requests']}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / "replay-cpu-fp32"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2))
    plot(result, stem.with_suffix(".png"))
    print(f"wrote {stem}.json and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
