"""Greedy losslessness on the real default model (SmolLM2-135M, fp32) and real traffic, for every drafter."""
from __future__ import annotations

from itertools import islice

import pytest

from drafters.registry import DrafterConfig, build_drafter
from moe.generate import SamplingParams, generate
from moe.loader import DEFAULT_MODEL, encode_prompt, load_model
from serving.engine import Engine, EngineConfig, Request
from serving.traffic import humaneval_prompts, sharegpt_prompts
from test_engine import _count_forwards  # tests/unit is on sys.path (no __init__.py)

NEW_TOKENS = 64
PARAMS = SamplingParams(max_new_tokens=NEW_TOKENS)
# Drafts are forced (fixed size) so every drafter is really exercised; the adaptive choice and a
# draft-LM tree run with 8 requests together. `make test` must stay under 25 minutes on 2 cores, so
# it runs the two cases whose drafters hold the others (the hybrid, which holds Token Recycling and
# prompt lookup, at the sizes the adaptive choice picks; the draft LM as a tree, whose paths include
# its chains) on 12 prompts, and marks the rest `extended` (`make test PYTEST_MARKERS=` runs them):
# every drafter is also checked at batch 1 and 8 on tiny models in test_engine.py and on 60 held-out
# prompts x 128 tokens by bench/speculative.py.
EXTENDED = [("prompt-lookup", 6, 1), ("hybrid", 12, 1), ("none", 0, 8), ("prompt-lookup", 6, 8),
            ("token-recycling", 8, 8), ("hybrid", 12, 8), ("draft-lm", 2, 8)]
CORE = [("draft-lm-topk", 6, 8), ("hybrid", "adaptive", 8)]
CASES = [pytest.param(*c, marks=pytest.mark.extended, id=f"{c[0]}-{c[1]}-batch{c[2]}") for c in EXTENDED]
CASES += [pytest.param(*c, id=f"{c[0]}-{c[1]}-batch{c[2]}") for c in CORE]
PROMPTS_PER_SOURCE = 4


@pytest.fixture(scope="module")
def default_model():
    return load_model(DEFAULT_MODEL, dtype="fp32")


@pytest.fixture(scope="module")
def traffic(default_model):
    """Held-out ShareGPT chats and HumanEval problems (PROMPTS_PER_SOURCE each), with the target's own greedy output."""
    tok = default_model.tokenizer
    prompts = [encode_prompt(tok, p.text) for p in islice((p for p in sharegpt_prompts("heldout")
                                                           if len(p.text) < 1200), PROMPTS_PER_SOURCE)]
    prompts += [tok.encode(p.text) for p in islice(humaneval_prompts("heldout"), PROMPTS_PER_SOURCE)]
    expected = [tuple(generate(default_model.model, p, PARAMS, default_model.eos_token_ids)) for p in prompts]
    return prompts, expected


@pytest.mark.slow
@pytest.mark.parametrize("drafter,speculation,max_batch", CASES)
def test_default_model_greedy_is_token_identical(default_model, traffic, drafter, speculation, max_batch):
    prompts, expected = traffic
    lm = default_model
    cfg = EngineConfig(max_batch=max_batch, max_len=2048, speculation=speculation)
    name, mode = (drafter.removesuffix("-topk"), "topk") if drafter.endswith("-topk") else (drafter, "chain")
    dcfg = DrafterConfig(name, draft_layers=2, draft_mode=mode, branching=(3, 2))
    d = build_drafter(dcfg, DEFAULT_MODEL, lm.config.vocab_size, max_batch, cfg.max_len, lm.config)
    engine = Engine(lm.model, d, cfg, lm.eos_token_ids)
    for i, p in enumerate(prompts):
        engine.add_request(Request(str(i), tuple(p), PARAMS))
    calls = _count_forwards(lm.model)
    got = {f.request_id: f.output_ids for f in engine.run_to_completion()}
    calls.remove()
    mismatched = [i for i in range(len(prompts)) if got[str(i)] != expected[i]]
    assert not mismatched, f"{drafter}: prompts {mismatched} differ from the target alone"
    assert calls.count == engine.stats.steps + engine.stats.prefill_forwards  # no extra target forward
    if speculation not in (0, "adaptive"):
        assert engine.stats.draft_tokens > 0
