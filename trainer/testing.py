"""Real token events from a tiny target served by the engine, for the trainer tests and smoke runs."""
from __future__ import annotations

from pathlib import Path

import torch

from drafters.draft_lm import DraftLMDrafter, draft_from_target
from moe.generate import SamplingParams
from moe.loader import load_model
from serving.engine import Engine, EngineConfig, Request
from serving.events import event_from_finished
from streams.schema import ModelRef, TokenEvent


def served_events(target_folder: Path, n: int, seed: int = 0, domain: str = "chat", prompt_len: int = 12,
                  new_tokens: int = 24, vocab: tuple[int, int] = (0, 256), pool: int | None = None) -> list[TokenEvent]:
    """n greedy requests on random prompts (token ids drawn from `vocab`), drafted by a 1-layer cut.

    With `pool`, prompts repeat: each request picks one of `pool` random prompts (templated traffic),
    so what a draft learns from some requests carries over to held-out ones.
    """
    target = load_model(str(target_folder), with_tokenizer=False, moe_backend="local").model
    drafter = DraftLMDrafter(draft_from_target(str(target_folder), 1, max_len=128), max_batch=8, max_len=128)
    engine = Engine(target, drafter, EngineConfig(max_batch=8, max_len=128, speculation=3, topk_log=8))
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(vocab[0], vocab[1], (prompt_len,), generator=g).tolist() for _ in range(pool or n)]
    for i in range(n):
        prompt = prompts[int(torch.randint(0, len(prompts), (1,), generator=g)) if pool else i]
        engine.add_request(Request(f"{domain}-{seed}-{i}", tuple(prompt), SamplingParams(max_new_tokens=new_tokens),
                                   domain=domain))
    done = sorted(engine.run_to_completion(), key=lambda f: int(f.request_id.rsplit("-", 1)[1]))
    return [event_from_finished(f, "replica-test", ModelRef("tiny", "1")) for f in done]
