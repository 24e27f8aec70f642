"""Dense building blocks of the lean decoder: norms, rotary embeddings, attention, gated MLP.

B sequences, N new tokens (tree nodes) per sequence, Lk keys, D hidden, H query heads,
Hkv key/value heads, hd head dim, I MLP width.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe.config import ModelConfig


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in fp32, as the Llama family does."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        if dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)  # one fused kernel
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def rope_inv_freq(cfg: ModelConfig) -> Tensor:
    """Inverse frequencies [hd/2] including linear or llama3-style scaling."""
    hd = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
    if cfg.rope_scaling is None:
        return inv
    s = dict(cfg.rope_scaling)
    kind = s.get("rope_type", s.get("type"))
    if kind == "linear":
        return inv / float(s["factor"])
    # llama3: leave high frequencies, divide low ones by `factor`, blend in between.
    factor, low, high = float(s["factor"]), float(s["low_freq_factor"]), float(s["high_freq_factor"])
    old_ctx = float(s["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > old_ctx / low, inv / factor, inv)
    smooth = (old_ctx / wavelen - low) / (high - low)
    mid = (1 - smooth) * scaled / factor + smooth * scaled
    is_mid = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
    return torch.where(is_mid, mid, scaled)


class Rotary(nn.Module):
    """cos/sin tables for every position up to `max_len`, looked up by position."""

    def __init__(self, cfg: ModelConfig, max_len: int):
        super().__init__()
        freqs = torch.outer(torch.arange(max_len, dtype=torch.float32), rope_inv_freq(cfg))  # [T, hd/2]
        emb = torch.cat([freqs, freqs], dim=-1)                                               # [T, hd]
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def forward(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        # [B, 1, N, hd] each, broadcast over heads
        return self.cos[positions][:, None].to(dtype), self.sin[positions][:, None].to(dtype)


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    return x * cos + _rotate_half(x) * sin


class Attention(nn.Module):
    """Grouped-query attention whose keys/values live in a shared `KVCache` slot per sequence."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.h, self.hkv, self.hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q, kv = self.h * self.hd, self.hkv * self.hd
        # q, k and v share one matmul: fewer, larger kernels on a CPU.
        self.qkv = nn.Linear(cfg.hidden_size, q + 2 * kv, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(q, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(q, cfg.rms_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(kv, cfg.rms_eps) if cfg.qk_norm else None
        self.clip = cfg.clip_qkv

    def _qkv(self, x: Tensor) -> Tensor:
        """x [..., D] -> [..., (H + 2 Hkv) * hd], clipped and q/k-normed as the model asks."""
        qkv = self.qkv(x)
        if self.clip is not None:
            qkv = qkv.clamp(-self.clip, self.clip)
        if self.q_norm is not None:
            q, k, v = qkv.split([self.h * self.hd, self.hkv * self.hd, self.hkv * self.hd], dim=-1)
            qkv = torch.cat([self.q_norm(q), self.k_norm(k), v], dim=-1)
        return qkv

    def project(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x [B, N, D] -> rotated q [B, H, N, hd], rotated k and v [B, Hkv, N, hd] (clip, qk-norm applied)."""
        b, n, _ = x.shape
        qkv = self._qkv(x).view(b, n, self.h + 2 * self.hkv, self.hd).transpose(1, 2)   # [B, H+2Hkv, N, hd]
        # Rotate q and k heads together: half the elementwise kernels of rotating them apart.
        qk = apply_rope(qkv[:, : self.h + self.hkv], cos, sin)
        q, k = qk.split([self.h, self.hkv], dim=1)              # [B, H, N, hd], [B, Hkv, N, hd]
        return q, k, qkv[:, self.h + self.hkv:]

    def forward(self, x: Tensor, layout: StepLayout, k_cache: Tensor, v_cache: Tensor) -> Tensor:
        """x [B, N, D]; k_cache/v_cache [S, Hkv, T, hd] of this layer."""
        b, n, _ = x.shape
        q, k, v = self.project(x, layout.cos, layout.sin)

        lk = layout.num_keys
        if layout.single is not None:
            # One sequence: write and read its slot through views, no gather copies.
            s, start = layout.single
            k_cache[s, :, start:start + n] = k[0]
            v_cache[s, :, start:start + n] = v[0]
            keys, values = k_cache[s:s + 1, :, :lk], v_cache[s:s + 1, :, :lk]
            out = grouped_attention(q, keys, values, layout.mask)        # [B, H, N, hd]
        else:
            slots, pos = layout.slots, layout.write_pos
            k_cache[slots[:, None], :, pos] = k.transpose(1, 2)   # [B, N, Hkv, hd]
            v_cache[slots[:, None], :, pos] = v.transpose(1, 2)
            out = attend(q, k_cache, v_cache, layout.read)               # [B, H, N, hd]
        return self.o_proj(out.transpose(1, 2).reshape(b, n, self.h * self.hd))

    def forward_packed(self, x: Tensor, p: "PackedLayout", k_cache: Tensor, v_cache: Tensor) -> Tensor:
        """x [T, D], the real nodes only -> [T, D].

        The projections run on the T real rows. Attention runs per group of sequences of one width
        (`PackedLayout.groups`): the sequences that verify no draft attend with one query each, so a
        wide tree in a batch of plain steps does not make every sequence attend with its width.
        """
        t = x.shape[0]
        qkv = self._qkv(x).view(t, self.h + 2 * self.hkv, self.hd)
        qk = apply_rope(qkv[:, : self.h + self.hkv], p.cos, p.sin)      # [T, H+Hkv, hd]
        q, k = qk.split([self.h, self.hkv], dim=1)
        k_cache[p.slots, :, p.pos] = k                                  # [T, Hkv, hd] after each slot's context
        v_cache[p.slots, :, p.pos] = qkv[:, self.h + self.hkv:]
        out = x.new_empty(t, self.h, self.hd)
        for g in p.groups:
            bg = g.read.slots.shape[0]
            if g.width == 1:
                qg = q[g.take][:, :, None]                              # [Bg, H, 1, hd]
            else:
                qg = q.new_zeros(bg * g.width, self.h, self.hd)
                qg[g.place] = q[g.take]
                qg = qg.view(bg, g.width, self.h, self.hd).transpose(1, 2)   # [Bg, H, n, hd]
            o = attend(qg, k_cache, v_cache, g.read)                   # [Bg, H, n, hd]
            o = o.transpose(1, 2).reshape(bg * g.width, self.h, self.hd)
            out[g.take] = o if g.width == 1 else o[g.place]
        return self.o_proj(out.view(t, self.h * self.hd))


@dataclass
class SlotRead:
    """How one attention call reads the keys of B sequences from a cache [S, Hkv, T, hd].

    When their slots fill most of a range (the usual case: the engine's sequences hold the cache's
    first slots), attention runs on that range of the cache in place, with a query row per slot
    (rows of slots not in the call have zero queries, a mask of all True, and are dropped). Else the
    keys are gathered. A gather copies every sequence's keys at every layer: at B = 16 and 300 tokens
    of context that was 30 of a 90 ms decode step on a 2-core CPU.
    """

    slots: Tensor               # [B]
    num_keys: int               # Lk
    mask: Tensor | None         # [B, 1, N, Lk], or [span, 1, N, Lk] when read in place
    lo: int | None = None       # first slot of the range read in place; None: gather
    span: int = 0
    at: Tensor | None = None    # [B] each sequence's row in the range; None when the range is the B slots in order


def slot_read(slots: Tensor, num_keys: int, mask: Tensor | None) -> SlotRead:
    """A `SlotRead` for `slots` (host-side decisions: computed once per forward, shared by every layer)."""
    ids = slots.tolist()
    lo, span = min(ids), max(ids) - min(ids) + 1
    if len(set(ids)) != len(ids) or span > len(ids) + max(2, len(ids) // 4):
        return SlotRead(slots, num_keys, mask)
    if ids == list(range(lo, lo + span)):
        return SlotRead(slots, num_keys, mask, lo, span)
    at = torch.tensor([i - lo for i in ids], device=slots.device)
    if mask is not None:
        full = torch.ones((span,) + tuple(mask.shape[1:]), dtype=torch.bool, device=mask.device)
        full[at.to(mask.device)] = mask
        mask = full
    return SlotRead(slots, num_keys, mask, lo, span, at)


def attend(q: Tensor, k_cache: Tensor, v_cache: Tensor, read: SlotRead) -> Tensor:
    """q [B, H, N, hd] -> [B, H, N, hd], attending over the keys `read` names."""
    if read.lo is None:
        keys = k_cache[:, :, : read.num_keys].index_select(0, read.slots)   # index_select: 3.5x `cache[slots]`
        values = v_cache[:, :, : read.num_keys].index_select(0, read.slots)
        return grouped_attention(q, keys, values, read.mask)
    window = slice(read.lo, read.lo + read.span)
    keys, values = k_cache[window, :, : read.num_keys], v_cache[window, :, : read.num_keys]
    if read.at is None:
        return grouped_attention(q, keys, values, read.mask)
    rows = q.new_zeros((read.span,) + tuple(q.shape[1:]))
    rows[read.at] = q
    return grouped_attention(rows, keys, values, read.mask)[read.at]


@dataclass
class PackedGroup:
    """Sequences of a packed batch that attend together, their trees padded to `width` nodes."""

    read: SlotRead              # its Bg sequences' keys (their longest context + n)
    width: int                  # n: nodes per sequence in this group's attention
    take: Tensor                # [Tg] the group's rows among the T real rows
    place: Tensor               # [Tg] where each sits in the group's [Bg * n] padded grid


@dataclass
class PackedLayout:
    """A forward over the real nodes only: T rows, their cache places and rotary tables, and the attention groups."""

    slots: Tensor               # [T] cache slot of each row
    pos: Tensor                 # [T] its cache position
    cos: Tensor                 # [T, 1, hd]
    sin: Tensor
    groups: list[PackedGroup]


@dataclass
class StepLayout:
    """Where one forward's tree nodes sit: computed once per forward, shared by every layer."""

    slots: Tensor               # [B] cache slot of each sequence
    write_pos: Tensor           # [B, N] cache position of each node (after the committed tokens)
    num_keys: int               # Lk: keys each query may look at (longest context + N)
    mask: Tensor | None         # [B, 1, N, Lk] bool, None when every query sees every key
    read: SlotRead | None       # how attention reads the B slots' keys (None when B == 1)
    cos: Tensor                 # [B, 1, N, hd] rotary tables at each node's position
    sin: Tensor
    single: tuple[int, int] | None  # (slot, first write position) when B == 1
    packed: PackedLayout | None = None  # set when the forward runs on the real nodes only (moe.model)


def grouped_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    """Softmax attention with H = G * Hkv query heads sharing each key/value head.

    q [B, H, N, hd], k/v [B, Hkv, Lk, hd] (may be strided views into the cache), mask [B, 1, N, Lk].
    Written as two batched matmuls: for the few queries of a decode step this is several times
    faster on a CPU than torch's fused attention, which is tuned for long query blocks.
    """
    b, h, n, hd = q.shape
    hkv = k.shape[1]
    q = q.reshape(b, hkv, (h // hkv) * n, hd)                           # [B, Hkv, G*N, hd]
    scores = torch.matmul(q, k.transpose(-1, -2)) * (hd ** -0.5)        # [B, Hkv, G*N, Lk]
    if mask is not None:
        scores = scores.view(b, hkv, h // hkv, n, -1).masked_fill(~mask[:, :, None], float("-inf"))
        scores = scores.view(b, hkv, (h // hkv) * n, -1)
    probs = scores.softmax(dim=-1) if scores.dtype == torch.float32 else scores.float().softmax(dim=-1).to(v.dtype)
    return torch.matmul(probs, v).view(b, h, n, hd)


class GatedMLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x)), gate and up fused in one matmul."""

    def __init__(self, hidden: int, inner: int):
        super().__init__()
        self.inner = inner
        self.gate_up = nn.Linear(hidden, 2 * inner, bias=False)
        self.down = nn.Linear(inner, hidden, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up(x).split(self.inner, dim=-1)
        return self.down(F.silu(gate) * up)
