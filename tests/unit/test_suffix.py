"""Suffix decoding: exact drafts on hand-made histories, exact counts under updates and eviction, greedy exactness."""
from __future__ import annotations

import random

import pytest
import torch

from drafters.base import DraftRequest
from drafters.registry import DrafterConfig, build_drafter
from drafters.suffix import SuffixDrafter, SuffixTrie
from moe.generate import SamplingParams, generate
from moe.loader import load_model
from serving.engine import Engine, EngineConfig, Request


def _req(history: list[int], budget: int = 16, seq_id: int = 0) -> DraftRequest:
    return DraftRequest(seq_id, history, budget, SamplingParams(), torch.Generator())


def _draft(drafter: SuffixDrafter, history: list[int], budget: int = 16, seq_id: int = 0) -> tuple[list[int], list[int]]:
    d = drafter.propose([_req(history, budget, seq_id)])[0]
    assert d.q is None and d.size <= budget
    return d.tokens.tolist(), d.parents.tolist()


def test_repeated_pattern_proposes_its_continuation():
    # The longest continued match is all of "1 2 3 4 5 1 2 3" (8 tokens); what followed it is the draft.
    assert _draft(SuffixDrafter(global_tokens=0), [1, 2, 3, 4, 5] * 2 + [1, 2, 3]) == ([4, 5, 1, 2, 3], [-1, 0, 1, 2, 3])


def test_draft_length_follows_the_match_length():
    # "7" matched (1 token): factor 1.0, offset 0 allow one draft token although 8 9 followed it.
    assert _draft(SuffixDrafter(global_tokens=0), [7, 8, 9, 7]) == ([8], [-1])
    assert _draft(SuffixDrafter(global_tokens=0, spec_offset=2), [7, 8, 9, 7]) == ([8, 9, 7], [-1, 0, 1])


BRANCHING = [1, 2, 3, 9, 1, 2, 3, 9, 1, 2, 3, 7, 1, 2, 3]  # "1 2 3" went on with 9 twice and 7 once


def test_branching_counts_make_a_tree():
    tokens, parents = _draft(SuffixDrafter(global_tokens=0), BRANCHING)
    # Match "1 2 3" (3 tokens deep): the 9 branch (2/3) first, then the 7 branch (1/3), each 3 deep.
    assert tokens == [9, 1, 2, 7, 1, 2]
    assert parents == [-1, 0, 1, -1, 3, 4]


def test_min_prob_prunes_the_rare_branch():
    assert _draft(SuffixDrafter(global_tokens=0, min_prob=0.4), BRANCHING) == ([9, 1, 2], [-1, 0, 1])
    assert _draft(SuffixDrafter(global_tokens=0, min_prob=0.3), BRANCHING)[0] == [9, 1, 2, 7, 1, 2]


def test_budget_keeps_the_likeliest_nodes():
    assert _draft(SuffixDrafter(global_tokens=0), BRANCHING, budget=4) == ([9, 1, 2, 7], [-1, 0, 1, -1])
    assert _draft(SuffixDrafter(global_tokens=0), BRANCHING, budget=0) == ([], [])
    rng = random.Random(0)
    d = SuffixDrafter()
    d.add_output([rng.randrange(4) for _ in range(300)])
    for budget in (1, 2, 5, 16):
        history = [rng.randrange(4) for _ in range(200)]
        tokens, parents = _draft(d, history, budget, seq_id=budget)
        assert 0 < len(tokens) <= budget
        assert all(-1 <= p < i for i, p in enumerate(parents))  # topological


def _scratch(tokens: list[int], depth: int) -> SuffixTrie:
    trie = SuffixTrie(depth)
    trie.add(tokens)
    return trie


def test_incremental_updates_equal_a_build_from_scratch():
    rng = random.Random(1)
    history = [rng.randrange(5) for _ in range(400)]
    d = SuffixDrafter(max_depth=8, global_tokens=0)
    end = 30
    while end < len(history):
        d.propose([_req(history[:end], 4, seq_id=7)])
        state = d._seqs[7]
        want = _scratch(history[:end], 8)
        assert state.trie.counts() == want.counts() and state.trie.nodes == want.nodes
        end += rng.randint(1, 9)
    assert 1 < d.nodes and d._seqs[7].trie.nodes <= 1 + 8 * len(history)


