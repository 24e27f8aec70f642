"""Duo-LLM on the default target (SmolLM2-135M-Instruct): distilled small FFNs, oracle routes, self-speculation.

1. Distillation: one small SwiGLU (inner width = big/16) per layer, fitted layer-locally to the big
   FFN on ShareGPT "train" text (built once, cached under $SPECTUTOR_HOME); held-out relative MSE.
2. Oracle (held-out ShareGPT text, `--sequences` x `--tokens`): per-token minimum next-token loss
   over every route with m big layers (others small). Exhaustive per layer for m in {0, 1, L-1, L},
   and at layer-group granularity (G groups of consecutive layers) for every budget 0..G; fixed
   patterns (big in the first / last m layers) and the best of N random routes for comparison;
   which layers the oracle picks. A route applies to the whole sequence (see moe/duo.py).
   The paper's check: the oracle with one big layer vs big modules in all layers (the dense model).
3. Drafters at batch 1, greedy, held-out HumanEval and ShareGPT prompts, EOS ignored, through the
   engine as bench/speculative.py runs it: "duo-small" (small FFN everywhere) vs "draft-lm" (the
   target's first 4 layers) vs no speculation.

    python bench/moe_duo.py [--sequences 8] [--tokens 64] [--prompts 4] [--new-tokens 32] [--out bench/results]

Defaults are sized for a shared 2-core machine (about 15 min once the small FFNs are cached; the
first run also distils them, about 3-10 min); raise them on a quiet machine.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.machine_info import torch_machine  # noqa: E402
from bench.speculative import load_prompts, make_engine, run_engine  # noqa: E402
from drafters.self_spec import duo_small_drafter  # noqa: E402
from moe.duo import (BIG, attach_duo, detach_duo, fixed_route, layer_groups, layer_preference, oracle,  # noqa: E402
                     random_routes, route_flops, route_losses, routes_with_budget)
from moe.duo_train import (DistillConfig, RandomRoutingConfig, ensure_random_routing, ensure_small_modules,  # noqa: E402
                           text_chunks)
from moe.loader import DEFAULT_MODEL, load_model  # noqa: E402
from serving.engine import Engine, EngineConfig  # noqa: E402
from serving.traffic import sharegpt_prompts  # noqa: E402

# (name, engine speculation): the adaptive runs are bench/speculative.py's method; fixed k=4 always drafts,
# so acceptance is measured even where the adaptive engine judges drafting not worth it.
DRAFTERS = (("none", "adaptive"), ("draft-lm", "adaptive"), ("duo-small", "adaptive"), ("draft-lm-k4", 4),
            ("duo-small-k4", 4))


def oracle_tables(model, tokens: torch.Tensor, num_groups: int, n_random: int, seed: int) -> dict:
    """Every route set of section 2 evaluated in one trie search; returns the tables and preferences."""
    L = len(model.layers)
    groups = layer_groups(L, num_groups)
    g = torch.Generator().manual_seed(seed)
    sets: dict[str, list] = {}
    for m in (0, 1, L - 1, L):
        sets[f"layer/{m}"] = routes_with_budget(L, m)
    for k in range(num_groups + 1):
        sets[f"group/{k}"] = routes_with_budget(L, k, groups)
    group_only = {sum(len(groups[i]) for i in range(k)) for k in range(1, num_groups)}
    group_budgets = sorted(group_only | {0, 1, L - 1, L})
    for m in group_budgets:
        sets[f"first/{m}"] = [fixed_route(L, m, "first")]
        sets[f"last/{m}"] = [fixed_route(L, m, "last")]
        if m in group_only:
            sets[f"random/{m}"] = random_routes(L, m, n_random, g)
    flat = sorted({r for rs in sets.values() for r in rs})
    index = {r: i for i, r in enumerate(flat)}
    bar = tqdm(total=len(flat), desc=f"oracle: {len(flat)} distinct routes")
    losses = route_losses(model, tokens, flat, on_leaf=bar.update)      # [R, B, N-1]
    bar.close()
    losses = losses.reshape(len(flat), -1)                                 # [R, T]

    def of(name: str) -> torch.Tensor:
        return losses[[index[r] for r in sets[name]]]

    cfg = model.cfg
    big_w, small_w = cfg.intermediate_size, model.layers[0].mlp.small.inner

    def flops(m: int) -> float:
        codes = torch.tensor([BIG if i < m else 1 for i in range(L)])[:, None]
        return float(route_flops(codes, cfg.hidden_size, big_w, small_w)[0])

    def row(kind: str, m: int, name: str) -> dict:
        ls = of(name)
        if kind in ("oracle", "group-oracle"):
            best, idx = oracle(ls)
            val, pref = best.mean().item(), layer_preference(sets[name], idx).tolist()
        else:  # one route for every token: the route whose mean loss is lowest
            val, pref = ls.mean(1).min().item(), None
        return {"policy": kind, "big_layers": m, "routes": len(sets[name]), "loss": val, "ppl": math.exp(val),
                "ffn_gflops_per_token": flops(m) / 1e9, "layer_preference": pref}

    rows = [row("oracle", m, f"layer/{m}") for m in (0, 1, L - 1, L)]
    rows += [row("group-oracle", sum(len(groups[i]) for i in range(k)), f"group/{k}") for k in range(num_groups + 1)]
    for m in group_budgets:
        rows += [row("fixed-first", m, f"first/{m}"), row("fixed-last", m, f"last/{m}")]
        if m in group_only:
            rows.append(row(f"best-of-{n_random}-random", m, f"random/{m}"))
    # At-most-m oracle over group routes: monotone in the budget by construction.
    at_most, cum = [], None
    for k in range(num_groups + 1):
        best = oracle(of(f"group/{k}"))[0]
        cum = best if cum is None else torch.minimum(cum, best)
        at_most.append({"big_groups": k, "loss": cum.mean().item()})
    dense = of(f"layer/{L}").mean().item()
    one = of("layer/1")
    check = {"dense_loss": dense, "dense_ppl": math.exp(dense),
             "oracle_one_big_loss": oracle(one)[0].mean().item(),
             "oracle_one_big_ppl": math.exp(oracle(one)[0].mean().item()),
             "all_small_loss": of("layer/0").mean().item(),
             "best_single_big_layer_route_loss": one.mean(1).min().item(),
             "tokens_where_some_one_big_route_beats_dense": (oracle(one)[0] < of(f"layer/{L}")[0]).float().mean().item()}
    check["holds"] = check["oracle_one_big_loss"] < dense
    return {"groups": [list(x) for x in groups], "rows": rows, "group_oracle_at_most": at_most,
            "paper_check": check, "distinct_routes": len(flat), "tokens": losses.shape[1]}


def drafter_table(lm, smalls, prompts: dict[str, list[list[int]]], new_tokens: int, draft_layers: int) -> dict:
    """Batch-1 greedy decoding with each drafter on each prompt, in turn (they share the machine's noise)."""
    engines = {}
    for name, spec in DRAFTERS:
        if name.startswith("duo-small"):
            cfg = EngineConfig(max_batch=1, max_len=2048, speculation=spec)
            drafter = duo_small_drafter(DEFAULT_MODEL, smalls, 1, cfg.max_len, target_cfg=lm.config)
            engines[name] = Engine(lm.model, drafter, cfg)
        else:
            engines[name] = make_engine(lm, name.removesuffix("-k4"), 1, draft_layers, speculation=spec)
    warm = prompts["sharegpt"][0][:32]
    for e in engines.values():
        run_engine(e, warm, 8)
    out: dict[str, dict] = {"duo_small_version": drafter.version, "duo_small_cost_hint": drafter.cost_hint}
    for domain, plist in prompts.items():
        acc = {n: {"seconds": 0.0, "tokens": 0, "forwards": 0, "draft": 0, "accepted": 0, "identical": 0}
               for n, _ in DRAFTERS}
        for ids in tqdm(plist, desc=f"drafters, {domain}"):
            reference = None
            for name, _ in DRAFTERS:
                o, s, fwd, draft, accepted = run_engine(engines[name], ids, new_tokens)
                reference = o if reference is None else reference
                a = acc[name]
                a["seconds"] += s
                a["tokens"] += len(o)
                a["forwards"] += fwd
                a["draft"] += draft
                a["accepted"] += accepted
                a["identical"] += o == reference
        base = acc["none"]["tokens"] / acc["none"]["seconds"]
        out[domain] = {n: {"tokens_per_s": a["tokens"] / a["seconds"],
                           "speedup_vs_none": a["tokens"] / a["seconds"] / base,
                           "tokens_per_target_forward": a["tokens"] / max(a["forwards"], 1),
                           "acceptance_rate": a["accepted"] / a["draft"] if a["draft"] else None,
                           "draft_tokens": a["draft"], "identical_to_none": a["identical"], "prompts": len(plist)}
                       for n, a in acc.items()}
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(22, 4.8))
    o = result["oracle"]
    L = result["num_layers"]
    ax = axes[0]
    for policy, style in (("group-oracle", "o-"), ("fixed-first", "s--"), ("fixed-last", "^--"),
                          (f"best-of-{result['random_routes']}-random", "x:"), ("oracle", "D")):
        pts = sorted((r["big_layers"], r["ppl"]) for r in o["rows"] if r["policy"] == policy)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=policy)
    ax.axhline(o["paper_check"]["dense_ppl"], color="k", lw=0.8, ls=":", label="dense (all big)")
    ax.set_yscale("log")
    ax.set_xlabel(f"big layers (of {L})")
    ax.set_ylabel("held-out perplexity")
    ax.set_title("oracle vs fixed vs random routes")
    ax.legend(fontsize=7)
    ax = axes[1]
    prefs = [r for r in o["rows"] if r["policy"] == "group-oracle" and 0 < r["big_layers"] < L]
    img = torch.tensor([r["layer_preference"] for r in prefs])
    ax.imshow(img, aspect="auto", cmap="viridis", vmin=0, vmax=1)
    ax.set_yticks(range(len(prefs)), [str(r["big_layers"]) for r in prefs])
    ax.set_xlabel("layer")
    ax.set_ylabel("budget (big layers)")
    ax.set_title("group oracle: share of tokens with big FFN")
    ax = axes[2]
    for m in (1, L - 1):
        r = next(x for x in o["rows"] if x["policy"] == "oracle" and x["big_layers"] == m)
        ax.plot(range(L), r["layer_preference"], marker=".", label=f"m={m}")
    ax.set_xlabel("layer")
    ax.set_ylabel("share of tokens with big FFN")
    ax.set_title("per-layer oracle preference")
    ax.legend()
    ax = axes[3]
    d = result["drafters"]
    domains = [k for k in d if isinstance(d[k], dict)]
    width = 0.8 / len(DRAFTERS)
    for j, (name, _) in enumerate(DRAFTERS):
        vals = [d[dom][name]["tokens_per_s"] for dom in domains]
        bars = ax.bar([i + j * width for i in range(len(domains))], vals, width, label=name)
        for b, dom in zip(bars, domains):
            r = d[dom][name]
            ax.text(b.get_x() + b.get_width() / 2, b.get_height(), f"{r['speedup_vs_none']:.2f}x\n"
                    f"{r['tokens_per_target_forward']:.2f}/fwd", ha="center", va="bottom", fontsize=7)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(domains))], domains)
    ax.set_ylabel("tokens / s (batch 1, greedy)")
    ax.set_title("self-speculation vs draft LM")
    ax.legend(fontsize=7)
    fig.suptitle(f"Duo-LLM on {result['model']} (small FFNs {result['small_version']}), "
                 f"{result['threads']} threads — {result['machine']['cpu']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sequences", type=int, default=8, help="held-out ShareGPT text chunks for the oracle")
    ap.add_argument("--tokens", type=int, default=64, help="tokens per oracle chunk")
    ap.add_argument("--groups", type=int, default=6, help="layer groups of the exhaustive group oracle")
    ap.add_argument("--random-routes", type=int, default=4, help="N of best-of-N random routes per budget")
    ap.add_argument("--prompts", type=int, default=4, help="held-out prompts per domain for the drafters")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--draft-layers", type=int, default=4, help="layers of the target kept in the draft LM")
    ap.add_argument("--distill-steps", type=int, default=300, help="Adam steps per layer")
    ap.add_argument("--rr-steps", type=int, default=0,
                    help="steps of the paper's stage 1 (random big/small routes, p=0.5, KL to the dense model) "
                         "on top of the layer-local distillation; 0 skips it")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    lm = load_model(DEFAULT_MODEL, dtype="fp32")
    dcfg = DistillConfig(steps=args.distill_steps)
    smalls, meta = ensure_small_modules(DEFAULT_MODEL, lm.folder, lm.model, lm.tokenizer, dcfg)
    rel = [x["rel_mse"] for x in meta["layers"]]
    print(f"distilled small FFNs ({meta['version']}): relative MSE per layer min {min(rel):.3f} "
          f"mean {sum(rel) / len(rel):.3f} max {max(rel):.3f} "
          f"(pruned init mean {sum(x['rel_mse_init'] for x in meta['layers']) / len(rel):.3f})", flush=True)
    result = {"model": DEFAULT_MODEL, "threads": args.threads, "machine": torch_machine(), "args": {
        k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "num_layers": lm.config.num_layers, "small_width": meta["width"], "small_version": meta["version"],
        "random_routes": args.random_routes,
        "distillation": {"version": meta["version"], "config": meta["distill"], "layers": meta["layers"]}}
    if args.rr_steps:
        smalls, meta = ensure_random_routing(DEFAULT_MODEL, smalls, meta, lm.tokenizer,
                                             RandomRoutingConfig(steps=args.rr_steps))
        kl = meta["kl_history"]
        k = max(1, len(kl) // 5)
        print(f"random-routing fine-tune ({meta['version']}): KL to dense, first {k} steps {sum(kl[:k]) / k:.3f}, "
              f"last {k} steps {sum(kl[-k:]) / k:.3f} nats/token", flush=True)
        result["small_version"] = meta["version"]
        result["random_routing"] = {"version": meta["version"], "config": meta["random_routing"], "kl_history": kl}

    attach_duo(lm.model, smalls)
    held = text_chunks(lm.tokenizer, (p.text for p in sharegpt_prompts("heldout")), args.sequences, args.tokens)
    t = time.perf_counter()
    result["oracle"] = oracle_tables(lm.model, held, args.groups, args.random_routes, seed=0)
    result["oracle"]["seconds"] = time.perf_counter() - t
    detach_duo(lm.model)  # the engine's target is the dense model
    for r in result["oracle"]["rows"]:
        print(f"{r['policy']:20s} big {r['big_layers']:2d}/{lm.config.num_layers} routes {r['routes']:3d} "
              f"loss {r['loss']:.3f} ppl {r['ppl']:8.2f} FFN {r['ffn_gflops_per_token']:.3f} GFLOP/token", flush=True)
    c = result["oracle"]["paper_check"]
    print(f"paper check: oracle with 1 big layer ppl {c['oracle_one_big_ppl']:.2f} vs all big (dense) "
          f"{c['dense_ppl']:.2f} -> holds: {c['holds']}; tokens where some 1-big route beats dense: "
          f"{c['tokens_where_some_one_big_route_beats_dense']:.3f}", flush=True)
    for r in result["oracle"]["rows"]:
        if r["policy"] == "group-oracle" and 0 < r["big_layers"] < lm.config.num_layers:
            print(f"group oracle, {r['big_layers']:2d} big layers: share per layer group "
                  + " ".join(f"{p:.2f}" for p in r["layer_preference"][::len(result['oracle']['groups'][0])]))

    prompts = load_prompts(lm.tokenizer, args.prompts)
    result["drafters"] = drafter_table(lm, smalls, prompts, args.new_tokens, args.draft_layers)
    print(f"duo-small drafter {result['drafters']['duo_small_version']}: cost hint (MACs vs target) "
          f"{result['drafters']['duo_small_cost_hint']:.3f}")
    for domain in ("humaneval", "sharegpt"):
        for name, r in result["drafters"][domain].items():
            rate = "-" if r["acceptance_rate"] is None else f"{r['acceptance_rate']:.2f}"
            print(f"{domain:10s} {name:13s} {r['tokens_per_s']:6.1f} tok/s {r['speedup_vs_none']:5.2f}x "
                  f"tokens/target forward {r['tokens_per_target_forward']:.2f} acceptance {rate} "
                  f"identical {r['identical_to_none']}/{r['prompts']}", flush=True)
    result["seconds"] = time.perf_counter() - t0
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / ("moe-duo-cpu" + (f"-rr{args.rr_steps}" if args.rr_steps else ""))
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2))
    plot(result, stem.with_suffix(".png"))
    print(f"wrote {stem}.json and .png in {result['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
