"""Duo-LLM on tiny random models: route equivalences, the oracle's guarantees, budget loss, FLOPs, the drafter."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from drafters.self_spec import duo_small_drafter, small_everywhere_model
from moe.config import ModelConfig
from moe.duo import (BIG, SKIP, SMALL, attach_duo, budget_loss, detach_duo, ffn_flops, fixed_route,
                     layer_groups, mix_routes, mix_routes_reference, oracle, route_flops, route_losses,
                     routes_with_budget, sequence_logits, set_route, set_token_routes)
from moe.duo_train import (DistillConfig, RandomRoutingConfig, distill_small_modules, load_small_modules,
                           save_small_modules, train_random_routing)
from moe.generate import SamplingParams, generate
from moe.layers import GatedMLP
from moe.loader import load_model
from moe.model import LeanDecoder
from moe.tree import TreeBatch
from serving.engine import Engine, EngineConfig, Request

SMALL_WIDTH = 8


def _smalls(model: LeanDecoder, seed: int = 1) -> list[GatedMLP]:
    torch.manual_seed(seed)
    return [GatedMLP(model.cfg.hidden_size, SMALL_WIDTH) for _ in model.layers]


def _logits(model: LeanDecoder, tokens: list[list[int]]) -> torch.Tensor:
    cache = model.new_cache(len(tokens), 64)
    slots = [cache.allocate() for _ in tokens]
    return model(TreeBatch.chains(tokens), slots, cache)


def _toy(num_layers: int = 4, seed: int = 0) -> LeanDecoder:
    cfg = ModelConfig(model_type="llama", vocab_size=64, hidden_size=32, num_layers=num_layers, num_heads=4,
                      num_kv_heads=2, head_dim=8, intermediate_size=64, max_position=64)
    torch.manual_seed(seed)
    model = LeanDecoder(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3) if p.dim() > 1 else None
    return model


class _NoFFN(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x)


@pytest.fixture(scope="module")
def tiny(tiny_model):
    folder = tiny_model("llama")
    return folder, load_model(str(folder), with_tokenizer=False, kernels="default").model


TOKENS = [[3, 17, 200, 5, 9, 44, 81, 2], [7, 7, 1, 250, 33, 12, 90, 4]]


def test_all_big_is_the_dense_model_exactly(tiny):
    _, dense = tiny
    duo = copy.deepcopy(dense)
    attach_duo(duo, _smalls(duo))
    set_route(duo, "big")
    assert torch.equal(_logits(duo, TOKENS), _logits(dense, TOKENS))
    detach_duo(duo)
    assert torch.equal(_logits(duo, TOKENS), _logits(dense, TOKENS))


@pytest.mark.parametrize("layer", [0, 2])
def test_skip_at_a_layer_is_that_ffn_deleted(tiny, layer):
    _, dense = tiny
    duo, deleted = copy.deepcopy(dense), copy.deepcopy(dense)
    attach_duo(duo, _smalls(duo))
    set_route(duo, [SKIP if i == layer else BIG for i in range(len(duo.layers))])
    deleted.layers[layer].mlp = _NoFFN()
    assert torch.equal(_logits(duo, TOKENS), _logits(deleted, TOKENS))
    assert not torch.equal(_logits(duo, TOKENS), _logits(dense, TOKENS))


def test_small_everywhere_is_the_dense_model_built_with_the_small_ffn(tiny):
    folder, dense = tiny
    smalls = _smalls(dense)
    duo = copy.deepcopy(dense)
    attach_duo(duo, smalls)
    set_route(duo, "small")
    draft = small_everywhere_model(str(folder), smalls).decoder
    assert draft.cfg.intermediate_size == SMALL_WIDTH
    torch.testing.assert_close(_logits(duo, TOKENS), _logits(draft, TOKENS), rtol=0, atol=1e-6)


def test_per_token_routes_match_the_reference_and_fixed_routes(tiny):
    _, dense = tiny
    duo = copy.deepcopy(dense)
    smalls = _smalls(duo)
    attach_duo(duo, smalls)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, duo.cfg.hidden_size, generator=g)
    route = torch.randint(0, 3, (2, 8), generator=g)
    big = duo.layers[0].mlp.big
    torch.testing.assert_close(mix_routes(x, route, big, smalls[0]), mix_routes_reference(x, route, big, smalls[0]))
    # A per-token route that is the same for every token gives the fixed route's logits.
    fixed = [BIG, SMALL, SKIP]
    set_route(duo, fixed)
    expected = _logits(duo, TOKENS)
    set_token_routes(duo, torch.tensor(fixed)[:, None, None].expand(3, 2, 8))
    torch.testing.assert_close(_logits(duo, TOKENS), expected, rtol=1e-5, atol=1e-5)


def test_cacheless_sequence_forward_matches_the_engine_forward(tiny):
    _, dense = tiny
    duo = copy.deepcopy(dense)
    attach_duo(duo, _smalls(duo))
    route = (SMALL, BIG, SKIP)
    set_route(duo, route)
    with torch.inference_mode():
        got = sequence_logits(duo, torch.tensor(TOKENS), route)
    torch.testing.assert_close(got, _logits(duo, TOKENS), rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def toy_losses():
    """Per-token losses of every big/small route of a toy L=4 model, by the trie search, by budget."""
    model = _toy()
    attach_duo(model, _smalls(model))
    tokens = torch.randint(0, 64, (3, 12), generator=torch.Generator().manual_seed(1))
    by_budget = {m: (routes_with_budget(4, m), None) for m in range(5)}
    return model, tokens, {m: (r, route_losses(model, tokens, r)) for m, (r, _) in by_budget.items()}


def test_route_count_is_l_choose_m(toy_losses):
    _, _, by_budget = toy_losses
    for m, (routes, losses) in by_budget.items():
        assert len(routes) == len(set(routes)) == math.comb(4, m)
        assert all(sum(c == BIG for c in r) == m for r in routes)
        assert losses.shape == (math.comb(4, m), 3, 11)
    groups = layer_groups(30, 6)
    assert [len(g) for g in groups] == [5] * 6 and sum(groups, ()) == tuple(range(30))
    assert len(routes_with_budget(30, 2, groups)) == math.comb(6, 2)
    assert len(routes_with_budget(30, 1)) == 30


def test_trie_search_equals_one_forward_per_route(toy_losses):
    model, tokens, by_budget = toy_losses
    routes, losses = by_budget[2]
    for r, got in zip(routes, losses):
        set_route(model, r)
        logits = _logits(model, tokens.tolist())[:, :-1]
        want = torch.nn.functional.cross_entropy(logits.transpose(1, 2), tokens[:, 1:], reduction="none")
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_oracle_beats_every_route_of_its_budget_and_is_monotone_when_nested(toy_losses):
    _, _, by_budget = toy_losses
    at_most = []
    for m, (routes, losses) in by_budget.items():
        best, idx = oracle(losses)
        assert (best[None] <= losses).all()
        assert all(best.mean() <= losses[i].mean() for i in range(len(routes)))
        assert torch.equal(losses.gather(0, idx[None])[0], best)
        fixed = routes.index(fixed_route(4, m, "last"))
        assert best.mean() <= losses[fixed].mean()
        nested = torch.cat([by_budget[k][1] for k in range(m + 1)])  # routes with at most m big layers
        at_most.append(oracle(nested)[0].mean().item())
    assert all(a >= b for a, b in zip(at_most, at_most[1:]))
    assert at_most[-1] < at_most[0]  # some compute helps some token on this toy


def test_budget_loss_zero_at_target_and_gradient_points_to_target():
    p = torch.full((4, 10), 0.25)
    assert budget_loss(p, 0.25).item() == 0.0
    for start, sign in ((0.8, 1.0), (0.1, -1.0)):
        q = torch.full((4, 10), start, requires_grad=True)
        budget_loss(q, 0.25).backward()
        assert (torch.sign(q.grad) == sign).all()  # descent moves every P_big toward the target
        with torch.no_grad():
            stepped = q - q.grad  # a small gradient step
        assert abs(stepped.mean().item() - 0.25) < abs(start - 0.25)


def test_flops_per_token_sum_the_chosen_modules():
    hidden, big, small = 576, 1536, 96
    codes = torch.tensor([[BIG, SMALL], [SMALL, SKIP], [BIG, BIG]])  # [L=3, T=2]
    got = route_flops(codes, hidden, big, small)
    assert got.tolist() == [2 * ffn_flops(hidden, big) + ffn_flops(hidden, small),
                            ffn_flops(hidden, small) + ffn_flops(hidden, big)]
    assert ffn_flops(hidden, big) == 6 * hidden * big == 16 * ffn_flops(hidden, small)


def test_distill_save_load_roundtrip(tiny, tmp_path):
    _, dense = tiny
    tokens = torch.randint(0, 256, (8, 32), generator=torch.Generator().manual_seed(0))
    cfg = DistillConfig(width=SMALL_WIDTH, sequences=8, seq_len=32, steps=60, batch_tokens=64)
    smalls, stats = distill_small_modules(dense, tokens, cfg, progress=False)
    assert len(smalls) == len(dense.layers) and all(s["rel_mse"] < s["rel_mse_init"] for s in stats)
    save_small_modules(smalls, tmp_path, {"num_layers": len(smalls)})
    loaded, meta = load_small_modules(tmp_path)
    for a, b in zip(smalls, loaded):
        assert torch.equal(a.gate_up.weight, b.gate_up.weight) and torch.equal(a.down.weight, b.down.weight)


def test_random_routing_finetune_trains_only_the_small_ffns(tiny):
    _, dense = tiny
    model = copy.deepcopy(dense)
    smalls = _smalls(model)
    attach_duo(model, smalls)
    frozen = {k: v.clone() for k, v in model.state_dict().items() if ".small." not in k}
    before = [s.down.weight.clone() for s in smalls]
    tokens = torch.randint(0, 256, (8, 16), generator=torch.Generator().manual_seed(0))
    kl = train_random_routing(model, tokens, RandomRoutingConfig(steps=25, lr=1e-2, batch=4), progress=False)
    assert sum(kl[-5:]) < sum(kl[:5])
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in frozen.items())
    assert all(not torch.equal(b, s.down.weight) for b, s in zip(before, smalls))
    assert not any(p.requires_grad for p in model.parameters())


def test_small_everywhere_drafter_is_token_exact_through_the_engine(tiny):
    folder, dense = tiny
    target = load_model(str(folder), with_tokenizer=False).model
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (5, 11, 17)]
    params = SamplingParams(max_new_tokens=16)
    expected = {str(i): tuple(generate(target, p, params)) for i, p in enumerate(prompts)}
    for spec in (4, "adaptive"):
        drafter = duo_small_drafter(str(folder), _smalls(dense), max_batch=2, max_len=128, target_cfg=target.cfg)
        assert drafter.version == f"duo-small-{SMALL_WIDTH}"
        engine = Engine(target, drafter, EngineConfig(max_batch=2, max_len=128, speculation=spec))
        for i, p in enumerate(prompts):
            engine.add_request(Request(str(i), tuple(p), params))
        got = {f.request_id: f.output_ids for f in engine.run_to_completion()}
        assert got == expected, spec
        if spec == 4:
            assert engine.stats.draft_tokens > 0
