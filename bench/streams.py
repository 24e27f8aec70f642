"""Streams benchmark: what logging token events costs the serving path (JSON + PNG under bench/results/).

For events of realistic size (128 output tokens, 128 prompt tokens, top-k 8 and 32):
1. Encoding: bytes per event and per generated token, encode/decode time, and what Kafka's own
   batch compression would add on top of the schema's per-record zlib.
2. Produce and consume throughput over loopback: Kafka (the local broker) and the embedded log,
   and publish() latency both at saturation and at a steady 100 events/s (what a serving thread sees).
3. Overhead per decoded token, as a fraction of the decode time measured by bench/decode.py
   (read from bench/results/decode-cpu-fp32.json): the CPU the producer spends per event (the
   caller's publish() plus the pump and Kafka client threads, all in this process) spread over the
   event's tokens, plus the share of a core its threads burn while idle. The broker's own CPU is
   reported beside it (in production the broker is on other machines). Target: < 2%.

    source deploy/local/env.sh && python bench/streams.py [--events 3000] [--backends kafka,file]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
import zlib
from pathlib import Path

import numpy as np
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.machine_info import machine  # noqa: E402
from streams import TokenEvent, decode_event, encode, open_consumer, open_producer  # noqa: E402
from streams.producer import BaseProducer  # noqa: E402

TARGET_FRACTION = 0.02
PACED_RATE, PACED_EVENTS = 100, 500  # events/s, and how many, for the serving-thread latency
DECODE_REFERENCE = ROOT / "bench" / "results" / "decode-cpu-fp32.json"


def decode_ms_per_token() -> tuple[float, float]:
    """(tokens/s, ms/token) of greedy decoding from the runtime benchmark's result file."""
    tps = json.loads(DECODE_REFERENCE.read_text())["greedy"]["lean_tokens_per_s"]
    return tps, 1000.0 / tps


def broker_cpu_s() -> float | None:
    """utime + stime of the local broker process (deploy/local keeps its pid), or None."""
    state = Path(os.environ.get("SPECTUTOR_LOCAL_STATE", Path.home() / ".cache" / "spectutor" / "local"))
    try:
        pid = (state / "run" / "kafka.pid").read_text().strip()
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def events_for(k: int, n: int, tokens: int, prompt: int) -> list[TokenEvent]:
    return [TokenEvent.make_dummy(tokens, k, prompt, request_id=f"bench-{i}", seed=i) for i in range(n)]


def bench_encoding(events: list[TokenEvent]) -> dict:
    tokens = events[0].num_tokens
    t = time.perf_counter()
    blobs = [encode(e) for e in events]
    encode_s = (time.perf_counter() - t) / len(events)
    t = time.perf_counter()
    for b in blobs:
        decode_event(b)
    decode_s = (time.perf_counter() - t) / len(events)
    sizes = [len(b) for b in blobs]
    f32 = [len(encode(e, logprobs_f32=True)) for e in events[:200]]
    from streams.schema import Codec

    raw = [len(encode(e, codec=Codec.NONE)) for e in events[:200]]
    # What Kafka's batch compression (gzip here) would save on top: batches of 100 records.
    batch = b"".join(blobs[:100])
    kafka_gzip_saving = 1.0 - len(zlib.compress(batch, 6)) / len(batch)
    mean = statistics.mean(sizes)
    return {
        "bytes_per_event": mean, "bytes_per_token": mean / tokens,
        "bytes_per_token_logprobs_f32": statistics.mean(f32) / tokens,
        "bytes_per_token_uncompressed": statistics.mean(raw) / tokens,
        "encode_us": encode_s * 1e6, "decode_us": decode_s * 1e6,
        "kafka_batch_gzip_saving": kafka_gzip_saving,
    }


def idle_cpu_share(producer: BaseProducer, seconds: float = 3.0) -> float:
    """CPU seconds per second this process burns while the producer has nothing to send."""
    time.sleep(0.5)
    c0, t0 = time.process_time(), time.monotonic()
    time.sleep(seconds)
    return (time.process_time() - c0) / (time.monotonic() - t0)


