"""The lean decoder: one forward over a batch of token trees, reading and writing a `KVCache`.

B sequences, N tree nodes per sequence, Lk keys, D hidden, V vocabulary.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from itertools import accumulate
from typing import Literal

import torch
from torch import Tensor, nn

from moe.config import ModelConfig
from moe.kv_cache import KVCache
from moe.layers import Attention, GatedMLP, PackedGroup, PackedLayout, RMSNorm, Rotary, StepLayout, slot_read
from moe.moe_block import MoEBlock
from moe.tree import TreeBatch, attention_mask

MoEBackend = Literal["local", "deepspeed"]


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, mlp: nn.Module):
        super().__init__()
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_eps)
        self.attn = Attention(cfg)
        self.post_norm = RMSNorm(cfg.hidden_size, cfg.rms_eps)
        self.mlp = mlp

    def forward(self, x: Tensor, layout: StepLayout, k_cache: Tensor, v_cache: Tensor) -> Tensor:
        """x [B, N, D], or [T, D] (the real nodes only) when `layout.packed` is set."""
        if layout.packed is None:
            x = x + self.attn(self.input_norm(x), layout, k_cache, v_cache)
            return x + self.mlp(self.post_norm(x))
        x = x + self.attn.forward_packed(self.input_norm(x), layout.packed, k_cache, v_cache)
        return x + self.mlp(self.post_norm(x)[None])[0]


def build_mlp(cfg: ModelConfig, layer: int, backend: MoEBackend, ep_size: int) -> nn.Module:
    """The feed-forward block of one layer: dense, local MoE, or DeepSpeed's MoE layer."""
    if layer not in cfg.sparse_layers:
        return GatedMLP(cfg.hidden_size, cfg.intermediate_size)
    if backend == "deepspeed":
        from moe.ds_moe import DeepSpeedMoEBlock  # imported lazily: deepspeed is slow to import

        return DeepSpeedMoEBlock(cfg, ep_size=ep_size)
    if ep_size != 1:
        raise ValueError("expert parallelism (ep_size > 1) needs moe_backend='deepspeed'")
    return MoEBlock(cfg)


