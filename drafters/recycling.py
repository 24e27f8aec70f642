"""Token Recycling: a train-free drafter that reuses the target's own top-k candidates.

V vocabulary, k candidates per token (8), n draft nodes.
Every verification forward yields the target's top-k next tokens after every tree node; they are
written into an adjacency matrix M [V, k] (row t: what followed t last time). The next draft is read
from M by walking a static tree template breadth-first from the last committed token. The matrix is
kept across requests (hot start) and can be serialized so replicas share it.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import Tensor

from drafters.base import DraftRequest, Feedback, Prefill
from drafters.verify import Draft

# The paper's default tree (version 2.2.2 of its code): 80 nodes over 6 levels, [8, 21, 25, 15, 8, 3]
# per level. A node is the tuple of candidate ranks from the root; a node with c children has
# children of ranks 0..c-1, so the number of children of each node fixes the whole tree.
_PAPER_CHILDREN: dict[tuple[int, ...], int] = {
    (): 8,
    (0,): 8, (1,): 4, (2,): 3, (3,): 2, (4,): 1, (5,): 1, (6,): 1, (7,): 1,
    (0, 0): 8, (0, 1): 3, (0, 2): 2, (0, 3): 1, (0, 4): 1, (0, 5): 1, (0, 6): 1, (0, 7): 1,
    (1, 0): 2, (1, 1): 1, (2, 0): 1, (3, 0): 1, (4, 0): 1, (5, 0): 1,
    (0, 0, 0): 5, (0, 0, 1): 2, (0, 0, 2): 1, (0, 0, 3): 1, (0, 0, 4): 1,
    (0, 1, 0): 1, (0, 2, 0): 1, (1, 0, 0): 1, (2, 0, 0): 1, (3, 0, 0): 1,
    (0, 0, 0, 0): 3, (0, 0, 0, 1): 1, (0, 0, 0, 2): 1, (0, 0, 1, 0): 1, (0, 1, 0, 0): 1, (1, 0, 0, 0): 1,
    (0, 0, 0, 0, 0): 2, (0, 0, 0, 1, 0): 1,
}

# Rough chance that the rank-r candidate is the one accepted; only orders nodes for smaller budgets.
_RANK_PRIOR = (0.55, 0.15, 0.08, 0.05, 0.04, 0.03, 0.02, 0.02)


def paper_template() -> list[tuple[int, ...]]:
    """The paper's 80 nodes in breadth-first order (level by level, ranks ascending)."""
    nodes, frontier = [], [()]
    while frontier:
        nxt = []
        for node in frontier:
            nxt += [node + (r,) for r in range(_PAPER_CHILDREN.get(node, 0))]
        nodes += nxt
        frontier = nxt
    return nodes


@dataclass(frozen=True)
class TreeLayout:
    """A template cut to a budget: per node its parent (-1: the root) and its candidate rank."""

    parents: Tensor  # [n] int64
    ranks: Tensor    # [n] int64
    levels: tuple[tuple[int, int], ...]  # (start, end) node ranges, one per depth
    order: Tensor    # [n] int64: the nodes from the most promising down (the draft's node order)
    order_parents: Tensor  # [n] int64: each of those nodes' parent, as a position in `order` (-1: the root)


def _by_promise(template: tuple[tuple[int, ...], ...]) -> list[tuple[int, ...]]:
    """The template from the most promising node down; a parent always comes before its children."""
    def score(node: tuple[int, ...]) -> float:
        s = 1.0
        for r in node:
            s *= _RANK_PRIOR[r] if r < len(_RANK_PRIOR) else _RANK_PRIOR[-1]
        return s

    return sorted(template, key=lambda t: (-score(t), len(t)))


@lru_cache(maxsize=64)
def layout_for(template: tuple[tuple[int, ...], ...], budget: int) -> TreeLayout:
    """The `budget` most promising nodes of `template` (prefix-closed), breadth-first.

    The draft lists them most promising first, so a smaller budget's draft is this one's first
    nodes (the controller scores every budget from one draft).
    """
    # A child never scores above its parent and comes after it on ties, so the best `budget` include their ancestors.
    best = _by_promise(template)[:budget]
    chosen = sorted(best, key=lambda t: (len(t), t))
    index = {node: i for i, node in enumerate(chosen)}
    parents = [index[node[:-1]] if len(node) > 1 else -1 for node in chosen]
    ranks = [node[-1] for node in chosen]
    levels, start = [], 0
    for i in range(1, len(chosen) + 1):
        if i == len(chosen) or len(chosen[i]) != len(chosen[start]):
            levels.append((start, i))
            start = i
    position = {node: i for i, node in enumerate(best)}
    return TreeLayout(torch.tensor(parents, dtype=torch.long), torch.tensor(ranks, dtype=torch.long), tuple(levels),
                      torch.tensor([index[node] for node in best], dtype=torch.long),
                      torch.tensor([position[node[:-1]] if len(node) > 1 else -1 for node in best], dtype=torch.long))


