"""Plain autoregressive decoding with the lean decoder: the reference every speculative path must match.

V vocabulary.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
from torch import Tensor

from moe.errors import ContextTooLongError
from moe.model import LeanDecoder
from moe.tree import TreeBatch


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen from the target's logits."""

    temperature: float = 0.0
    """0 means greedy (argmax); otherwise logits are divided by it before sampling."""
    top_k: int = 0
    """Keep only the k most likely tokens (0 = all)."""
    top_p: float = 1.0
    """Keep the smallest set of most likely tokens whose probability reaches top_p."""
    max_new_tokens: int = 128
    seed: int | None = None
    """Seed of the request's own torch.Generator; None draws one at random."""

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def probs_from_logits(logits: Tensor, params: SamplingParams) -> Tensor:
    """[..., V] logits -> [..., V] probabilities after temperature, top-k and top-p."""
    logits = logits.float()
    # Shift the maximum to 0 before dividing, so a tiny temperature gives -inf (not inf - inf = NaN);
    # the floor keeps a temperature below float32's range from becoming 0 (0 / 0 = NaN).
    temperature = max(params.temperature, torch.finfo(torch.float32).tiny)
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / temperature
    if params.top_k:
        kth = logits.topk(min(params.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(dim=-1)
    if params.top_p < 1:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # Drop a token when the tokens strictly more likely already reach top_p.
        drop = (sorted_p.cumsum(-1) - sorted_p) >= params.top_p
        # The most likely token always stays, even when top_p rounds to 0 in float32.
        drop[..., 0] = False
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def next_token(logits: Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """One token from [V] logits."""
    if params.greedy:
        return int(logits.argmax())  # host sync: the token feeds the next step
    # Sampling runs on the host with the request's CPU generator, wherever the logits were made.
    return int(torch.multinomial(probs_from_logits(logits.cpu(), params), 1, generator=generator))


def decode_stream(model: LeanDecoder, prompt: list[int], params: SamplingParams,
                  eos_ids: set[int] | frozenset[int] = frozenset()) -> Iterator[int]:
    """Yield generated token ids one by one (prompt excluded), stopping at EOS or max_new_tokens."""
    if not prompt:
        raise ValueError("the prompt is empty")
    if len(prompt) + 1 > model.max_len:
        raise ContextTooLongError(f"prompt has {len(prompt)} tokens, the model's context is {model.max_len}")
    generator = torch.Generator()
    generator.manual_seed(params.seed if params.seed is not None else int(torch.seed()))
    total = min(len(prompt) + params.max_new_tokens, model.max_len)
    cache = model.new_cache(1, total)
    slot = cache.allocate()
    logits = model(TreeBatch.chains([prompt]), [slot], cache, logits_for="last")[0]
    cache.commit([slot], [list(range(len(prompt)))])
    for step in range(total - len(prompt)):
        token = next_token(logits, params, generator)
        yield token
        if token in eos_ids or step + 1 == total - len(prompt):
            return
        logits = model(TreeBatch.chains([[token]]), [slot], cache, logits_for="last")[0]
        cache.commit([slot], [[0]])


def generate(model: LeanDecoder, prompt: list[int], params: SamplingParams,
             eos_ids: set[int] | frozenset[int] = frozenset()) -> list[int]:
    """All generated token ids of `decode_stream`."""
    return list(decode_stream(model, prompt, params, eos_ids))
