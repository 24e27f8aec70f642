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
    _device_args(p, "cpu", "auto")
    _kernels_arg(p, "auto")


def _device_args(p: argparse.ArgumentParser, device: str | None, dtype: str | None) -> None:
    """--device and --dtype; their values are checked when the model loads (moe.loader.resolve_device)."""
    p.add_argument("--device", default=device, help="cpu, cuda or cuda:N" + ("" if device else "; default: the config's"))
    p.add_argument("--dtype", default=dtype, choices=["auto", "fp32", "bf16"],
                   help="weights: auto = bf16 on a GPU, fp32 on the CPU" + ("" if dtype else "; default: the config's"))


def _kernels_arg(p: argparse.ArgumentParser, default: str | None) -> None:
    from moe.kernels import KERNELS

    p.add_argument("--kernels", default=default, choices=KERNELS,
                   help="fp32 CPU kernels of the linear layers: auto (time each candidate on this machine "
                        "once, keep the fastest) or one forced" + ("" if default else "; default: the config's"))


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
    loaded = load_model(args.model, dtype=args.dtype, kernels=args.kernels, device=args.device)
    print(f"{args.model}: ready in {loaded.folder} ({time.perf_counter() - start:.1f}s, "
          f"{loaded.config.num_layers} layers, vocab {loaded.config.vocab_size}; {loaded.kernels.summary()})")
    return 0


def _encode(tok, text: str, raw: bool) -> list[int]:
    from moe.loader import encode_prompt

    return encode_prompt(tok, text, chat=not raw)


def _speculation(value: str) -> str | int:
    if value == "adaptive":
        return value
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--speculation must be 'adaptive' or a number of draft tokens, got {value!r}")
    if n < 0:
        raise argparse.ArgumentTypeError(f"--speculation must be >= 0, got {n}")
    return n


def _drafter_args(p: argparse.ArgumentParser) -> None:
    from drafters.registry import DRAFTERS

    p.add_argument("--drafter", default="hybrid", choices=DRAFTERS,
                   help="who proposes draft tokens; output is the target's either way")
    p.add_argument("--speculation", type=_speculation, default="adaptive",
                   help="'adaptive' (choose the draft size each step) or a fixed draft size, 0 = off")
    p.add_argument("--draft-layers", type=int, default=4, help="draft-lm: target layers kept in the draft")
    p.add_argument("--draft-mode", default="chain", choices=["chain", "topk", "gumbel", "beam"],
                   help="draft-lm: a chain, or a tree (top-k, Gumbel-Top-k as RSD-C, stochastic beam as RSD-S)")
    p.add_argument("--draft-checkpoint", default=None, help="draft-lm: a saved draft version instead of a cut")


def build_engine(args: argparse.Namespace, loaded, max_batch: int = 1):
    """The engine with the drafter the command line names."""
    from drafters.registry import DrafterConfig, build_drafter
    from serving.engine import Engine, EngineConfig

    cfg = EngineConfig(max_batch=max_batch, max_len=loaded.model.max_len, speculation=args.speculation)
    dcfg = DrafterConfig(args.drafter, draft_layers=args.draft_layers, draft_mode=args.draft_mode,
                         draft_checkpoint=args.draft_checkpoint, kernels=args.kernels)
    drafter = build_drafter(dcfg, args.model, loaded.config.vocab_size, max_batch, cfg.max_len, loaded.config,
                            target=loaded.model)
    return Engine(loaded.model, drafter, cfg, loaded.eos_token_ids,
                  detokenize=lambda ids: loaded.tokenizer.decode(ids, skip_special_tokens=True))


def cmd_generate(args: argparse.Namespace) -> int:
    """Print a completion of --prompt, decoded by the speculative engine with --drafter."""
    from moe.generate import SamplingParams
    from moe.loader import load_model
    from serving.engine import Request

    params = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                            max_new_tokens=args.max_new_tokens, seed=args.seed)
    if args.ep_size > 1:
        return _generate_expert_parallel(args, params)
    loaded = load_model(args.model, dtype=args.dtype, kernels=args.kernels, device=args.device)
    engine = build_engine(args, loaded)
    engine.add_request(Request("cli", tuple(_encode(loaded.tokenizer, args.prompt, args.raw)), params))
    out: list[int] = []
    printed = ""
    start = time.perf_counter()
    done = None
    while done is None:
        for o in engine.step():
            out += o.new_tokens
            done = o.finished or done
        text = loaded.tokenizer.decode(out, skip_special_tokens=True)
        sys.stdout.write(text[len(printed):])
        sys.stdout.flush()
        printed = text
    seconds = time.perf_counter() - start
    sys.stdout.write("\n")
    if args.stats:
        print(f"[{len(out)} tokens in {seconds:.2f}s, {len(out) / seconds:.1f} tokens/s; drafter {args.drafter} "
              f"{engine.drafter.version}; {len(done.steps)} target forwards, mean accepted length "
              f"{done.mean_accepted_length:.2f}; {done.accepted_tokens}/{done.draft_tokens} draft tokens accepted; "
              f"{loaded.kernels.summary()}]",
              file=sys.stderr)
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
    _drafter_args(p)
    p.add_argument("--stats", action="store_true", help="print speed and acceptance to stderr")
    p.set_defaults(func=cmd_generate)

    from spectutor.demo_cmd import add_parser as add_demo_parser

    add_demo_parser(sub)

    from spectutor.train_cmd import add_parsers

    add_parsers(sub)

    from spectutor.serve_cmd import add_parser as add_serve_parser

    add_serve_parser(sub)

    from spectutor.moefy_cmd import add_parser as add_moefy_parser

    add_moefy_parser(sub)

    from spectutor.draft_cmd import add_parser as add_draft_parser

    add_draft_parser(sub)
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
