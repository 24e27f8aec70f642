"""Per-layer, per-step accounting of expert-parallel all-to-alls: bytes each way and wall time.

P expert-parallel ranks, E experts, C capacity per expert, D hidden.

`A2AStats` is a plain recorder: the MoE layer calls `timed(...)` around each collective and the
benchmark reads `records` or `totals()`. `instrument_deepspeed` does the same for DeepSpeed's
capacity-padded EP path without touching moe/ds_moe.py: it swaps
`deepspeed.moe.sharded_moe._AllToAll` for a timing wrapper while active, and forward pre-hooks on
each `MOELayer` say which layer (and which forward = step) the next all-to-alls belong to.
Bytes count only what crosses to other ranks (a rank's own chunk never leaves it).
"""
from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import Tensor, nn


@dataclass
class A2ARecord:
    """One collective on this rank."""

    layer: int
    step: int
    phase: str
    """"dispatch", "combine", "counts" (split sizes), "meta" (routing metadata) or "allgather"."""
    bytes_sent: int
    """Bytes this rank sent to other ranks."""
    bytes_recv: int
    """Bytes this rank received from other ranks."""
    rows_sent: int = 0
    """Activation rows sent to other ranks (DeepSpeed: padding included)."""
    rows_recv: int = 0
    real_rows_sent: int = 0
    """Of rows_sent, those carrying a real token (differs from rows_sent only on padded paths)."""
    real_rows_recv: int = 0
    seconds: float = 0.0


@dataclass
class A2AStats:
    """Recorder of this rank's all-to-alls; `layer` and `step` say where the next record belongs."""

    records: list[A2ARecord] = field(default_factory=list)
    layer: int = 0
    step: int = 0
    enabled: bool = True

    @contextmanager
    def timed(self, phase: str, bytes_sent: int, bytes_recv: int, rows_sent: int = 0, rows_recv: int = 0,
              real_rows_sent: int | None = None, real_rows_recv: int | None = None,
              device: torch.device | None = None) -> Iterator[None]:
        """Time the collective run inside the block and record it (synchronising CUDA around it)."""
        if not self.enabled:
            yield
            return
        cuda = device is not None and device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        yield
        if cuda:
            torch.cuda.synchronize(device)
        self.records.append(A2ARecord(
            self.layer, self.step, phase, bytes_sent, bytes_recv, rows_sent, rows_recv,
            rows_sent if real_rows_sent is None else real_rows_sent,
            rows_recv if real_rows_recv is None else real_rows_recv, time.perf_counter() - start))

    def clear(self) -> None:
        self.records.clear()

    def totals(self, by: tuple[str, ...] = ("phase",)) -> dict[tuple, dict[str, float]]:
        """Sums of bytes, rows, seconds and call counts grouped by record fields (e.g. ("layer", "phase"))."""
        out: dict[tuple, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        for r in self.records:
            acc = out[tuple(getattr(r, k) for k in by)]
            for name in ("bytes_sent", "bytes_recv", "rows_sent", "rows_recv", "real_rows_sent", "real_rows_recv",
                         "seconds"):
                acc[name] += getattr(r, name)
            acc["calls"] += 1
        return {k: dict(v) for k, v in out.items()}


def _nonzero_rows(x: Tensor) -> Tensor:
    """[P] rows per rank chunk that are not all zero (DeepSpeed pads with zeros; an expert maps 0 to 0)."""
    chunks = x.reshape(x.shape[0], -1, x.shape[-1])                       # [E, C, D]
    return (chunks != 0).any(-1).sum(-1)                                  # [E]


@contextmanager
def instrument_deepspeed(model: nn.Module, stats: A2AStats) -> Iterator[A2AStats]:
    """Record every all-to-all of DeepSpeed's MoE layers in `model` into `stats` while active.

    Layers are numbered by their order in `model.modules()`; each forward of `model` is a step.
    Per call it records the whole [E, C, D] buffer's bytes to other ranks (capacity padding
    included, since that is what DeepSpeed sends) and how many of those rows hold real tokens:
    rows that are not all zero (the padding is zeros, and a bias-free expert maps zeros to zeros).
    ExactGate's one-integer all-reduce of the capacity (moe/ds_moe.py) is not recorded.
    """
    import torch.distributed as dist
    from deepspeed.moe import sharded_moe

    layers = [m for m in model.modules() if isinstance(m, sharded_moe.MOELayer)]
    calls = {"n": 0}
    original = sharded_moe._AllToAll
    forwards = {"n": 0}

    class _Recorded:
        @staticmethod
        def apply(group, x: Tensor) -> Tensor:
            world = dist.get_world_size(group)
            me = dist.get_rank(group)
            chunk_rows = x.shape[0] // world * (x.numel() // (x.shape[0] * x.shape[-1]))
            real_out = _nonzero_rows(x).reshape(world, -1).sum(1)         # [P] real rows per destination
            row_bytes = x.shape[-1] * x.element_size()
            phase = "dispatch" if calls["n"] % 2 == 0 else "combine"
            calls["n"] += 1
            with stats.timed(phase, (world - 1) * chunk_rows * row_bytes, (world - 1) * chunk_rows * row_bytes,
                             (world - 1) * chunk_rows, (world - 1) * chunk_rows,
                             int(real_out.sum() - real_out[me]), None, x.device):
                y = original.apply(group, x)
            real_in = _nonzero_rows(y).reshape(world, -1).sum(1)
            stats.records[-1].real_rows_recv = int(real_in.sum() - real_in[me])
            return y

    def on_layer(index: int):
        def hook(module, args):
            stats.layer = index
            calls["n"] = 0
        return hook

    def on_model(module, args):
        stats.step = forwards["n"]
        forwards["n"] += 1

    handles = [layer.register_forward_pre_hook(on_layer(i)) for i, layer in enumerate(layers)]
    handles.append(model.register_forward_pre_hook(on_model))
    sharded_moe._AllToAll = _Recorded
    try:
        yield stats
    finally:
        sharded_moe._AllToAll = original
        for h in handles:
            h.remove()
