"""A running stream's inter-token latency while a long prompt arrives, with and without chunked prefill.

One greedy stream decodes on the in-process engine (batch slots 2, no speculation, the default
model); at its 10th token a 1,500-token prompt arrives. Per run: the stream's inter-token gaps
over the steps from the arrival until the long prompt's first token, p50 and p99 (the target: p99
within 2x p50 with chunking), and the long prompt's time to first token. Outputs are checked
token-exact against the engine with whole-prompt prefill. Chunks run either as forwards of their
own before the decode step (`--chunks`), or inside it (`--stalls`: the engine's prefill_stall).

    python bench/chunked_prefill.py [--chunks 0 32 128] [--stalls 1.5 1.8 2.5] [--long-tokens 1500]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.machine_info import torch_machine  # noqa: E402


def run(loaded, chunk: int, stall: float, stream_prompt: list[int], long_prompt: list[int], tokens: int) -> dict:
    from drafters.base import NoDrafter
    from moe.generate import SamplingParams
    from serving.engine import Engine, EngineConfig, Request

    engine = Engine(loaded.model, NoDrafter(), EngineConfig(max_batch=2, max_len=2048, speculation=0,
                                                             prefill_chunk=chunk, prefill_stall=stall))
    engine.add_request(Request("stream", tuple(stream_prompt), SamplingParams(max_new_tokens=tokens)))
    stamps, arrival, long_first, outputs = [], None, None, {}
    while engine.has_work():
        outs = engine.step()
        now = time.perf_counter()
        for o in outs:
            if o.request_id == "stream" and o.new_tokens:
                stamps.append(now)
            if o.request_id == "long" and o.new_tokens and long_first is None:
                long_first = now
            if o.finished:
                outputs[o.request_id] = list(o.finished.output_ids)
        if len(stamps) == 10 and arrival is None:
            arrival = time.perf_counter()
            engine.add_request(Request("long", tuple(long_prompt), SamplingParams(max_new_tokens=8)))
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    during = [b - a for a, b in zip(stamps, stamps[1:]) if arrival <= b and (a <= long_first)]
    before = gaps[:8]

    def pct(xs, q):
        xs = sorted(xs)
        return xs[min(len(xs) - 1, round(q / 100 * (len(xs) - 1)))]

    window = during + gaps[len(gaps) // 2:]  # the arrival window and the steady state after it
    label = "off (whole prompt)" if not chunk else f"{chunk}, own forwards" if not stall else \
        f"riding, stall {stall:g} (<= {chunk})"
    return {"chunk": chunk, "prefill_stall": stall, "label": label, "gaps_during_arrival_ms": [g * 1e3 for g in during],
            "steady_p50_ms": statistics.median(before) * 1e3,
            "p50_ms": pct(window, 50) * 1e3, "p99_ms": pct(window, 99) * 1e3,
            "max_gap_ms": max(during) * 1e3, "p99_over_p50": pct(window, 99) / pct(window, 50),
            "p99_over_steady_p50": pct(window, 99) / statistics.median(before),
            "long_ttft_s": long_first - arrival, "outputs": outputs}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in result["runs"]:
        ax.plot(r["gaps_during_arrival_ms"], marker="o", label=f"{r['label']}: p99/steady "
                f"{r['p99_over_steady_p50']:.2f}, long TTFT {r['long_ttft_s']:.1f}s")
    ax.set_xlabel("stream token after the 1,500-token prompt arrives")
    ax.set_ylabel("inter-token gap (ms)")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    fig.suptitle(f"{result['machine']['cpu']}, {result['threads']} threads, {result['model']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--chunks", type=int, nargs="+", default=[0, 32, 128],
                    help="chunk sizes prefilled as forwards of their own (0: whole prompts)")
    ap.add_argument("--stalls", type=float, nargs="+", default=[1.5, 1.8, 2.5],
                    help="prefill_stall values of chunks riding in the decode step (at most 128 tokens)")
    ap.add_argument("--long-tokens", type=int, default=1500)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args()

    import torch

    from moe.loader import encode_prompt, load_model
    from serving.traffic import sharegpt_prompts

    torch.set_num_threads(args.threads)
    loaded = load_model(args.model)
    texts = [p.text for p in sharegpt_prompts("heldout")]
    stream_prompt = encode_prompt(loaded.tokenizer, texts[0], chat=True)
    long_prompt: list[int] = []
    for t in texts[1:]:
        long_prompt += loaded.tokenizer.encode(t)
        if len(long_prompt) >= args.long_tokens:
            break
    long_prompt = long_prompt[: args.long_tokens]
    # Enough stream tokens to outlast the longest unchunked prefill and reach a steady state again.
    tokens = 60
    runs = []
    for chunk, stall in [(c, 0.0) for c in args.chunks] + [(128, s) for s in args.stalls]:
        r = run(loaded, chunk, stall, stream_prompt, long_prompt, tokens)
        print(f"{r['label']}: stream gaps p50 {r['p50_ms']:.0f} ms, p99 {r['p99_ms']:.0f} ms "
              f"(p99/p50 {r['p99_over_p50']:.2f}; p99 / p50 before the arrival {r['p99_over_steady_p50']:.1f}; "
              f"max {r['max_gap_ms']:.0f} ms); long prompt TTFT "
              f"{r['long_ttft_s']:.2f} s", flush=True)
        runs.append(r)
    exact = all(r["outputs"] == runs[0]["outputs"] for r in runs)
    result = {"model": args.model, "threads": args.threads, "long_tokens": len(long_prompt),
              "machine": torch_machine(), "kernels": loaded.kernels.as_dict(), "identical_outputs": exact,
              "runs": [{k: v for k, v in r.items() if k != "outputs"} for r in runs]}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / "chunked_prefill"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2))
    plot(result, stem.with_suffix(".png"))
    print(f"outputs identical across chunk sizes: {exact}; wrote {stem}.json and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
