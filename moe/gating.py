"""Gating for mixture-of-experts blocks: routers, auxiliary losses, capacity, dispatch and combine.

T tokens, E experts, A routes per token (top-k: A = k; expert choice: A = E), C capacity, D hidden.

Pure torch, no I/O. A router turns hidden states into a `Routing`; `moe_forward` runs any list of
expert callables on it, either through a plain loop over tokens and experts (the reference) or
through a sort-by-expert dispatch with one batched call per expert (the fast path). The routing
functions (`topk_routing`, `expert_choice_routing`) take logits, so a block with its own router
weights (a checkpoint's, or a dense FFN cut into experts) can use them without the modules here.

Every router reports its choices as routes `[T, A]` with a `kept` mask, so the dispatch code is
the same for token choice (a token picks k experts; some routes may be dropped over capacity) and
expert choice (each expert picks C tokens; column e of the routes is expert e, kept where picked).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Weighting = Literal["softmax", "none"]
Expert = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class Routing:
    """Where each token goes and with what weight, plus what the losses and telemetry need."""

    experts: Tensor
    """[T, A] int64: expert of each route. Expert choice: A = E and column e holds e."""
    weights: Tensor
    """[T, A] float: combine weight of each route (applied only where `kept`)."""
    kept: Tensor
    """[T, A] bool: the route is dispatched (False where dropped, or not picked by expert choice)."""
    dropped: Tensor
    """[T, A] bool: the router chose the route but the expert was over capacity (train-time drops)."""
    probs: Tensor
    """[T, E] float32+: router probabilities, softmax over experts (what the load-balancing loss reads)."""
    logits: Tensor
    """[T, E] float32+: the logits routed on, noise included for noisy top-k (what z-loss reads)."""
    counts: Tensor
    """[E] int64: tokens dispatched to each expert, after drops."""
    capacity: int | None
    """Per-expert token capacity applied, or None when nothing limited the experts."""

    @property
    def num_tokens(self) -> int:
        return self.experts.shape[0]

    @property
    def num_experts(self) -> int:
        return self.probs.shape[1]

    @property
    def num_dropped(self) -> Tensor:
        """Scalar int64: routes dropped over capacity."""
        return self.dropped.sum()

    @property
    def selected(self) -> Tensor:
        """[T, A] bool: routes the router chose, before any capacity drop."""
        return self.kept | self.dropped


def capacity(num_tokens: int, num_experts: int, top_k: int, capacity_factor: float) -> int:
    """Tokens one expert may take: ceil(capacity_factor * T * k / E), as in Switch and GShard.

    Returns an int >= 0 (0 only when there are no tokens). Rounded to 9 decimals before the
    ceiling so that a factor such as 1.1 does not add a slot through binary round-off.
    """
    if num_experts <= 0 or top_k <= 0:
        raise ValueError(f"num_experts={num_experts} and top_k={top_k} must be positive")
    if capacity_factor <= 0:
        raise ValueError(f"capacity_factor={capacity_factor} must be positive")
    if num_tokens == 0:
        return 0
    return max(1, math.ceil(round(capacity_factor * num_tokens * top_k / num_experts, 9)))


def _router_logits(x: Tensor, weight: Tensor) -> Tensor:
    """x [T, D] -> logits [T, E], computed in at least fp32 (bf16 routing flips near-ties)."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    return F.linear(x.to(dtype), weight.to(dtype))


def topk_weights(probs: Tensor, top_k: int, *, normalize_topk: bool = False,
                 weighting: Weighting = "softmax") -> tuple[Tensor, Tensor]:
    """probs [T, E] -> (weights [T, A], experts [T, A]): each token's top-k and their combine weights.

    The part of `topk_routing` a served block needs on every decode step, without the bookkeeping
    (masks, counts) that training and telemetry read.
    """
    num_experts = probs.shape[1]
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k={top_k} must be in 1..num_experts={num_experts}")
    if weighting not in ("softmax", "none"):
        raise ValueError(f"weighting={weighting!r} must be 'softmax' or 'none'")
    if weighting == "none" and normalize_topk:
        raise ValueError("normalize_topk=True has no meaning with weighting='none' (every weight is 1.0)")
    top_probs, experts = probs.topk(top_k, dim=-1)                        # [T, A]
    if weighting == "none":
        return torch.ones_like(top_probs), experts
    if normalize_topk:
        return top_probs / top_probs.sum(dim=-1, keepdim=True), experts
    return top_probs, experts


