"""Token Recycling: the paper's template, budget layouts, matrix drafting and updates, serialization,
and greedy decoding with its drafts equal to plain greedy decoding.

V vocabulary, k candidates per token, n draft nodes.
"""
from __future__ import annotations

import pytest
import torch

from drafters.base import DraftRequest, Feedback
from drafters.recycling import TokenRecycling, layout_for, paper_template
from drafters.verify import Verified, verify_greedy
from moe.generate import SamplingParams

# §1.7 test 2 (the smpanaro/token-recycling case): an 8 x 4 matrix, a 4-node template, root 5.
TOY_ROWS = [[7, 2, 0, 5], [3, 6, 1, 4], [5, 2, 7, 0], [1, 6, 4, 3],
            [0, 7, 2, 4], [6, 3, 5, 1], [4, 1, 7, 2], [3, 0, 5, 6]]
TOY_TEMPLATE = [(0,), (1,), (2,), (0, 0)]


def toy_recycler() -> TokenRecycling:
    tr = TokenRecycling(vocab_size=8, k=4, template=TOY_TEMPLATE, budgets=(4,))
    tr.matrix = torch.tensor(TOY_ROWS, dtype=torch.int32)
    return tr


def nodes_of(parents: list[int], ranks: list[int]) -> list[tuple[int, ...]]:
    """Rank tuples of a layout's nodes, rebuilt from its parents and ranks."""
    nodes: list[tuple[int, ...]] = []
    for par, rank in zip(parents, ranks):
        nodes.append((nodes[par] if par >= 0 else ()) + (rank,))
    return nodes


def test_paper_template_shape():
    nodes = paper_template()
    assert len(nodes) == 80 and len(set(nodes)) == 80
    assert [sum(len(t) == d for t in nodes) for d in range(1, 7)] == [8, 21, 25, 15, 8, 3]
    assert all(t[:-1] in nodes for t in nodes if len(t) > 1), "not prefix-closed"
    children = {t: [c for c in nodes if c[:-1] == t] for t in [()] + nodes}
    assert sum(not kids for t, kids in children.items() if t) == 40  # leaves
    # A node with c children has the children of ranks 0..c-1.
    assert all(sorted(c[-1] for c in kids) == list(range(len(kids))) for kids in children.values())
    # Branching along the leftmost spine, as counted from the reference template (§1.3).
    expected = {(): 8, (0,): 8, (1,): 4, (2,): 3, (3,): 2, (4,): 1, (5,): 1, (6,): 1, (7,): 1,
                (0, 0): 8, (0, 1): 3, (0, 2): 2, (0, 3): 1, (0, 4): 1, (0, 5): 1, (0, 6): 1, (0, 7): 1,
                (0, 0, 0): 5, (0, 0, 1): 2, (0, 0, 2): 1, (0, 0, 3): 1, (0, 0, 4): 1,
                (0, 0, 0, 0): 3, (0, 0, 0, 1): 1, (0, 0, 0, 2): 1, (0, 0, 0, 0, 0): 2}
    assert {t: len(children[t]) for t in expected} == expected
    assert nodes == sorted(nodes, key=lambda t: (len(t), t)), "not breadth-first"


@pytest.mark.parametrize("budget", range(1, 81))
def test_layout_for_every_budget(budget):
    template = tuple(paper_template())
    layout = layout_for(template, budget)
    parents, ranks = layout.parents.tolist(), layout.ranks.tolist()
    assert len(parents) == len(ranks) == budget
    assert all(-1 <= p < i for i, p in enumerate(parents))
    nodes = nodes_of(parents, ranks)
    assert len(set(nodes)) == budget and set(nodes) <= set(template)
    assert nodes == sorted(nodes, key=lambda t: (len(t), t)), "not breadth-first"
    assert [(s, e) for s, e in layout.levels] == [
        (min(i for i, t in enumerate(nodes) if len(t) == d), 1 + max(i for i, t in enumerate(nodes) if len(t) == d))
        for d in sorted({len(t) for t in nodes})]
    if budget == 80:
        assert nodes == list(template)


def test_toy_matrix_drafts_the_reference_tree():
    tr = toy_recycler()
    draft = tr.draft_tree(5, 4)
    # Most promising first: ranks (0), (0, 0), (1), (2) of the root 5.
    assert [5] + draft.tokens.tolist() == [5, 6, 4, 3, 5]
    assert draft.parents.tolist() == [-1, 0, -1, -1]
    for b in range(1, 4):  # a smaller budget drafts this draft's first nodes
        small = tr.draft_tree(5, b)
        assert small.tokens.tolist() == draft.tokens[:b].tolist() and small.parents.tolist() == draft.parents[:b].tolist()
    assert draft.q is None  # deterministic: verified by the target-only rule
    req = DraftRequest(seq_id=1, history=[2, 7, 5], budget=4, params=SamplingParams(), generator=torch.Generator())
    [proposed] = tr.propose([req])
    assert proposed.tokens.tolist() == draft.tokens.tolist()
    assert tr.draft_tree(5, 0).size == 0


def test_template_is_cut_to_k():
    tr = TokenRecycling(vocab_size=8, k=2)
    assert tr.template and all(max(t) < 2 for t in tr.template)
    assert all(t[:-1] in tr.template for t in tr.template if len(t) > 1)
    assert all(b <= len(tr.template) for b in tr.budgets())
    with pytest.raises(ValueError, match="k"):
        TokenRecycling(vocab_size=8, k=9)


