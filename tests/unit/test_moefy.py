"""MoEfication: a dense FFN cut into balanced experts, a fitted router, and a Mixtral checkpoint.

The k = E checkpoint must be the dense model exactly (logits and greedy tokens, both MoE
backends); the pieces (balanced clustering, the split, the router fit) are checked on planted data.
"""
from __future__ import annotations

import json

import pytest
import torch

from moe.config import config_from_hf
from moe.errors import UnsupportedArchitectureError
from moe.moefy import (MoefyConfig, balanced_kmeans, expert_contributions, fit_router, neuron_activations,
                       split_ffn, topk_recall)
from moe.moefy_build import DEFAULT_CUT, MARKER, build, named_cut, quality, sequence_logits


def _token_lists(n: int = 6, length: int = 40, vocab: int = 256) -> list[list[int]]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(3, vocab, (length,), generator=gen).tolist() for _ in range(n)]


@pytest.fixture(scope="module")
def moefied(tiny_model, tmp_path_factory):
    dense = tiny_model("llama")
    out = tmp_path_factory.mktemp("moefied") / "tiny-moe"
    cfg = MoefyConfig(experts=4, top_k=4, cluster_tokens=128, kmeans_iters=10)
    build(str(dense), out, cfg, token_lists=_token_lists())
    return dense, out


def test_balanced_kmeans_recovers_planted_equal_clusters():
    gen = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 32, generator=gen) * 4
    truth = torch.arange(4).repeat_interleave(10)[torch.randperm(40, generator=gen)]
    points = centres[truth] + 0.3 * torch.randn(40, 32, generator=gen)
    labels = balanced_kmeans(points, 4, iters=20, seed=3)
    assert torch.bincount(labels, minlength=4).tolist() == [10, 10, 10, 10]
    # Same partition up to renaming: every planted cluster maps to exactly one found cluster.
    assert {tuple(sorted(set(labels[truth == c].tolist()))) for c in range(4)} == {(0,), (1,), (2,), (3,)}


def test_balanced_kmeans_stays_balanced_when_the_data_is_not():
    points = torch.cat([torch.randn(30, 8) + 5, torch.randn(6, 8) - 5])  # one big blob, one small
    assert torch.bincount(balanced_kmeans(points, 3, iters=10), minlength=3).tolist() == [12, 12, 12]
    with pytest.raises(ValueError, match="equal clusters"):
        balanced_kmeans(points[:35], 3, iters=2)


