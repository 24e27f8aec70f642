"""MoE benchmarks: the MoEfied target's quality table, expert parallelism, Duo-LLM.

    python bench/moe.py quality [--experts 16 64] [--texts 16]
    python bench/moe.py speed [--texts 8] [--new-tokens 32]   decode speed, dense vs the MoE target
    python bench/moe.py ep  [bench/moe_ep.py's arguments]    all-to-all volume and latency, plain EP vs s-MoE
    python bench/moe.py duo [bench/moe_duo.py's arguments]   oracle table and the small-FFN drafter

`quality` cuts SmolLM2-135M into E experts per layer (moe/moefy.py; cached under
$SPECTUTOR_HOME/models) and, for k = E/4, E/2, 3E/4 and E, reports on held-out ShareGPT and
HumanEval prompts: next-token agreement with the dense model (argmax of the same prefix),
and perplexity of the prompts' own next tokens. Writes bench/results/moe-quality-cpu.{json,png}.
`speed` times batch-1 greedy decode of the dense model and the default MoE target (local block and
DeepSpeed's MoE layer), prompt by prompt in one run. Writes bench/results/moe-speed-cpu.json.
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

from bench.machine_info import torch_machine  # noqa: E402
from moe.generate import SamplingParams, generate  # noqa: E402
from moe.loader import DEFAULT_MODEL, load_model, resolve_model  # noqa: E402
from moe.moefy_build import DEFAULT_CUT, encode_texts, quality, sample_texts  # noqa: E402
from serving.traffic import humaneval_prompts  # noqa: E402


def run_quality(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    dense = load_model(DEFAULT_MODEL)
    tok = dense.tokenizer
    sets = {"sharegpt": encode_texts(tok, sample_texts(args.texts, "heldout"), 128),
            "humaneval": [tok.encode(p.text)[:128] for p in islice(humaneval_prompts("heldout"), args.texts)]}
    result: dict = {"machine": torch_machine(), "threads": args.threads, "cuts": []}
    for experts in args.experts:
        spec = "smollm2-135m-moe" if experts == DEFAULT_CUT.experts else f"smollm2-135m-moe-e{experts}-k{experts // 4}"
        folder = resolve_model(spec)
        moe = load_model(str(folder), moe_backend="local")
        ks = [experts // 4, experts // 2, 3 * experts // 4, experts]
        rows = {name: quality(moe.model, dense.model, seqs, ks, lambda it: tqdm(it, desc=f"E={experts} {name}"))
                for name, seqs in sets.items()}
        table = []
        for i, k in enumerate(ks):
            row = {"k": k, "ffn_share": k / experts}
            for name in sets:
                row[f"{name}_agreement"] = rows[name][i]["agreement"]
                row[f"{name}_ppl"] = rows[name][i]["ppl"]
                row[f"{name}_dense_ppl"] = rows[name][i]["dense_ppl"]
            table.append(row)
            print(f"E={experts:>3} k={k:>3}  agreement sharegpt {row['sharegpt_agreement']:.3f} humaneval "
                  f"{row['humaneval_agreement']:.3f}  ppl sharegpt {row['sharegpt_ppl']:.1f} "
                  f"(dense {row['sharegpt_dense_ppl']:.1f}) humaneval {row['humaneval_ppl']:.2f} "
                  f"(dense {row['humaneval_dense_ppl']:.2f})", flush=True)
        marker = json.loads((folder / "spectutor-moefy.json").read_text())
        result["cuts"].append({"spec": spec, "experts": experts, "rows": table,
                               "router_recall_mean": sum(marker["router_recall"]) / len(marker["router_recall"])})
    return result


def run_speed(args: argparse.Namespace) -> dict:
    """Batch-1 greedy decode of the dense model and the default MoE target (both MoE backends), interleaved."""
    torch.set_num_threads(args.threads)
    dense = load_model(DEFAULT_MODEL)
    prompts = [ids[:64] for ids in encode_texts(dense.tokenizer, sample_texts(args.texts, "heldout"), 128)]
    models = {"dense": dense.model}
    for spec in args.specs:
        for backend in ("local", "deepspeed"):
            models[f"{spec} {backend}"] = load_model(spec, moe_backend=backend, with_tokenizer=False).model
    params = SamplingParams(max_new_tokens=args.new_tokens)  # no EOS ids: every prompt makes new_tokens
    seconds = {name: 0.0 for name in models}
    outputs: dict[str, list[list[int]]] = {name: [] for name in models}
    for p in tqdm(prompts, desc="decode"):
        for name, model in models.items():
            start = time.perf_counter()
            outputs[name].append(generate(model, p, params))
            seconds[name] += time.perf_counter() - start
    made = len(prompts) * args.new_tokens
    result = {"machine": torch_machine(), "threads": args.threads, "prompts": len(prompts), "new_tokens": args.new_tokens,
              "tokens_per_s": {n: made / s for n, s in seconds.items()},
              "deepspeed_equals_local": {spec: outputs[f"{spec} deepspeed"] == outputs[f"{spec} local"]
                                         for spec in args.specs}}
    for name, tps in result["tokens_per_s"].items():
        print(f"{name:>34}: {tps:.1f} tokens/s ({tps / result['tokens_per_s']['dense']:.2f}x dense)")
    print(f"DeepSpeed's MoE layer and the local block give the same tokens: {result['deepspeed_equals_local']}")
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
    parser.add_argument("part", choices=["quality", "speed"])
    parser.add_argument("--experts", type=int, nargs="+", default=[DEFAULT_CUT.experts])
    parser.add_argument("--texts", type=int, default=16, help="held-out prompts per domain")
    parser.add_argument("--specs", nargs="+", default=["smollm2-135m-moe"], help="MoE targets timed by `speed`")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.part == "speed":
        (out / "moe-speed-cpu.json").write_text(json.dumps(run_speed(args), indent=2))
        print(f"wrote {out / 'moe-speed-cpu.json'}")
        return 0
    result = run_quality(args)
    (out / "moe-quality-cpu.json").write_text(json.dumps(result, indent=2))
    plot_quality(result, out / "moe-quality-cpu.png")
    print(f"wrote {out / 'moe-quality-cpu.json'} and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
