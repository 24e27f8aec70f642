"""Several deterministic drafters merged into one tree: prompt lookup first, Token Recycling filling the rest.

n draft nodes. Each part drafts a tree from the same root; the trees are merged as prefix trees
(a path two parts both propose is verified once), earlier parts first, until the budget is spent.
Prompt lookup is long and precise when the text repeats itself (code, edits); Token Recycling is
short and broad everywhere else, so together they cover both kinds of text in one verification.
"""
from __future__ import annotations

import torch

from drafters.base import Drafter, DraftRequest, Feedback, Prefill
from drafters.verify import Draft


def merge_trees(drafts: list[Draft], budget: int) -> Draft:
    """Union of deterministic trees over the same root, cut to `budget` nodes (earlier drafts win)."""
    tokens: list[int] = []
    parents: list[int] = []
    index: dict[tuple[int, int], int] = {}  # (merged parent, token) -> merged node
    for d in drafts:
        if d.q is not None:
            raise ValueError("only deterministic drafts can be merged (their q would no longer apply)")
        mapped: list[int] = []
        for tok, par in zip(d.tokens.tolist(), d.parents.tolist()):
            up = -1 if par < 0 else mapped[par]
            if up == -2:  # the parent was cut: so is this node
                mapped.append(-2)
                continue
            node = index.get((up, tok))
            if node is None:
                if len(tokens) == budget:
                    mapped.append(-2)
                    continue
                node = len(tokens)
                tokens.append(tok)
                parents.append(up)
                index[(up, tok)] = node
            mapped.append(node)
    if not tokens:
        return Draft.empty()
    return Draft(torch.tensor(tokens, dtype=torch.long), torch.tensor(parents, dtype=torch.long))


class HybridDrafter:
    """Runs every part on every request and verifies the union of their trees."""

    cost_hint = 0.0
    feature_layers = ()  # parts that read target features are not combined here

    def __init__(self, parts: list[Drafter], budgets: tuple[int, ...] = (4, 8, 12, 16, 24, 32)):
        if not parts:
            raise ValueError("a hybrid drafter needs at least one part")
        self.parts = parts
        self.name = "+".join(p.name for p in parts)
        self.needs_topk = max(p.needs_topk for p in parts)
        self._budgets = budgets

    @property
    def version(self) -> str:
        return "+".join(p.version for p in self.parts)

    def budgets(self) -> tuple[int, ...]:
        return self._budgets

    def propose(self, requests: list[DraftRequest]) -> list[Draft]:
        per_part = [p.propose(requests) for p in self.parts]
        return [merge_trees([drafts[i] for drafts in per_part], r.budget) for i, r in enumerate(requests)]

    def observe(self, feedback: list[Feedback]) -> None:
        for p in self.parts:
            p.observe(feedback)

    def observe_prefill(self, prefills: list[Prefill]) -> None:
        pass

    def release(self, seq_id: int) -> None:
        for p in self.parts:
            p.release(seq_id)
