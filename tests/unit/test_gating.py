"""Gating: routers, dispatch/combine (loop reference == fast path), losses, capacity and drops."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from moe.gating import (ExpertChoiceRouter, NoisyTopKRouter, Routing, TopKRouter, capacity,
                        expert_choice_routing, load_balancing_loss, moe_forward, router_z_loss,
                        topk_routing)
from moe.layers import GatedMLP
from moe.moe_block import Router as BlockRouter


def make_experts(num_experts: int, hidden: int, seed: int) -> list[nn.Module]:
    """E small SwiGLU experts of different widths, so a mix-up between experts shows."""
    torch.manual_seed(seed)
    return [GatedMLP(hidden, 3 + e) for e in range(num_experts)]


def make_router(kind: str, hidden: int, num_experts: int, top_k: int) -> nn.Module:
    if kind == "topk":
        return TopKRouter(hidden, num_experts, top_k, normalize_topk=True)
    if kind == "topk_raw":
        return TopKRouter(hidden, num_experts, top_k, normalize_topk=False)
    if kind == "topk_none":
        return TopKRouter(hidden, num_experts, top_k, weighting="none")
    if kind == "topk_capacity":
        return TopKRouter(hidden, num_experts, top_k, capacity_factor=0.75)
    if kind == "noisy":
        return NoisyTopKRouter(hidden, num_experts, top_k, capacity_factor=1.0)
    if kind == "expert_choice":
        return ExpertChoiceRouter(hidden, num_experts, top_k, capacity_factor=1.0)
    raise AssertionError(kind)


ROUTERS = ["topk", "topk_raw", "topk_none", "topk_capacity", "noisy", "expert_choice"]


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("kind", ROUTERS)
def test_loop_equals_fast_for_every_router(kind, seed):
    g = torch.Generator().manual_seed(seed)
    num_tokens = int(torch.randint(5, 24, (), generator=g))
    num_experts = int(torch.randint(3, 7, (), generator=g))
    top_k = int(torch.randint(1, num_experts, (), generator=g))
    hidden = 8
    torch.manual_seed(100 + seed)
    router = make_router(kind, hidden, num_experts, top_k).train()
    experts = make_experts(num_experts, hidden, seed)
    x = torch.randn(num_tokens, hidden, generator=g)
    if kind != "expert_choice":
        # A constant feature the last expert's router row hates: it must receive no token at all.
        x[:, 0] = 1.0
        with torch.no_grad():
            router.weight[-1, 0] = -100.0
    with torch.no_grad():
        routing = router(x, generator=torch.Generator().manual_seed(seed))
        fast = moe_forward(x, routing, experts, impl="fast")
        loop = moe_forward(x, routing, experts, impl="loop")
    if kind != "expert_choice":
        assert routing.counts[-1] == 0
    assert routing.counts.sum() == routing.kept.sum()
    assert torch.equal(routing.counts, torch.bincount(routing.experts[routing.kept], minlength=num_experts))
    assert fast.abs().max() > 0
    torch.testing.assert_close(fast, loop, rtol=1e-6, atol=1e-6)


def test_moe_forward_keeps_leading_dims_and_checks_expert_count():
    router = TopKRouter(8, 4, 2)
    experts = make_experts(4, 8, 0)
    x = torch.randn(2, 3, 8)
    with torch.no_grad():
        out = moe_forward(x, router(x.reshape(-1, 8)), experts)
    assert out.shape == x.shape
    with pytest.raises(ValueError, match="experts has 3"):
        moe_forward(x, router(x.reshape(-1, 8)), experts[:3])


def test_topk_matches_the_moe_block_router_mixtral_and_qwen_conventions():
    torch.manual_seed(0)
    x = torch.randn(11, 16)
    for renormalize in (True, False):
        block = BlockRouter(16, 6, 2, renormalize)
        nn.init.normal_(block.weight)
        with torch.no_grad():
            want_w, want_e = block(x)
            routing = topk_routing(x @ block.weight.t(), 2, normalize_topk=renormalize)
        assert torch.equal(routing.experts, want_e)
        torch.testing.assert_close(routing.weights, want_w)
        sums = routing.weights.sum(-1)
        if renormalize:
            torch.testing.assert_close(sums, torch.ones(11))
        else:
            # Raw probabilities of 2 of 6 experts: not rescaled, so they fall short of 1.
            assert torch.equal(routing.weights, routing.probs.gather(1, routing.experts))
            assert (sums < 1 - 1e-2).any()


def partition_dense_mlp(dense: GatedMLP, num_experts: int, seed: int) -> list[GatedMLP]:
    """Cut a SwiGLU MLP's intermediate neurons into E disjoint groups, one expert per group."""
    inner = dense.inner
    perm = torch.randperm(inner, generator=torch.Generator().manual_seed(seed))
    cuts = [0, 1, 4, 9, inner]  # unequal group sizes
    assert len(cuts) == num_experts + 1
    gate, up = dense.gate_up.weight.split(inner)
    experts = []
    for lo, hi in zip(cuts, cuts[1:]):
        idx = perm[lo:hi]
        expert = GatedMLP(dense.down.out_features, hi - lo).to(dense.down.weight.dtype)
        with torch.no_grad():
            expert.gate_up.weight.copy_(torch.cat([gate[idx], up[idx]]))
            expert.down.weight.copy_(dense.down.weight[:, idx])
        experts.append(expert)
    return experts


