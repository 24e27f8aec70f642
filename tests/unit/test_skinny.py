"""The avx2 few-row kernel (moe/skinny.py): agreement with torch, row independence, fallbacks, swapping."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from moe import skinny
from moe.kernels import PARITY_ATOL
from moe.loader import load_model
from moe.tree import TreeBatch

pytestmark = pytest.mark.skipif(not skinny.available(), reason="no AVX2/FMA or no compiler here")


@pytest.mark.parametrize("k,o,bias", [(576, 960, False), (61, 37, True), (8, 4, False), (1536, 576, True)])
def test_matches_torch_at_every_width_and_each_row_ignores_its_neighbours(k, o, bias) -> None:
    g = torch.Generator().manual_seed(k * 31 + o)
    lin = nn.Linear(k, o, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(o, k, generator=g) * 0.05)
        if bias:
            lin.bias.copy_(torch.randn(o, generator=g))
    fast = skinny.SkinnyLinear(lin)
    x = torch.randn(skinny.MAX_ROWS, k, generator=g)
    with torch.inference_mode():
        alone = torch.cat([fast(x[i: i + 1]) for i in range(x.shape[0])])
        for m in (1, 2, 3, 5, 8, 17, skinny.MAX_ROWS):
            got = fast(x[:m])
            torch.testing.assert_close(got, F.linear(x[:m], lin.weight, lin.bias), atol=1e-4, rtol=1e-5)
            assert torch.equal(got, alone[:m]), f"rows changed when {m} shared the call"
        # 3-D input [B, N, K], as the decoder calls it
        torch.testing.assert_close(fast(x[:6].view(2, 3, k)), F.linear(x[:6], lin.weight, lin.bias).view(2, 3, o),
                                   atol=1e-4, rtol=1e-5)


def test_wide_products_and_autograd_take_torchs_kernels_and_bf16_is_never_swapped() -> None:
    lin = nn.Linear(16, 24)
    fast = skinny.SkinnyLinear(lin)
    wide = torch.randn(skinny.MAX_ROWS + 1, 16)
    with torch.inference_mode():
        assert torch.equal(fast(wide), F.linear(wide, lin.weight, lin.bias))
    assert skinny.use_skinny(nn.Sequential(nn.Linear(16, 24).bfloat16())) == 0
    x = torch.randn(3, 16, requires_grad=True)
    fast(x).sum().backward()  # the kernel has no backward: autograd must have gone through F.linear
    assert x.grad is not None and lin.weight.grad is not None
    torch.testing.assert_close(x.grad, lin.weight.sum(0).expand(3, 16))


def test_swapping_keeps_the_same_tensors_and_state_dict(tiny_model) -> None:
    model = load_model(str(tiny_model("qwen2_moe")), with_tokenizer=False, kernels="default").model
    before = dict(model.named_parameters())
    keys = list(model.state_dict())
    n = skinny.use_skinny(model)
    assert n > 0 and sum(isinstance(m, skinny.SkinnyLinear) for m in model.modules()) == n
    assert list(model.state_dict()) == keys
    assert all(p is before[k] for k, p in model.named_parameters())
    assert skinny.drop_skinny(model) == n
    assert not any(isinstance(m, skinny.SkinnyLinear) for m in model.modules())
    assert all(p is before[k] for k, p in model.named_parameters())


def test_decode_steps_on_avx2_match_the_default_kernels(tiny_model) -> None:
    """A prefill (wide: torch's kernels) then one-token and 4-token steps (the avx2 kernel) of the tiny llama."""
    folder = str(tiny_model("llama"))
    ref = load_model(folder, with_tokenizer=False, kernels="default").model
    fast = load_model(folder, with_tokenizer=False, kernels="avx2")
    assert fast.kernels.kernels == "avx2" and fast.kernels.how == "forced"
    g = torch.Generator().manual_seed(5)
    prompt = torch.randint(0, ref.cfg.vocab_size, (40,), generator=g).tolist()
    steps = [[int(t)] for t in torch.randint(0, ref.cfg.vocab_size, (3,), generator=g)]
    steps.append(torch.randint(0, ref.cfg.vocab_size, (4,), generator=g).tolist())
    outs = []
    with torch.inference_mode():
        for model in (ref, fast.model):
            cache = model.new_cache(1, 64)
            slot = cache.allocate()
            rows = []
            for chunk in [prompt] + steps:
                rows.append(model(TreeBatch.chains([chunk]), [slot], cache, logits_for="all")[0])
                cache.commit([slot], [list(range(len(chunk)))])
            outs.append(torch.cat(rows))
    assert outs[0].abs().max() > 1.0
    torch.testing.assert_close(outs[1], outs[0], atol=PARITY_ATOL, rtol=0)
    assert torch.equal(outs[1].argmax(-1), outs[0].argmax(-1))


def test_an_eagle_head_beside_an_avx2_target_runs_avx2_and_stays_lossless(tiny_model) -> None:
    from drafters.base import NoDrafter
    from drafters.eagle import EagleDrafter, head_from_target
    from moe.generate import SamplingParams
    from moe.kernels import running
    from serving.engine import Engine, EngineConfig, Request

    target = load_model(str(tiny_model("llama")), with_tokenizer=False, kernels="avx2").model
    assert running(target) == "avx2"
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(256, (int(n),), generator=g).tolist() for n in (7, 19, 3, 26)]

    def run(drafter):
        e = Engine(target, drafter, EngineConfig(max_batch=4, max_len=256, speculation=4))
        for i, p in enumerate(prompts):
            e.add_request(Request(str(i), tuple(p), SamplingParams(max_new_tokens=16)))
        return {f.request_id: f.output_ids for f in e.run_to_completion()}, e.stats

    ref, _ = run(NoDrafter())
    drafter = EagleDrafter(head_from_target(target, torch.arange(200), seed=1), max_batch=4, max_len=256,
                           min_confidence=0.0, kernels=running(target))
    assert running(drafter.head) == "avx2"
    out, stats = run(drafter)
    assert out == ref and stats.draft_tokens > 0