def test_split_experts_sum_to_the_dense_ffn():
    gen = torch.Generator().manual_seed(2)
    d, inner, e = 16, 24, 4
    gate_up, down = torch.randn(2 * inner, d, generator=gen), torch.randn(d, inner, generator=gen)
    labels = torch.arange(e).repeat(inner // e)[torch.randperm(inner, generator=gen)]
    x = torch.randn(10, d, generator=gen, dtype=torch.float64)
    gu, dn = split_ffn(gate_up.double(), down.double(), labels, e)
    assert gu.shape == (e, 2 * inner // e, d) and dn.shape == (e, d, inner // e)
    dense = neuron_activations(x, gate_up.double()) @ down.double().T
    experts = sum(neuron_activations(x, gu[i]) @ dn[i].T for i in range(e))
    torch.testing.assert_close(experts, dense, rtol=0, atol=1e-12)
    norms = expert_contributions(x, gu, dn)
    assert norms.shape == (10, e) and bool((norms >= 0).all())


def test_fitted_router_ranks_experts_like_a_planted_linear_score():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2000, 24, generator=gen)
    truth = torch.randn(8, 24, generator=gen)
    contributions = (x @ truth.T).exp()  # log-contribution linear in x: the fit can be exact
    router = fit_router(x, contributions, ridge=1e-6)
    assert topk_recall(x @ router.T, contributions, 3) > 0.99
    assert topk_recall(torch.randn(2000, 8, generator=gen), contributions, 3) < 0.5


def test_k_equal_e_is_exactly_the_dense_model(moefied, tiny_model):
    from moe.generate import SamplingParams, generate
    from moe.loader import load_model

    dense_folder, folder = moefied
    raw = json.loads((folder / "config.json").read_text())
    assert raw["model_type"] == "mixtral" and raw["spectutor_router_weighting"] == "none"
    assert raw["num_local_experts"] == 4 and raw["intermediate_size"] == 96 // 4
    dense = load_model(str(dense_folder), with_tokenizer=False).model
    prompt = _token_lists(1, 30)[0]
    ref = sequence_logits(dense, prompt)
    for backend in ("local", "deepspeed"):
        moe = load_model(str(folder), with_tokenizer=False, moe_backend=backend).model
        torch.testing.assert_close(sequence_logits(moe, prompt), ref, atol=1e-4, rtol=1e-4)
        params = SamplingParams(max_new_tokens=16)
        assert generate(moe, prompt[:8], params) == generate(dense, prompt[:8], params)


def test_quality_table_rows_and_the_k_equal_e_row(moefied):
    from moe.loader import load_model

    dense_folder, folder = moefied
    dense = load_model(str(dense_folder), with_tokenizer=False).model
    moe = load_model(str(folder), with_tokenizer=False, moe_backend="local").model
    rows = quality(moe, dense, _token_lists(3, 24), ks=[1, 2, 4])
    assert [r["k"] for r in rows] == [1, 2, 4]
    assert rows[-1]["agreement"] == 1.0
    assert rows[-1]["ppl"] == pytest.approx(rows[-1]["dense_ppl"], rel=1e-4)
    assert rows[0]["agreement"] < 1.0  # one expert of four is not the dense model
    marker = json.loads((folder / MARKER).read_text())
    assert len(marker["router_recall"]) == 3 and all(0 <= r <= 1 for r in marker["router_recall"])


def test_named_cuts_and_bad_settings():
    assert named_cut("smollm2-135m-moe") == DEFAULT_CUT
    cut = named_cut("smollm2-135m-moe-e64-k16")
    assert (cut.experts, cut.top_k) == (64, 16)
    assert named_cut("smollm2-135m-instruct") is None
    with pytest.raises(ValueError, match="top_k=9"):
        MoefyConfig(experts=8, top_k=9)
    with pytest.raises(ValueError, match="experts=1"):
        MoefyConfig(experts=1, top_k=1)


def test_unknown_router_weighting_is_refused():
    raw = {"model_type": "mixtral", "hidden_size": 8, "num_attention_heads": 2, "num_hidden_layers": 1,
           "vocab_size": 10, "intermediate_size": 4, "num_local_experts": 2, "num_experts_per_tok": 1,
           "spectutor_router_weighting": "sigmoid"}
    with pytest.raises(UnsupportedArchitectureError, match="sigmoid"):
        config_from_hf(raw)
    assert config_from_hf({**raw, "spectutor_router_weighting": "none"}).router_weighting == "none"
    assert config_from_hf({k: v for k, v in raw.items() if k != "spectutor_router_weighting"}).router_weighting == "softmax"


def test_a_width_the_experts_cannot_split_is_refused(tiny_model, tmp_path):
    with pytest.raises(ValueError, match="experts=5"):
        build(str(tiny_model("llama")), tmp_path / "bad", MoefyConfig(experts=5, top_k=2, cluster_tokens=64),
              token_lists=_token_lists(2, 20))
    assert not (tmp_path / "bad").exists()


def test_another_k_is_a_config_change_of_the_same_cut(moefied, tmp_path):
    from moe.loader import load_model
    from moe.moefy_build import with_top_k

    dense_folder, folder = moefied
    two = with_top_k(folder, tmp_path / "k2", 2)
    assert json.loads((two / "config.json").read_text())["num_experts_per_tok"] == 2
    assert json.loads((two / MARKER).read_text())["cut"]["top_k"] == 2
    # The same kernels for both (auto may time each config to a different winner): the cut is compared exactly.
    moe4 = load_model(str(folder), with_tokenizer=False, moe_backend="local", kernels="default").model
    moe2 = load_model(str(two), with_tokenizer=False, moe_backend="local", kernels="default").model
    prompt = _token_lists(1, 20)[0]
    for layer in moe4.layers:
        layer.mlp.router.top_k = 2
    torch.testing.assert_close(sequence_logits(moe2, prompt), sequence_logits(moe4, prompt), rtol=0, atol=0)
    with pytest.raises(ValueError, match="top_k=5"):
        with_top_k(folder, tmp_path / "k5", 5)
