"""Plain decoding with the lean decoder: greedy equals transformers' generate; sampling follows the target."""
from __future__ import annotations

import pytest
import torch

from moe.generate import SamplingParams, generate, probs_from_logits
from moe.loader import load_model


@pytest.mark.parametrize("name", ["llama", "qwen2_moe"])
def test_greedy_equals_transformers_generate(name, tiny_model, hf_reference):
    folder = tiny_model(name)
    lean = load_model(str(folder), with_tokenizer=False).model
    hf = hf_reference(folder)
    prompt = torch.randint(0, 256, (12,), generator=torch.Generator().manual_seed(5)).tolist()
    ref = hf.generate(torch.tensor([prompt]), max_new_tokens=40, do_sample=False, eos_token_id=None,
                      pad_token_id=0)[0, len(prompt):].tolist()
    assert generate(lean, prompt, SamplingParams(max_new_tokens=40)) == ref


def test_stops_at_eos(tiny_model):
    lean = load_model(str(tiny_model("llama")), with_tokenizer=False).model
    prompt = [3, 4, 5]
    full = generate(lean, prompt, SamplingParams(max_new_tokens=20))
    eos = full[5]
    cut = generate(lean, prompt, SamplingParams(max_new_tokens=20), eos_ids={eos})
    assert cut == full[: full.index(eos) + 1]


def test_top_k_top_p_keep_the_right_support():
    logits = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0])
    p = probs_from_logits(logits, SamplingParams(temperature=1.0, top_k=3))
    assert (p[3:] == 0).all() and torch.isclose(p.sum(), torch.tensor(1.0))
    full = logits.softmax(-1)
    p = probs_from_logits(logits, SamplingParams(temperature=1.0, top_p=float(full[0] + full[1] / 2)))
    assert (p[:2] > 0).all() and (p[2:] == 0).all()


def test_sampled_first_tokens_follow_the_target_distribution(tiny_model):
    """Chi-square test of 3000 seeded first tokens against the target's own distribution."""
    from scipy.stats import chisquare

    lean = load_model(str(tiny_model("llama")), with_tokenizer=False).model
    prompt = [10, 20, 30]
    params = SamplingParams(temperature=1.5, top_k=8, max_new_tokens=1)
    cache = lean.new_cache(1, 8)
    from moe.tree import TreeBatch

    probs = probs_from_logits(lean(TreeBatch.chains([prompt]), [cache.allocate()], cache, logits_for="last")[0], params)
    draws = torch.tensor([generate(lean, prompt, SamplingParams(**{**params.__dict__, "seed": s}))[0] for s in range(3000)])
    support = probs.nonzero().flatten()
    observed = torch.stack([(draws == t).sum() for t in support]).double()
    assert int(observed.sum()) == 3000, "a token outside top-k was sampled"
    expected = probs[support].double()
    expected = expected / expected.sum() * 3000
    assert chisquare(observed.numpy(), expected.numpy()).pvalue > 1e-3


def test_extreme_sampling_values_keep_a_valid_distribution():
    logits = torch.tensor([[3.0, 1.0, 2.9, -50.0], [0.0, 0.0, -1.0, 5.0]])
    for temperature, top_p in ((1e-300, 1.0), (1.0, 1e-300), (1e-30, 1e-30), (1e6, 1e-9)):
        probs = probs_from_logits(logits, SamplingParams(temperature=temperature, top_p=top_p))
        assert torch.isfinite(probs).all(), (temperature, top_p)
        assert torch.allclose(probs.sum(-1), torch.ones(2)), (temperature, top_p)
        # With either knob at its extreme only the most likely token is left.
        assert probs.argmax(-1).tolist() == [0, 3] and (probs.max(-1).values == 1).all(), (temperature, top_p)
