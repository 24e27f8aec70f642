"""Token-level expert parallelism (plain and speculative) over gloo equals one process, and its traffic is counted."""
from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp

from moe.expert_parallel import free_port

E, K, D, I = 8, 2, 32, 24
PREDICTORS = ("plain", "perfect", "random", "adversarial")


def make_block(seed: int = 0, num_experts: int = E, top_k: int = K, weighting: str = "softmax"):
    """A random Mixtral-style MoE block (fp32), built from a config as the loader builds it.

    `weighting="none"` gives every chosen expert weight 1, as MoEfied checkpoints route.
    """
    from moe.config import config_from_hf
    from moe.moe_block import MoEBlock

    cfg = config_from_hf({"model_type": "mixtral", "architectures": ["MixtralForCausalLM"], "hidden_size": D,
                          "num_attention_heads": 4, "num_key_value_heads": 2, "num_local_experts": num_experts,
                          "num_experts_per_tok": top_k, "intermediate_size": I, "num_hidden_layers": 1,
                          "vocab_size": 16, "spectutor_router_weighting": weighting})
    block = MoEBlock(cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return block.eval()


def predictor(kind: str, block, x, placement, ep: int, gen: torch.Generator):
    """Predicted owner per token: None (plain), the rank of its first expert, random, or never that rank."""
    if kind == "plain":
        return None
    first = placement[block.router(x)[1][:, 0]]                            # [T] rank of the top-1 expert
    if kind == "perfect":
        return first
    if kind == "random":
        return torch.randint(0, ep, (x.shape[0],), generator=gen)
    return (first + 1 + torch.randint(0, ep - 1, (x.shape[0],), generator=gen)) % ep


def _worker(rank: int, ep: int, port: int, out_dir: str) -> None:
    from moe.a2a_stats import A2AStats
    from moe.ep_dispatch import EPMoELayer
    from moe.expert_parallel import init_process_group

    torch.set_num_threads(1)
    init_process_group(rank, ep, port, backend="gloo")
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(37, D, generator=gen)                                  # same on every rank
    blocks = [make_block(0), make_block(1, weighting="none")]            # both routing weightings
    placement = torch.randperm(E, generator=gen) % ep                      # a scattered, balanced placement
    results = {}
    for kind in PREDICTORS:
        layers = [EPMoELayer(b, placement, rank, ep) for b in blocks]
        stats = A2AStats()
        for layer in layers:
            layer.stats = stats
        h, preds = x, []
        for i, (layer, block) in enumerate(zip(layers, blocks)):
            stats.layer = i
            pred = predictor(kind, block, h, placement, ep, gen)
            preds.append(pred)
            h = h + layer(h, pred)                                        # residual, as in a decoder layer
        results[kind] = dict(out=h, preds=preds, totals=stats.totals(("layer", "phase")))
    results["placement"] = placement
    torch.save(results, f"{out_dir}/rank{rank}.pt")
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def _single(x, blocks):
    """The single-process stack's output and each layer's input."""
    h, inputs = x, []
    for block in blocks:
        inputs.append(h)
        h = h + block(h[None])[0]
    return h, inputs


@pytest.mark.slow
@pytest.mark.parametrize("ep", [2, 4])
def test_ep_dispatch_is_lossless_and_counts_its_bytes(ep, tmp_path):
    from moe.smoe import plain_token_rank, remote_destinations

    mp.start_processes(_worker, args=(ep, free_port(), str(tmp_path)), nprocs=ep, join=True, start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(ep)]
    placement = ranks[0]["placement"]
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(37, D, generator=gen)
    blocks = [make_block(0), make_block(1, weighting="none")]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        want, inputs = _single(x, blocks)
    finally:
        torch.set_num_threads(threads)
    sent = {}
    for kind in PREDICTORS:
        preds = ranks[0][kind]["preds"]
        for r in range(ep):
            torch.testing.assert_close(ranks[r][kind]["out"], want, atol=1e-6, rtol=1e-6)
        # Bytes: each (token, remote rank) pair once each way, D fp32 values, plus P-1 int64 counts.
        total = 0
        for layer, (block, h, pred) in enumerate(zip(blocks, inputs, preds)):
            owner = plain_token_rank(h.shape[0], ep) if pred is None else pred
            sends = remote_destinations(block.router(h)[1], owner, placement, ep)  # [T, P]
            for r in range(ep):
                t = ranks[r][kind]["totals"]
                mine = sends[owner == r]
                assert t[(layer, "dispatch")]["bytes_sent"] == mine.sum() * D * 4
                assert t[(layer, "dispatch")]["rows_sent"] == mine.sum()
                assert t[(layer, "combine")]["bytes_recv"] == mine.sum() * D * 4
                assert t[(layer, "counts")]["bytes_sent"] == (ep - 1) * 8
                assert t[(layer, "meta")]["bytes_sent"] == mine.sum() * 2 * K * 4
            total += int(sends.sum())
        sent[kind] = total
    assert sent["perfect"] < sent["plain"]
    assert sent["adversarial"] >= sent["perfect"]


def test_single_rank_group_is_the_block(tmp_path):
    """ep=1 over a one-process group: nothing leaves the rank and the output is the block's."""
    import torch.distributed as dist

    from moe.a2a_stats import A2AStats
    from moe.ep_dispatch import EPMoELayer

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/rdv", rank=0, world_size=1)
    try:
        block = make_block(3)
        layer = EPMoELayer(block, torch.zeros(E, dtype=torch.long), 0, 1)
        layer.stats = A2AStats()
        x = torch.randn(11, D)
        torch.testing.assert_close(layer(x), block(x[None])[0], atol=1e-6, rtol=1e-6)
        assert all(r.bytes_sent == 0 for r in layer.stats.records)
    finally:
        dist.destroy_process_group()
