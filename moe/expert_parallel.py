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


def load_expert_parallel(spec: str, ep_size: int, dtype: str = "fp32", max_len: int | None = None,
                         kernels: str = "auto") -> LoadedModel:
    """Load this process's shard of `spec` (the process group must already be up)."""
    from moe.ds_moe import init_expert_parallel

    loaded = load_model(spec, dtype=dtype, max_len=max_len, moe_backend="deepspeed", ep_size=ep_size,
                        ep_rank=dist.get_rank() % ep_size, with_tokenizer=False, kernels=kernels)
    init_expert_parallel(loaded.model)
    return loaded


def free_port() -> int:
    """A TCP port free on loopback right now, for a process group's rendezvous."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _generate_worker(rank: int, ep_size: int, port: int, spec: str, prompt: list[int], params, dtype: str,
                     eos_ids: set[int], results) -> None:
    from moe.generate import generate

    torch.set_num_threads(max(1, torch.get_num_threads() // ep_size))
    init_process_group(rank, ep_size, port)
    try:
        loaded = load_expert_parallel(spec, ep_size, dtype=dtype, max_len=len(prompt) + params.max_new_tokens)
        # Every rank decodes the same prompt with the same seed, so all take the same number of
        # steps (the all-to-all is collective); rank 0 reports, the others check they agree.
        tokens = generate(loaded.model, prompt, params, eos_ids)
        gathered: list = [None] * ep_size
        dist.all_gather_object(gathered, tokens)
        if any(g != tokens for g in gathered):
            raise RuntimeError("expert-parallel ranks decoded different tokens")
        if rank == 0:
            results.put(tokens)
        dist.barrier()  # no rank tears the group down while a peer still talks to it
    finally:
        dist.destroy_process_group()


def generate_expert_parallel(spec: str, prompt: list[int], params, ep_size: int, dtype: str = "fp32",
                             eos_ids: set[int] | frozenset[int] = frozenset()) -> list[int]:
    """Decode `prompt` with the model's experts spread over `ep_size` local processes (gloo or NCCL)."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    mp.start_processes(_generate_worker, nprocs=ep_size, join=True, start_method="spawn",
                       args=(ep_size, free_port(), spec, prompt, params, dtype, set(eos_ids), results))
    return results.get()
