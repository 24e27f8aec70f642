"""Does speculation pay at batch 16, and how well does the cost model price a batch's step?

16 held-out requests of one domain admitted at once (max_batch 16), 128 greedy tokens each (EOS
ignored), for no speculation, suffix alone and the controller ("auto"), the three interleaved round
by round so they share the machine's drift. For every speculative step at batch 16 the cost model's
prediction (made before the step's own time is observed) is compared with the measured forward:
the mean relative error over the second half of each run's steps, and the fitted row factor k(16)
(how much dearer a row is at batch 16 than in one sequence's chain, serving.adaptive.CostModel).

    python bench/batch_cost.py [--rounds 2] [--requests 16]
Writes bench/results/batch_cost.{json,png}.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.machine_info import torch_machine  # noqa: E402
from bench.speculative import load_prompts, make_engine  # noqa: E402
from moe.generate import SamplingParams  # noqa: E402
from moe.loader import DEFAULT_MODEL, load_model  # noqa: E402
from serving.engine import Request  # noqa: E402

DRAFTERS = ("none", "suffix", "auto")
FLOOR = 0.98  # the floor: speculation never below this ratio to none


def run(lm, name: str, prompts: list[list[int]], domain: str, batch: int, new_tokens: int) -> dict:
    """One engine serving all `prompts` at once: tokens/s and the batch-`batch` price errors."""
    engine = make_engine(lm, name, batch, 2)
    cost = engine.policy.target_cost
    errors: list[float] = []
    observe = cost.observe

    def watched(tokens: int, seconds: float, b: int | None = None) -> None:
        if b == batch and tokens > batch and batch in cost.plain:
            errors.append(cost.predict(tokens, batch) / seconds - 1)
        observe(tokens, seconds, b)

    cost.observe = watched  # type: ignore[method-assign]
    for i, ids in enumerate(prompts):
        engine.add_request(Request(str(i), tuple(ids), SamplingParams(max_new_tokens=new_tokens), domain=domain))
    t = time.perf_counter()
    done = engine.run_to_completion()
    seconds = time.perf_counter() - t
    late = errors[len(errors) // 2:]
    return {"tokens_per_s": sum(len(f.output_ids) for f in done) / seconds,
            "draft_tokens": sum(f.draft_tokens for f in done), "accepted_tokens": sum(f.accepted_tokens for f in done),
            "priced_steps": len(errors), "price_error_late": statistics.mean(late) if late else None,
            "row_factor": cost.row_factor(batch) if errors else None}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    domains = list(result["domains"])
    width = 0.8 / len(DRAFTERS)
    for j, name in enumerate(DRAFTERS):
        vals = [result["domains"][d]["vs_none"][name] for d in domains]
        ax.bar([i + j * width for i in range(len(domains))], vals, width, label=name)
    ax.axhline(FLOOR, color="black", ls="--", lw=1, label=f"floor {FLOOR}x")
    ax.set_xticks([i + width for i in range(len(domains))], domains)
    ax.set_ylabel("tokens/s vs no speculation (mean of rounds)")
    ax.set_ylim(0.8, 1.2)
    ax.set_title(f"{result['requests']} requests at once, {result['rounds']} interleaved rounds", fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--requests", type=int, default=16, help="held-out requests per domain, all admitted at once")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "batch_cost")
    args = ap.parse_args()
    for name in ("rounds", "requests", "new_tokens"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    torch.set_num_threads(2)
    lm = load_model(DEFAULT_MODEL)
    prompts = load_prompts(lm.tokenizer, args.requests)
    result = {"machine": torch_machine(), "requests": args.requests, "rounds": args.rounds,
              "new_tokens": args.new_tokens, "domains": {}}
    bar = tqdm(total=len(prompts) * args.rounds * len(DRAFTERS), desc="runs")
    for domain, plist in prompts.items():
        runs: dict[str, list[dict]] = {n: [] for n in DRAFTERS}
        for _ in range(args.rounds):
            for name in DRAFTERS:
                runs[name].append(run(lm, name, plist, domain, args.requests, args.new_tokens))
                bar.update(1)
        base = statistics.mean(r["tokens_per_s"] for r in runs["none"])
        result["domains"][domain] = {
            "runs": runs, "vs_none": {n: statistics.mean(r["tokens_per_s"] for r in rs) / base for n, rs in runs.items()}}
        print(f"{domain}: " + ", ".join(f"{n} {v:.3f}x" for n, v in result["domains"][domain]["vs_none"].items()),
              flush=True)
    bar.close()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, args.out.with_suffix(".png"))
    print(f"wrote {args.out.with_suffix('.json')} and .png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
