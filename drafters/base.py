"""The one small protocol every drafter implements, and what the engine hands it.

n draft nodes, k top-k candidates, V vocabulary.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from drafters.verify import Draft, Verified
from moe.generate import SamplingParams


@dataclass(frozen=True)
class DraftRequest:
    """One running sequence the engine wants a draft for this step."""

    seq_id: int
    """Engine-wide id of the sequence, stable for its life; drafters key their per-sequence state on it."""
    history: list[int]
    """Prompt then every emitted token; the last one is the root, not yet in the target's cache. Read-only."""
    budget: int
    """At most this many draft nodes (0: propose nothing)."""
    params: SamplingParams
    generator: torch.Generator
    """The request's own generator, for drafters that sample."""
    domain: str | None = None
    """The request's traffic domain ("code", "chat", ...), for drafters kept per domain."""


@dataclass(frozen=True)
class Feedback:
    """What the target made of one sequence's draft, from the verification forward that already ran."""

    seq_id: int
    tree_tokens: Tensor  # [n+1] int64: the root then the draft nodes
    topk_ids: Tensor     # [n+1, k] int64: the target's top-k next tokens after each tree node
    verified: Verified
    features: Tensor | None = None
    """[n+1, F] the target's hidden states at `feature_layers` after each tree node; None unless asked for."""


@dataclass(frozen=True)
class Prefill:
    """What the prefill forward computed for a newly admitted sequence, for drafters that read features."""

    seq_id: int
    domain: str | None   # the request's traffic domain (per-domain drafters route on it)
    features: Tensor     # [n, F] target hidden states after n prompt tokens (never the last, the root);
    # a long prompt comes in several chunks, in order (serving.engine.EngineConfig.prefill_chunk)
    next_tokens: Tensor  # [n] int64: the token that followed each of them


@runtime_checkable
class Drafter(Protocol):
    """Proposes token trees for a batch of sequences and learns from what the target verified."""

    name: str
    """Registry name, e.g. "token-recycling"; recorded in every step record."""
    needs_topk: int
    """How many of the target's top candidates per tree node `observe` wants (0: none, saves a top-k)."""
    cost_hint: float
    """Guess of one draft node's cost relative to a one-token target forward, until it is measured."""
    feature_layers: tuple[int, ...]
    """Target layers whose hidden states `observe` and `observe_prefill` want (empty: none, the target skips them)."""

    @property
    def version(self) -> str:
        """Version of the weights or state that made the drafts; recorded in every step record."""
        ...

    def budgets(self) -> tuple[int, ...]:
        """Draft sizes the adaptive policy may choose from (0, no speculation, is always allowed too)."""
        ...

    def propose(self, requests: list[DraftRequest]) -> list[Draft]:
        """One draft per request, each with at most `request.budget` nodes."""
        ...

    def observe(self, feedback: list[Feedback]) -> None:
        """Called after verification with what the target computed at every tree node."""
        ...

    def observe_prefill(self, prefills: list[Prefill]) -> None:
        """Called after a prefill forward, only for drafters with `feature_layers`."""
        ...

    def release(self, seq_id: int) -> None:
        """The sequence finished or was aborted: forget its state."""
        ...


class NoDrafter:
    """Plain decoding through the same engine: every step verifies the root alone."""

    name = "none"
    version = "0"
    needs_topk = 0
    cost_hint = 0.0
    feature_layers = ()

    def budgets(self) -> tuple[int, ...]:
        return ()

    def propose(self, requests: list[DraftRequest]) -> list[Draft]:
        return [Draft.empty() for _ in requests]

    def observe(self, feedback: list[Feedback]) -> None:
        pass

    def observe_prefill(self, prefills: list[Prefill]) -> None:
        pass

    def release(self, seq_id: int) -> None:
        pass
