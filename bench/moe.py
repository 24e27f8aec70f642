"""MoE benchmarks: the MoEfied target's quality table, expert parallelism, Duo-LLM.

    python bench/moe.py quality [--experts 16 64] [--texts 16] [--new-tokens 32]
    python bench/moe.py ep  [bench/moe_ep.py's arguments]    all-to-all volume and latency, plain EP vs s-MoE
    python bench/moe.py duo [bench/moe_duo.py's arguments]   oracle table and the small-FFN drafter

`quality` cuts SmolLM2-135M into E experts per layer (moe/moefy.py; cached under
$SPECTUTOR_HOME/models) and, for k = E/4, E/2, 3E/4 and E, reports on held-out ShareGPT and
HumanEval prompts: next-token agreement with the dense model (argmax of the same prefix),
perplexity of the prompts' own next tokens, and batch-1 greedy decode speed of the lean decoder
against the dense model in the same run. Writes bench/results/moe-quality-cpu.{json,png}.
"""
from __future__ import annotations

import argparse
import json
import runpy
import sys
import time
from itertools import islice
from pathlib import Path

import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.decode import machine  # noqa: E402
from moe.generate import SamplingParams, generate  # noqa: E402
from moe.loader import DEFAULT_MODEL, load_model, resolve_model  # noqa: E402
from moe.moefy_build import DEFAULT_CUT, encode_texts, quality, sample_texts  # noqa: E402
from serving.traffic import humaneval_prompts  # noqa: E402


def _decode_speed(model, prompts: list[list[int]], new_tokens: int) -> float:
    params = SamplingParams(max_new_tokens=new_tokens)  # no EOS ids: every prompt makes new_tokens
    made, start = 0, time.perf_counter()
    for p in prompts:
        made += len(generate(model, p, params))
    return made / (time.perf_counter() - start)


def run_quality(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    dense = load_model(DEFAULT_MODEL)
    tok = dense.tokenizer
    sets = {"sharegpt": encode_texts(tok, sample_texts(args.texts, "heldout"), 128),
            "humaneval": [tok.encode(p.text)[:128] for p in islice(humaneval_prompts("heldout"), args.texts)]}
    speed_prompts = [ids[:48] for ids in sets["sharegpt"][:4]]
    result: dict = {"machine": machine(), "threads": args.threads, "dense_tokens_per_s": None, "cuts": []}
    result["dense_tokens_per_s"] = _decode_speed(dense.model, speed_prompts, args.new_tokens)
    for experts in args.experts:
        spec = "smollm2-135m-moe" if experts == DEFAULT_CUT.experts else f"smollm2-135m-moe-e{experts}-k{experts // 4}"
        folder = resolve_model(spec)
        moe = load_model(str(folder), moe_backend="local")
        ks = [experts // 4, experts // 2, 3 * experts // 4, experts]
        rows = {name: quality(moe.model, dense.model, seqs, ks, lambda it: tqdm(it, desc=f"E={experts} {name}"))
                for name, seqs in sets.items()}
        table = []
        for i, k in enumerate(ks):
            for b in moe.model.layers:
                b.mlp.router.top_k = k
            row = {"k": k, "ffn_share": k / experts,
                   "decode_tokens_per_s": _decode_speed(moe.model, speed_prompts, args.new_tokens)}
            for name in sets:
                row[f"{name}_agreement"] = rows[name][i]["agreement"]
                row[f"{name}_ppl"] = rows[name][i]["ppl"]
                row[f"{name}_dense_ppl"] = rows[name][i]["dense_ppl"]
            table.append(row)
            print(f"E={experts:>3} k={k:>3}  agreement sharegpt {row['sharegpt_agreement']:.3f} humaneval "
                  f"{row['humaneval_agreement']:.3f}  ppl sharegpt {row['sharegpt_ppl']:.1f} "
                  f"(dense {row['sharegpt_dense_ppl']:.1f}) humaneval {row['humaneval_ppl']:.2f} "
                  f"(dense {row['humaneval_dense_ppl']:.2f})  decode {row['decode_tokens_per_s']:.1f} tok/s", flush=True)
        marker = json.loads((folder / "spectutor-moefy.json").read_text())
        result["cuts"].append({"spec": spec, "experts": experts, "rows": table,
                               "router_recall_mean": sum(marker["router_recall"]) / len(marker["router_recall"])})
    print(f"dense decode {result['dense_tokens_per_s']:.1f} tok/s")
    return result


def plot_quality(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for cut in result["cuts"]:
        share = [r["ffn_share"] for r in cut["rows"]]
        for name, style in (("sharegpt", "-o"), ("humaneval", "--s")):
            ax1.plot(share, [r[f"{name}_agreement"] for r in cut["rows"]], style, label=f"E={cut['experts']} {name}")
            ax2.plot(share, [r[f"{name}_ppl"] / r[f"{name}_dense_ppl"] for r in cut["rows"]], style,
                     label=f"E={cut['experts']} {name}")
    ax1.set(xlabel="k / E (share of FFN neurons per token)", ylabel="next-token agreement with dense",
            title="MoEfied SmolLM2-135M: agreement")
    ax2.set(xlabel="k / E", ylabel="perplexity / dense perplexity", yscale="log", title="held-out perplexity ratio")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("ep", "duo"):
        sys.argv = [str(ROOT / "bench" / f"moe_{argv[0]}.py"), *argv[1:]]
        runpy.run_path(sys.argv[0], run_name="__main__")
        return 0
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=["quality"])
    parser.add_argument("--experts", type=int, nargs="+", default=[DEFAULT_CUT.experts])
    parser.add_argument("--texts", type=int, default=16, help="held-out prompts per domain")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args(argv)
    result = run_quality(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "moe-quality-cpu.json").write_text(json.dumps(result, indent=2))
    plot_quality(result, out / "moe-quality-cpu.png")
    print(f"wrote {out / 'moe-quality-cpu.json'} and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