@pytest.mark.parametrize("impl", ["fast", "loop"])
def test_weighting_none_with_k_equal_e_is_the_dense_mlp(impl):
    torch.manual_seed(0)
    dense = GatedMLP(12, 20).double()
    experts = partition_dense_mlp(dense, 4, seed=1)
    x = torch.randn(7, 12, dtype=torch.float64)
    router = TopKRouter(12, 4, 4, weighting="none").double()
    with torch.no_grad():
        out = moe_forward(x, router(x), experts, impl=impl)
        want = dense(x)
        torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
        # Negative control: softmax weights (summing to 1 over the E parts) are not the dense MLP.
        soft = TopKRouter(12, 4, 4).double()
        assert not torch.allclose(moe_forward(x, soft(x), experts, impl=impl), want, atol=1e-3)


def test_weighting_none_refuses_normalize_topk():
    with pytest.raises(ValueError, match="normalize_topk"):
        topk_routing(torch.zeros(3, 4), 2, weighting="none", normalize_topk=True)


def spread_logits(num_tokens: int, num_experts: int, peak: float, skew: bool) -> torch.Tensor:
    """Token t prefers expert t % E (uniform) or always expert 0 (skewed), by `peak` logits."""
    favourite = torch.zeros(num_tokens, dtype=torch.long) if skew else torch.arange(num_tokens) % num_experts
    return peak * nn.functional.one_hot(favourite, num_experts).float()


def test_load_balancing_loss_is_one_when_uniform_and_larger_when_skewed():
    uniform = load_balancing_loss(topk_routing(spread_logits(12, 4, 3.0, skew=False), 1))
    torch.testing.assert_close(uniform, torch.tensor(1.0))
    skewed = load_balancing_loss(topk_routing(spread_logits(12, 4, 3.0, skew=True), 1))
    assert skewed > 1.5
    # Total collapse with certainty approaches E.
    collapsed = load_balancing_loss(topk_routing(spread_logits(12, 4, 50.0, skew=True), 1))
    torch.testing.assert_close(collapsed, torch.tensor(4.0))
    # Top-2 over uniform routes: still 1.
    two = load_balancing_loss(topk_routing(spread_logits(12, 4, 3.0, skew=False), 2))
    torch.testing.assert_close(two, torch.tensor(1.0))


def test_load_balancing_loss_gradient_reaches_router_weights():
    router = NoisyTopKRouter(8, 4, 2).train()
    x = torch.randn(10, 8)
    load_balancing_loss(router(x, generator=torch.Generator().manual_seed(0))).backward()
    for weight in (router.weight, router.noise_weight):
        assert weight.grad is not None and torch.isfinite(weight.grad).all()
        assert weight.grad.abs().sum() > 0


def test_z_loss_by_hand_two_experts():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    # logsumexp: log 2 and log 4 = 2 log 2, so the mean square is (1 + 4) / 2 * log(2)^2.
    torch.testing.assert_close(router_z_loss(logits), torch.tensor(2.5 * math.log(2.0) ** 2))
    assert router_z_loss(logits * 10) > router_z_loss(logits)


def test_capacity_formula():
    assert capacity(8, 4, 2, 1.0) == 4
    assert capacity(10, 4, 1, 1.0) == 3       # ceil(2.5)
    assert capacity(10, 4, 1, 1.2) == 3       # 3.0 exactly, no extra slot from round-off
    assert capacity(10, 4, 1, 0.01) == 1
    with pytest.raises(ValueError, match="capacity_factor"):
        capacity(8, 4, 2, 0.0)


