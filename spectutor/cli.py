"""The `spectutor` command line: one entry point, one small `main` per subcommand."""
from __future__ import annotations

import argparse
import sys
import time
from typing import Callable, Sequence

from moe.errors import ModelError

Command = Callable[[argparse.Namespace], int]


def _model_args(p: argparse.ArgumentParser) -> None:
    from moe.loader import DEFAULT_MODEL

    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"model name, Hugging Face folder, cached hub id or .gguf file (default: {DEFAULT_MODEL})")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)


def cmd_prepare(args: argparse.Namespace) -> int:
    """Convert the model once into the local cache and check that it loads."""
    from moe.loader import load_model

    start = time.perf_counter()
    loaded = load_model(args.model)
    print(f"{args.model}: ready in {loaded.folder} ({time.perf_counter() - start:.1f}s, "
          f"{loaded.config.num_layers} layers, vocab {loaded.config.vocab_size})")
    return 0


def _encode(tok, text: str, raw: bool) -> list[int]:
    if not raw and tok.chat_template:
        return list(tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                            tokenize=True, return_dict=False))
    return tok.encode(text)


def cmd_generate(args: argparse.Namespace) -> int:
    """Print a completion of --prompt from the target model alone (no speculation)."""
    from moe.generate import SamplingParams, decode_stream
    from moe.loader import load_model

    params = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                            max_new_tokens=args.max_new_tokens, seed=args.seed)
    if args.ep_size > 1:
        return _generate_expert_parallel(args, params)
    loaded = load_model(args.model, dtype=args.dtype)
    prompt = _encode(loaded.tokenizer, args.prompt, args.raw)
    out: list[int] = []
    printed = ""
    for token in decode_stream(loaded.model, prompt, params, loaded.eos_token_ids):
        out.append(token)
        text = loaded.tokenizer.decode(out, skip_special_tokens=True)
        sys.stdout.write(text[len(printed):])
        sys.stdout.flush()
        printed = text
    sys.stdout.write("\n")
    return 0


def _generate_expert_parallel(args: argparse.Namespace, params) -> int:
    from moe.expert_parallel import generate_expert_parallel
    from moe.loader import eos_token_ids, load_tokenizer, read_config, resolve_model

    folder = resolve_model(args.model)
    cfg, _ = read_config(folder)
    if not cfg.is_moe:
        raise ValueError(f"--ep-size {args.ep_size} needs an MoE model; {args.model} is dense")
    if cfg.num_experts % args.ep_size:
        raise ValueError(f"--ep-size {args.ep_size} must divide the model's {cfg.num_experts} experts")
    tok = load_tokenizer(folder)
    prompt = _encode(tok, args.prompt, args.raw)
    out = generate_expert_parallel(str(folder), prompt, params, args.ep_size, args.dtype, eos_token_ids(tok))
    print(tok.decode(out, skip_special_tokens=True))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Load the default model and answer one real ShareGPT prompt (later: the whole loop)."""
    from itertools import islice

    from moe.generate import SamplingParams, generate
    from moe.loader import load_model
    from serving.traffic import sharegpt_prompts

    start = time.perf_counter()
    loaded = load_model(args.model, dtype=args.dtype)
    load_s = time.perf_counter() - start
    prompt = next(islice((p for p in sharegpt_prompts("heldout") if len(p.text) < 300), 1))
    ids = _encode(loaded.tokenizer, prompt.text, raw=False)
    start = time.perf_counter()
    out = generate(loaded.model, ids, SamplingParams(max_new_tokens=args.max_new_tokens), loaded.eos_token_ids)
    gen_s = time.perf_counter() - start
    print(f"model {args.model} loaded in {load_s:.1f}s")
    print(f"--- ShareGPT {prompt.id} ---\n{prompt.text}\n--- answer ---")
    print(loaded.tokenizer.decode(out, skip_special_tokens=True))
    print(f"--- {len(out)} tokens in {gen_s:.1f}s ({len(out) / gen_s:.1f} tokens/s, greedy, lean decoder) ---")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spectutor", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", help="convert and cache the model so later starts are fast")
    _model_args(p)
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("generate", help="complete a prompt with the target model")
    _model_args(p)
    _sampling_args(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--raw", action="store_true", help="do not wrap the prompt in the chat template")
    p.add_argument("--ep-size", type=int, default=1,
                   help="spread an MoE model's experts over this many local processes (DeepSpeed all-to-all)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("demo", help="the main job on the local stack")
    _model_args(p)
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ModelError, ValueError) as exc:
        print(f"spectutor {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
