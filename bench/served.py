"""What serving costs at batch 1: the in-process engine, the same replica behind HTTP, and Ray Serve.

One request at a time, the same held-out ShareGPT chat prompts on three paths, interleaved prompt
by prompt so all three see the same machine noise, with the same torch threads:

1. `engine`: serving.engine.Engine stepped in this process (no HTTP, no asyncio);
2. `http`: serving.service.Replica behind the FastAPI app on uvicorn, streamed over loopback;
3. `ray`: `serving.app.build_app` on a local Ray cluster (proxy, router deployment, handle
   streaming to the engine replica), the replica's threads following its `num_cpus`.

Tokens/s is completion tokens over the client-side time from sending the request to its last
token (prefill included), summed over the prompts. The target: ray >= 0.95x engine.

    python bench/served.py [--prompts 8] [--max-tokens 96] [--threads 2] [--speculation 0]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from itertools import islice
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.machine_info import torch_machine  # noqa: E402

PATHS = ("engine", "http", "ray")


def engine_run(engine, tokenizer, text: str, max_tokens: int, rid: str) -> tuple[float, int]:
    """Seconds and completion tokens of one greedy request stepped to the end."""
    from moe.generate import SamplingParams
    from moe.loader import encode_prompt
    from serving.engine import Request

    t0 = time.perf_counter()
    ids = tuple(encode_prompt(tokenizer, text, chat=True))
    engine.add_request(Request(rid, ids, SamplingParams(max_new_tokens=max_tokens)))
    n, done = 0, False
    while not done:
        for out in engine.step():
            n += len(out.new_tokens)
            done = done or out.finished is not None
    return time.perf_counter() - t0, n


async def http_run(url: str, model: str, text: str, max_tokens: int) -> tuple[float, int]:
    import httpx

    from bench.serving import one_request

    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        r = await one_request(http, model, {"kind": "chat", "prompt": text, "domain": "chat"}, max_tokens)
    if "error" in r:
        raise RuntimeError(f"{url}: {r['error']}")
    return r["latency"], r["tokens"]


def start_ray(model: str, threads: int, speculation: int | str, drafter: str, port: int, stream_interval: int = 1) -> str:
    import ray
    from ray import serve

    from serving.app import build_app

    ray.init(num_cpus=threads, include_dashboard=False, configure_logging=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    app = build_app(dict(model=model, drafter=drafter, speculation=speculation, max_batch=1, events_url="",
                         redis_url="", mlflow_uri="", num_replicas=1, num_cpus=threads,
                         stream_interval=stream_interval))
    serve.run(app, name="spectutor", route_prefix="/")
    return f"http://127.0.0.1:{port}"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tps = result["tokens_per_s"]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.bar(list(tps), list(tps.values()), color=["#2a7", "#59c", "#c84"])
    ax.set_ylabel("tokens / s (batch 1, greedy)")
    ax.set_title(f"served / in-process: http {result['ratio']['http']:.3f}x, ray {result['ratio']['ray']:.3f}x "
                 f"(target 0.95x)", fontsize=10)
    fig.suptitle(f"{result['machine']['cpu']}, {result['threads']} threads, {result['model']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--speculation", default="0", help="0 (plain decoding: the overhead alone), a size, or adaptive")
    ap.add_argument("--drafter", default="hybrid")
    ap.add_argument("--port", type=int, default=8123)
    ap.add_argument("--stream-interval", type=int, default=1, help="tokens per streamed chunk (http and ray)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args()
    speculation = args.speculation if args.speculation == "adaptive" else int(args.speculation)

    import torch
    from tqdm import tqdm

    from drafters.registry import DrafterConfig, build_drafter
    from moe.loader import load_model
    from serving.config import SwapPolicy
    from serving.engine import Engine, EngineConfig
    from serving.traffic import sharegpt_prompts

    from bench.serving import start_local

    torch.set_num_threads(args.threads)
    texts = [p.text for p in islice(sharegpt_prompts("heldout"), args.prompts)]
    ray_url = start_ray(args.model, args.threads, speculation, args.drafter, args.port, args.stream_interval)
    loaded = load_model(args.model)
    ecfg = EngineConfig(max_batch=1, max_len=2048, speculation=speculation)
    drafter = build_drafter(DrafterConfig(args.drafter), args.model, loaded.config.vocab_size, 1, 2048,
                            loaded.config, target=loaded.model)
    engine = Engine(loaded.model, drafter, ecfg, loaded.eos_token_ids)
    replica, server, http_url = start_local(args.model, args.drafter, 1, args.stream_interval)
    replica.reconfigure(SwapPolicy(follow=False, speculation=speculation))  # the operators' path
    model_id = replica.cfg.model_id
    seconds = {p: 0.0 for p in PATHS}
    tokens = {p: [] for p in PATHS}
    try:
        for text in texts[:1]:  # warm-up of every path
            engine_run(engine, loaded.tokenizer, text, 8, "warm")
            asyncio.run(http_run(http_url, model_id, text, 8))
            asyncio.run(http_run(ray_url, model_id, text, 8))
        for i, text in enumerate(tqdm(texts, desc="batch-1 requests (engine, http, ray)")):
            for path in PATHS:
                if path == "engine":
                    s, n = engine_run(engine, loaded.tokenizer, text, args.max_tokens, f"r{i}")
                else:
                    s, n = asyncio.run(http_run(http_url if path == "http" else ray_url, model_id, text,
                                                args.max_tokens))
                seconds[path] += s
                tokens[path].append(n)
    finally:
        server.should_exit = True
        replica.close()
        import ray
        from ray import serve

        serve.shutdown()
        ray.shutdown()
    tps = {p: sum(tokens[p]) / seconds[p] for p in PATHS}
    result = {"model": args.model, "threads": args.threads, "speculation": args.speculation, "drafter": args.drafter,
              "stream_interval": args.stream_interval,
              "prompts": len(texts), "max_tokens": args.max_tokens, "machine": torch_machine(),
              "kernels": loaded.kernels.as_dict(), "tokens_per_s": tps,
              "ms_per_token": {p: 1e3 * seconds[p] / sum(tokens[p]) for p in PATHS},
              "ratio": {p: tps[p] / tps["engine"] for p in PATHS},
              "same_token_counts": tokens["engine"] == tokens["http"] == tokens["ray"],
              "tokens": tokens}
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / ("served" if args.stream_interval == 1 else f"served-interval{args.stream_interval}")
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2))
    plot(result, stem.with_suffix(".png"))
    print(", ".join(f"{p} {tps[p]:.2f} tok/s ({result['ms_per_token'][p]:.1f} ms/token)" for p in PATHS))
    print(f"served / in-process: http {result['ratio']['http']:.3f}x, ray {result['ratio']['ray']:.3f}x "
          f"(target 0.95x); same token counts: {result['same_token_counts']}")
    print(f"wrote {stem}.json and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