class LeanDecoder(nn.Module):
    """Llama-family decoder (dense or MoE) whose forward takes token trees and a KV cache."""

    def __init__(self, cfg: ModelConfig, max_len: int | None = None, moe_backend: MoEBackend = "local",
                 ep_size: int = 1):
        super().__init__()
        self.cfg = cfg
        self.max_len = min(max_len or cfg.max_position, cfg.max_position)
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, build_mlp(cfg, i, moe_backend, ep_size)) for i in range(cfg.num_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.rotary = Rotary(cfg, self.max_len)

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    def new_cache(self, num_slots: int, max_len: int | None = None) -> KVCache:
        """A KV cache sized for this model; `max_len` defaults to the model's context."""
        c = self.cfg
        return KVCache(c.num_layers, num_slots, c.num_kv_heads, min(max_len or self.max_len, self.max_len),
                       c.head_dim, dtype=self.dtype, device=self.embed.weight.device)

    def layout(self, tree: TreeBatch, slots: list[int] | Tensor, cache: KVCache) -> StepLayout:
        """Where `tree`'s nodes sit after each slot's committed tokens: positions, mask, rotary tables."""
        return step_layout(tree, slots, cache, self.rotary, self.dtype, self.cfg.sliding_window,
                           self.embed.weight.device, packed=packs(tree))

    @torch.inference_mode()
    def forward(self, tree: TreeBatch, slots: list[int] | Tensor, cache: KVCache,
                logits_for: Literal["all", "last", "rows"] = "all", heads: list[bool] | None = None) -> Tensor:
        """Run every tree node once; returns logits [B, N, V] ("all"), [B, V] of each tree's last real
        node ("last"), or a `TreeOutput` ("rows": the real nodes' logits back to back, never padded to
        [B, N, V], which is what verification reads; in a batch of 16 with one 16-node tree the
        padded logits are 256 rows, 50 MB written for 31). With "rows", `heads[b]` False skips the LM
        head on sequence b's nodes (a prompt chunk prefilled in a decode step needs no logits).

        Node keys/values are written after each slot's committed tokens; call `cache.commit`
        with the accepted path to keep them. Nothing is committed here.
        """
        out = self._run(tree, slots, cache, logits_for, (), heads)
        return out if logits_for == "rows" else out[0]  # type: ignore[return-value]

    @torch.inference_mode()
    def forward_features(self, tree: TreeBatch, slots: list[int] | Tensor, cache: KVCache,
                         layers: tuple[int, ...], logits_for: Literal["all", "last", "rows"] = "all",
                         heads: list[bool] | None = None) -> tuple[Tensor, Tensor]:
        """`forward`, plus the hidden states leaving each of `layers` at every node: [B, N, len(layers) * D].

        This is what a feature-level drafter (EAGLE) reads; the states are taken on the way, so the
        verification forward that already runs costs nothing more than the copies. With
        logits_for="rows", one `TreeOutput` carrying both.
        """
        bad = [i for i in layers if not 0 <= i < self.cfg.num_layers]
        if bad or not layers:
            raise ValueError(f"feature layers must be within [0, {self.cfg.num_layers}), got {layers}")
        return self._run(tree, slots, cache, logits_for, layers, heads)  # type: ignore[return-value]

    def _run(self, tree: TreeBatch, slots: list[int] | Tensor, cache: KVCache, logits_for: str,
             capture: tuple[int, ...], heads: list[bool] | None = None) -> tuple[Tensor, Tensor | None] | "TreeOutput":
        """The layers over the trees. A batch whose trees differ in size runs packed: every layer but
        attention, and the LM head, see only the real nodes (one long draft in a batch of short ones
        no longer costs the whole batch its width). Padding rows of the logits are 0."""
        layout = self.layout(tree, slots, cache)
        b, n = tree.tokens.shape
        dev = self.embed.weight.device
        rows = _real_rows(tree, dev)                                      # [T] or None: nothing to pack
        x = self.embed(tree.tokens.to(dev))                               # [B, N, D]
        if rows is not None:
            x = x.reshape(b * n, -1)[rows]                                # [T, D]
            layout = replace(layout, packed=pack_layout(layout, tree, rows))
        taken: dict[int, Tensor] = {}
        for i, layer in enumerate(self.layers):
            x = layer(x, layout, cache.k[i], cache.v[i])
            if i in capture:
                taken[i] = x
        feats = torch.cat([taken[i] for i in capture], dim=-1) if capture else None  # [B, N, F] or [T, F]
        if logits_for == "rows":
            sizes = tree.num_nodes.tolist()
            if rows is None:
                x, feats = x.reshape(b * n, -1), None if feats is None else feats.reshape(b * n, -1)
                start = [i * n for i in range(b)]
            else:
                start = list(accumulate(sizes[:-1], initial=0))
            if heads is None or all(heads):
                return TreeOutput(self.lm_head(self.norm(x)).float(), feats, start, sizes, start)
            kept = [sizes[i] if heads[i] else 0 for i in range(b)]
            logit_start = [at if heads[i] else -1 for i, at in enumerate(accumulate(kept[:-1], initial=0))]
            keep = [torch.arange(start[i], start[i] + sizes[i]) for i in range(b) if heads[i]]
            x = x[torch.cat(keep).to(dev)] if keep else x[:0]
            return TreeOutput(self.lm_head(self.norm(x)).float(), feats, start, sizes, logit_start)
        if rows is not None and feats is not None:
            feats = _unpack(feats, rows, b, n)
        if logits_for == "last":
            last = torch.arange(b, device=dev) * n + (tree.num_nodes - 1).to(dev)   # [B] flat index of each last node
            if rows is not None:
                x = _unpack(x, rows, b, n).reshape(b * n, -1)
                return self.lm_head(self.norm(x[last])).float(), feats    # [B, V]
            return self.lm_head(self.norm(x.reshape(b * n, -1)[last])).float(), feats
        logits = self.lm_head(self.norm(x)).float()                       # [B, N, V] or [T, V]
        return (logits if rows is None else _unpack(logits, rows, b, n)), feats


@dataclass
class TreeOutput:
    """What a verification forward gives the engine: rows of every sequence's tree nodes, back to back."""

    logits: Tensor              # [R', V] fp32; with trees of one node each, R' = B and row b is sequence b
    feats: Tensor | None        # [R, F] the captured layers' hidden states, or None
    start: list[int]            # row of each sequence's root in `feats`
    sizes: list[int]            # its tree's nodes
    logit_start: list[int]      # row of its root in `logits`; -1 where its logits were skipped

    def logits_of(self, b: int) -> Tensor:
        """[n_b, V] logits of sequence b's nodes."""
        if self.logit_start[b] < 0:
            raise ValueError(f"sequence {b} was run without its logits")
        return self.logits[self.logit_start[b]: self.logit_start[b] + self.sizes[b]]

    def feats_of(self, b: int) -> Tensor | None:
        return None if self.feats is None else self.feats[self.start[b]: self.start[b] + self.sizes[b]]


PACK_SAVING = 1
"""Run packed whenever that skips a padding row. Measured on SmolLM2, 2 CPU cores, context 200, one
tree of k nodes beside plain steps: B = 4, k = 2: 47.3 ms packed, 48.7 padded; k = 17: 80.8 and
172.2. B = 16, k = 2: 82.7 and 112.0; k = 17: 117.1 and 544.9 (`PackedLayout`: attention per group
of one width, the cache read in place, no padded logits)."""


def packs(tree: TreeBatch) -> bool:
    """Whether a forward over `tree` runs packed (see PACK_SAVING)."""
    return tree.batch_size > 1 and tree.batch_size * tree.width - int(tree.num_nodes.sum()) >= PACK_SAVING


def _real_rows(tree: TreeBatch, device: torch.device) -> Tensor | None:
    """Flat indices b * N + i of the real nodes, or None when the forward runs padded."""
    n = tree.width
    if not packs(tree):  # host sync
        return None
    real = torch.arange(n)[None, :] < tree.num_nodes[:, None]        # [B, N]
    return real.flatten().nonzero().squeeze(1).to(device)


def attention_groups(sizes: list[int]) -> list[list[int]]:
    """Sequences (by batch index) that attend together, each group padded to its widest tree: those of
    one node apart (a plain step's one query), the others by size, a group growing while padding stays
    under half its work (draft trees of a few nodes do not attend padded to a 128-token prompt chunk)."""
    plain = [b for b, n in enumerate(sizes) if n == 1]
    groups: list[list[int]] = [plain] if plain else []
    current: list[int] = []
    for b in sorted((b for b, n in enumerate(sizes) if n > 1), key=lambda b: sizes[b]):
        if current and sizes[b] * (len(current) + 1) > 1.5 * (sum(sizes[i] for i in current) + sizes[b]) + 32:
            groups.append(current)
            current = []
        current.append(b)
    if current:
        groups.append(current)
    return [sorted(g) for g in groups]


def pack_layout(layout: StepLayout, tree: TreeBatch, rows: Tensor) -> PackedLayout:
    """The packed forward's layout: each real row's cache place and rotary tables, and the attention
    groups (`attention_groups`: the sequences verifying no draft attend with one query each)."""
    b, n = tree.tokens.shape
    flat_rows = rows.cpu()
    seq_of_row = flat_rows // n                                       # [T]
    cos = layout.cos.reshape(b * n, 1, -1)[rows]                      # [T, 1, hd]
    sin = layout.sin.reshape(b * n, 1, -1)[rows]
    sizes = tree.num_nodes
    lens = layout.write_pos[:, 0].cpu()                               # [B] committed tokens per sequence
    groups = []
    for members in attention_groups(sizes.tolist()):
        members = torch.tensor(members, dtype=torch.long)
        width = int(sizes[members].max())
        num_keys = int((lens[members] + sizes[members]).max())  # keys past a sequence's own nodes are masked
        local = torch.full((b,), -1, dtype=torch.long)
        local[members] = torch.arange(members.numel())
        in_group = local[seq_of_row] >= 0                             # [T]
        take = in_group.nonzero().squeeze(1)
        place = local[seq_of_row[take]] * width + flat_rows[take] % n
        mask = layout.mask[members.to(layout.mask.device), :, :width, :num_keys]
        dev = rows.device
        read = slot_read(layout.slots[members.to(dev)], num_keys, mask)
        groups.append(PackedGroup(read, width, take.to(dev), place.to(dev)))
    return PackedLayout(layout.slots.cpu()[seq_of_row].to(rows.device), layout.write_pos.reshape(-1)[rows],
                        cos, sin, groups)


def rows_computed(tree: TreeBatch) -> int:
    """Rows the layers compute for `tree`: the real nodes when it runs packed, else the padded batch."""
    return int(tree.num_nodes.sum()) if packs(tree) else tree.batch_size * tree.width


def _unpack(x: Tensor, rows: Tensor, b: int, n: int) -> Tensor:
    """[T, F] rows of real nodes -> [B, N, F], padding rows 0 (written once: logits rows are 196 KiB each)."""
    full = x.new_empty(b * n, x.shape[-1])
    full[rows] = x
    pad = torch.ones(b * n, dtype=torch.bool, device=x.device)
    pad[rows] = False
    full.index_fill_(0, pad.nonzero().squeeze(1), 0)  # whole rows: a broadcast boolean mask is ~10x slower
    return full.view(b, n, -1)


def step_layout(tree: TreeBatch, slots: list[int] | Tensor, cache: KVCache, rotary: Rotary, dtype: torch.dtype,
                sliding_window: int | None, device: torch.device,
                packed: bool = False) -> StepLayout:
    """The layout one forward over `tree` shares across layers (the lean decoder's and the EAGLE head's)."""
    slots = torch.as_tensor(slots, dtype=torch.long)
    b, n = tree.tokens.shape
    # `packed`: the caller runs the real nodes only (moe.model.pack_layout), so only they are written
    # (a slot near its end may sit beside a wider tree), and each attention group reads its own slots.
    cache.check_room(slots, tree.num_nodes if packed else n)
    lens = cache.lens[slots]                                          # [B]
    write_pos = lens[:, None] + torch.arange(n)                       # [B, N]
    num_keys = int(lens.max()) + n  # host sync: sizes the key window
    if b == 1 and n == 1 and sliding_window is None:
        positions, mask = write_pos, None                             # plain decode: one query sees every key
    else:
        anc = tree.ancestors()                                        # [B, N, N]
        depths = anc.sum(-1) - 1                                      # [B, N]
        positions = lens[:, None] + depths                            # [B, N]
        mask = attention_mask(anc, depths, lens, num_keys, sliding_window)
    # The tree's layout is built on the host; the model may live on an accelerator.
    cos, sin = rotary(positions.to(device), dtype)
    single = (int(slots[0]), int(lens[0])) if b == 1 else None  # host sync: view offsets
    mask = None if mask is None else mask.to(device)
    slots = slots.to(device)
    read = None if b == 1 or packed else slot_read(slots, num_keys, mask)
    return StepLayout(slots, write_pos.to(device), num_keys, mask, read, cos, sin, single)
