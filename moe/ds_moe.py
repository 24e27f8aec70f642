"""MoE blocks run through DeepSpeed's MoE layer, with expert parallelism over torch.distributed.

T tokens, E experts (El = E / ep local ones), A active per token, C capacity per expert, D hidden.

DeepSpeed's `MoE` provides the expert container (each rank holds El experts), the dispatch into
an [E, C, D] buffer, the all-to-all between expert-parallel ranks and the weighted combine. Its
stock gate always renormalises the top-k weights and may drop tokens past a capacity; the models
served here need their own routing (Qwen2-MoE and OLMoE keep raw softmax weights) and must never
drop a token, so the gate is replaced by `ExactGate`, which routes exactly as the checkpoint's
architecture does and sizes the capacity to the busiest expert across the group.
"""
from __future__ import annotations

import os
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe.config import ModelConfig
from moe.layers import GatedMLP
from moe.moe_block import route_topk

os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")

from deepspeed.moe.layer import MoE  # noqa: E402  (after the accelerator choice)
from deepspeed.moe.sharded_moe import TopKGate  # noqa: E402


class ExactGate(TopKGate):
    """A DeepSpeed gate that routes like the model (softmax, top-k, its weighting), dropping nothing."""

    def __init__(self, hidden: int, num_experts: int, top_k: int, renormalize: bool, weighting: str = "softmax"):
        super().__init__(hidden, num_experts, k=top_k, drop_tokens=False, use_rts=False,
                         top2_2nd_expert_sampling=False)
        self.renormalize = renormalize
        self.weighting = weighting

    def forward(self, x: Tensor, used_token: Tensor | None = None, sparse_routes: bool = True,
                use_tutel: bool = False) -> tuple[Any, ...]:
        logits = F.linear(x.float(), self.wg.weight.float())              # [T, E]
        weights, experts = route_topk(logits, self.k, self.renormalize, self.weighting)  # [T, A]
        num_experts = logits.shape[1]
        chosen = torch.zeros_like(logits, dtype=torch.long).scatter_(1, experts, 1)  # [T, E]
        counts = chosen.sum(0)                                            # [E]
        slot_in_expert = (chosen.cumsum(0) - 1).gather(1, experts)        # [T, A]
        capacity = counts.max() if counts.numel() else torch.zeros((), dtype=torch.long)
        if self.ep_group is not None and torch.distributed.get_world_size(self.ep_group) > 1:
            # Every rank must send equal [E, C, D] chunks: agree on the busiest expert's load.
            torch.distributed.all_reduce(capacity, op=torch.distributed.ReduceOp.MAX, group=self.ep_group)
        capacity = max(int(capacity), 1)  # host sync: the buffer shape depends on it
        l_aux = logits.new_zeros(())  # no load-balancing loss at inference
        # DeepSpeed's sparse-route format: one row per route (k of them), one column per token.
        return (l_aux, capacity, num_experts, experts.t().to(torch.int32).contiguous(),
                slot_in_expert.t().to(torch.int32).contiguous(), weights.t().contiguous(), counts)


class DeepSpeedMoEBlock(nn.Module):
    """An MoE feed-forward whose experts are held and reached through `deepspeed.moe.layer.MoE`."""

    def __init__(self, cfg: ModelConfig, ep_size: int = 1):
        super().__init__()
        if cfg.num_experts % ep_size:
            raise ValueError(f"ep_size={ep_size} must divide num_experts={cfg.num_experts}")
        self.ep_size = ep_size
        expert = GatedMLP(cfg.hidden_size, cfg.moe_intermediate_size)
        self.moe = MoE(hidden_size=cfg.hidden_size, expert=expert, num_experts=cfg.num_experts, ep_size=ep_size,
                       k=cfg.top_k, drop_tokens=False, use_rts=False, top2_2nd_expert_sampling=False)
        self.moe.deepspeed_moe.gate = ExactGate(cfg.hidden_size, cfg.num_experts, cfg.top_k,
                                                  cfg.norm_topk_prob, cfg.router_weighting)
        self.shared = None
        if cfg.shared_expert_intermediate_size:
            self.shared = GatedMLP(cfg.hidden_size, cfg.shared_expert_intermediate_size)
            self.shared_gate = nn.Linear(cfg.hidden_size, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """x [B, N, D] -> [B, N, D]."""
        out = self.moe(x)[0]
        if self.shared is not None:
            out = out + torch.sigmoid(self.shared_gate(x)) * self.shared(x)
        return out


def adapt_state_dict(cfg: ModelConfig, sd: Mapping[str, Tensor], ep_size: int, ep_rank: int) -> dict[str, Tensor]:
    """Rename stacked-expert tensors to DeepSpeed's layout, keeping only this rank's experts."""
    local = cfg.num_experts // ep_size
    first = ep_rank * local
    out: dict[str, Tensor] = {}
    for key, value in sd.items():
        if key.endswith("mlp.router.weight"):
            out[key.replace("mlp.router.weight", "mlp.moe.deepspeed_moe.gate.wg.weight")] = value
        elif key.endswith("mlp.experts.gate_up") or key.endswith("mlp.experts.down"):
            prefix, kind = key.rsplit(".experts.", 1)
            for j in range(local):
                name = f"{prefix}.moe.deepspeed_moe.experts.deepspeed_experts.{j}.{kind}.weight"
                out[name] = value[first + j].clone()
        else:
            out[key] = value
    return out


def init_expert_parallel(model: nn.Module) -> None:
    """Create DeepSpeed's expert-parallel groups for every MoE block (torch.distributed must be up)."""
    import deepspeed

    deepspeed.init_distributed(dist_backend=torch.distributed.get_backend(), auto_mpi_discovery=False)
    for module in model.modules():
        if isinstance(module, MoE):
            module.set_deepspeed_parallelism()
