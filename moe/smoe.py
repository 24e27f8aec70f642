"""Speculative MoE (s-MoE, arXiv 2503.04398): profiling, expert grouping, token tables, shuffles, accounting.

T tokens, U distinct profiled tokens, V vocabulary, E experts, A active experts per token (top-k),
P expert-parallel ranks (ep), El = E / P experts per rank, D hidden.

Pure tensor logic: no I/O, no torch.distributed. The offline stage profiles routing traces into
per-token expert statistics and solves a balanced token-expert co-clustering (v5's alternating
solver: tokens to ranks given the placement, experts to ranks given the token clusters, repeat);
its outputs are an expert placement (expert -> rank) and a token table (token -> rank, confidence).
The online stage groups a step's tokens by their predicted rank (shuffle) and restores the order
afterwards (unshuffle); `moe/ep_dispatch.py` runs the layer. Wrong predictions cost traffic, never
accuracy: the gate still runs on the real activations.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


# --------------------------------------------------------------------------------------------- profiling

@dataclass(frozen=True)
class Profile:
    """Routing statistics of one MoE layer over a profiling corpus."""

    tokens: Tensor
    """[U] int64: the distinct token ids seen, ascending."""
    count: Tensor
    """[U, E] float64: how often each token was routed to each expert (every top-k expert counts)."""
    freq: Tensor
    """[U] float64: a[token], how often each token occurred."""

    @property
    def num_experts(self) -> int:
        return self.count.shape[1]

    @property
    def cp(self) -> Tensor:
        """[U, E] Cp[token, expert] = count / sum_e count, an estimate of Pr(expert | token)."""
        return self.count / self.count.sum(1, keepdim=True).clamp_min(1)


def profile_layer(token_ids: Tensor, experts: Tensor, num_experts: int) -> Profile:
    """count[token, expert], a[token] and Cp from one layer's trace: token ids [T], top-k expert ids [T, A]."""
    tokens, inverse = token_ids.long().unique(return_inverse=True)        # [U], [T]
    count = torch.zeros(tokens.numel(), num_experts, dtype=torch.float64)
    rows = inverse[:, None].expand_as(experts)                            # [T, A]
    count.index_put_((rows.reshape(-1), experts.reshape(-1).long()),
                     torch.ones(rows.numel(), dtype=torch.float64), accumulate=True)
    freq = torch.bincount(inverse, minlength=tokens.numel()).double()
    return Profile(tokens, count, freq)


def coactivation(experts: Tensor, num_experts: int) -> Tensor:
    """[E, E] how often two experts serve the same token (diagonal: each expert's load)."""
    hot = torch.zeros(experts.shape[0], num_experts)
    hot.scatter_(1, experts.long(), 1.0)                                  # [T, E] multi-hot
    return hot.T @ hot


# --------------------------------------------------------------------------------------------- grouping

@dataclass(frozen=True)
class Grouping:
    """The s-EG solution for one layer."""

    placement: Tensor
    """[E] int64: expert -> rank, exactly E / P experts per rank."""
    token_rank: Tensor
    """[U] int64: profiled token (as in `Profile.tokens`) -> its cluster's rank."""
    local_rate: float
    """Expected local activation rate on the profiling corpus (frequency-weighted)."""


def _place_experts(gain: Tensor, ep: int) -> Tensor:
    """Experts -> ranks maximising sum gain[e, rank], exactly E / P per rank (an exact assignment problem)."""
    from scipy.optimize import linear_sum_assignment

    num_experts = gain.shape[0]
    per_rank = num_experts // ep
    slots = gain.repeat_interleave(per_rank, dim=1)                       # [E, E]: rank r owns columns r*El..
    rows, cols = linear_sum_assignment(slots.numpy(), maximize=True)
    placement = torch.empty(num_experts, dtype=torch.long)
    placement[torch.as_tensor(rows)] = torch.as_tensor(cols) // per_rank
    return placement


def _assign_tokens(mass: Tensor, freq: Tensor, ep: int, slack: float) -> Tensor:
    """Tokens -> ranks maximising local mass, each rank taking at most (1 + slack) * S / P token frequency.

    mass [U, P] is the expected number of a token's activations that would be local on each rank.
    Greedy by regret (how much a token loses if it does not get its best rank), the usual
    heuristic for a capacitated assignment; frequent tokens that overflow go to their next best rank.
    """
    cap = (1 + slack) * float(freq.sum()) / ep
    ranked = mass.argsort(dim=1, descending=True)                         # [U, P]
    top = mass.gather(1, ranked[:, :2]) if ep > 1 else mass
    regret = top[:, 0] - (top[:, 1] if ep > 1 else 0)
    load = [0.0] * ep
    out = [0] * mass.shape[0]
    prefs, freqs = ranked.tolist(), freq.tolist()
    for j in regret.argsort(descending=True).tolist():  # host loop: U is small (thousands)
        f = freqs[j]
        for r in prefs[j]:
            if load[r] + f <= cap:
                break
        else:
            r = min(range(ep), key=load.__getitem__)
        out[j] = r
        load[r] += f
    return torch.tensor(out, dtype=torch.long)


