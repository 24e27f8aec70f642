"""Serving benchmark: replay held-out ShareGPT and HumanEval requests against the OpenAI HTTP API.

Load: fixed concurrency (1, 4, 16 clients, each sends its next request when the last ends) and
Poisson arrivals (a rate in requests/s). Per run: output throughput (tokens/s), requests/s, TTFT
and time per output token (TPOT, after the first token) p50/p99, measured by the client from the
SSE stream. Every setting runs with speculation on (the replica's drafter, adaptive) and off
(plain decoding through the same engine), switched with the same `reconfigure` path operators use.

By default the server is the in-process Replica behind the real FastAPI app on uvicorn (no Ray;
what Ray Serve adds is one proxy hop); `--url` points it at a running `spectutor serve` instead
(then speculation is whatever that server does, and the result is labelled so).

    python bench/serving.py                 # SmolLM2-135M, concurrency 1/4/16 + Poisson, on and off
    python bench/serving.py --quick         # a short version (a few minutes on 2 cores)
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import threading
import time
from itertools import islice
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# This file is bench/serving.py: drop bench/ from the path so `serving` is the package, not this script.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT))

from bench.machine_info import torch_machine  # noqa: E402


def load_requests(n: int) -> list[dict]:
    """n held-out requests alternating HumanEval (completions) and ShareGPT (chat)."""
    from serving.traffic import humaneval_prompts, sharegpt_prompts

    code = list(islice(humaneval_prompts("heldout"), n))
    chat = list(islice((p for p in sharegpt_prompts("heldout") if len(p.text) < 600), n))
    out = []
    for a, b in zip(code, chat):
        out.append({"kind": "completion", "domain": "humaneval", "prompt": a.text})
        out.append({"kind": "chat", "domain": "sharegpt", "prompt": b.text})
    return out[:n]


async def one_request(http, model: str, req: dict, max_tokens: int) -> dict:
    """Send one streaming request; timings as the client sees them."""
    body = {"model": model, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "metadata": {"domain": req["domain"]}}
    if req["kind"] == "chat":
        path, body["messages"] = "/v1/chat/completions", [{"role": "user", "content": req["prompt"]}]
    else:
        path, body["prompt"] = "/v1/completions", req["prompt"]
    t0 = time.perf_counter()
    first = None
    usage = None
    error = None
    async with http.stream("POST", path, json=body) as r:
        if r.status_code != 200:
            await r.aread()
            return {"error": f"HTTP {r.status_code}"}
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            obj = json.loads(line[6:])
            if "error" in obj:
                error = obj["error"]["message"]
            elif obj.get("choices") and first is None:
                ch = obj["choices"][0]
                if ch.get("text") or (ch.get("delta") or {}).get("content"):
                    first = time.perf_counter()
            if obj.get("usage"):
                usage = obj["usage"]
    end = time.perf_counter()
    if error or usage is None:
        return {"error": error or "no usage chunk"}
    n = usage["completion_tokens"]
    first = first or end
    return {"ttft": first - t0, "tpot": (end - first) / (n - 1) if n > 1 else None, "tokens": n,
            "latency": end - t0, "mal": usage["speculative"]["mean_accepted_length"]}


async def run_load(url: str, model: str, reqs: list[dict], max_tokens: int, concurrency: int | None,
                   rate: float | None, seed: int = 0) -> dict:
    """Fixed concurrency (closed loop) or Poisson arrivals at `rate` requests/s (open loop)."""
    import httpx

    results: list[dict] = []
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=httpx.Limits(max_connections=64)) as http:
        t0 = time.perf_counter()
        if concurrency:
            queue = list(reqs)

            async def client() -> None:
                while queue:
                    results.append(await one_request(http, model, queue.pop(0), max_tokens))

            await asyncio.gather(*(client() for _ in range(concurrency)))
        else:
            rng = random.Random(seed)
            tasks = []
            for req in reqs:
                tasks.append(asyncio.create_task(one_request(http, model, req, max_tokens)))
                await asyncio.sleep(rng.expovariate(rate))
            results = list(await asyncio.gather(*tasks))
        wall = time.perf_counter() - t0
    ok = [r for r in results if "error" not in r]
    return {"requests": len(results), "failed": len(results) - len(ok), "wall_s": round(wall, 3),
            "output_tokens_per_s": round(sum(r["tokens"] for r in ok) / wall, 2),
            "requests_per_s": round(len(ok) / wall, 3),
            "ttft_p50_s": _pct([r["ttft"] for r in ok], 50), "ttft_p99_s": _pct([r["ttft"] for r in ok], 99),
            "tpot_p50_s": _pct([r["tpot"] for r in ok if r["tpot"]], 50),
            "tpot_p99_s": _pct([r["tpot"] for r in ok if r["tpot"]], 99),
            "mean_accepted_length": round(sum(r["mal"] for r in ok) / max(len(ok), 1), 3)}


def _pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))], 4)


def start_local(model: str, drafter: str, max_batch: int, stream_interval: int = 1):
    """The Replica behind the FastAPI app on uvicorn, on a free loopback port."""
    import socket

    import uvicorn

    from serving.config import ServeConfig
    from serving.openai_api import build_app
    from serving.service import Replica

    replica = Replica(ServeConfig(model=model, drafter=drafter, max_batch=max_batch, max_waiting=256,
                                  events_url="", redis_url="", mlflow_uri="", stream_interval=stream_interval))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(build_app(replica.completer, replica.cfg.model_id), host="127.0.0.1",
                                           port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return replica, server, f"http://127.0.0.1:{port}"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for mode, marker in (("on", "o"), ("off", "s")):
        rows = [r for r in result["runs"] if r["speculation"] == mode]
        labels = [r["load"] for r in rows]
        for ax, key, title in ((axes[0], "output_tokens_per_s", "throughput (tokens/s)"),
                               (axes[1], "ttft_p50_s", "TTFT p50 (s)"), (axes[2], "tpot_p50_s", "TPOT p50 (s)")):
            ax.plot(labels, [r[key] or 0 for r in rows], marker=marker, label=f"speculation {mode}")
            ax.set_title(title)
            ax.tick_params(axis="x", rotation=30)
    axes[0].legend()
    fig.suptitle(f"spectutor serving, {result['model']}, {result['machine']['cpu']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--drafter", default="hybrid")
    ap.add_argument("--url", default=None, help="benchmark a running server instead of an in-process replica")
    ap.add_argument("--requests", type=int, default=48, help="requests per run")
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--rate", type=float, default=2.0, help="Poisson arrivals, requests/s (0 = skip)")
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--quick", action="store_true", help="12 requests, 32 tokens, concurrency 1 and 4, rate 1/s")
    ap.add_argument("--note", default="", help="recorded in the result (e.g. what else ran on the machine)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args()
    if args.quick:
        args.requests, args.max_tokens, args.concurrency, args.rate = 12, 32, [1, 4], 1.0

    import torch

    from serving.config import SwapPolicy

    torch.set_num_threads(2)
    reqs = load_requests(args.requests)
    replica = server = None
    if args.url:
        url, model, modes = args.url, args.model, ["server"]
    else:
        replica, server, url = start_local(args.model, args.drafter, args.max_batch)
        model, modes = replica.cfg.model_id, ["on", "off"]
    loads = [(f"c={c}", c, None) for c in args.concurrency] + ([(f"poisson {args.rate}/s", None, args.rate)]
                                                              if args.rate else [])
    result = {"model": args.model, "drafter": args.drafter, "max_tokens": args.max_tokens, "requests": len(reqs),
              "server": "external " + args.url if args.url else "in-process replica + FastAPI on uvicorn",
              "machine": torch_machine(), "note": args.note, "runs": []}
    try:
        for mode in modes:
            if replica is not None:
                replica.reconfigure(SwapPolicy(follow=False, speculation="adaptive" if mode == "on" else 0))
                time.sleep(0.5)
            asyncio.run(run_load(url, model, reqs[:2], 8, 1, None))  # warm-up
            for label, conc, rate in loads:
                row = {"speculation": mode, "load": label,
                       **asyncio.run(run_load(url, model, reqs, args.max_tokens, conc, rate))}
                result["runs"].append(row)
                print(json.dumps(row), flush=True)
    finally:
        if server is not None:
            server.should_exit = True
        if replica is not None:
            replica.close()
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / ("serving-cpu-quick" if args.quick else "serving-cpu")
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2))
    plot(result, stem.with_suffix(".png"))
    print(f"wrote {stem}.json and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
