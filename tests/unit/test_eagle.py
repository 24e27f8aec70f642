"""The EAGLE drafter on a tiny random Llama: exact greedy output, TTT equal to drafting, features, checkpoints."""
from __future__ import annotations

import pytest
import torch

from drafters.base import DraftRequest, NoDrafter, Prefill
from drafters.eagle import EagleDrafter, head_from_target, load_eagle, save_eagle
from moe.generate import SamplingParams
from moe.loader import load_model
from moe.tree import TreeBatch
from serving.engine import Engine, EngineConfig, Request
from trainer.eagle_train import collect, make_batch, sparse_soft_xent, ttt_forward

VOCAB = torch.arange(0, 256, 2)  # half the target vocabulary: drafts never propose odd ids


@pytest.fixture(scope="module")
def target(tiny_model):
    return load_model(str(tiny_model("llama")), with_tokenizer=False, kernels="default").model


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(256, (int(k),), generator=g).tolist() for k in torch.randint(1, 30, (n,), generator=g)]


def _run(target, drafter, prompts, params, batch):
    e = Engine(target, drafter, EngineConfig(max_batch=batch, max_len=256, speculation=4))
    for i, p in enumerate(prompts):
        e.add_request(Request(str(i), tuple(p), params))
    return {f.request_id: f.output_ids for f in e.run_to_completion()}, e.stats


@pytest.mark.parametrize("tree_topk", [0, 3])
@pytest.mark.parametrize("batch", [1, 8])
def test_greedy_output_equals_the_target_alone(target, batch, tree_topk):
    prompts = _prompts(8)
    params = SamplingParams(max_new_tokens=20)
    ref, _ = _run(target, NoDrafter(), prompts, params, batch)
    head = head_from_target(target, VOCAB, seed=1)
    out, stats = _run(target, EagleDrafter(head, max_batch=batch, max_len=256, min_confidence=0.0,
                                           tree_topk=tree_topk, tree_min_prob=0.0),
                      prompts, params, batch)
    assert out == ref
    assert stats.draft_tokens > 0


def test_tree_nodes_are_the_top_children_of_their_path_drafted_as_a_chain(target):
    """Each tree node is among the k likeliest tokens after its path, the path drafted alone as a chain.

    The tree's head forwards attend across several branches at once; a wrong tree mask or position
    changes the hidden state of some node and so the children it offers.
    """
    head = head_from_target(target, VOCAB, seed=4)
    k, budget = 2, 10  # a random head is nearly uniform: 2 + 4 + 4 nodes, 3 deep
    drafter = EagleDrafter(head, max_batch=1, max_len=64, tree_topk=k, tree_beam=2, tree_min_prob=0.0)
    toks = _prompts(1, seed=5)[0][:12] + [4, 8, 16, 32]
    sample = collect(target, toks, head.cfg.feature_layers, VOCAB)
    drafter.observe_prefill([Prefill(0, None, sample.features[:-1].float(), torch.tensor(toks[1:]))])
    [draft] = drafter.propose([DraftRequest(0, toks, budget, SamplingParams(), torch.Generator())])
    assert draft.size == budget
    parents = draft.parents.tolist()
    depth = [0] * budget
    for i, p in enumerate(parents):
        depth[i] = 1 if p < 0 else depth[p] + 1
    assert max(depth) >= 3 and sum(d == 1 for d in depth) >= 2  # a real tree: branches and depth
    with torch.no_grad():
        cache = head.new_cache(1, 64)
        slot = cache.allocate()
        nxt = torch.tensor(toks[1:])[None]
        out = head(nxt, head.fuse(sample.features[:-1].float()[None]), TreeBatch.chains([nxt[0].tolist()]),
                   [slot], cache)
        cache.commit([slot], [list(range(nxt.shape[1]))])
        base, root = int(cache.lens[slot]), out[:, -1]
        for i in range(budget):
            path = []
            j = i
            while j >= 0:
                path.append(j)
                j = parents[j]
            path = path[::-1]
            h = root
            for m, node in enumerate(path):
                top = VOCAB[head.logits(h).topk(k, dim=-1).indices[0]].tolist()
                assert int(draft.tokens[node]) in top, f"node {node} (depth {m + 1}) is not a top-{k} child"
                if m + 1 < len(path):
                    t = torch.tensor([[int(draft.tokens[node])]])
                    h = head(t, h[:, None], TreeBatch.chains([[int(t)]]), [slot], cache)[:, 0]
                    cache.commit([slot], [[0]])
            cache.truncate(slot, base)


def test_ttt_unroll_equals_cached_drafting(target):
    head = head_from_target(target, VOCAB, seed=1)
    toks = torch.randint(256, (20,), generator=torch.Generator().manual_seed(0)).tolist()
    sample = collect(target, toks, head.cfg.feature_layers, VOCAB)
    steps, p = 4, 9
    with torch.no_grad():
        outs = ttt_forward(head, make_batch([sample]), steps)
        cache = head.new_cache(1, 64)
        slot = cache.allocate()
        nxt = torch.tensor(toks[1: p + 2])[None]
        out = head(nxt, head.fuse(sample.features[: p + 1].float()[None]), TreeBatch.chains([nxt[0].tolist()]),
                   [slot], cache)
        cache.commit([slot], [list(range(p + 1))])
        torch.testing.assert_close(out[0], outs[0][0, : p + 1], atol=1e-5, rtol=1e-5)
        h = out[:, -1]
        for j in range(1, steps):
            tok = torch.tensor([[toks[p + 1 + j]]])
            o = head(tok, h[:, None], TreeBatch.chains([[int(tok)]]), [slot], cache)
            cache.commit([slot], [[0]])
            torch.testing.assert_close(o[0, 0], outs[j][0, p + j], atol=1e-5, rtol=1e-5)
            h = o[:, 0]


