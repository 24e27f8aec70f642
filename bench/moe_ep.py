"""Expert-parallel MoE benchmark: plain EP vs Speculative MoE (s-EG grouping + token shuffling), CPU/gloo.

1. Trace: run the model over ShareGPT prompts ("train" split to profile, "heldout" to evaluate),
   recording per MoE layer the token ids, top-k experts and (held-out, a few layers) the layer inputs.
2. Plan: per layer and ep, s-EG expert placement and token table from the train traces.
3. Live: per ep in --ep and decode batch in --batches, ep gloo processes run moe/ep_dispatch.py on
   held-out MoE inputs with the model's expert weights, plain EP then speculative, counting each
   all-to-all's bytes and time (moe/a2a_stats.py) and timing the whole MoE layer.
4. Replay: volume only (LAR, bytes) on held-out traces for ep = 2 .. 64 (ep <= E).

    python bench/moe_ep.py --model smollm2-135m-moe-e64-k16 [--ep 2 4] [--batches 16 32 64] [--steps 8]

Writes bench/results/moe-ep-cpu.json and .png.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from itertools import islice
from pathlib import Path

import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.machine_info import torch_machine  # noqa: E402
from moe import smoe  # noqa: E402

REPLAY_EPS = (2, 4, 8, 16, 32, 64)


# --------------------------------------------------------------------------------------------- 1. traces

def record_traces(loaded, texts: list[str], input_layers: set[int], max_tokens: int, desc: str) -> dict:
    """Per MoE layer: token ids [T], experts [T, A]; inputs [T, D] for `input_layers` (MoE-layer indices)."""
    from moe.loader import encode_prompt
    from moe.moe_block import MoEBlock
    from moe.tree import TreeBatch

    model = loaded.model
    blocks = [m for m in model.modules() if isinstance(m, MoEBlock)]
    experts: list[list[torch.Tensor]] = [[] for _ in blocks]
    inputs: dict[int, list[torch.Tensor]] = {i: [] for i in input_layers}

    def hook(index: int):
        def pre(module, args):
            flat = args[0].reshape(-1, args[0].shape[-1])                 # [N, D]
            experts[index].append(module.router(flat)[1].to(torch.int16))
            if index in inputs:
                inputs[index].append(flat.float().clone())
        return pre

    handles = [b.register_forward_pre_hook(hook(i)) for i, b in enumerate(blocks)]
    ids_all = []
    vocab = loaded.config.vocab_size
    try:
        for text in tqdm(texts, desc=desc):
            if loaded.tokenizer is not None:
                ids = encode_prompt(loaded.tokenizer, text)[-max_tokens:]
            else:  # tiny test folders have no tokenizer: bytes stand in for tokens
                ids = [b % vocab for b in text.encode()][-max_tokens:]
            cache = model.new_cache(1, len(ids) + 1)
            slot = cache.allocate()
            model(TreeBatch.chains([ids]), [slot], cache, logits_for="last")
            ids_all.append(torch.tensor(ids))
    finally:
        for h in handles:
            h.remove()
    return {"tokens": torch.cat(ids_all), "experts": [torch.cat(e).long() for e in experts],
            "inputs": {i: torch.cat(v) for i, v in inputs.items()}, "blocks": blocks}


def best_rank(experts: torch.Tensor, placement: torch.Tensor, ep: int) -> torch.Tensor:
    """[T] the rank hosting most of each token's actual experts: a perfect predictor, the LAR bound of a placement."""
    return torch.nn.functional.one_hot(placement[experts], ep).sum(1).argmax(1)


# --------------------------------------------------------------------------------------------- 3. live runs