@pytest.mark.parametrize("num_tokens,num_experts,top_k,factor", [(10, 4, 2, 1.0), (9, 3, 1, 0.5), (6, 5, 3, 2.0)])
def test_expert_choice_gives_every_expert_exactly_c_tokens(num_tokens, num_experts, top_k, factor):
    logits = torch.randn(num_tokens, num_experts, generator=torch.Generator().manual_seed(num_tokens))
    routing = expert_choice_routing(logits, top_k, factor)
    c = min(capacity(num_tokens, num_experts, top_k, factor), num_tokens)
    assert routing.capacity == c
    assert (routing.kept.sum(dim=0) == c).all()
    assert (routing.counts == c).all()
    assert routing.num_dropped == 0
    # Each expert picked its most probable tokens.
    for e in range(num_experts):
        picked = routing.probs[routing.kept[:, e], e]
        others = routing.probs[~routing.kept[:, e], e]
        if others.numel():
            assert picked.min() >= others.max()


def test_noisy_topk_is_seeded_in_training_and_noise_free_in_eval():
    torch.manual_seed(0)
    noisy = NoisyTopKRouter(8, 5, 2)
    x = torch.randn(16, 8)
    noisy.train()
    a = noisy(x, generator=torch.Generator().manual_seed(3))
    b = noisy(x, generator=torch.Generator().manual_seed(3))
    c = noisy(x, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a.logits, b.logits) and torch.equal(a.experts, b.experts)
    assert not torch.equal(a.logits, c.logits)
    clean = TopKRouter(8, 5, 2, normalize_topk=True)
    clean.weight = noisy.weight
    noisy.eval()
    want = clean(x)
    for seed in (3, 4):
        got = noisy(x, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(got.logits, want.logits)
        assert torch.equal(got.experts, want.experts) and torch.equal(got.weights, want.weights)


def test_small_capacity_drops_only_in_training_and_counts_drops():
    torch.manual_seed(0)
    router = TopKRouter(8, 4, 2, capacity_factor=0.5)
    experts = make_experts(4, 8, 0)
    x = torch.randn(16, 8)
    router.eval()
    with torch.no_grad():
        kept_all = router(x)
    assert kept_all.num_dropped == 0 and kept_all.kept.all() and kept_all.capacity is None
    assert kept_all.counts.sum() == 16 * 2
    router.train()
    with torch.no_grad():
        routing = router(x)
        assert torch.equal(router(x, drop_tokens=False).kept, kept_all.kept)  # explicit override
    cap = capacity(16, 4, 2, 0.5)
    assert routing.capacity == cap == 4
    assert (routing.counts <= cap).all()
    assert routing.num_dropped == 16 * 2 - routing.counts.sum() > 0
    assert torch.equal(routing.dropped, ~routing.kept)
    assert torch.equal(routing.selected, kept_all.kept)  # same choices, some dropped
    # Each over-full expert keeps exactly `cap` routes.
    asked = torch.bincount(kept_all.experts.flatten(), minlength=4)
    assert torch.equal(routing.counts, asked.clamp(max=cap))
    with torch.no_grad():
        fast = moe_forward(x, routing, experts)
        torch.testing.assert_close(fast, moe_forward(x, routing, experts, impl="loop"), rtol=1e-6, atol=1e-6)


def test_collapse_onto_one_expert_drops_t_minus_capacity_and_outputs_zero_for_them():
    num_tokens, num_experts = 10, 4
    logits = spread_logits(num_tokens, num_experts, 5.0, skew=True)
    routing = topk_routing(logits, 1, capacity_factor=1.0, drop_tokens=True)
    cap = math.ceil(num_tokens / num_experts)
    assert routing.num_dropped == num_tokens - cap
    # First come, first served: the earliest tokens keep their slot.
    assert routing.kept[:cap].all() and not routing.kept[cap:].any()
    experts = make_experts(num_experts, 6, 0)
    x = torch.randn(num_tokens, 6)
    with torch.no_grad():
        out = moe_forward(x, routing, experts)
    assert (out[cap:] == 0).all() and (out[:cap] != 0).any()


def test_top2_drops_second_choices_before_first_choices():
    # All 4 tokens: first choice expert 0, second choice expert 1... except token 3, whose first is 1.
    logits = torch.tensor([[3.0, 2.0, 0.0], [3.0, 2.0, 0.0], [3.0, 2.0, 0.0], [2.0, 3.0, 0.0]])
    routing = topk_routing(logits, 2, capacity_factor=0.75, drop_tokens=True)  # capacity 2
    assert routing.capacity == 2
    # Expert 1 is asked by token 3 (first choice) and tokens 0-2 (second): token 3 must keep it.
    assert routing.kept[3, 0] and routing.experts[3, 0] == 1
    assert isinstance(routing, Routing) and routing.counts.tolist() == [2, 2, 0]