def topk_routing(logits: Tensor, top_k: int, *, normalize_topk: bool = False,
                 weighting: Weighting = "softmax", capacity_factor: float | None = None,
                 drop_tokens: bool = False) -> Routing:
    """Token-choice routing: softmax over all E experts, then each token keeps its top-k.

    `normalize_topk` rescales the k weights to sum to 1 (Mixtral; Qwen2-MoE with norm_topk_prob;
    equal to softmax over the top-k logits, as in Shazeer et al. 2017); without it the weights are
    the raw probabilities (Qwen2-MoE's norm_topk_prob=False, DeepSeek-V2). `weighting="none"`
    gives every chosen expert weight 1.0, the MoEfication convention (Zhang et al. 2022), under
    which k = E over experts that partition a dense FFN's neurons is exactly that FFN.

    Tokens are dropped only when `drop_tokens` and `capacity_factor` are both set: each expert
    then keeps at most `capacity(T, E, k, capacity_factor)` routes, first choices before second
    choices and, within one choice rank, earlier tokens first (GShard's priority). A dropped route
    contributes nothing; the block's residual connection carries the token.

    Returns a `Routing` with A = k.
    """
    num_tokens, num_experts = logits.shape
    probs = logits.softmax(dim=-1)                                        # [T, E]
    weights, experts = topk_weights(probs, top_k, normalize_topk=normalize_topk, weighting=weighting)

    cap = None
    kept = torch.ones_like(experts, dtype=torch.bool)                    # [T, A]
    if drop_tokens and capacity_factor is not None:
        cap = capacity(num_tokens, num_experts, top_k, capacity_factor)
        # Slot of each route in its expert's queue, routes ordered choice-rank-major.
        one_hot = F.one_hot(experts.t().reshape(-1), num_experts)         # [A*T, E]
        slot = (one_hot.cumsum(dim=0) - 1).gather(1, experts.t().reshape(-1, 1))  # [A*T, 1]
        kept = (slot.view(top_k, num_tokens) < cap).t()                   # [T, A]
    dropped = ~kept
    counts = torch.bincount(experts[kept], minlength=num_experts)         # [E]
    return Routing(experts=experts, weights=weights, kept=kept, dropped=dropped, probs=probs,
                   logits=logits, counts=counts, capacity=cap)


def expert_choice_routing(logits: Tensor, top_k: int, capacity_factor: float = 1.0) -> Routing:
    """Expert-choice routing (Zhou et al. 2022): each expert picks its C most probable tokens.

    Probabilities are a softmax over experts; C = capacity(T, E, top_k, capacity_factor), capped
    at T. Every expert gets exactly C tokens; a token may get anywhere from 0 to E experts, and its
    weight for each is its router probability. `top_k` is the average number of experts per token
    the capacity is sized for. Non-causal within the batch (a token's route depends on the
    others), so suited to training and prefill rather than decode.

    Returns a `Routing` with A = E: column e is expert e, kept where e picked the token.
    """
    num_tokens, num_experts = logits.shape
    probs = logits.softmax(dim=-1)                                        # [T, E]
    cap = min(capacity(num_tokens, num_experts, top_k, capacity_factor), num_tokens)
    picked = probs.t().topk(cap, dim=-1).indices                          # [E, C] token ids
    kept = torch.zeros(num_experts, num_tokens, dtype=torch.bool, device=logits.device)
    kept.scatter_(1, picked, True)
    kept = kept.t()                                                       # [T, E]
    experts = torch.arange(num_experts, device=logits.device).expand(num_tokens, num_experts)
    weights = torch.where(kept, probs, torch.zeros_like(probs))           # [T, E]
    return Routing(experts=experts, weights=weights, kept=kept, dropped=torch.zeros_like(kept),
                   probs=probs, logits=logits, counts=kept.sum(dim=0), capacity=cap)