def _worker(rank: int, ep: int, port: int, job: str, out: str) -> None:
    from moe.a2a_stats import A2AStats
    from moe.ep_dispatch import EPMoELayer
    from moe.expert_parallel import init_process_group

    torch.set_num_threads(1)
    init_process_group(rank, ep, port, backend="gloo")
    spec = torch.load(job, weights_only=False)
    layers = {"plain": [], "spec": []}
    for block, placement in zip(spec["blocks"], spec["placements"]):
        layers["plain"].append(EPMoELayer(block, smoe.contiguous_placement(placement.numel(), ep), rank, ep))
        layers["spec"].append(EPMoELayer(block, placement, rank, ep))
    stats = {mode: A2AStats() for mode in layers}
    for mode, ls in layers.items():
        for layer in ls:
            layer.stats = stats[mode]
    latency: list[dict] = []
    mismatch = 0.0
    with torch.inference_mode():
        for batch, steps in spec["batches"].items():
            for step, idx in enumerate(steps):
                for li, layer_inputs in enumerate(spec["inputs"]):
                    x = layer_inputs[idx]                                  # [B, D]
                    pred = spec["preds"][li][idx]                          # [B]
                    outs = {}
                    for mode in ("plain", "spec"):
                        st = stats[mode]
                        st.layer, st.step = li, step
                        st.enabled = step > 0                              # step 0 warms up
                        torch.distributed.barrier()
                        t0 = time.perf_counter()
                        outs[mode] = layers[mode][li](x, pred if mode == "spec" else None)
                        dt = time.perf_counter() - t0
                        if step > 0:
                            latency.append(dict(batch=batch, step=step, layer=li, mode=mode, seconds=dt))
                    scale = float(outs["plain"].abs().max()) or 1.0
                    mismatch = max(mismatch, float((outs["plain"] - outs["spec"]).abs().max()) / scale)
            for mode in stats:  # tag this batch size's records, then start the next one clean
                for r in stats[mode].records:
                    r.__dict__.setdefault("batch", batch)
    torch.save({"latency": latency, "mismatch": mismatch,
                "records": {m: [r.__dict__ for r in s.records] for m, s in stats.items()}}, f"{out}/rank{rank}.pt")
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def run_live(ep: int, blocks, placements, inputs, preds, batches: dict[int, list[torch.Tensor]]) -> list[dict]:
    """Spawn ep gloo ranks; returns each rank's latency and a2a records."""
    import torch.multiprocessing as mp

    from moe.expert_parallel import free_port

    with tempfile.TemporaryDirectory() as tmp:
        job = f"{tmp}/job.pt"
        torch.save({"blocks": blocks, "placements": placements, "inputs": inputs, "preds": preds,
                    "batches": batches}, job)
        mp.start_processes(_worker, args=(ep, free_port(), job, tmp), nprocs=ep, join=True, start_method="spawn")
        return [torch.load(f"{tmp}/rank{r}.pt", weights_only=False) for r in range(ep)]


def summarise_live(ranks: list[dict], batch: int) -> dict:
    """Per mode: a2a bytes sent per rank per layer-step (dispatch+combine, +counts/meta), a2a and layer time."""
    out = {}
    for mode in ("plain", "spec"):
        per_call: dict[tuple, dict[str, float]] = {}
        for rank in ranks:
            for r in rank["records"][mode]:
                if r["batch"] != batch:
                    continue
                acc = per_call.setdefault((r["step"], r["layer"]), {"act": 0.0, "all": 0.0, "a2a_s": 0.0})
                if r["phase"] in ("dispatch", "combine"):
                    acc["act"] += r["bytes_sent"]
                if r["phase"] != "allgather":
                    acc["all"] += r["bytes_sent"]
                    acc["a2a_s"] += r["seconds"] / len(ranks)           # mean over ranks
        lat = [x["seconds"] for rank in ranks for x in rank["latency"] if x["batch"] == batch and x["mode"] == mode]
        calls = max(len(per_call), 1)
        out[mode] = {
            "a2a_activation_bytes_per_layer_step": sum(v["act"] for v in per_call.values()) / calls,
            "a2a_total_bytes_per_layer_step": sum(v["all"] for v in per_call.values()) / calls,
            "a2a_seconds_per_layer_step": sum(v["a2a_s"] for v in per_call.values()) / calls,
            "moe_layer_seconds_median": statistics.median(lat) if lat else None,
        }
    return out