def group_experts(profile: Profile, ep: int, rounds: int = 8, restarts: int = 4, slack: float = 0.1,
                  seed: int = 0) -> Grouping:
    """s-EG: balanced token-expert co-clustering by alternating optimisation (v5), best of `restarts`.

    Each round assigns tokens to ranks given the expert placement (balanced token load), then
    places experts given the token clusters (exactly E / P per rank). The objective is the
    expected number of local activations, sum_j a_j * sum_{k on rank(j)} Cp[j, k].
    """
    num_experts = profile.num_experts
    if num_experts % ep:
        raise ValueError(f"ep={ep} must divide the number of experts ({num_experts})")
    weighted = profile.cp * profile.freq[:, None]                         # [U, E] a_j * Cp[j, k]
    total = float(weighted.sum()) or 1.0
    gen = torch.Generator().manual_seed(seed)
    best: Grouping | None = None
    for _ in range(restarts):
        placement = torch.randperm(num_experts, generator=gen) % ep       # balanced random start
        token_rank = torch.zeros(profile.tokens.numel(), dtype=torch.long)
        for _ in range(rounds):
            onehot = torch.nn.functional.one_hot(placement, ep).double()  # [E, P]
            token_rank = _assign_tokens(weighted @ onehot, profile.freq, ep, slack)
            cluster = torch.nn.functional.one_hot(token_rank, ep).double()  # [U, P]
            new = _place_experts(weighted.T @ cluster, ep)                # gain [E, P]
            if torch.equal(new, placement):
                break
            placement = new
        local = float((weighted * (placement[None, :] == token_rank[:, None])).sum()) / total
        if best is None or local > best.local_rate:
            best = Grouping(placement, token_rank, local)
    assert best is not None
    return best


def contiguous_placement(num_experts: int, ep: int) -> Tensor:
    """[E] the plain-EP placement: rank r holds experts r*El .. (r+1)*El - 1."""
    return torch.arange(num_experts) // (num_experts // ep)


# --------------------------------------------------------------------------------------------- token table

@dataclass(frozen=True)
class TokenTable:
    """T[token] -> predicted rank with confidence Tp, over the whole vocabulary."""

    rank: Tensor
    """[V] int64 predicted rank of each token id."""
    confidence: Tensor
    """[V] float32 expected share of the token's activations local on that rank (0 where unknown)."""
    seen: Tensor
    """[V] bool: whether the entry came from profiling (others were filled)."""

    def predict(self, token_ids: Tensor) -> Tensor:
        """[T] predicted rank of each token."""
        return self.rank[token_ids.long()]


def nearest_profiled(tokens: Tensor, embeddings: Tensor, chunk: int = 4096) -> Tensor:
    """[V] for every token id, the index into `tokens` [U] of the profiled token nearest by embedding cosine.

    Profiled tokens map to themselves. Every layer and ep sees the same profiled tokens, so this
    is computed once and passed to `token_table`.
    """
    unit = torch.nn.functional.normalize(embeddings.float(), dim=1)       # [V, D]
    known = unit[tokens]                                                  # [U, D]
    out = torch.empty(unit.shape[0], dtype=torch.long)
    for start in range(0, unit.shape[0], chunk):
        out[start:start + chunk] = (unit[start:start + chunk] @ known.T).argmax(dim=1)
    out[tokens] = torch.arange(tokens.numel())
    return out


def token_table(profile: Profile, grouping: Grouping, vocab_size: int, ep: int,
                neighbours: Tensor | None = None, balanced: bool = True) -> TokenTable:
    """Build T and Tp from a grouping; tokens never profiled copy their nearest profiled neighbour.

    `balanced` keeps the solver's token clusters (token load balanced across ranks); False sends
    each token to the rank holding most of its expected activations (highest LAR, uneven load).
    `neighbours` [V] is `nearest_profiled(profile.tokens, embeddings)`. Without it the fallback
    for unseen tokens is `token_id % P` (a hash: spreads load, predicts at chance).
    """
    mass = profile.cp @ torch.nn.functional.one_hot(grouping.placement, ep).double()  # [U, P]
    token_rank = grouping.token_rank if balanced else mass.argmax(1)
    local = mass.gather(1, token_rank[:, None]).squeeze(1).float()        # [U] Tp
    seen = torch.zeros(vocab_size, dtype=torch.bool)
    seen[profile.tokens] = True
    if neighbours is not None and profile.tokens.numel():
        return TokenTable(token_rank[neighbours], local[neighbours], seen)
    rank = torch.arange(vocab_size) % ep
    confidence = torch.zeros(vocab_size)
    rank[profile.tokens] = token_rank
    confidence[profile.tokens] = local
    return TokenTable(rank, confidence, seen)


