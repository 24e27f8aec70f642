"""Lossless verification of a draft tree against the target: pure functions over tensors.

n draft nodes, V vocabulary. The target ran one forward over the tree [root, node 0, ..., node n-1],
where the root is the sequence's last committed token; row 0 of the target's logits is the
distribution after the root and row i+1 the distribution after draft node i.

Three rules, one per kind of draft:
- greedy: accept the deepest node whose every ancestor matched the target's argmax;
- target-only recursive rejection (deterministic drafts: Token Recycling, prompt lookup, top-k
  trees): siblings are tried in order, each accepted with its share of the remaining target mass;
- recursive rejection sampling with the draft law (sampled drafts: chains, Gumbel-Top-k trees):
  accept with min(1, p/q), replace p by norm(max(0, p - q)) and, for siblings drawn without
  replacement, q by q with the rejected token removed (RSD). A chain is the one-child case.
Each rule emits the accepted draft tokens plus one token drawn from the target (correction or bonus),
so the output follows the target's law exactly.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from moe.generate import SamplingParams, probs_from_logits


@dataclass(frozen=True)
class Draft:
    """What a drafter proposes for one sequence: a token tree hanging off the last committed token."""

    tokens: Tensor   # [n] int64 draft token ids, topologically ordered
    parents: Tensor  # [n] int64 parent draft node, -1 for children of the root
    q: Tensor | None = None
    """[n+1, V] float32 draft law each node's children were drawn from (row 0: the root's, row i+1:
    node i's), after the request's temperature/top-k/top-p; None for a deterministic draft."""
    with_replacement: bool = False
    """Siblings were drawn i.i.d. from q (SpecInfer) rather than without replacement (RSD)."""

    def __post_init__(self) -> None:
        if self.tokens.shape != self.parents.shape or self.tokens.dim() != 1:
            raise ValueError(f"draft tokens {tuple(self.tokens.shape)} and parents {tuple(self.parents.shape)} must be [n]")
        if self.q is not None and self.q.shape[0] != self.tokens.shape[0] + 1:
            raise ValueError(f"draft q has {self.q.shape[0]} rows for {self.tokens.shape[0]} nodes (needs n+1)")

    @property
    def size(self) -> int:
        return self.tokens.shape[0]

    @staticmethod
    def empty() -> "Draft":
        """No speculation: the target verifies the root alone and emits one token."""
        return Draft(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))

    @staticmethod
    def chain(tokens: list[int], q: Tensor | None = None) -> "Draft":
        """A chain of draft tokens (each the child of the previous one)."""
        n = len(tokens)
        return Draft(torch.tensor(tokens, dtype=torch.long), torch.arange(n, dtype=torch.long) - 1, q)


@dataclass(frozen=True)
class Verified:
    """Outcome of one verification: which tree nodes were kept and which tokens come out."""

    path: list[int]    # target-tree indices kept in the KV cache: 0 (the root) then accepted nodes
    tokens: list[int]  # emitted tokens: the accepted draft tokens, then the correction or bonus token

    @property
    def accepted(self) -> int:
        """Draft tokens accepted (the emitted token from the target not counted)."""
        return len(self.path) - 1


def _children(parents: list[int]) -> list[list[int]]:
    """children[j] = draft nodes whose parent is target-tree node j (0 = root), in draft order."""
    kids: list[list[int]] = [[] for _ in range(len(parents) + 1)]
    for i, p in enumerate(parents):
        kids[p + 1].append(i)
    return kids


def verify_greedy(draft: Draft, logits: Tensor) -> Verified:
    """Longest root-to-node path whose tokens equal the target's argmax at their parents, plus the bonus.

    Ties between equally deep paths go to the earliest node, so the output is the target's greedy
    output whatever the tree holds.
    """
    pred = logits.argmax(-1).tolist()          # host sync: the walk below is on the host  # [n+1]
    tokens = draft.tokens.tolist()
    parents = draft.parents.tolist()
    depth = [0] * (len(tokens) + 1)            # depth of accepted target-tree nodes, -1 when rejected
    best = 0
    for i, (tok, par) in enumerate(zip(tokens, parents)):
        node, up = i + 1, par + 1
        if depth[up] >= 0 and tok == pred[up]:
            depth[node] = depth[up] + 1
            if depth[node] > depth[best]:
                best = node
        else:
            depth[node] = -1
    path = _path(parents, best)
    return Verified(path, [tokens[j - 1] for j in path[1:]] + [pred[best]])


def _path(parents: list[int], node: int) -> list[int]:
    """Target-tree indices from the root down to `node`."""
    path = []
    while node > 0:
        path.append(node)
        node = parents[node - 1] + 1
    return [0] + path[::-1]


def _normalized(x: Tensor) -> Tensor | None:
    total = x.sum()
    return x / total if float(total) > 0 else None


def verify_sampled(draft: Draft, probs: Tensor, generator: torch.Generator) -> Verified:
    """Recursive rejection sampling down the tree; `probs` [n+1, V] is the target law at every node.

    Deterministic drafts (q is None) use the target-only rule; sampled drafts use min(1, p/q) with
    the residual update, removing each rejected sibling from q unless it was drawn with replacement.
    Uniforms come from `generator` in a fixed order, so a seeded request is reproducible.
    """
    tokens = draft.tokens.tolist()
    kids = _children(draft.parents.tolist())
    node, path, out = 0, [0], []
    while True:
        p = probs[node]
        q = None if draft.q is None else draft.q[node]
        accepted = None
        for child in kids[node]:
            x = tokens[child]
            u = float(torch.rand((), generator=generator))
            if q is None:
                # Target-only: p stays normalized over the siblings not yet rejected.
                if u < float(p[x]):
                    accepted = child
                    break
                rest = _normalized(p.index_fill(0, torch.tensor([x]), 0.0))
                if rest is None:
                    break
                p = rest
            else:
                qx = float(q[x])
                if qx > 0 and u * qx < float(p[x]):  # u < p/q without dividing by a tiny q
                    accepted = child
                    break
                residual = _normalized(torch.clamp(p - q, min=0.0))
                # p == q (residual empty) cannot reject; keep p if rounding says otherwise.
                p = p if residual is None else residual
                if not draft.with_replacement:
                    rest = _normalized(q.index_fill(0, torch.tensor([x]), 0.0))
                    if rest is None:
                        break
                    q = rest
        if accepted is None:
            out.append(int(torch.multinomial(p, 1, generator=generator)))
            return Verified(path, out)
        node = accepted + 1
        path.append(node)
        out.append(tokens[accepted])


def verify(draft: Draft, logits: Tensor, params: SamplingParams, generator: torch.Generator | None) -> Verified:
    """Verify one sequence's draft from the target's raw logits [n+1, V] over [root] + draft nodes."""
    if params.greedy:
        return verify_greedy(draft, logits)
    if generator is None:
        raise ValueError("sampling verification needs a torch.Generator")
    # Sampling runs on the host with the request's CPU generator, wherever the logits were made.
    if draft.q is not None and draft.q.device.type != "cpu":
        draft = replace(draft, q=draft.q.cpu())
    return verify_sampled(draft, probs_from_logits(logits.cpu(), params), generator)
