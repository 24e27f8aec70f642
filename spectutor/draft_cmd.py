"""`spectutor draft init`: train and cache the warm-start EAGLE head of a target (progress bars, minutes on a CPU).

`spectutor draft export` / `draft import`: convert between our eagle checkpoints and EAGLE-3 folders
as vLLM's speculators and SpecForge write them (drafters/eagle3_format.py).
"""
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
    i.add_argument("--no-feature-norm", action="store_true",
                   help="EAGLE-3's exact layer (no norm per feature layer), so that `draft export` can write it")
    i.set_defaults(func=main)
    e = dsub.add_parser("export", help="write an eagle checkpoint as an EAGLE-3 folder for vLLM / SGLang")
    e.add_argument("--from", dest="src", required=True, help="our eagle checkpoint folder")
    e.add_argument("--to", dest="dst", required=True, help="output folder (config.json + model.safetensors)")
    e.add_argument("--layout", default="speculators", help="speculators (vLLM) or specforge (SGLang)")
    e.add_argument("--model", default=DEFAULT_MODEL, help="target model (default: %(default)s)")
    e.set_defaults(func=export_main)
    m = dsub.add_parser("import", help="read an EAGLE-3 folder (speculators or SpecForge) as an eagle checkpoint")
    m.add_argument("--from", dest="src", required=True, help="EAGLE-3 folder (config.json + model.safetensors)")
    m.add_argument("--to", dest="dst", required=True, help="output eagle checkpoint folder")
    m.add_argument("--model", default=DEFAULT_MODEL, help="target model (default: %(default)s)")
    m.set_defaults(func=import_main)


def main(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from drafters.eagle import is_eagle_checkpoint, warm_start_dir
    from trainer.eagle_init import InitConfig, build_warm_start

    out = Path(args.out) if args.out else warm_start_dir(args.model)
    if is_eagle_checkpoint(out) and not args.force:
        print(f"{out}: an eagle head is already cached (--force rebuilds it)")
        return 0
    folder = build_warm_start(args.model, out, InitConfig(feature_norm=not args.no_feature_norm), progress=tqdm)
    meta = json.loads((folder / "eagle.json").read_text())
    print(f"{folder}  ({meta['train_tokens']} training tokens, {meta['seconds']:.0f} s)")
    for domain, row in meta["heldout_agreement_by_step"].items():
        print(f"  held-out {domain} agreement by draft step: " + " ".join(f"{a:.2f}" for a in row))
    return 0


def _target(spec: str):
    from moe.loader import load_model

    return load_model(spec, with_tokenizer=False, kernels="default")


def export_main(args: argparse.Namespace) -> int:
    """Bad values (layout, a head EAGLE-3 cannot express) raise ValueError: one line, exit 2 (cli.main)."""
    from drafters.eagle import load_eagle
    from drafters.eagle3_format import LAYOUTS, export_eagle3

    if args.layout not in LAYOUTS:
        raise ValueError(f"--layout must be one of {', '.join(LAYOUTS)}, got {args.layout!r}")
    loaded = _target(args.model)
    target = loaded.model
    head, version = load_eagle(args.src, target.cfg, target.embed)
    try:
        archs = tuple(json.loads((Path(loaded.folder) / "config.json").read_text())["architectures"])
    except (OSError, KeyError, TypeError, ValueError):
        archs = ("LlamaForCausalLM",)
    out = export_eagle3(head, args.dst, args.layout, target_name=loaded.name, target_architectures=archs)
    print(f"{out}: eagle head {version} as an EAGLE-3 {args.layout} checkpoint")
    return 0


def import_main(args: argparse.Namespace) -> int:
    from drafters.eagle import save_eagle
    from drafters.eagle3_format import import_eagle3

    target = _target(args.model).model
    head = import_eagle3(args.src, target.cfg, target.embed)
    save_eagle(head, args.dst, "imported", {"imported_from": str(Path(args.src).resolve())})
    print(f"{args.dst}: eagle checkpoint (version imported, {head.draft_vocab} draft tokens, "
          f"feature layers {list(head.cfg.feature_layers)})")
    return 0