def test_observe_overwrites_every_tree_token_row():
    tr = toy_recycler()
    before = tr.matrix.clone()
    tree = torch.tensor([5, 6, 3, 5, 4])  # token 5 twice: root and node 2
    g = torch.Generator().manual_seed(0)
    topk = torch.stack([torch.randperm(8, generator=g)[:4] for _ in tree])  # [n+1, k] distinct ids per row
    assert topk[0].tolist() != topk[3].tolist()
    verified = Verified(path=[0, 1], tokens=[6, 2])
    tr.observe([Feedback(seq_id=1, tree_tokens=tree, topk_ids=topk, verified=verified)])
    assert tr.matrix.dtype == torch.int32 and tr.updates == 1
    for node, tok in enumerate(tree.tolist()):
        if tree.tolist().count(tok) == 1:
            assert tr.matrix[tok].tolist() == topk[node].tolist()
    assert tr.matrix[5].tolist() in (topk[0].tolist(), topk[3].tolist())
    untouched = [t for t in range(8) if t not in tree.tolist()]
    assert torch.equal(tr.matrix[untouched], before[untouched])
    # The next draft from 6 reads the row the target just wrote.
    d = tr.draft_tree(6, 4)
    assert d.tokens[d.parents < 0].tolist() == topk[1, :3].tolist()


def test_observe_keeps_the_first_k_ranks_of_a_wider_topk():
    tr = toy_recycler()
    topk = torch.arange(2 * 6).reshape(2, 6) % 8
    tr.observe([Feedback(0, torch.tensor([1, 2]), topk, Verified([0], [3]))])
    assert tr.matrix[[1, 2]].tolist() == topk[:, :4].tolist()


def test_bytes_round_trip_and_shape_check():
    tr = TokenRecycling(vocab_size=50, k=4)
    tr.matrix = torch.randint(0, 50, (50, 4), generator=torch.Generator().manual_seed(1), dtype=torch.int32)
    other = TokenRecycling(vocab_size=50, k=4)
    other.load_bytes(tr.to_bytes())
    assert other.matrix.dtype == torch.int32 and torch.equal(other.matrix, tr.matrix)
    for wrong in (TokenRecycling(vocab_size=51, k=4), TokenRecycling(vocab_size=50, k=3)):
        with pytest.raises(ValueError, match="does not fit"):
            wrong.load_bytes(tr.to_bytes())


def test_matrix_memory_for_smollm2_vocab():
    tr = TokenRecycling(vocab_size=49152, k=8)
    assert tr.matrix.dtype == torch.int32
    assert tr.matrix.numel() * tr.matrix.element_size() < 2 * 1024 * 1024


def _toy_logits(v: int, seed: int) -> torch.Tensor:
    """[V, V, V] a trigram toy LM: logits of the next token given the last two."""
    return torch.randn(v, v, v, generator=torch.Generator().manual_seed(seed))


def _greedy(table: torch.Tensor, prompt: list[int], n: int) -> list[int]:
    out = list(prompt)
    while len(out) < len(prompt) + n:
        out.append(int(table[out[-2], out[-1]].argmax()))
    return out[len(prompt):]


def _recycled(tr: TokenRecycling, table: torch.Tensor, prompt: list[int], n: int, budget: int) -> tuple[list[int], float]:
    """Greedy decoding where every step verifies a TR draft, then feeds the target's top-k back."""
    hist, steps = list(prompt), 0
    while len(hist) < len(prompt) + n:
        draft = tr.draft_tree(hist[-1], budget)
        tree = [hist[-1]] + draft.tokens.tolist()
        prev = [hist[-2]] + [tree[p + 1] for p in draft.parents.tolist()]  # token before each tree node
        logits = table[prev, tree]                                         # [n+1, V]
        verified = verify_greedy(draft, logits)
        tr.observe([Feedback(0, torch.tensor(tree), logits.topk(tr.k, -1).indices, verified)])
        hist += verified.tokens
        steps += 1
    return hist[len(prompt):len(prompt) + n], (len(hist) - len(prompt)) / steps


@pytest.mark.parametrize("budget", [4, 16, 80])
def test_greedy_with_recycled_drafts_equals_plain_greedy(budget):
    """§1.7 test 4 on a toy trigram LM: cold matrix, hot matrix, then a random (adversarial) matrix."""
    v = 24
    table = _toy_logits(v, seed=budget)
    prompts = [torch.randint(0, v, (6,), generator=torch.Generator().manual_seed(s)).tolist() for s in range(8)]
    tr = TokenRecycling(vocab_size=v, k=8)
    mats = []
    for state in ("cold", "hot", "random"):
        if state == "random":
            tr.matrix = torch.randint(0, v, (v, 8), generator=torch.Generator().manual_seed(3), dtype=torch.int32)
        for prompt in prompts:
            out, mat = _recycled(tr, table, prompt, 48, budget)
            assert out == _greedy(table, prompt, 48), f"{state} matrix, prompt {prompt}"
            assert 1.0 <= mat <= 7.0
            mats.append(mat)
    assert max(mats) > 1.0, "the drafts never helped"
