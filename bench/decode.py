"""Decode benchmark of the lean decoder on the default model (JSON + PNG under bench/results/).

1. Greedy autoregressive tokens/s, lean decoder vs Hugging Face `generate`, same model, prompts and
   threads, interleaved prompt by prompt so both see the same machine noise.
2. Verification cost curve: one tree forward of 1..64 nodes at context 256 and 1024.
3. Memory: peak RSS of a process that loads the model and decodes, and KV cache bytes per token.
4. Kernels: what `--kernels auto` chose here (moe/kernels.py, its per-width timings), and greedy
   tokens/s of each candidate forced, interleaved prompt by prompt: the choice should be the fastest.

    python bench/decode.py [--prompts 20] [--new-tokens 128] [--threads 2] [--dtype fp32] [--kernels auto]
"""
from __future__ import annotations

import argparse
import json
import statistics
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
from moe.generate import SamplingParams, generate  # noqa: E402
from moe.loader import DEFAULT_MODEL, load_model  # noqa: E402
from moe.tree import TreeBatch  # noqa: E402
from serving.traffic import sharegpt_prompts  # noqa: E402

TREE_SIZES = (1, 2, 4, 8, 16, 32, 64)
CONTEXTS = (256, 1024)


def chat_ids(tok, text: str, limit: int = 512) -> list[int]:
    ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True,
                                  return_dict=False)
    return list(ids)[-limit:]


