"""Choosing children in a draft tree from a draft distribution: top-k, Gumbel-Top-k, stochastic beam search.

V vocabulary, b children, W beams.
- top-k: the b most likely tokens; deterministic, verified by the target-only rule.
- Gumbel-Top-k (RSD-C): the top-b of log q + Gumbel noise, which is distributed like b draws from q
  without replacement, in draw order; verified by recursive rejection sampling with q.
- stochastic beam search (RSD-S): W whole sequences sampled without replacement, unlikely branches
  pruned early (Kool et al. 2019). Which children survive depends on the competing branches, so the
  children of a node are not a plain draw from q; these trees are verified by the target-only rule,
  which is exact for any tree chosen without looking at the target.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


def _gumbel(shape: torch.Size | tuple[int, ...], generator: torch.Generator | None) -> Tensor:
    u = torch.rand(shape, generator=generator).clamp_(1e-20, 1.0 - 1e-7)
    return -torch.log(-torch.log(u))


def gumbel_topk(logq: Tensor, k: int, generator: torch.Generator | None) -> Tensor:
    """[b] distinct token ids: b = min(k, support of q) draws from softmax(logq) without replacement, in order."""
    support = int((logq > float("-inf")).sum())  # host sync: sizes the draw
    k = min(k, support)
    return (logq.float() + _gumbel(logq.shape, generator)).topk(k).indices


def topk_children(logq: Tensor, k: int) -> Tensor:
    """[b] the k most likely ids (ties: lowest id first), restricted to the support of q."""
    support = int((logq > float("-inf")).sum())  # host sync: sizes the draw
    return logq.topk(min(k, support)).indices


@dataclass
class Beam:
    """One partial sequence in stochastic beam search."""

    node: int          # tree node index of its last token (-1: the root)
    logp: float        # log q of the sequence so far
    gumbel: float      # its perturbed log-probability, G


def beam_children(beams: list[Beam], logqs: list[Tensor], width: int,
                  generator: torch.Generator | None) -> list[tuple[int, int, Beam]]:
    """One level of stochastic beam search.

    `logqs[i]` is the draft's log-law after beam i. Returns up to `width` (beam index, token,
    child beam) triples, best perturbed value first; the caller assigns the children's node ids.
    Each beam's children get Gumbel values conditioned on their maximum being the beam's own G,
    so the top-W over all of them are W sequences sampled without replacement.
    """
    cands: list[tuple[float, int, int, float]] = []
    for i, (beam, logq) in enumerate(zip(beams, logqs)):
        # Only the top `width` children of a beam can make the cut; take a few more for the max.
        phi = beam.logp + logq.float()                                          # [V]
        g_tilde = phi + _gumbel(phi.shape, generator)
        z = float(g_tilde.max())
        top = g_tilde.topk(min(width, int((phi > float("-inf")).sum()))).indices
        for tok in top.tolist():
            gt = float(g_tilde[tok])
            # G = -log(exp(-G_parent) - exp(-Z) + exp(-G~)), written to stay finite.
            v = beam.gumbel - gt + math.log1p(-math.exp(gt - z)) if gt < z else None
            g = beam.gumbel if v is None else beam.gumbel - max(v, 0.0) - math.log1p(math.exp(-abs(v)))
            cands.append((g, i, tok, float(phi[tok])))
    cands.sort(key=lambda c: -c[0])
    return [(i, tok, Beam(-1, logp, g)) for g, i, tok, logp in cands[:width]]