class TopKRouter(nn.Module):
    """A linear router with top-k softmax gating; optional train-time capacity and drops."""

    def __init__(self, hidden: int, num_experts: int, top_k: int, *, normalize_topk: bool = False,
                 weighting: Weighting = "softmax", capacity_factor: float | None = None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden))     # [E, D]
        nn.init.normal_(self.weight, std=hidden ** -0.5)
        self.top_k = top_k
        self.normalize_topk = normalize_topk
        self.weighting = weighting
        self.capacity_factor = capacity_factor

    def logits(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """x [T, D] -> logits [T, E] in at least fp32."""
        return _router_logits(x, self.weight)

    def forward(self, x: Tensor, *, drop_tokens: bool | None = None,
                generator: torch.Generator | None = None) -> Routing:
        """Route x [T, D]; returns a `Routing` with A = top_k.

        `drop_tokens` defaults to `self.training`: at inference no token is ever dropped,
        whatever `capacity_factor` says.
        """
        drop = self.training if drop_tokens is None else drop_tokens
        return topk_routing(self.logits(x, generator), self.top_k, normalize_topk=self.normalize_topk,
                            weighting=self.weighting, capacity_factor=self.capacity_factor, drop_tokens=drop)


class NoisyTopKRouter(TopKRouter):
    """Noisy top-k gating (Shazeer et al. 2017, "Outrageously Large Neural Networks").

    In training mode the logits gain softplus(x W_noise) * N(0, 1) noise, a learned per-expert
    scale, before the softmax and top-k; in eval mode the router is exactly `TopKRouter`. The noise
    is drawn from the `generator` passed to `forward`, so a seeded generator repeats the routing.
    `normalize_topk` defaults to True: the paper's softmax over the kept top-k logits.
    """

    def __init__(self, hidden: int, num_experts: int, top_k: int, *, normalize_topk: bool = True,
                 weighting: Weighting = "softmax", capacity_factor: float | None = None):
        super().__init__(hidden, num_experts, top_k, normalize_topk=normalize_topk,
                         weighting=weighting, capacity_factor=capacity_factor)
        # Zero start as in the paper: every expert's noise scale begins at softplus(0) = ln 2.
        self.noise_weight = nn.Parameter(torch.zeros(num_experts, hidden))  # [E, D]

    def logits(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """x [T, D] -> logits [T, E]; noisy in training mode only."""
        clean = _router_logits(x, self.weight)
        if not self.training:
            return clean
        scale = F.softplus(_router_logits(x, self.noise_weight))         # [T, E]
        noise = torch.randn(clean.shape, generator=generator, device=clean.device, dtype=clean.dtype)
        return clean + noise * scale


class ExpertChoiceRouter(nn.Module):
    """A linear router whose experts pick tokens (Zhou et al. 2022, "Mixture-of-Experts with Expert Choice Routing")."""

    def __init__(self, hidden: int, num_experts: int, top_k: int, capacity_factor: float = 1.0):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden))     # [E, D]
        nn.init.normal_(self.weight, std=hidden ** -0.5)
        self.top_k = top_k
        self.capacity_factor = capacity_factor

    def forward(self, x: Tensor, *, drop_tokens: bool | None = None,
                generator: torch.Generator | None = None) -> Routing:
        """Route x [T, D]; returns a `Routing` with A = E.

        No route is ever "dropped": a token no expert picked simply has no kept route.
        `drop_tokens` and `generator` are accepted and ignored, so routers are interchangeable.
        """
        return expert_choice_routing(_router_logits(x, self.weight), self.top_k, self.capacity_factor)