def test_features_from_verification_equal_a_separate_forward(target):
    head = head_from_target(target, VOCAB, seed=1)
    drafter = EagleDrafter(head, max_batch=1, max_len=256, min_confidence=0.0)
    seen = []
    observe = drafter.observe
    drafter.observe = lambda fb: (seen.extend(fb), observe(fb))[1]  # type: ignore[method-assign]
    prompt = _prompts(1, seed=3)[0] + [5, 7]
    out, _ = _run(target, drafter, [prompt], SamplingParams(max_new_tokens=12), 1)
    full = list(prompt) + list(out["0"])
    ref = collect(target, full, head.cfg.feature_layers, VOCAB).features.float()
    pos = len(prompt) - 1                      # the first root
    for fb in seen:
        kept = fb.features[fb.verified.path]
        torch.testing.assert_close(kept, ref[pos: pos + len(fb.verified.path)], atol=2e-2, rtol=2e-2)
        pos += len(fb.verified.tokens)
    assert seen


def test_sparse_soft_xent_by_hand():
    logits = torch.tensor([[0.0, 1.0, 2.0]])
    ids, p = torch.tensor([[2, 0]]), torch.tensor([[0.6, 0.2]])
    lse = torch.logsumexp(logits, -1)
    want = -(0.6 * (2.0 - lse) + 0.2 * (0.0 - lse)) / 0.8
    torch.testing.assert_close(sparse_soft_xent(logits, ids, p), want)


def test_checkpoint_round_trip_and_mismatch_refused(target, tmp_path, tiny_model):
    head = head_from_target(target, VOCAB, seed=2)
    save_eagle(head, tmp_path / "h", version="v7")
    back, version = load_eagle(tmp_path / "h", target.cfg, target.embed)
    assert version == "v7"
    for k, v in head.state_dict().items():
        torch.testing.assert_close(back.state_dict()[k], v)
    other = load_model(str(tiny_model("qwen2_moe")), with_tokenizer=False, kernels="default").model
    import dataclasses

    wide = dataclasses.replace(target.cfg, hidden_size=target.cfg.hidden_size * 2)
    with pytest.raises(ValueError, match="hidden_size"):
        load_eagle(tmp_path / "h", wide, target.embed)
    fewer = dataclasses.replace(other.cfg, num_layers=2)
    with pytest.raises(ValueError, match="num_layers"):
        load_eagle(tmp_path / "h", fewer, target.embed)


@pytest.mark.parametrize("tree_topk", [0, 2])
def test_sampled_outputs_follow_the_target_law_with_three_deep_drafts(tmp_path, tree_topk):
    """An 8-token target, 4-token outputs: the first draft is 3 deep; the joint law of all 4 tokens is exact."""
    import itertools

    import transformers
    from scipy.stats import chisquare

    cfg = transformers.LlamaConfig(vocab_size=8, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   initializer_range=0.3, tie_word_embeddings=False)
    torch.manual_seed(5)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(tmp_path / "t8")
    target = load_model(str(tmp_path / "t8"), with_tokenizer=False, kernels="default").model
    prompt, params = [1, 2, 3], SamplingParams(temperature=1.0, max_new_tokens=4)
    # Exact law of the 4-token outputs from the target alone.
    outs = list(itertools.product(range(8), repeat=4))
    with torch.no_grad():
        ids = torch.tensor([prompt + list(o[:3]) for o in outs[::8]])
        logp = hf(ids).logits.float().log_softmax(-1)                      # [512, 6, 8]
    law = torch.zeros(len(outs))
    for n, o in enumerate(outs):
        row = logp[n // 8]
        law[n] = sum(row[len(prompt) - 1 + i, o[i]] for i in range(4)).exp()
    # The head drafts only 6 of the 8 tokens, so q is 0 for the others.
    head = head_from_target(target, torch.tensor([0, 1, 2, 3, 5, 6]), seed=3)
    drafter = EagleDrafter(head, max_batch=64, max_len=16, min_confidence=0.0, tree_topk=tree_topk, tree_min_prob=0.0)
    n = 3000
    e = Engine(target, drafter, EngineConfig(max_batch=64, max_len=16, speculation=3, topk_log=0))
    for i in range(n):
        e.add_request(Request(str(i), tuple(prompt), SamplingParams(temperature=1.0, max_new_tokens=4, seed=i)))
    counts = torch.zeros(len(outs))
    for f in e.run_to_completion():
        o = f.output_ids
        counts[((o[0] * 8 + o[1]) * 8 + o[2]) * 8 + o[3]] += 1
    # Chains: 3-deep drafts accepted. Trees of 3 nodes branch first: 2-deep ones accepted.
    assert len(e.stats.accepted_per_position) >= (2 if tree_topk else 3)
    expected = law * n
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big].sum()[None]])
    exp = torch.cat([expected[big], expected[~big].sum()[None]])
    assert big.sum() >= 10
    assert chisquare(obs.numpy(), exp.numpy() * obs.sum().item() / exp.sum().item()).pvalue > 1e-3


def test_a_tree_of_one_child_per_node_is_refused_by_name(target):
    from drafters.registry import DrafterConfig
    from serving.config import ServeConfig

    with pytest.raises(ValueError, match="eagle_tree_topk"):
        DrafterConfig("eagle", eagle_tree_topk=1)
    with pytest.raises(ValueError, match="eagle_tree_topk"):
        ServeConfig(drafter="eagle", eagle_tree_topk=-2)
    with pytest.raises(ValueError, match="tree_topk"):
        EagleDrafter(head_from_target(target, VOCAB), tree_topk=1)
