"""Prompt lookup: draft the continuation that followed the latest n-gram the last time it appeared.

L history length, n draft nodes.
The longest n-gram (max_ngram down to min_ngram) ending the history is searched for earlier in the
prompt and output. Up to `max_matches` of its most recent earlier occurrences each propose what
followed them; their continuations are merged into a prefix tree, so two matches that agree share
nodes and two that disagree become siblings. Deterministic: verified by the target-only rule.
"""
from __future__ import annotations

import numpy as np
import torch
from numpy.lib.stride_tricks import sliding_window_view

from drafters.base import DraftRequest, Feedback, Prefill
from drafters.verify import Draft


class PromptLookup:
    """N-gram drafter over the sequence's own prompt and output; no weights, no shared state."""

    name = "prompt-lookup"
    version = "0"
    needs_topk = 0
    cost_hint = 0.0
    feature_layers = ()

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1, max_matches: int = 4,
                 budgets: tuple[int, ...] = (2, 4, 8, 16)):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        self.max_ngram, self.min_ngram, self.max_matches = max_ngram, min_ngram, max_matches
        self._budgets = budgets

    def budgets(self) -> tuple[int, ...]:
        return self._budgets

    def continuations(self, history: list[int], length: int) -> list[list[int]]:
        """What followed the most recent earlier occurrences of the history's longest matching n-gram."""
        seq = np.asarray(history, dtype=np.int64)
        for n in range(min(self.max_ngram, len(seq) - 1), self.min_ngram - 1, -1):
            # Windows that start before the final n-gram and end early enough to have a follower.
            windows = sliding_window_view(seq[:-1], n)                     # [L-n, n]
            hits = np.nonzero((windows == seq[-n:]).all(axis=1))[0]
            if hits.size:
                conts = []
                for start in hits[::-1][: self.max_matches]:               # most recent first
                    cont = seq[start + n: start + n + length].tolist()
                    if cont and cont not in conts:
                        conts.append(cont)
                return conts
        return []

    def draft_for(self, history: list[int], budget: int) -> Draft:
        """A prefix tree of the continuations, cut to `budget` nodes (earlier matches first)."""
        if budget <= 0:
            return Draft.empty()
        tokens: list[int] = []
        parents: list[int] = []
        children: dict[tuple[int, int], int] = {}  # (parent node, token) -> node
        for cont in self.continuations(history, budget):
            parent = -1
            for tok in cont:
                node = children.get((parent, tok))
                if node is None:
                    if len(tokens) == budget:
                        break
                    node = len(tokens)
                    tokens.append(tok)
                    parents.append(parent)
                    children[(parent, tok)] = node
                parent = node
        if not tokens:
            return Draft.empty()
        return Draft(torch.tensor(tokens, dtype=torch.long), torch.tensor(parents, dtype=torch.long))

    def propose(self, requests: list[DraftRequest]) -> list[Draft]:
        return [self.draft_for(r.history, r.budget) for r in requests]

    def observe(self, feedback: list[Feedback]) -> None:
        pass

    def observe_prefill(self, prefills: list[Prefill]) -> None:
        pass

    def release(self, seq_id: int) -> None:
        pass