def bench_backend(url: str, topic: str, events: list[TokenEvent], spill_dir: str) -> dict:
    producer = open_producer(url, topic=topic, client_id=f"bench-{uuid.uuid4().hex[:6]}",
                             spill_path=f"{spill_dir}/{topic}.spill")
    # Warm-up: connection, topic metadata, the first batch.
    for ev in events[:50]:
        producer.publish(ev)
    assert producer.flush(60), producer.stats()
    idle = idle_cpu_share(producer)
    timed = events[50:]
    latencies = []
    broker0 = broker_cpu_s()
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for ev in timed:
        t = time.perf_counter()
        producer.publish(ev)
        latencies.append(time.perf_counter() - t)
    assert producer.flush(120), producer.stats()
    produce_wall = time.perf_counter() - wall0
    produce_cpu = time.process_time() - cpu0
    broker1 = broker_cpu_s()
    # publish() latency at a steady PACED_RATE (far above one replica's request completions, far
    # below saturation): what the serving thread sees. The loop above measures saturation.
    paced = []
    for ev in events[:PACED_EVENTS]:
        t = time.perf_counter()
        producer.publish(ev)
        paced.append(time.perf_counter() - t)
        time.sleep(max(0.0, 1.0 / PACED_RATE - (time.perf_counter() - t)))
    assert producer.flush(120), producer.stats()
    stats = producer.close()
    assert stats.acked + stats.replayed == stats.enqueued and stats.unaccounted == 0, stats

    consumer = open_consumer(url, group=f"bench-{uuid.uuid4().hex[:8]}", topic=topic)
    total = len(events) + PACED_EVENTS
    got, cpu0, wall0 = 0, time.process_time(), time.perf_counter()
    deadline = time.monotonic() + 120
    while got + consumer.stats().duplicates < total and time.monotonic() < deadline:
        got += len(consumer.poll(1.0))
    consume_wall, consume_cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    dups = consumer.stats().duplicates
    consumer.close()
    # The paced run re-sent the first events (same event_ids): the consumer drops them.
    assert got + dups == total and dups == PACED_EVENTS, f"consumed {got} + {dups} duplicates of {total}"
    got += dups
    n = len(timed)
    return {
        "events": n,
        "produce_events_per_s": n / produce_wall,
        "publish_p50_us": float(np.percentile(latencies, 50) * 1e6),
        "publish_p99_us": float(np.percentile(latencies, 99) * 1e6),
        "paced_events_per_s": PACED_RATE,
        "paced_publish_p50_us": float(np.percentile(paced, 50) * 1e6),
        "paced_publish_p99_us": float(np.percentile(paced, 99) * 1e6),
        "producer_cpu_us_per_event": produce_cpu / n * 1e6,
        "broker_cpu_us_per_event": (broker1 - broker0) / n * 1e6 if broker0 is not None and broker1 is not None else None,
        "producer_idle_cpu_share": idle,
        "consume_events_per_s": got / consume_wall,
        "consumer_cpu_us_per_event": consume_cpu / got * 1e6,
    }