class TokenRecycling:
    """Drafts from the adjacency matrix of the target's recent top-k candidates."""

    name = "token-recycling"
    cost_hint = 0.0
    feature_layers = ()

    def __init__(self, vocab_size: int, k: int = 8, template: list[tuple[int, ...]] | None = None,
                 budgets: tuple[int, ...] = (4, 8, 16, 32, 80)):
        if k < 1 or k > len(_RANK_PRIOR):
            raise ValueError(f"k must be in [1, {len(_RANK_PRIOR)}], got {k}")
        self.k = k
        self.needs_topk = k
        self.template = tuple(t for t in (template or paper_template()) if max(t) < k)
        self._budgets = tuple(b for b in budgets if b <= len(self.template))
        # int32: 49152 x 8 x 4 B = 1.5 MiB for SmolLM2's vocabulary.
        self.matrix = torch.zeros(vocab_size, k, dtype=torch.int32)
        self.updates = 0

    @property
    def version(self) -> str:
        # The matrix changes every step; the version names the template and the rule, not the contents.
        return f"k{self.k}-n{len(self.template)}"

    def budgets(self) -> tuple[int, ...]:
        return self._budgets

    def draft_tree(self, root: int, budget: int) -> Draft:
        """The template (cut to `budget` nodes) filled breadth-first from the matrix, starting at `root`.

        Nodes come most promising first: the first b nodes are the draft at budget b.
        """
        if budget <= 0:
            return Draft.empty()
        return self._trees([root], budget)[0]

    def _trees(self, roots: list[int], budget: int) -> list[Draft]:
        """draft_tree for several roots at one budget: one gather per level for all of them."""
        layout = layout_for(self.template, budget)
        base = torch.tensor(roots, dtype=torch.long)[:, None]                 # [R, 1]
        tokens = torch.empty(len(roots), layout.parents.shape[0], dtype=torch.long)
        for start, end in layout.levels:
            par = layout.parents[start:end]
            above = torch.where(par < 0, base, tokens[:, par.clamp(min=0)])    # [R, level]
            tokens[:, start:end] = self.matrix[above, layout.ranks[start:end]].long()
        ordered = tokens[:, layout.order]
        return [Draft(row, layout.order_parents) for row in ordered]

    def propose(self, requests: list[DraftRequest]) -> list[Draft]:
        out = [Draft.empty() for _ in requests]
        by_budget: dict[int, list[int]] = {}
        for i, r in enumerate(requests):
            if r.budget > 0:
                by_budget.setdefault(min(r.budget, len(self.template)), []).append(i)
        for budget, idx in by_budget.items():
            for i, d in zip(idx, self._trees([requests[i].history[-1] for i in idx], budget)):
                out[i] = d
        return out

    def observe(self, feedback: list[Feedback]) -> None:
        """Overwrite the row of every tree token (accepted or not) with the target's top-k after it."""
        for fb in feedback:
            # Duplicate tokens in one tree: the last write wins, which the paper found marginally best.
            self.matrix[fb.tree_tokens] = fb.topk_ids[:, : self.k].to(torch.int32)
            self.updates += 1

    def observe_prefill(self, prefills: list[Prefill]) -> None:
        pass

    def release(self, seq_id: int) -> None:
        pass  # the matrix is shared by every sequence on purpose (hot start)

    def to_bytes(self) -> bytes:
        """The matrix, for sharing between replicas (Redis) or saving."""
        buf = io.BytesIO()
        torch.save({"k": self.k, "matrix": self.matrix}, buf)
        return buf.getvalue()

    def load_bytes(self, data: bytes) -> None:
        """Replace the matrix with one from `to_bytes`; the vocabulary and k must match."""
        state = torch.load(io.BytesIO(data), weights_only=True)
        if state["k"] != self.k or state["matrix"].shape != self.matrix.shape:
            raise ValueError(f"matrix {tuple(state['matrix'].shape)} does not fit {tuple(self.matrix.shape)}")
        self.matrix = state["matrix"].to(torch.int32)