# --------------------------------------------------------------------------------------------- placement

def placement_permutation(placement: Tensor) -> Tensor:
    """[E] perm such that slot i holds old expert perm[i] and rank r's experts fill slots r*El.. (stable)."""
    return placement.argsort(stable=True)


def permute_experts(router_weight: Tensor, gate_up: Tensor, down: Tensor, perm: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Reorder expert weights [E, ...] and router rows [E, D] by the same permutation (routing unchanged).

    A token's new expert id i means old expert perm[i]; softmax and top-k see the same logits in
    a different order, so weights, chosen experts (mapped back) and outputs are identical.
    """
    return router_weight[perm], gate_up[perm], down[perm]


@torch.no_grad()
def apply_placement(block: torch.nn.Module, placement: Tensor) -> Tensor:
    """Permute an MoE block's router rows and stacked experts in place so rank r owns contiguous slots; returns perm."""
    perm = placement_permutation(placement)
    w, gu, d = permute_experts(block.router.weight.data, block.experts.gate_up.data, block.experts.down.data, perm)
    block.router.weight.data = w.clone()
    block.experts.gate_up.data = gu.clone()
    block.experts.down.data = d.clone()
    return perm


# --------------------------------------------------------------------------------------------- shuffling

def shuffle_order(pred_rank: Tensor, ep: int) -> tuple[Tensor, Tensor]:
    """Order that groups tokens by predicted rank (stable) and the group sizes [P]."""
    order = pred_rank.argsort(stable=True)                                # [T]
    return order, torch.bincount(pred_rank, minlength=ep)


def inverse_order(order: Tensor) -> Tensor:
    """[T] inverse permutation: x[order][inverse_order(order)] == x."""
    inv = torch.empty_like(order)
    inv[order] = torch.arange(order.numel(), device=order.device)
    return inv


# --------------------------------------------------------------------------------------------- accounting

@dataclass(frozen=True)
class Volume:
    """Communication of one MoE layer for one step under a placement and a token -> rank ownership."""

    pairs: int
    """(token, expert) activations, T * A."""
    local_pairs: int
    """Activations whose expert lives on the token's rank."""
    remote_sends: int
    """Distinct (token, remote rank) pairs: rows sent in the dispatch (and returned in the combine)."""
    bytes: int
    """Dispatch + combine activation bytes, 2 * remote_sends * D * element size."""

    @property
    def lar(self) -> float:
        """Local activation rate."""
        return self.local_pairs / max(self.pairs, 1)

    @property
    def remote_pairs(self) -> int:
        return self.pairs - self.local_pairs


def remote_destinations(experts: Tensor, token_rank: Tensor, placement: Tensor, ep: int) -> Tensor:
    """[T, P] bool: which remote ranks each token must be sent to (one row per rank: dedup)."""
    dest = torch.zeros(experts.shape[0], ep, dtype=torch.bool)
    dest.scatter_(1, placement[experts.long()], True)                     # ranks hosting any chosen expert
    dest[torch.arange(experts.shape[0]), token_rank] = False              # the token's own rank costs nothing
    return dest


def volume(experts: Tensor, token_rank: Tensor, placement: Tensor, ep: int, hidden: int,
           element_size: int = 4) -> Volume:
    """LAR, remote sends and bytes for routing experts [T, A] when token t lives on token_rank[t]."""
    local = int((placement[experts.long()] == token_rank[:, None]).sum())
    sends = int(remote_destinations(experts, token_rank, placement, ep).sum())
    return Volume(experts.numel(), local, sends, 2 * sends * hidden * element_size)


def plain_token_rank(num_tokens: int, ep: int) -> Tensor:
    """[T] plain EP's ownership: contiguous slices, as a reduce-scatter leaves them (torch.tensor_split sizes)."""
    sizes = [len(c) for c in torch.arange(num_tokens).tensor_split(ep)]
    return torch.repeat_interleave(torch.arange(ep), torch.tensor(sizes))
