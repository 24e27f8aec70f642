"""Two processes with ep_size=2 give the same logits as one process holding every expert."""
from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp

from moe.expert_parallel import free_port
from moe.loader import load_model
from moe.tree import TreeBatch

PROMPTS = {0: list(range(3, 40)), 1: [7, 1, 200, 45, 45, 9, 18, 250, 3, 11, 2]}


def _decode(model, prompt: list[int]) -> torch.Tensor:
    """Prefill, then one 6-node tree: logits of every position [len(prompt) + 6, V]."""
    cache = model.new_cache(1, 64)
    slot = cache.allocate()
    first = model(TreeBatch.chains([prompt]), [slot], cache)[0]
    cache.commit([slot], [list(range(len(prompt)))])
    tree = TreeBatch.from_lists([[5, 9, 12, 5, 77, 3]], [[-1, 0, 0, 1, -1, 4]])
    return torch.cat([first, model(tree, [slot], cache)[0]])


def _worker(rank: int, folder: str, port: int, out_dir: str) -> None:
    from moe.a2a_stats import A2AStats, instrument_deepspeed
    from moe.expert_parallel import init_process_group, load_expert_parallel

    torch.set_num_threads(1)
    init_process_group(rank, 2, port, backend="gloo")
    loaded = load_expert_parallel(folder, ep_size=2, kernels="default")
    blocks = [m for m in loaded.model.modules() if type(m).__name__ == "DeepSpeedMoEBlock"]
    assert blocks and all(b.moe.num_local_experts == loaded.config.num_experts // 2 for b in blocks)
    stats = A2AStats()
    with instrument_deepspeed(loaded.model, stats):  # DeepSpeed's all-to-all, counted per layer and step
        logits = _decode(loaded.model, PROMPTS[rank])
    _decode(loaded.model, PROMPTS[rank])  # after the context: not recorded
    torch.save(logits, f"{out_dir}/rank{rank}.pt")
    torch.save(stats.records, f"{out_dir}/a2a{rank}.pt")
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe"])
def test_two_ranks_match_one_process(name, tiny_model, tmp_path):
    folder = str(tiny_model(name))
    mp.start_processes(_worker, args=(folder, free_port(), str(tmp_path)), nprocs=2, join=True,
                       start_method="spawn")
    # Same DeepSpeed MoE layer with every expert local, and the same kernels (a cached or measured
    # verdict could put the one process on others: 2e-5 apart), so only the expert placement differs.
    single = load_model(folder, with_tokenizer=False, moe_backend="deepspeed", kernels="default").model
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the workers: matmul blocking differs with the thread count
    try:
        for rank, prompt in PROMPTS.items():
            got = torch.load(tmp_path / f"rank{rank}.pt")
            torch.testing.assert_close(got, _decode(single, prompt), atol=1e-5, rtol=0)
    finally:
        torch.set_num_threads(threads)
    _check_a2a_records(tmp_path, load_model(folder, with_tokenizer=False, moe_backend="local").config)


def _check_a2a_records(out_dir, cfg) -> None:
    """Each of the 2 forwards (prefill, 6-node tree) records a dispatch and a combine per MoE layer."""
    for rank in range(2):
        records = torch.load(out_dir / f"a2a{rank}.pt", weights_only=False)
        keys = [(r.step, r.layer, r.phase) for r in records]
        assert keys == [(s, i, p) for s in range(2) for i in range(len(cfg.sparse_layers)) for p in ("dispatch", "combine")]
        for r in records:
            # The padded [E, C, D] buffer: half of it (the other rank's experts) leaves this rank.
            assert r.bytes_sent == r.rows_sent * cfg.hidden_size * 4 > 0
            assert r.rows_sent % (cfg.num_experts // 2) == 0
            assert 0 <= r.real_rows_sent <= r.rows_sent and r.seconds > 0
        # The 6-node tree with top-2 routing: at most 12 real rows leave a rank per layer.
        assert all(r.real_rows_sent <= 6 * cfg.top_k for r in records if r.step == 1 and r.phase == "dispatch")


@pytest.mark.slow
def test_expert_parallel_generation_equals_single_process(tiny_model):
    from moe.expert_parallel import generate_expert_parallel
    from moe.generate import SamplingParams, generate

    folder = str(tiny_model("olmoe"))
    prompt = [11, 42, 7, 99, 3]
    params = SamplingParams(max_new_tokens=12)
    ep = generate_expert_parallel(folder, prompt, params, ep_size=2)
    # The ranks take the default kernels (their forwards cannot be timed alone); so does the reference.
    assert ep == generate(load_model(folder, with_tokenizer=False, kernels="default").model, prompt, params)


def test_cli_refuses_expert_parallel_on_a_dense_model(tiny_model, capsys):
    from spectutor.cli import main

    assert main(["generate", "--model", str(tiny_model("llama")), "--prompt", "hi", "--ep-size", "2"]) == 2
    err = capsys.readouterr().err
    assert "--ep-size 2" in err and "dense" in err
