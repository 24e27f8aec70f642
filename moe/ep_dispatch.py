"""A token-level expert-parallel MoE layer over torch.distributed, plain or speculative (s-MoE).

T tokens in the step, t tokens owned by this rank, R rows received, P ranks, E experts,
El = E / P experts per rank, A active experts per token, D hidden.

Every rank holds El experts (those `placement` maps to it) and the replicated router. A layer
call takes the step's full hidden states [T, D] (what every rank holds after attention's
all-reduce) and:

1. takes its own tokens: plain EP a contiguous slice (the reduce-scatter half of the all-reduce);
   speculative EP the tokens the token table predicts for this rank (a shuffled reduce-scatter);
2. runs the gate on them; experts on this rank run directly;
3. sends each token once to every remote rank hosting one of its experts (dedup), with the
   routing (local expert slot and weight per route) beside it: split sizes first (counts), then
   activations (dispatch) and routing (meta), all through `all_to_all_single`;
4. the remote rank runs its experts and returns one weighted partial sum per row (combine);
5. the owner adds the partial sums and all ranks all-gather the owned outputs, undoing the shuffle.

Wrong predictions only move more rows; outputs equal the single-process MoE block's.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor, nn

from moe.a2a_stats import A2AStats
from moe.moe_block import StackedExperts
from moe.smoe import inverse_order


class EPMoELayer(nn.Module):
    """This rank's part of one MoE layer: the router and the El experts `placement` gives it."""

    def __init__(self, block: nn.Module, placement: Tensor, rank: int, ep: int, group=None):
        super().__init__()
        if getattr(block, "shared", None) is not None:
            raise ValueError("EPMoELayer does not handle shared experts")
        self.router = block.router
        self.rank, self.ep, self.group = rank, ep, group
        placement = placement.long().cpu()
        if torch.bincount(placement, minlength=ep).tolist() != [placement.numel() // ep] * ep:
            raise ValueError(f"placement must give each of the {ep} ranks {placement.numel() // ep} experts")
        slot_of = torch.empty_like(placement)                              # [E] global id -> slot on its rank
        for r in range(ep):
            ids = (placement == r).nonzero().squeeze(1)
            slot_of[ids] = torch.arange(ids.numel())
        self.local_ids = (placement == rank).nonzero().squeeze(1)         # [El] global ids, ascending
        # Buffers, so `.to(device)` moves the routing maps with the experts.
        self.register_buffer("placement", placement, persistent=False)    # [E] expert -> rank
        self.register_buffer("slot_of", slot_of, persistent=False)
        src = block.experts
        self.experts = StackedExperts(self.local_ids.numel(), src.gate_up.shape[2], src.inner)
        with torch.no_grad():
            self.experts.gate_up = nn.Parameter(src.gate_up.data[self.local_ids].clone())
            self.experts.down = nn.Parameter(src.down.data[self.local_ids].clone())
        self.stats: A2AStats | None = None

    def owned(self, num_tokens: int, pred_rank: Tensor | None) -> tuple[Tensor, list[int], Tensor | None]:
        """(token order grouped by owner rank [T], group sizes [P], inverse order or None when unshuffled)."""
        if pred_rank is None:
            order = torch.arange(num_tokens, device=self.placement.device)
            sizes = [len(c) for c in order.tensor_split(self.ep)]
            return order, sizes, None
        order = pred_rank.long().argsort(stable=True)
        sizes = torch.bincount(pred_rank.long(), minlength=self.ep).tolist()  # host sync: split sizes
        return order, sizes, inverse_order(order)

    def _a2a(self, phase: str, x: Tensor, send: list[int], recv: list[int], real: bool = True) -> Tensor:
        """all_to_all_single of rows split by `send`, received by `recv`, recorded in stats."""
        out = x.new_empty((sum(recv), *x.shape[1:]))
        row = math.prod(x.shape[1:]) * x.element_size()
        rs = sum(send) - send[self.rank]
        rr = sum(recv) - recv[self.rank]
        if self.stats is None:
            dist.all_to_all_single(out, x.contiguous(), recv, send, group=self.group)
            return out
        rows = (rs, rr) if real else (0, 0)
        with self.stats.timed(phase, rs * row, rr * row, *rows, device=x.device):
            dist.all_to_all_single(out, x.contiguous(), recv, send, group=self.group)
        return out

    def _run_local(self, x: Tensor, slots: Tensor, weights: Tensor) -> Tensor:
        """Weighted sum over this rank's experts: rows x [N, D], slots/weights [N, A] (slot -1: not here)."""
        out = torch.zeros_like(x)
        for j in range(self.experts.gate_up.shape[0]):
            hit = slots == j                                               # [N, A]
            rows = hit.any(1).nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            w = (weights[rows] * hit[rows]).sum(1)                         # [n] at most one route per expert
            out.index_add_(0, rows, self.experts.run(j, x[rows]) * w[:, None].to(x.dtype))
        return out

    def forward(self, x: Tensor, pred_rank: Tensor | None = None) -> Tensor:
        """x [T, D] (identical on every rank) -> [T, D] on every rank. pred_rank [T]: speculative owner per token."""
        num_tokens, hidden = x.shape
        order, sizes, inverse = self.owned(num_tokens, pred_rank)
        start = sum(sizes[:self.rank])
        mine = order[start:start + sizes[self.rank]]                      # [t]
        xs = x[mine]                                                       # [t, D]
        weights, experts = self.router(xs)                                 # [t, A]
        owner = self.placement[experts]                                    # [t, A] rank hosting each route
        slots = self.slot_of[experts]                                      # [t, A] slot on that rank

        # Dedup: one row per (token, remote rank); its routes to other ranks are masked to slot -1.
        dest = torch.zeros(xs.shape[0], self.ep, dtype=torch.bool, device=x.device)
        dest.scatter_(1, owner, True)
        dest[:, self.rank] = False
        send_rank, send_tok = dest.T.nonzero(as_tuple=True)                # grouped by destination rank
        send = torch.bincount(send_rank, minlength=self.ep)
        send_sizes = send.tolist()  # host sync: all_to_all_single takes python split sizes
        on_dest = owner[send_tok] == send_rank[:, None]                    # [S, A]
        meta = torch.cat([torch.where(on_dest, slots[send_tok], -1).int(),
                          (weights[send_tok] * on_dest).view(torch.int32)], dim=1)  # [S, 2A] int32

        ones = [1] * self.ep
        recv_sizes = self._a2a("counts", send, ones, ones, real=False).tolist()  # host sync: split sizes
        recv_x = self._a2a("dispatch", xs[send_tok], send_sizes, recv_sizes)     # [R, D]
        recv_meta = self._a2a("meta", meta, send_sizes, recv_sizes, real=False)  # [R, 2A]
        a = experts.shape[1]
        recv_slots = recv_meta[:, :a].long()
        recv_w = recv_meta[:, a:].contiguous().view(torch.float32)

        own_slots = torch.where(owner == self.rank, slots, -1)
        rows = torch.cat([xs, recv_x])                                     # [t + R, D]
        partial = self._run_local(rows, torch.cat([own_slots, recv_slots]), torch.cat([weights, recv_w]))
        back = self._a2a("combine", partial[xs.shape[0]:], recv_sizes, send_sizes)  # [S, D]
        out = partial[:xs.shape[0]].index_add(0, send_tok, back)           # [t, D]

        # Deferred all-gather of the owned outputs (padded to the largest group), then unshuffle.
        width = max(sizes)
        padded = torch.zeros(width, hidden, dtype=x.dtype, device=x.device)
        padded[:out.shape[0]] = out
        gathered = [torch.empty_like(padded) for _ in range(self.ep)]
        if self.stats is None:
            dist.all_gather(gathered, padded, group=self.group)
        else:
            row = hidden * x.element_size()
            with self.stats.timed("allgather", out.shape[0] * row * (self.ep - 1),
                                  (num_tokens - out.shape[0]) * row, device=x.device):
                dist.all_gather(gathered, padded, group=self.group)
        full = torch.cat([g[:n] for g, n in zip(gathered, sizes)])         # [T, D] in owner order
        return full if inverse is None else full[inverse]
