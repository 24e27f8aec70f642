"""The warm-start EAGLE head: trained offline on the train split of ShareGPT + HumanEval, cached per target.

1. The target answers train-split prompts greedily (plain decoding, batched): the head must predict
   the target's own outputs, not human text.
2. Optionally (`exchanges`, none by default: see its note), more train-split ShareGPT exchanges (a
   first turn and the reply that followed) read teacher-forced, without generating: the labels are
   still the target's own distribution after each token, at about a fifth of an answered token's cost.
3. The draft vocabulary is the most frequent tokens of those answers (counted 4x), the prompts and the replies.
4. One teacher-forced target forward per sequence gives features and labels (trainer.eagle_train).
5. TTT training; the held-out prompts' per-step agreement is recorded with the checkpoint, with
   each phase's seconds.
Written atomically to $SPECTUTOR_HOME/drafters/eagle-<target>/ ; `spectutor draft init` runs it.
"""
from __future__ import annotations

import logging
import random
import time
from dataclasses import asdict, dataclass
from itertools import islice
from pathlib import Path
from typing import Callable, Iterable

import torch

from drafters.eagle import warm_start_dir
from moe.atomic import atomic_folder
from moe.loader import DEFAULT_MODEL, encode_prompt, load_model

log = logging.getLogger(__name__)
Progress = Callable[..., Iterable]


