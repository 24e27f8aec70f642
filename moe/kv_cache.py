"""A preallocated key/value cache with one slot per running sequence.

L layers, S slots, Hkv key/value heads, T positions per slot, hd head dim.
Committed tokens of slot s live at positions [0, lens[s]); a forward over a token tree writes its
nodes' keys and values right after them, and `commit` moves the accepted path down into place.
"""
from __future__ import annotations

import torch
from torch import Tensor

from moe.errors import ContextTooLongError


class KVCache:
    """Keys and values for `num_slots` sequences of up to `max_len` tokens each."""

    def __init__(self, num_layers: int, num_slots: int, num_kv_heads: int, max_len: int,
                 head_dim: int, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        self.k = torch.zeros(num_layers, num_slots, num_kv_heads, max_len, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.lens = torch.zeros(num_slots, dtype=torch.long)  # host-side: drives indexing
        self.max_len = max_len
        self._free = list(range(num_slots - 1, -1, -1))

    @property
    def num_slots(self) -> int:
        return self.k.shape[1]

    def bytes_per_token(self) -> int:
        """Bytes one committed token costs in one slot (all layers, keys and values)."""
        l, _, h, _, d = self.k.shape
        return 2 * l * h * d * self.k.element_size()

    def allocate(self) -> int:
        """Take a free slot, emptied; raises RuntimeError when every slot is in use."""
        if not self._free:
            raise RuntimeError(f"all {self.num_slots} KV cache slots are in use")
        slot = self._free.pop()
        self.lens[slot] = 0
        return slot

    def release(self, slot: int) -> None:
        """Give a slot back; its contents are forgotten."""
        self.lens[slot] = 0
        if slot not in self._free:
            self._free.append(slot)

    def check_room(self, slots: Tensor, num_new: Tensor | int) -> None:
        """Raise ContextTooLongError if some slot cannot hold `num_new` more positions."""
        need = self.lens[slots] + num_new
        if bool((need > self.max_len).any()):  # host sync: lens live on the host anyway
            worst = int(need.max())
            raise ContextTooLongError(f"{worst} positions needed but a cache slot holds {self.max_len}")

    def commit(self, slots: list[int], paths: list[list[int]]) -> None:
        """Keep, for each slot, the tree nodes on `path` (root first) and drop every other node.

        Node i of the last forward sits at position lens + i; the path's nodes move to
        lens, lens + 1, ... and lens grows by the path length. Nothing else needs clearing:
        positions past lens are never read as context.
        """
        for slot, path in zip(slots, paths, strict=True):
            if not path:
                continue
            base = int(self.lens[slot])
            if path != list(range(len(path))):  # a chain prefix is already in place
                src = torch.tensor(path, dtype=torch.long, device=self.k.device) + base
                dst = slice(base, base + len(path))
                self.k[:, slot, :, dst] = self.k[:, slot, :, src]
                self.v[:, slot, :, dst] = self.v[:, slot, :, src]
            self.lens[slot] = base + len(path)

    def truncate(self, slot: int, length: int) -> None:
        """Roll a slot back to its first `length` committed tokens."""
        if not 0 <= length <= int(self.lens[slot]):
            raise ValueError(f"cannot truncate slot {slot} of length {int(self.lens[slot])} to {length}")
        self.lens[slot] = length