def test_eviction_keeps_the_bound_and_exact_counts():
    rng = random.Random(2)
    d = SuffixDrafter(max_depth=6, global_tokens=50)
    outputs = [[rng.randrange(6) for _ in range(rng.randint(1, 20))] for _ in range(40)]
    for i, out in enumerate(outputs):
        d.add_output(out)
        assert d.global_tokens <= 50
        # What is held is the newest outputs that fit, and the trie is exactly theirs.
        held, total = [], 0
        for o in reversed(outputs[: i + 1]):
            if total + len(o) > 50:
                break
            held.append(o)
            total += len(o)
        assert d.global_tokens == total
        want = SuffixTrie(6)
        for o in reversed(held):
            want.add(o)
        assert d.global_trie.counts() == want.counts() and d.global_trie.nodes == want.nodes
    d.add_output(list(range(80)))  # longer than the bound: its last 50 tokens
    assert d.global_tokens == 50 and d.global_trie.counts() == _scratch(list(range(30, 80)), 6).counts()


def test_released_output_drafts_for_the_next_request():
    d = SuffixDrafter()
    _draft(d, [1, 2], seq_id=0)           # first sight: [1, 2] is the prompt
    _draft(d, [1, 2, 5, 6, 7, 8], seq_id=0)
    d.release(0)
    assert d.global_tokens == 4 and 0 not in d._seqs  # the output alone joined the shared trie
    # "5 6" is matched in the shared trie (2 tokens, so 2 draft tokens); the request's own text has nothing.
    assert _draft(d, [9, 5, 6], seq_id=1) == ([7, 8], [-1, 0])


def test_the_better_tree_wins_and_own_text_wins_ties():
    d = SuffixDrafter()
    d.add_output([4, 5, 6, 1])
    # Own text: "4 5" continued by 9 3 once before; shared: "4 5" by 6 1. Equal scores: own text.
    assert _draft(d, [4, 5, 9, 3, 4, 5], seq_id=0)[0] == [9, 3]
    # The shared trie matches 3 tokens ("1 4 5"), so it may draft 3 deep and scores higher.
    d.add_output([1, 4, 5, 6, 1, 2])
    assert _draft(d, [8, 4, 5, 0, 1, 4, 5], seq_id=1)[0] == [6, 1, 2]


def test_registry_builds_and_validates_suffix():
    d = build_drafter(DrafterConfig("suffix", suffix_max_depth=12, suffix_global_tokens=99, suffix_min_prob=0.2),
                      "unused", 256, 1, 128)
    assert isinstance(d, SuffixDrafter) and (d.max_depth, d.global_limit, d.min_prob) == (12, 99, 0.2)
    assert d.needs_topk == 0 and d.cost_hint == 0.0 and max(d.budgets()) == 16
    for field, bad in (("suffix_max_depth", 1), ("suffix_global_tokens", -1), ("suffix_min_prob", 1.5)):
        with pytest.raises(ValueError, match=field):
            DrafterConfig("suffix", **{field: bad})


def _repetitive_prompts(n: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        base = torch.randint(vocab, (int(torch.randint(3, 9, (), generator=g)),), generator=g).tolist()
        out.append(base * 4 + base[:2])
    return out


@pytest.mark.parametrize("max_batch", [1, 4])
@pytest.mark.parametrize("speculation", [8, "adaptive"])
def test_greedy_output_equals_plain_decoding(tiny_model, max_batch, speculation):
    target = load_model(str(tiny_model("llama")), with_tokenizer=False).model
    params = SamplingParams(max_new_tokens=32)
    # Every prompt twice: the second answer is in the shared trie, so drafts pay there.
    prompts = _repetitive_prompts(6, target.cfg.vocab_size) * 2
    expected = {str(i): tuple(generate(target, p, params)) for i, p in enumerate(prompts)}
    drafter = SuffixDrafter()
    engine = Engine(target, drafter, EngineConfig(max_batch=max_batch, max_len=128, speculation=speculation))
    for i, p in enumerate(prompts):
        engine.add_request(Request(str(i), tuple(p), params))
    got = {f.request_id: f.output_ids for f in engine.run_to_completion()}
    assert got == expected
    assert engine.stats.accepted_tokens > 0
    assert not drafter._seqs and 0 < drafter.global_tokens <= drafter.global_limit  # all released into the shared trie
