"""On a CUDA device: parity with transformers, tree equality, greedy exactness through the engine,
bf16 by default, and a served request (skipped without a GPU; bench/gpu_check.sh runs them)."""
from __future__ import annotations

import pytest
import torch

from moe.loader import load_model
from moe.tree import TreeBatch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]


@pytest.mark.parametrize("name", ["llama", "qwen2_moe"])
def test_cuda_prefill_and_tree_match_transformers(name, tiny_model, hf_reference):
    folder = tiny_model(name)
    lean = load_model(str(folder), with_tokenizer=False, device="cuda", dtype="fp32").model
    hf = hf_reference(folder).cuda()
    prompt = list(range(5, 45))
    cache = lean.new_cache(2, 128)
    slot = cache.allocate()
    out = lean(TreeBatch.chains([prompt]), [slot], cache)[0]
    with torch.inference_mode():
        ref = hf(torch.tensor([prompt], device="cuda")).logits[0]
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=0)
    cache.commit([slot], [list(range(len(prompt)))])
    tree = TreeBatch.make_dummy(1, 16, seed=3, vocab_size=256)
    logits = lean(tree, [slot], cache)[0]
    for node in range(16):
        path = prompt + [int(tree.tokens[0, i]) for i in tree.path_to(0, node)]
        with torch.inference_mode():
            alone = hf(torch.tensor([path], device="cuda")).logits[0, -1]
        torch.testing.assert_close(logits[node], alone, atol=1e-4, rtol=0)


@pytest.mark.parametrize("drafter", ["draft-lm", "eagle", "hybrid"])
def test_cuda_engine_greedy_equals_the_target_alone(drafter, tiny_model):
    from drafters.registry import DrafterConfig, build_drafter
    from moe.generate import SamplingParams, generate
    from serving.engine import Engine, EngineConfig, Request

    folder = str(tiny_model("llama"))
    loaded = load_model(folder, with_tokenizer=False, device="cuda", dtype="fp32")
    d = build_drafter(DrafterConfig(drafter, draft_layers=1, fallback="hybrid"), folder, loaded.config.vocab_size,
                      4, 256, loaded.config, target=loaded.model)
    engine = Engine(loaded.model, d, EngineConfig(max_batch=4, max_len=256, speculation=3, prefill_chunk=16))
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(256, (n,), generator=g).tolist() for n in (5, 40, 17, 3)]
    params = SamplingParams(max_new_tokens=24)
    for i, p in enumerate(prompts):
        engine.add_request(Request(str(i), tuple(p), params))
    got = {f.request_id: f.output_ids for f in engine.run_to_completion()}
    for i, p in enumerate(prompts):
        assert got[str(i)] == tuple(generate(loaded.model, p, params)), i


def test_cuda_defaults_to_bf16_and_a_replica_serves_on_it(tiny_model):
    import asyncio

    from moe.loader import DEFAULT_MODEL
    from serving.config import ServeConfig
    from serving.openai_api import Head
    from serving.service import Replica

    assert load_model(str(tiny_model("llama")), with_tokenizer=False,
                      device="cuda").model.embed.weight.dtype == torch.bfloat16
    replica = Replica(ServeConfig(model=DEFAULT_MODEL, device="cuda", drafter="hybrid", events_url="", redis_url="",
                                  mlflow_uri="", max_batch=2, max_len=256))
    try:
        assert replica.loaded.model.embed.weight.device.type == "cuda"

        async def one() -> list:
            return [item async for item in replica.completer.generate(
                "completion", {"model": replica.cfg.model_id, "prompt": "def add(a, b):", "max_tokens": 16,
                               "temperature": 0, "stream": True})]

        items = asyncio.run(one())
        assert isinstance(items[0], Head) and items[0].status == 200, items[0]
        assert items[-1] == "data: [DONE]\n\n" and any('"text"' in str(x) for x in items[1:-1])
    finally:
        replica.close()
