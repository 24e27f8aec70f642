"""`spectutor moefy`: cut a dense model into a mixture of experts and print its quality table."""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

from moe.loader import DEFAULT_MODEL, spectutor_home


def _positive(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"{value!r} must be at least 1")
    return n


def add_parser(sub: Any) -> None:
    p = sub.add_parser("moefy", help="cut a dense model's FFNs into experts and fit a router per layer")
    p.add_argument("--model", default=DEFAULT_MODEL, help="dense model to cut (default: %(default)s)")
    p.add_argument("--experts", type=_positive, default=16, help="experts per layer, E (default 16)")
    p.add_argument("--top-k", type=_positive, default=None, help="experts per token in the checkpoint (default 3E/4)")
    p.add_argument("--texts", type=_positive, default=64, help="ShareGPT training prompts to cut with (default 64)")
    p.add_argument("--eval-texts", type=_positive, default=12,
                   help="held-out ShareGPT prompts for the quality table (default 12)")
    p.add_argument("--out", default=None, help="output folder (default $SPECTUTOR_HOME/models/<model>-moe-e<E>-k<K>)")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from moe.loader import load_model
    from moe.moefy import MoefyConfig
    from moe.moefy_build import build, encode_texts, quality, sample_texts

    top_k = args.top_k or max(1, 3 * args.experts // 4)
    cfg = MoefyConfig(experts=args.experts, top_k=top_k, texts=args.texts)
    name = Path(args.model).name if args.model != DEFAULT_MODEL else "smollm2-135m"
    out = Path(args.out) if args.out else spectutor_home() / "models" / f"{name}-moe-e{cfg.experts}-k{cfg.top_k}"
    progress = lambda it: tqdm(it, desc="moefy", leave=False)  # noqa: E731
    build(args.model, out, cfg, progress=progress)
    moe, dense = load_model(str(out), moe_backend="local"), load_model(args.model)
    held = encode_texts(moe.tokenizer, sample_texts(args.eval_texts, "heldout"), cfg.tokens_per_text)
    ks = sorted({max(1, cfg.experts * q // 4) for q in (1, 2, 3, 4)})
    rows = quality(moe.model, dense.model, held, ks, progress)
    print(f"{out}  ({cfg.experts} experts, checkpoint routes top-{cfg.top_k})")
    print(f"{'k':>4} {'agreement':>10} {'ppl':>10} {'dense ppl':>10}")
    for r in rows:
        print(f"{r['k']:>4} {r['agreement']:>10.3f} {r['ppl']:>10.2f} {r['dense_ppl']:>10.2f}")
    (out / "quality.json").write_text(json.dumps({"cut": dataclasses.asdict(cfg), "rows": rows}, indent=2))
    return 0
