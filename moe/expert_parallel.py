"""Run the lean decoder with experts spread over torch.distributed processes (gloo on CPU, NCCL on GPU).

Each process holds every dense weight and E / ep of the experts of each MoE layer; every process
decodes its own batch and the MoE layers exchange tokens with DeepSpeed's all-to-all.
All processes must call forward the same number of times (the all-to-all is collective).
"""
from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

from moe.loader import LoadedModel, load_model


def init_process_group(rank: int, world_size: int, port: int, backend: str | None = None) -> None:
    """Join a process group over loopback (MASTER_ADDR/PORT for DeepSpeed's own init as well)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timedelta(seconds=120))


def load_expert_parallel(spec: str, ep_size: int, dtype: str = "fp32", max_len: int | None = None) -> LoadedModel:
    """Load this process's shard of `spec` (the process group must already be up)."""
    from moe.ds_moe import init_expert_parallel

    loaded = load_model(spec, dtype=dtype, max_len=max_len, moe_backend="deepspeed", ep_size=ep_size,
                        ep_rank=dist.get_rank() % ep_size, with_tokenizer=False)
    init_expert_parallel(loaded.model)
    return loaded