def bench_tokens_per_s(loaded, prompts: list[list[int]], new_tokens: int, dtype: torch.dtype) -> dict:
    from transformers import AutoModelForCausalLM

    device = loaded.model.embed.weight.device
    hf = AutoModelForCausalLM.from_pretrained(loaded.folder, dtype=dtype).to(device).eval()
    params = SamplingParams(max_new_tokens=new_tokens)
    # Warm both paths (allocator, oneDNN kernels) before timing anything.
    generate(loaded.model, prompts[0][:32], SamplingParams(max_new_tokens=8))
    with torch.inference_mode():
        hf.generate(torch.tensor([prompts[0][:32]], device=device), max_new_tokens=8, do_sample=False)
    lean_s, hf_s, same = [], [], 0
    for ids in tqdm(prompts, desc="greedy decode (lean vs HF)"):
        t = time.perf_counter()
        ours = generate(loaded.model, ids, params)  # no EOS: both produce exactly new_tokens
        lean_s.append(time.perf_counter() - t)
        t = time.perf_counter()
        with torch.inference_mode():
            ref = hf.generate(torch.tensor([ids], device=device), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                              do_sample=False, eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
        hf_s.append(time.perf_counter() - t)
        same += ours == ref
    total = new_tokens * len(prompts)
    lean_tps, hf_tps = total / sum(lean_s), total / sum(hf_s)
    return {"lean_tokens_per_s": lean_tps, "hf_tokens_per_s": hf_tps, "speedup": lean_tps / hf_tps,
            "identical_outputs": same, "prompts": len(prompts), "new_tokens": new_tokens,
            "mean_prompt_tokens": statistics.mean(len(p) for p in prompts)}


def bench_tree_cost(model, repeats: int) -> dict:
    out: dict[str, dict[str, float]] = {}
    for ctx in CONTEXTS:
        cache = model.new_cache(1, ctx + max(TREE_SIZES) + 1)
        slot = cache.allocate()
        g = torch.Generator().manual_seed(0)
        model(TreeBatch.chains([torch.randint(100, 20000, (ctx,), generator=g).tolist()]), [slot], cache)
        cache.commit([slot], [list(range(ctx))])
        row = {}
        for n in tqdm(TREE_SIZES, desc=f"tree forward @ context {ctx}"):
            tree = TreeBatch.make_dummy(1, n, seed=n, vocab_size=20000)
            model(tree, [slot], cache)  # warm-up; nothing is committed, so the context stays ctx
            times = []
            for _ in range(repeats):
                _sync()
                t = time.perf_counter()
                model(tree, [slot], cache)
                _sync()
                times.append(time.perf_counter() - t)
            row[str(n)] = statistics.median(times) * 1000
        out[str(ctx)] = row
    return out


def bench_kernels(spec: str, dtype: str, device: str, prompts: list[list[int]], new_tokens: int) -> dict:
    """Greedy tokens/s with each kernel candidate forced, same prompts, interleaved."""
    from moe.kernels import available

    models = {c: load_model(spec, dtype=dtype, device=device, with_tokenizer=False, kernels=c).model
              for c in available()}
    params = SamplingParams(max_new_tokens=new_tokens)
    seconds = {c: 0.0 for c in models}
    outputs = {c: [] for c in models}
    for m in models.values():
        generate(m, prompts[0][:32], SamplingParams(max_new_tokens=8))  # warm-up
    for ids in tqdm(prompts, desc="greedy decode per kernel candidate"):
        for c, m in models.items():
            t = time.perf_counter()
            outputs[c].append(generate(m, ids, params))
            seconds[c] += time.perf_counter() - t
    total = new_tokens * len(prompts)
    first = next(iter(outputs))
    return {"tokens_per_s": {c: total / s for c, s in seconds.items()}, "prompts": len(prompts),
            "identical_outputs": {c: sum(a == b for a, b in zip(outputs[c], outputs[first])) for c in outputs}}


def copy_bandwidth_gbs(mb: int = 512, repeats: int = 5) -> float:
    """Memory bandwidth as STREAM's copy counts it (bytes read + bytes written per second, best of
    `repeats`), with the threads torch runs: the roofline a weight-bound decode step is held to."""
    src = torch.ones(mb * 2**20 // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)  # first touch
    best = min(_timed_copy(dst, src) for _ in range(repeats))
    return 2 * src.numel() * 4 / best / 1e9


def _timed_copy(dst: torch.Tensor, src: torch.Tensor) -> float:
    t = time.perf_counter()
    dst.copy_(src)
    return time.perf_counter() - t


def roofline(result: dict) -> dict:
    """Greedy ms per token against weight bytes / copy bandwidth."""
    bw = copy_bandwidth_gbs()
    floor_ms = result["memory"]["weights_mb"] * 2**20 / (bw * 1e9) * 1e3
    step_ms = 1e3 / result["greedy"]["lean_tokens_per_s"]
    return {"copy_bandwidth_gbs": bw, "weight_read_floor_ms": floor_ms, "lean_ms_per_token": step_ms,
            "fraction_of_roofline": floor_ms / step_ms}


def weights_mb(model: torch.nn.Module) -> float:
    """Bytes of weights the model holds, counting oneDNN-packed linears that dropped their dense copy."""
    from moe.cpu_kernels import PackedLinear

    total = sum(p.numel() * p.element_size() for p in model.parameters())
    total += sum(m._packed.numel() * 4 for m in model.modules() if isinstance(m, PackedLinear) and m._dense is None)
    return total / 2**20


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_rss_mb(model_spec: str, dtype: str) -> float:
    """Peak RSS of a fresh process that loads the model and decodes 16 tokens."""
    code = (
        "import sys; sys.path.insert(0, %r)\n"
        "from moe.loader import load_model; from moe.generate import generate, SamplingParams\n"
        "m = load_model(%r, dtype=%r)\n"
        "generate(m.model, m.tokenizer.encode('Hello there, how are you?'), SamplingParams(max_new_tokens=16))\n"
        "print(next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')))\n"
    ) % (str(ROOT), model_spec, dtype)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(res.stdout.strip().splitlines()[-1]) / 1024


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    tps = result["greedy"]
    a.bar(["HF generate", "lean decoder"], [tps["hf_tokens_per_s"], tps["lean_tokens_per_s"]], color=["#999", "#2a7"])
    a.set_ylabel("tokens / s (greedy, batch 1)")
    a.set_title(f"{result['model']} {result['dtype']}, {result['threads']} threads: {tps['speedup']:.2f}x")
    for ctx, row in result["tree_forward_ms"].items():
        b.plot([int(n) for n in row], list(row.values()), marker="o", label=f"context {ctx}")
    b.set_xscale("log", base=2)
    b.set_xlabel("tree nodes in one forward")
    b.set_ylabel("ms per forward (median)")
    b.set_title("verification cost curve")
    b.legend()
    fig.suptitle(result["machine"]["cpu"], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--prompts", type=int, default=20)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    ap.add_argument("--tag", default=None, help="name in the output files (default: the device type)")
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    from moe.kernels import KERNELS

    ap.add_argument("--kernels", default="auto", choices=KERNELS, help="CPU kernels of the lean decoder")
    ap.add_argument("--kernel-prompts", type=int, default=5, help="prompts for the per-candidate comparison (0: skip)")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    loaded = load_model(args.model, dtype=args.dtype, device=args.device, kernels=args.kernels)
    tag = args.tag or torch.device(args.device).type
    prompts = [chat_ids(loaded.tokenizer, p.text) for p in islice(sharegpt_prompts("heldout"), args.prompts)]
    result = {
        "model": args.model, "dtype": args.dtype, "threads": args.threads, "device": args.device,
        "machine": torch_machine(),
        "greedy": bench_tokens_per_s(loaded, prompts, args.new_tokens, loaded.model.dtype),
        "tree_forward_ms": bench_tree_cost(loaded.model, args.repeats),
        "memory": {"peak_rss_mb": peak_rss_mb(args.model, args.dtype),
                   "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
                   "kv_bytes_per_token_per_slot": loaded.model.new_cache(1, 1).bytes_per_token(),
                   "weights_mb": weights_mb(loaded.model)},
        "kernels": {"choice": loaded.kernels.as_dict()},
    }
    if loaded.model.embed.weight.device.type == "cpu":
        result["roofline"] = roofline(result)
    if args.kernel_prompts and loaded.kernels.how != "only candidate":
        result["kernels"]["forced"] = bench_kernels(args.model, args.dtype, args.device,
                                                    prompts[: args.kernel_prompts], args.new_tokens)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"decode-{tag}-{args.dtype}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2))
    plot(result, stem.with_suffix(".png"))
    g = result["greedy"]
    print(f"greedy: lean {g['lean_tokens_per_s']:.1f} tok/s, HF {g['hf_tokens_per_s']:.1f} tok/s, "
          f"{g['speedup']:.2f}x; identical outputs {g['identical_outputs']}/{g['prompts']}")
    for ctx, row in result["tree_forward_ms"].items():
        print(f"tree forward @ {ctx}: " + ", ".join(f"{n}:{ms:.1f}ms" for n, ms in row.items()))
    print(f"memory: {result['memory']}")
    print(loaded.kernels.summary())
    if "roofline" in result:
        r = result["roofline"]
        print(f"roofline: copy bandwidth {r['copy_bandwidth_gbs']:.1f} GB/s, weight-read floor "
              f"{r['weight_read_floor_ms']:.1f} ms/token, lean {r['lean_ms_per_token']:.1f} ms/token: "
              f"{r['fraction_of_roofline']:.0%} of the roofline")
    if "forced" in result["kernels"]:
        print("greedy tok/s per kernel candidate: " + ", ".join(
            f"{c} {v:.1f}" for c, v in result["kernels"]["forced"]["tokens_per_s"].items()))
    print(f"wrote {stem}.json and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