# --------------------------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--ep", type=int, nargs="+", default=[2, 4])
    p.add_argument("--batches", type=int, nargs="+", default=[16, 32, 64])
    p.add_argument("--steps", type=int, default=8, help="decode steps per batch size (the first warms up)")
    p.add_argument("--layers", type=int, default=4, help="MoE layers run live and replayed (spread over depth)")
    p.add_argument("--train-prompts", type=int, default=200)
    p.add_argument("--heldout-prompts", type=int, default=60)
    p.add_argument("--max-tokens", type=int, default=256, help="prompt tokens kept per prompt")
    p.add_argument("--slack", type=float, default=0.1,
                   help="s-EG token-load slack: a rank takes at most (1 + slack) / ep of the profiled tokens")
    p.add_argument("--table", choices=("balanced", "argmax"), default="balanced",
                   help="token table: the solver's balanced clusters, or each token's best rank (uneven load)")
    p.add_argument("--top-k", type=int, default=None,
                   help="experts per token, overriding the checkpoint's (e.g. 8 of 64, DeepSeek-like sparsity)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    p.add_argument("--tag", default="cpu")
    args = p.parse_args(argv)
    torch.set_num_threads(1)

    from moe.errors import CorruptModelError
    from moe.loader import load_model
    from serving.traffic import sharegpt_prompts

    t_start = time.time()
    try:
        loaded = load_model(args.model, moe_backend="local", with_tokenizer=True)
    except CorruptModelError:  # a folder without a tokenizer (tests' tiny models)
        loaded = load_model(args.model, moe_backend="local", with_tokenizer=False)
    cfg = loaded.config
    if args.top_k:  # route with another k than the checkpoint's (a MoEfied cut's router ranks all E)
        cfg = dataclasses.replace(cfg, top_k=args.top_k)
        for layer in loaded.model.layers:
            if hasattr(layer.mlp, "router"):
                layer.mlp.router.top_k = args.top_k
    num_experts, top_k, hidden = cfg.num_experts, cfg.top_k, cfg.hidden_size
    n_moe = len(cfg.sparse_layers)
    chosen = sorted({round(i * (n_moe - 1) / max(args.layers - 1, 1)) for i in range(args.layers)})
    train_texts = [q.text for q in islice(sharegpt_prompts("train"), args.train_prompts)]
    held_texts = [q.text for q in islice(sharegpt_prompts("heldout"), args.heldout_prompts)]
    train = record_traces(loaded, train_texts, set(), args.max_tokens, "trace train")
    held = record_traces(loaded, held_texts, set(chosen), args.max_tokens, "trace heldout")
    # Unseen tokens take their nearest profiled neighbour's entry (same profiled set in every layer).
    neighbours = smoe.nearest_profiled(train["tokens"].unique(), loaded.model.embed.weight.detach())
    print(f"model {args.model}: E={num_experts} top-{top_k} D={hidden}, {n_moe} MoE layers, live/replay layers {chosen}; "
          f"train {train['tokens'].numel()} tokens, held-out {held['tokens'].numel()} tokens")

    # 2 + 4. Plans for every ep, and volume-only replay on held-out batches.
    eps = sorted({e for e in (*args.ep, *REPLAY_EPS) if e <= num_experts and num_experts % e == 0})
    gen = torch.Generator().manual_seed(0)
    num_held = held["tokens"].numel()
    batches = {b: [torch.randperm(num_held, generator=gen)[:b] for _ in range(args.steps)] for b in args.batches}
    plans: dict[tuple[int, int], tuple[smoe.Grouping, smoe.TokenTable]] = {}
    train_local: dict[int, list[float]] = {ep: [] for ep in eps}
    replay: dict[int, dict] = {}
    for ep in tqdm(eps, desc="s-EG plans + replay"):
        # pairs, local pairs, sends, bytes, summed token-load skew, batches
        agg = {m: [0, 0, 0, 0, 0.0, 0] for m in ("plain", "spec", "spec_other_table", "oracle")}
        for li in chosen:
            prof = smoe.profile_layer(train["tokens"], train["experts"][li], num_experts)
            grouping = smoe.group_experts(prof, ep, restarts=2, slack=args.slack)
            train_local[ep].append(grouping.local_rate)
            table = smoe.token_table(prof, grouping, cfg.vocab_size, ep, neighbours, balanced=args.table == "balanced")
            other = smoe.token_table(prof, grouping, cfg.vocab_size, ep, neighbours, balanced=args.table != "balanced")
            plans[(ep, li)] = (grouping, table)
            for b in args.batches:
                for idx in batches[b]:
                    ex, tok = held["experts"][li][idx], held["tokens"][idx]
                    for mode, owner, placement in (
                            ("plain", smoe.plain_token_rank(b, ep), smoe.contiguous_placement(num_experts, ep)),
                            ("spec", table.predict(tok), grouping.placement),
                            ("spec_other_table", other.predict(tok), grouping.placement),
                            ("oracle", best_rank(ex, grouping.placement, ep), grouping.placement)):
                        v = smoe.volume(ex, owner, placement, ep, hidden)
                        # Busiest rank's tokens over the even share: the all-gather pads to it, compute waits on it.
                        skew = float(torch.bincount(owner, minlength=ep).max()) * ep / b
                        for k, val in enumerate((v.pairs, v.local_pairs, v.remote_sends, v.bytes, skew, 1)):
                            agg[mode][k] += val
        replay[ep] = {m: {"lar": a[1] / a[0], "remote_sends": a[2], "bytes": a[3], "token_load_skew": a[4] / a[5]}
                      for m, a in agg.items()}
        replay[ep]["train_expected_local_rate"] = statistics.mean(train_local[ep])
        replay[ep]["bytes_ratio"] = agg["spec"][3] / max(agg["plain"][3], 1)
        replay[ep]["lar_ratio"] = replay[ep]["spec"]["lar"] / max(replay[ep]["plain"]["lar"], 1e-9)
        print(f"replay ep={ep:>2}: LAR plain {replay[ep]['plain']['lar']:.3f} spec {replay[ep]['spec']['lar']:.3f} "
              f"({replay[ep]['lar_ratio']:.2f}x), a2a bytes spec/plain {replay[ep]['bytes_ratio']:.3f}; "
              f"with the {'argmax' if args.table == 'balanced' else 'balanced'} table: "
              f"LAR {replay[ep]['spec_other_table']['lar']:.3f}, bytes ratio "
              f"{agg['spec_other_table'][3] / max(agg['plain'][3], 1):.3f}; perfect prediction (same placement): "
              f"LAR {replay[ep]['oracle']['lar']:.3f}, bytes ratio {agg['oracle'][3] / max(agg['plain'][3], 1):.3f}; "
              f"expected LAR on the profile {replay[ep]['train_expected_local_rate']:.3f}; busiest rank's tokens / even "
              f"share: plain {replay[ep]['plain']['token_load_skew']:.2f} spec {replay[ep]['spec']['token_load_skew']:.2f} "
              f"other table {replay[ep]['spec_other_table']['token_load_skew']:.2f}")

    # 3. Live gloo runs on the chosen layers.
    blocks = [copy.deepcopy(held["blocks"][li]) for li in chosen]
    inputs = [held["inputs"][li] for li in chosen]
    live: dict[int, dict] = {}
    for ep in tqdm(args.ep, desc="live EP runs"):
        placements = [plans[(ep, li)][0].placement for li in chosen]
        preds = [plans[(ep, li)][1].predict(held["tokens"]) for li in chosen]
        ranks = run_live(ep, blocks, placements, inputs, preds, batches)
        live[ep] = {"max_rel_diff_plain_vs_spec": max(r["mismatch"] for r in ranks)}
        for b in args.batches:
            s = summarise_live(ranks, b)
            for mode in ("plain", "spec"):
                pairs = local = 0
                for li, layer_in in zip(chosen, inputs):
                    for idx in batches[b][1:]:
                        owner = smoe.plain_token_rank(b, ep) if mode == "plain" else preds[chosen.index(li)][idx]
                        placement = (smoe.contiguous_placement(num_experts, ep) if mode == "plain"
                                     else placements[chosen.index(li)])
                        v = smoe.volume(held["experts"][li][idx], owner, placement, ep, hidden)
                        pairs, local = pairs + v.pairs, local + v.local_pairs
                s[mode]["lar"] = local / max(pairs, 1)
            p_, s_ = s["plain"], s["spec"]
            s["bytes_ratio"] = s_["a2a_activation_bytes_per_layer_step"] / max(p_["a2a_activation_bytes_per_layer_step"], 1)
            s["a2a_time_ratio"] = s_["a2a_seconds_per_layer_step"] / max(p_["a2a_seconds_per_layer_step"], 1e-12)
            s["latency_ratio"] = s_["moe_layer_seconds_median"] / p_["moe_layer_seconds_median"]
            live[ep][b] = s
            print(f"live ep={ep} batch={b:>3}: LAR plain {p_['lar']:.3f} spec {s_['lar']:.3f}; "
                  f"a2a bytes/layer-step plain {p_['a2a_activation_bytes_per_layer_step']:.0f} "
                  f"spec {s_['a2a_activation_bytes_per_layer_step']:.0f} (ratio {s['bytes_ratio']:.3f}); "
                  f"a2a time ratio {s['a2a_time_ratio']:.2f}; MoE layer median {p_['moe_layer_seconds_median'] * 1e3:.2f} ms "
                  f"vs {s_['moe_layer_seconds_median'] * 1e3:.2f} ms (ratio {s['latency_ratio']:.2f})")
        print(f"live ep={ep}: max |plain - spec| / max |plain| output difference {live[ep]['max_rel_diff_plain_vs_spec']:.2e}")

    result = {
        "model": args.model, "folder": str(loaded.folder), "build": build_marker(loaded.folder),
        "experts": num_experts, "top_k": top_k, "hidden": hidden,
        "moe_layers": n_moe, "layers_used": chosen, "train_prompts": len(train_texts), "heldout_prompts": len(held_texts),
        "train_tokens": train["tokens"].numel(), "heldout_tokens": num_held, "batches": args.batches,
        "steps": args.steps, "table": args.table, "slack": args.slack, "replay": {str(k): v for k, v in replay.items()},
        "live": {str(ep): {str(k): v for k, v in d.items()} for ep, d in live.items()},
        "notes": ("CPU, gloo over loopback, 1 thread per rank on a shared 2-core machine: times are noisy and "
                  "a2a time is dominated by per-collective latency, not bytes. Bytes = activation rows sent to other "
                  "ranks (dispatch + combine), fp32, per rank per layer-step; routing metadata and split sizes are "
                  "recorded separately (a2a_total_bytes)."),
        "machine": torch_machine(),
        "seconds": round(time.time() - t_start, 1),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"moe-ep-{args.tag}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1))
    plot(result, stem.with_suffix(".png"))
    print(f"wrote {stem}.json and .png in {result['seconds']} s")
    return 0


def build_marker(folder: Path) -> dict | None:
    """The model folder's build record (MoEfied checkpoints name their source and recipe), if any."""
    marker = Path(folder) / "spectutor-moefy.json"
    return json.loads(marker.read_text()) if marker.is_file() else None


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    eps = [int(k) for k in result["replay"]]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    ax = axes[0]
    ax.plot(eps, [result["replay"][str(e)]["plain"]["lar"] for e in eps], "o-", label="plain EP")
    ax.plot(eps, [result["replay"][str(e)]["spec"]["lar"] for e in eps], "o-", label="s-MoE (s-EG + shuffle)")
    ax.plot(eps, [result["replay"][str(e)]["oracle"]["lar"] for e in eps], "o--", label="s-EG, perfect prediction")
    ax.set_xscale("log", base=2)
    ax.set(xlabel="ep", ylabel="local activation rate", title="LAR, held-out replay")
    ax.set_xticks(eps, [str(e) for e in eps])
    ax.minorticks_off()
    ax.legend()
    ax = axes[1]
    ax.plot(eps, [result["replay"][str(e)]["bytes_ratio"] for e in eps], "o-", label="replay")
    for ep, d in result["live"].items():
        ax.plot([int(ep)] * len(result["batches"]), [d[str(b)]["bytes_ratio"] for b in result["batches"]], "x",
                label=f"live ep={ep}")
    ax.axhline(0.5, ls="--", c="grey")
    ax.set_xscale("log", base=2)
    ax.set(xlabel="ep", ylabel="a2a bytes, s-MoE / plain", title="all-to-all volume ratio")
    ax.set_xticks(eps, [str(e) for e in eps])
    ax.minorticks_off()
    ax.legend()
    ax = axes[2]
    labels, plain, spec = [], [], []
    for ep, d in result["live"].items():
        for b in result["batches"]:
            labels.append(f"ep{ep}\nB{b}")
            plain.append(d[str(b)]["plain"]["moe_layer_seconds_median"] * 1e3)
            spec.append(d[str(b)]["spec"]["moe_layer_seconds_median"] * 1e3)
    xs = range(len(labels))
    ax.bar([x - 0.2 for x in xs], plain, 0.4, label="plain EP")
    ax.bar([x + 0.2 for x in xs], spec, 0.4, label="s-MoE")
    ax.set_xticks(list(xs), labels)
    ax.set(ylabel="MoE layer median ms (gloo, CPU)", title="MoE layer latency")
    ax.legend()
    fig.suptitle(f"{result['model']}: E={result['experts']} top-{result['top_k']}, layers {result['layers_used']}, "
                 f"{result.get('table', 'balanced')} token table")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    raise SystemExit(main())