def overhead(result: dict, tokens: int, ms_per_token: float) -> dict:
    per_token_ms = result["producer_cpu_us_per_event"] / 1000 / tokens
    caller_ms = result["publish_p50_us"] / 1000 / tokens
    fraction = per_token_ms / ms_per_token + result["producer_idle_cpu_share"]
    out = {"producer_cpu_ms_per_token": per_token_ms, "publish_ms_per_token_on_serving_thread": caller_ms,
           "fraction_of_decode": fraction, "meets_target": fraction < TARGET_FRACTION}
    if result.get("broker_cpu_us_per_event") is not None:
        out["broker_fraction_of_decode_if_colocated"] = result["broker_cpu_us_per_event"] / 1000 / tokens / ms_per_token
    return out


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    labels, produce, consume, fractions = [], [], [], []
    for backend, per_k in results["backends"].items():
        for k, r in per_k.items():
            labels.append(f"{backend}\n{k}")
            produce.append(r["produce_events_per_s"])
            consume.append(r["consume_events_per_s"])
            fractions.append(100 * r["overhead"]["fraction_of_decode"])
    x = np.arange(len(labels))
    axes[0].bar(x - 0.2, produce, 0.4, label="produce")
    axes[0].bar(x + 0.2, consume, 0.4, label="consume")
    axes[0].set(xticks=x, xticklabels=labels, ylabel="events/s", title="Throughput over loopback (128-token events)")
    axes[0].legend()
    ks = list(results["encoding"])
    axes[1].bar(ks, [results["encoding"][k]["bytes_per_token"] for k in ks], label="float16 log-probs (default)")
    axes[1].bar(ks, [results["encoding"][k]["bytes_per_token_logprobs_f32"] - results["encoding"][k]["bytes_per_token"]
                     for k in ks], bottom=[results["encoding"][k]["bytes_per_token"] for k in ks], label="+ float32", alpha=0.5)
    axes[1].set(ylabel="bytes per generated token", title="Event size")
    axes[1].legend()
    bars = axes[2].bar(x, fractions, color="tab:green")
    axes[2].bar_label(bars, labels=[f"{f:.3f}%" for f in fractions], padding=2)
    axes[2].axhline(100 * TARGET_FRACTION, color="red", linestyle="--", label="target 2%")
    axes[2].set(xticks=x, xticklabels=labels, ylabel="% of decode time per token",
                title=f"Producer overhead vs {results['decode_reference']['ms_per_token']:.1f} ms/token decode")
    axes[2].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--events", type=int, default=3000, help="events per backend and top-k width")
    ap.add_argument("--tokens", type=int, default=128, help="output tokens per event")
    ap.add_argument("--prompt", type=int, default=128, help="prompt tokens per event")
    ap.add_argument("--ks", default="8,32", help="top-k widths")
    ap.add_argument("--backends", default="kafka,file", help="kafka and/or file")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "streams-cpu"), help="output path without suffix")
    args = ap.parse_args()

    tps, ms_per_token = decode_ms_per_token()
    ks = [int(k) for k in args.ks.split(",")]
    backends = args.backends.split(",")
    bootstrap = os.environ.get("SPECTUTOR_KAFKA_BOOTSTRAP", "127.0.0.1:9092")
    results: dict = {
        "machine": machine(),
        "decode_reference": {"tokens_per_s": tps, "ms_per_token": ms_per_token,
                             "source": str(DECODE_REFERENCE.relative_to(ROOT))},
        "event": {"output_tokens": args.tokens, "prompt_tokens": args.prompt, "ks": ks},
        "target_fraction": TARGET_FRACTION, "encoding": {}, "backends": {b: {} for b in backends},
    }
    steps = [(None, k) for k in ks] + [(b, k) for b in backends for k in ks]
    with tempfile.TemporaryDirectory() as tmp, tqdm(steps, desc="streams bench") as bar:
        for backend, k in bar:
            bar.set_postfix_str(f"{backend or 'encoding'} top-{k}")
            events = events_for(k, args.events + 50, args.tokens, args.prompt)
            if backend is None:
                results["encoding"][f"k{k}"] = bench_encoding(events)
                continue
            topic = f"bench-streams-{uuid.uuid4().hex[:10]}"
            url = f"kafka://{bootstrap}" if backend == "kafka" else f"file://{tmp}/log"
            r = bench_backend(url, topic, events, tmp)
            r["overhead"] = overhead(r, args.tokens, ms_per_token)
            results["backends"][backend][f"k{k}"] = r
    worst = max(r["overhead"]["fraction_of_decode"] for per_k in results["backends"].values() for r in per_k.values())
    results["overhead_fraction_worst"] = worst
    results["meets_target"] = worst < TARGET_FRACTION
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, out.with_suffix(".png"))
    for name, enc in results["encoding"].items():
        print(f"{name}: {enc['bytes_per_token']:.1f} B/token ({enc['bytes_per_event']:.0f} B/event), "
              f"encode {enc['encode_us']:.0f} us, decode {enc['decode_us']:.0f} us")
    for backend, per_k in results["backends"].items():
        for name, r in per_k.items():
            print(f"{backend} {name}: produce {r['produce_events_per_s']:.0f} ev/s, consume {r['consume_events_per_s']:.0f} ev/s, "
                  f"publish p99 {r['publish_p99_us']:.0f} us saturated / {r['paced_publish_p99_us']:.0f} us at {PACED_RATE}/s, overhead {100 * r['overhead']['fraction_of_decode']:.3f}% of decode")
    print(f"worst overhead {100 * worst:.3f}% (target < {100 * TARGET_FRACTION:.0f}%) -> {out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
