"""A batch of token trees, one per sequence, and the attention layout they imply.

B sequences, N nodes per tree (padded), Lk keys (committed context + tree nodes).
Node i of sequence b has parent `parents[b, i]` < i, or -1 when it hangs directly off the
sequence's committed context. A chain is the tree whose parents are (-1, 0, 1, ...).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class TreeBatch:
    """Token trees for a ragged batch of sequences, validated and topologically ordered."""

    tokens: Tensor   # [B, N] int64 token ids; padding nodes hold any valid id
    parents: Tensor  # [B, N] int64, parents[b, i] in [-1, i)
    num_nodes: Tensor  # [B] int64, real nodes per tree; nodes past it are padding

    def __post_init__(self) -> None:
        if self.tokens.shape != self.parents.shape or self.tokens.dim() != 2:
            raise ValueError(f"tokens {tuple(self.tokens.shape)} and parents {tuple(self.parents.shape)} must both be [B, N]")
        n = self.tokens.shape[1]
        idx = torch.arange(n)
        if bool(((self.parents < -1) | (self.parents >= idx)).any()):  # host sync: validation only
            raise ValueError("every parent index must be -1 or smaller than its node's index")

    @property
    def batch_size(self) -> int:
        return self.tokens.shape[0]

    @property
    def width(self) -> int:
        return self.tokens.shape[1]

    @staticmethod
    def chains(token_lists: list[list[int]]) -> "TreeBatch":
        """One chain per sequence (a prompt, or a single next token), padded to the longest."""
        n = max(len(t) for t in token_lists)
        tokens = torch.zeros(len(token_lists), n, dtype=torch.long)
        for b, toks in enumerate(token_lists):
            tokens[b, : len(toks)] = torch.tensor(toks, dtype=torch.long)
        parents = (torch.arange(n) - 1).expand(len(token_lists), n).clone()
        num = torch.tensor([len(t) for t in token_lists], dtype=torch.long)
        return TreeBatch(tokens, parents, num)

    @staticmethod
    def from_lists(tokens: list[list[int]], parents: list[list[int]]) -> "TreeBatch":
        """Trees given as per-sequence lists; padded with self-contained dummy nodes."""
        n = max(len(t) for t in tokens)
        tok = torch.zeros(len(tokens), n, dtype=torch.long)
        par = torch.full((len(tokens), n), -1, dtype=torch.long)
        for b, (t, p) in enumerate(zip(tokens, parents, strict=True)):
            if len(t) != len(p):
                raise ValueError(f"sequence {b}: {len(t)} tokens but {len(p)} parents")
            tok[b, : len(t)] = torch.tensor(t, dtype=torch.long)
            par[b, : len(p)] = torch.tensor(p, dtype=torch.long)
        return TreeBatch(tok, par, torch.tensor([len(t) for t in tokens], dtype=torch.long))

    @staticmethod
    def make_dummy(batch_size: int, width: int, seed: int = 0, vocab_size: int = 100) -> "TreeBatch":
        """Random trees (tests, warm-up): each node's parent drawn uniformly from earlier nodes or -1."""
        g = torch.Generator().manual_seed(seed)
        tokens = torch.randint(vocab_size, (batch_size, width), generator=g)
        parents = torch.empty(batch_size, width, dtype=torch.long)
        for i in range(width):
            parents[:, i] = torch.randint(-1, i, (batch_size,), generator=g) if i else -1
        return TreeBatch(tokens, parents, torch.full((batch_size,), width, dtype=torch.long))

    def ancestors(self) -> Tensor:
        """[B, N, N] bool: ancestors[b, i, j] is True when j is i itself or one of its ancestors."""
        b, n = self.tokens.shape
        eye = torch.eye(n, dtype=torch.bool).expand(b, n, n)
        # One step up the tree, then square the reachability relation until it covers depth N.
        valid = self.parents >= 0
        step = torch.zeros(b, n, n, dtype=torch.bool)
        step[valid.nonzero(as_tuple=True) + (self.parents[valid],)] = True
        reach = (eye | step).to(torch.float32)
        hops = 1
        while hops < n:
            reach = ((reach @ reach) > 0).to(torch.float32)
            hops *= 2
        return reach > 0

    def depths(self, ancestors: Tensor | None = None) -> Tensor:
        """[B, N] int64: 0 for nodes hanging off the context, parent's depth + 1 otherwise."""
        anc = self.ancestors() if ancestors is None else ancestors
        return anc.sum(-1) - 1

    def path_to(self, b: int, node: int) -> list[int]:
        """Node indices from the root down to `node` (inclusive) in sequence b's tree."""
        parents = self.parents[b].tolist()  # host sync: commit needs the path on the host
        path = []
        while node >= 0:
            path.append(node)
            node = parents[node]
        return path[::-1]


def attention_mask(anc: Tensor, depths: Tensor, lens: Tensor, num_keys: int, window: int | None) -> Tensor:
    """[B, 1, N, Lk] bool mask over keys laid out as committed context then the tree.

    Sequence b's committed keys occupy positions [0, lens[b]), its tree nodes [lens[b], lens[b]+N).
    A query sees the whole committed context and its own ancestors (itself included) in the tree.
    """
    b, n, _ = anc.shape
    key = torch.arange(num_keys)                                       # [Lk]
    rel = key[None, :] - lens[:, None]                                 # [B, Lk] index into the tree
    in_ctx = rel < 0                                                   # [B, Lk]
    in_tree = (rel >= 0) & (rel < n)
    tree_idx = rel.clamp(0, n - 1)
    sees_tree = torch.gather(anc, 2, tree_idx[:, None, :].expand(b, n, num_keys))  # [B, N, Lk]
    mask = in_ctx[:, None, :] | (in_tree[:, None, :] & sees_tree)
    if window is not None:
        q_pos = lens[:, None] + depths                                 # [B, N]
        k_pos = torch.where(in_ctx, key[None, :], lens[:, None] + torch.gather(depths, 1, tree_idx))
        mask &= (q_pos[:, :, None] - k_pos[:, None, :]) < window
    return mask[:, None]