def load_balancing_loss(routing: Routing) -> Tensor:
    """Switch / GShard load-balancing loss E * sum_e f_e * P_e (Fedus et al. 2021; Lepikhin et al. 2020).

    f_e is the fraction of the router's chosen routes that go to expert e (counted before capacity
    drops, so it measures what the router asked for; sums to 1 over experts), P_e the mean router
    probability of e over tokens. Returns a scalar: 1.0 under perfectly uniform routing, up to E
    when every token goes to one expert with certainty. Gradients flow through P_e only; multiply
    by the usual coefficient (about 0.01) in the training loss.
    """
    selected = routing.selected                                           # [T, A]
    chosen = torch.bincount(routing.experts[selected], minlength=routing.num_experts)  # [E]
    fraction = chosen.to(routing.probs.dtype) / selected.sum().clamp(min=1)
    mean_prob = routing.probs.mean(dim=0)                                  # [E]
    return routing.num_experts * (fraction * mean_prob).sum()


def router_z_loss(logits: Tensor) -> Tensor:
    """Router z-loss (Zoph et al. 2022, ST-MoE): mean over tokens of logsumexp(logits)^2.

    logits [T, E] -> scalar. Penalises large router logits, which keeps the softmax stable in low
    precision; multiply by the usual coefficient (about 1e-3) in the training loss.
    """
    return logits.logsumexp(dim=-1).square().mean()


def _check(x: Tensor, routing: Routing, experts: Sequence[Expert]) -> None:
    if len(experts) != routing.num_experts:
        raise ValueError(f"experts has {len(experts)} entries, the routing has {routing.num_experts} experts")
    if x.shape[0] != routing.num_tokens:
        raise ValueError(f"x has {x.shape[0]} tokens, the routing has {routing.num_tokens}")


def _forward_loop(x: Tensor, routing: Routing, experts: Sequence[Expert]) -> Tensor:
    """The reference: for every token, for every route it kept, add weight * expert(token)."""
    out = torch.zeros_like(x)
    for t in range(routing.num_tokens):
        for a in range(routing.experts.shape[1]):
            if not routing.kept[t, a]:
                continue
            e = int(routing.experts[t, a])
            out[t] += routing.weights[t, a].to(x.dtype) * experts[e](x[t:t + 1])[0]
    return out


def _forward_fast(x: Tensor, routing: Routing, experts: Sequence[Expert]) -> Tensor:
    """Sort the kept routes by expert, run each expert once on its tokens, scatter-add back."""
    token_of_route = torch.arange(routing.num_tokens, device=x.device)[:, None].expand_as(routing.experts)
    route_expert = routing.experts[routing.kept]                          # [R]
    route_token = token_of_route[routing.kept]                            # [R]
    route_weight = routing.weights[routing.kept].to(x.dtype)              # [R]
    order = route_expert.argsort(stable=True)                             # routes grouped by expert
    route_token, route_weight = route_token[order], route_weight[order]
    grouped = x.index_select(0, route_token)                              # [R, D]
    sizes = routing.counts.tolist()  # host sync: the per-expert split needs the group sizes
    ys = [experts[e](chunk) if size else chunk
          for e, (size, chunk) in enumerate(zip(sizes, grouped.split(sizes)))]
    y = torch.cat(ys) if ys else grouped                                  # [R, D]
    return torch.zeros_like(x).index_add_(0, route_token, y * route_weight[:, None])


def moe_forward(x: Tensor, routing: Routing, experts: Sequence[Expert],
                impl: Literal["fast", "loop"] = "fast") -> Tensor:
    """Dispatch x to the experts `routing` kept and combine their weighted outputs.

    x [T, D] (or [..., D] with T = the product of the leading dims); experts[e] maps [t, D] ->
    [t, D]. Returns [..., D]: sum over kept routes of weight * expert(x); a token with no kept route
    gets zeros (the residual connection carries it). `impl="loop"` is the slow reference over tokens
    and routes; `impl="fast"` groups routes by expert and calls each expert once (one host sync).
    """
    shape = x.shape
    flat = x.reshape(-1, shape[-1])                                       # [T, D]
    _check(flat, routing, experts)
    if impl == "fast":
        out = _forward_fast(flat, routing, experts)
    elif impl == "loop":
        out = _forward_loop(flat, routing, experts)
    else:
        raise ValueError(f"impl={impl!r} must be 'fast' or 'loop'")
    return out.reshape(shape)