@dataclass(frozen=True)
class InitConfig:
    """How the warm-start head is made; every field is recorded in its checkpoint."""

    sharegpt_prompts: int = 160
    """Train-split ShareGPT first turns the target answers."""
    humaneval_prompts: int = 123
    """Train-split HumanEval problems the target completes (the split has 123)."""
    answer_tokens: int = 128
    """Tokens of each greedy answer."""
    prompt_tokens: int = 192
    """ShareGPT prompts are cut to their last this many tokens."""
    vocab_size: int = 8192
    """Rows of the draft head."""
    vocab_texts: int = 3000
    """Extra train-split ShareGPT prompts counted for the draft vocabulary (no answers needed)."""
    exchanges: int = 0
    """Train-split ShareGPT exchanges read teacher-forced (after the answered prompts' records).
    Measured on 2 cores (2026-12-07): 300 of them with 1.5 epochs instead of 3 (the same time) gave
    the same chat agreement and worse code (first step 0.42 against 0.48), so none by default."""
    reply_tokens: int = 128
    """Tokens of each exchange's reply kept."""
    prompt_weight: float = 0.3
    """Loss weight of positions inside the prompt (answers weigh 1)."""
    ttt_steps: int = 3
    epochs: float = 3.0
    lr: float = 2e-3
    batch_tokens: int = 1024
    heldout: int = 12
    """Held-out prompts per domain scored after training."""
    feature_norm: bool = True
    """A norm per feature layer before fc (ours). False is EAGLE-3's exact layer, which exports to
    vLLM/SGLang; on 2 cores it drafted worse past the first step (3rd step: 0.09 against 0.12 on code,
    0.07 against 0.12 on chat, same data and steps)."""
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("sharegpt_prompts", "answer_tokens", "vocab_size", "ttt_steps", "batch_tokens", "reply_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.epochs > 0:
            raise ValueError(f"epochs must be > 0, got {self.epochs}")


def domain_prompts(tokenizer, split: str, n_sharegpt: int, n_humaneval: int, prompt_tokens: int
                   ) -> list[tuple[str, list[int]]]:
    """(domain, prompt ids) as the benches and the demo send them: ShareGPT chat-templated, HumanEval raw."""
    from serving.traffic import humaneval_prompts, sharegpt_prompts

    out = [("sharegpt", encode_prompt(tokenizer, p.text)[-prompt_tokens:])
           for p in islice(sharegpt_prompts(split), n_sharegpt)]
    out += [("humaneval", list(tokenizer.encode(p.text))) for p in islice(humaneval_prompts(split), n_humaneval)]
    return out


def answer(target, eos: set[int], prompts: list[list[int]], new_tokens: int, progress: Progress | None = None,
           max_batch: int = 32) -> list[list[int]]:
    """The target's greedy answers, batched through the engine without speculation."""
    from drafters.base import NoDrafter
    from moe.generate import SamplingParams
    from serving.engine import Engine, EngineConfig, Request

    longest = max(len(p) for p in prompts) + new_tokens + 1
    engine = Engine(target, NoDrafter(), EngineConfig(max_batch=max_batch, max_len=longest, speculation=0,
                                                      topk_log=0, calibrate=False), eos_ids=eos)
    params = SamplingParams(max_new_tokens=new_tokens)
    for i, p in enumerate(prompts):
        engine.add_request(Request(str(i), tuple(p), params))
    out: dict[str, list[int]] = {}
    bar = progress(total=len(prompts), desc="answers") if progress else None
    while engine.has_work():
        for o in engine.step():
            if o.finished is not None:
                out[o.request_id] = list(o.finished.output_ids)
                if bar is not None:
                    bar.update(1)
    if bar is not None:
        bar.close()
    return [out[str(i)] for i in range(len(prompts))]


def build_warm_start(model: str = DEFAULT_MODEL, out: Path | None = None, cfg: InitConfig = InitConfig(),
                     progress: Progress | None = None) -> Path:
    """Make and cache the warm-start head of `model`; returns its folder."""
    from drafters.eagle import draft_vocab_from_counts, head_from_target, save_eagle
    from trainer.eagle_train import acceptance_by_step, collect, train

    out = out or warm_start_dir(model)
    t0 = time.monotonic()
    seconds: dict[str, float] = {}

    def phase(name: str) -> None:
        seconds[name] = round(time.monotonic() - t0 - sum(seconds.values()), 1)

    torch.manual_seed(cfg.seed)
    loaded = load_model(model)  # the measured kernels: the answers are decoded at batch 32
    target, tok = loaded.model, loaded.tokenizer
    train_p = domain_prompts(tok, "train", cfg.sharegpt_prompts, cfg.humaneval_prompts, cfg.prompt_tokens)
    held_p = domain_prompts(tok, "heldout", cfg.heldout, cfg.heldout, cfg.prompt_tokens)
    phase("load")
    answers = answer(target, loaded.eos_token_ids, [p for _, p in train_p + held_p], cfg.answer_tokens, progress)
    train_a, held_a = answers[: len(train_p)], answers[len(train_p):]
    phase("answers")
    from serving.traffic import sharegpt_exchanges, sharegpt_prompts

    read = [(encode_prompt(tok, p.text)[-cfg.prompt_tokens:], tok.encode(reply)[: cfg.reply_tokens])
            for p, reply in islice(sharegpt_exchanges("train"), cfg.sharegpt_prompts,
                                   cfg.sharegpt_prompts + cfg.exchanges)] if cfg.exchanges else []

    counts = torch.zeros(target.cfg.vocab_size)
    for p, a in [(p, a * 4) for (_, p), a in zip(train_p, train_a)] + read:
        counts += torch.bincount(torch.tensor(p + a, dtype=torch.long), minlength=counts.numel()).float()
    for p in islice(sharegpt_prompts("train"), cfg.sharegpt_prompts, cfg.sharegpt_prompts + cfg.vocab_texts):
        ids = tok.encode(p.text)
        counts += torch.bincount(torch.tensor(ids, dtype=torch.long), minlength=counts.numel()).float()
    vocab_ids = draft_vocab_from_counts(counts, cfg.vocab_size)
    coverage = float(counts[vocab_ids].sum() / counts.sum())

    head = head_from_target(target, vocab_ids, seed=cfg.seed, feature_norm=cfg.feature_norm)
    layers = head.cfg.feature_layers
    phase("vocabulary")

    def samples_of(prompts, answers_, desc):
        it = list(zip(prompts, answers_))
        it = progress(it, desc=desc) if progress else it
        res = []
        for (domain, p), a in it:
            w = torch.cat([torch.full((len(p),), cfg.prompt_weight), torch.ones(len(a))])
            w[-1] = 0.0  # nothing follows the last token
            res.append(collect(target, p + a, layers, vocab_ids, w, domain=domain))
        return res

    train_s = samples_of(train_p, train_a, "features")
    train_s += samples_of([("sharegpt", p) for p, _ in read], [r for _, r in read], "exchange features")
    held_s = samples_of(held_p, held_a, "held-out features")
    phase("features")
    random.Random(cfg.seed).shuffle(train_s)
    bar = progress(total=1, desc="train") if progress else None
    losses = train(head, train_s, cfg.epochs, cfg.ttt_steps, cfg.lr, cfg.batch_tokens,
                   max_tokens=cfg.prompt_tokens + cfg.answer_tokens, seed=cfg.seed,
                   progress=(lambda it: progress(it, desc="train")) if progress else None)
    if bar is not None:
        bar.close()
    phase("train")
    by_domain = {}
    for domain in ("sharegpt", "humaneval"):
        part = [s for s in held_s if s.domain == domain]
        for s in part:  # score the answers only: that is what gets drafted
            s.weights[: s.num_tokens - cfg.answer_tokens - 1] = 0.0
        by_domain[domain] = acceptance_by_step(head, part, steps=6) if part else []
    extra = {"init": asdict(cfg), "target": loaded.name, "vocab_coverage": coverage,
             "train_tokens": sum(s.num_tokens for s in train_s), "final_loss": losses[-1] if losses else None,
             "heldout_agreement_by_step": by_domain, "seconds": time.monotonic() - t0,
             "phase_seconds": seconds, "kernels": loaded.kernels.summary() if loaded.kernels else "default"}
    with atomic_folder(out) as tmp:
        save_eagle(head, tmp, version="warm-start", extra=extra)
    log.info("eagle warm start for %s: %s (%.0f s)", loaded.name, out, extra["seconds"])
    return out
