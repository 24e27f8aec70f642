"""Sparse mixture-of-experts feed-forward blocks (Mixtral, Qwen2-MoE, OLMoE).

T tokens, E experts, A active experts per token (top-k), D hidden, I expert width.

The block is composed of a router and a set of experts. `forward_reference` loops over every
expert with per-token weights, the plainest reading of the models' definitions; `forward` only
visits the experts some token picked. Both are kept and tested equal.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe.config import ModelConfig
from moe.gating import topk_weights
from moe.layers import GatedMLP


class Router(nn.Module):
    """Softmax over expert logits (in fp32), top-k, then the checkpoint's weighting of the k routes.

    `weighting="softmax"` keeps the k probabilities (renormalised to sum to 1 when `renormalize`);
    `"none"` gives every chosen expert weight 1 (MoEfied checkpoints, see moe/moefy.py).
    """

    def __init__(self, hidden: int, num_experts: int, top_k: int, renormalize: bool, weighting: str = "softmax"):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden))
        self.top_k = top_k
        self.renormalize = renormalize
        self.weighting = weighting

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x [T, D] -> (weights [T, A] fp32, experts [T, A] int64)."""
        logits = F.linear(x.float(), self.weight.float())        # [T, E]
        return route_topk(logits, self.top_k, self.renormalize, self.weighting)


def route_topk(logits: Tensor, top_k: int, renormalize: bool, weighting: str) -> tuple[Tensor, Tensor]:
    """logits [T, E] -> (weights [T, A], experts [T, A]) as a checkpoint of this kind routes."""
    return topk_weights(logits.softmax(dim=-1), top_k, normalize_topk=renormalize and weighting == "softmax",
                        weighting=weighting)


class StackedExperts(nn.Module):
    """E SwiGLU experts whose weights are stacked, so one expert is an index, not a module."""

    def __init__(self, num_experts: int, hidden: int, inner: int):
        super().__init__()
        self.inner = inner
        self.gate_up = nn.Parameter(torch.empty(num_experts, 2 * inner, hidden))  # [E, 2I, D]
        self.down = nn.Parameter(torch.empty(num_experts, hidden, inner))         # [E, D, I]

    def run(self, e: int, x: Tensor) -> Tensor:
        """Expert e on tokens x [t, D] -> [t, D]."""
        gate, up = F.linear(x, self.gate_up[e]).split(self.inner, dim=-1)
        return F.linear(F.silu(gate) * up, self.down[e])


class MoEBlock(nn.Module):
    """Router + experts (+ Qwen2-MoE's sigmoid-gated shared expert)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.router = Router(cfg.hidden_size, cfg.num_experts, cfg.top_k, cfg.norm_topk_prob,
                             cfg.router_weighting)
        self.experts = StackedExperts(cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size)
        self.shared = None
        if cfg.shared_expert_intermediate_size:
            self.shared = GatedMLP(cfg.hidden_size, cfg.shared_expert_intermediate_size)
            self.shared_gate = nn.Linear(cfg.hidden_size, 1, bias=False)

    def _shared(self, x: Tensor) -> Tensor | float:
        if self.shared is None:
            return 0.0
        return torch.sigmoid(self.shared_gate(x)) * self.shared(x)

    def forward(self, x: Tensor) -> Tensor:
        """x [B, N, D] -> [B, N, D], visiting only the experts some token selected."""
        shape = x.shape
        flat = x.reshape(-1, shape[-1])                                   # [T, D]
        weights, experts = self.router(flat)                              # [T, A]
        out = torch.zeros_like(flat)
        order = experts.flatten().argsort(stable=True)                    # routes grouped by expert
        counts = torch.bincount(experts.flatten(), minlength=self.router.weight.shape[0])
        token_of_route = order // experts.shape[1]
        route_weights = weights.flatten()[order]
        start = 0
        for e, count in enumerate(counts.tolist()):  # host sync: the loop needs the group sizes
            if count == 0:
                continue
            tokens = token_of_route[start:start + count]
            y = self.experts.run(e, flat[tokens]) * route_weights[start:start + count, None].to(flat.dtype)
            out.index_add_(0, tokens, y)
            start += count
        return (out + self._shared(flat)).reshape(shape)

    def forward_reference(self, x: Tensor) -> Tensor:
        """The slow, obvious version: every expert on every token, weighted by a dense [T, E] map."""
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        weights, experts = self.router(flat)
        dense = torch.zeros(flat.shape[0], self.router.weight.shape[0])   # [T, E]
        dense.scatter_(1, experts, weights)
        out = torch.zeros_like(flat)
        for e in range(dense.shape[1]):
            out += self.experts.run(e, flat) * dense[:, e:e + 1].to(flat.dtype)
        return (out + self._shared(flat)).reshape(shape)
