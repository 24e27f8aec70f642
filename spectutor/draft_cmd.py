"""`spectutor draft init`: train and cache the warm-start EAGLE head of a target (progress bars, minutes on a CPU)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from moe.loader import DEFAULT_MODEL


def add_parser(sub: Any) -> None:
    p = sub.add_parser("draft", help="draft heads: `draft init` trains the warm-start eagle head")
    dsub = p.add_subparsers(dest="draft_command", required=True)
    i = dsub.add_parser("init", help="train the warm-start eagle head on train-split ShareGPT + HumanEval and cache it")
    i.add_argument("--model", default=DEFAULT_MODEL, help="target model (default: %(default)s)")
    i.add_argument("--out", default=None, help="output folder (default $SPECTUTOR_HOME/drafters/eagle-<model>)")
    i.add_argument("--force", action="store_true", help="rebuild even if a cached head exists")
    i.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from drafters.eagle import is_eagle_checkpoint, warm_start_dir
    from trainer.eagle_init import build_warm_start

    out = Path(args.out) if args.out else warm_start_dir(args.model)
    if is_eagle_checkpoint(out) and not args.force:
        print(f"{out}: an eagle head is already cached (--force rebuilds it)")
        return 0
    folder = build_warm_start(args.model, out, progress=tqdm)
    meta = json.loads((folder / "eagle.json").read_text())
    print(f"{folder}  ({meta['train_tokens']} training tokens, {meta['seconds']:.0f} s)")
    for domain, row in meta["heldout_agreement_by_step"].items():
        print(f"  held-out {domain} agreement by draft step: " + " ".join(f"{a:.2f}" for a in row))
    return 0
