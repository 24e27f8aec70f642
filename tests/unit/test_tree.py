"""Token-tree forwards: each node's logits equal decoding its root-to-node path alone; commit rolls back the rest."""
from __future__ import annotations

import pytest
import torch

from moe.loader import load_model
from moe.tree import TreeBatch

TOL = 1e-4


def prefill(model, cache, prompts):
    slots = [cache.allocate() for _ in prompts]
    model(TreeBatch.chains(prompts), slots, cache)
    cache.commit(slots, [list(range(len(p))) for p in prompts])
    return slots


def path_logits(model, prompt: list[int], path_tokens: list[int]) -> torch.Tensor:
    """Logits of the last token of prompt + path, decoded as one plain chain in a fresh cache."""
    cache = model.new_cache(1, len(prompt) + len(path_tokens) + 1)
    slot = cache.allocate()
    return model(TreeBatch.chains([prompt + path_tokens]), [slot], cache, logits_for="last")[0]


def _ragged_trees(widths: list[int], seed: int) -> tuple[TreeBatch, list[list[int]]]:
    """One random tree per sequence, of the given node counts (seeds seed, seed + 1, ...), and their tokens."""
    tokens, parents = [], []
    for b, w in enumerate(widths):
        t = TreeBatch.make_dummy(1, w, seed=seed + b, vocab_size=256)
        tokens.append(t.tokens[0].tolist())
        parents.append(t.parents[0].tolist())
    return TreeBatch.from_lists(tokens, parents), tokens


@pytest.mark.parametrize("name", ["llama", "mistral", "qwen2_moe", "mixtral"])
def test_every_node_equals_its_path_decoded_alone(name, tiny_model):
    model = load_model(str(tiny_model(name)), with_tokenizer=False).model
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (19, 5, 30)]
    cache = model.new_cache(4, 96)
    slots = prefill(model, cache, prompts)
    # Ragged trees: 15, 20 and 17 real nodes.
    widths = [15, 20, 17]
    tree, tokens = _ragged_trees(widths, seed=100)
    assert int(tree.depths().max()) >= 3, "trees should be deeper than a star"
    logits = model(tree, slots, cache)
    for b, prompt in enumerate(prompts):
        for node in range(widths[b]):
            path = [tokens[b][i] for i in tree.path_to(b, node)]
            torch.testing.assert_close(logits[b, node], path_logits(model, prompt, path), atol=TOL, rtol=0)


@pytest.mark.parametrize("name", ["llama", "olmoe"])
def test_commit_then_continue_equals_decoding_from_scratch(name, tiny_model):
    model = load_model(str(tiny_model(name)), with_tokenizer=False).model
    g = torch.Generator().manual_seed(11)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (12, 25, 8)]
    cache = model.new_cache(3, 128)
    slots = prefill(model, cache, prompts)
    histories = [list(p) for p in prompts]
    for round_ in range(3):
        tree = TreeBatch.make_dummy(3, 16, seed=round_, vocab_size=256)
        model(tree, slots, cache)
        # Accept a different root-to-node path per sequence (the deepest node's path for one of them).
        targets = [15, int(tree.depths()[1].argmax()), 3 + round_]
        paths = [tree.path_to(b, n) for b, n in enumerate(targets)]
        cache.commit(slots, paths)
        for b, path in enumerate(paths):
            histories[b] += [int(tree.tokens[b, i]) for i in path]
    assert cache.lens[slots].tolist() == [len(h) for h in histories]
    nxt = [[5], [77], [200]]
    cont = model(TreeBatch.chains(nxt), slots, cache, logits_for="last")
    for b, h in enumerate(histories):
        torch.testing.assert_close(cont[b], path_logits(model, h, nxt[b]), atol=TOL, rtol=0)


def test_tree_validation_rejects_forward_parents():
    with pytest.raises(ValueError, match="parent"):
        TreeBatch.from_lists([[1, 2, 3]], [[-1, 2, 0]])


def test_ancestors_of_a_known_tree():
    #      0     5
    #     / \    |
    #    1   2   6
    #   /|
    #  3 4
    tree = TreeBatch.from_lists([[9] * 7], [[-1, 0, 0, 1, 1, -1, 5]])
    assert tree.depths()[0].tolist() == [0, 1, 1, 2, 2, 0, 1]
    assert tree.path_to(0, 4) == [0, 1, 4]
    anc = tree.ancestors()[0]
    assert anc[4].nonzero().flatten().tolist() == [0, 1, 4]
    assert anc[6].nonzero().flatten().tolist() == [5, 6]


@pytest.mark.parametrize("name", ["llama", "mistral", "olmoe"])
@pytest.mark.parametrize("order", ["in-order", "permuted", "scattered"])
def test_packed_batch_of_plain_steps_and_trees_equals_each_path_alone(name, order, tiny_model):
    """Sequences verifying nothing beside deep trees (the packed forward's two attention groups), their
    slots read in place (in order or permuted) or gathered: every node's logits, in both the padded
    [B, N, V] and the back-to-back row layout, equal its path decoded alone; the commit keeps the path."""
    model = load_model(str(tiny_model(name)), with_tokenizer=False).model
    g = torch.Generator().manual_seed(3)
    cache = model.new_cache(8, 96)
    taken = [cache.allocate() for _ in range(8)]
    use = {"in-order": [0, 1, 2, 3, 4], "permuted": [3, 1, 0, 4, 2], "scattered": [6, 0, 7, 2, 5]}[order]
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (9, 21, 4, 15, 30)]
    slots = [taken[i] for i in use]
    model(TreeBatch.chains(prompts), slots, cache)
    cache.commit(slots, [list(range(len(p))) for p in prompts])
    widths = [1, 6, 1, 1, 9]
    tree, tokens = _ragged_trees(widths, seed=40)
    padded = model(tree, slots, cache)
    out = model(tree, slots, cache, logits_for="rows")
    assert out.sizes == widths and out.logits.shape[0] == sum(widths)   # real rows only
    for b, prompt in enumerate(prompts):
        assert out.logits_of(b).shape[0] == widths[b]
        for node in range(widths[b]):
            want = path_logits(model, prompt, [tokens[b][i] for i in tree.path_to(b, node)])
            torch.testing.assert_close(padded[b, node], want, atol=TOL, rtol=0)
            torch.testing.assert_close(out.logits_of(b)[node], want, atol=TOL, rtol=0)
    # Keep the deepest path of each tree, then one more token: as if decoded from scratch.
    paths = [tree.path_to(b, int(tree.depths()[b, :w].argmax())) for b, w in enumerate(widths)]
    cache.commit(slots, paths)
    nxt = [[11], [12], [13], [14], [15]]
    cont = model(TreeBatch.chains(nxt), slots, cache, logits_for="last")
    for b, prompt in enumerate(prompts):
        history = prompt + [tokens[b][i] for i in paths[b]]
        torch.testing.assert_close(cont[b], path_logits(model, history, nxt[b]), atol=TOL, rtol=0)


def test_a_nearly_full_slot_beside_a_wide_tree(tiny_model):
    """Packed, only real nodes are written and read: a sequence one position from the end of its slot
    verifies beside a 9-node tree (padded, it would need 9 positions)."""
    model = load_model(str(tiny_model("llama")), with_tokenizer=False).model
    g = torch.Generator().manual_seed(8)
    cache = model.new_cache(2, 40)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (39, 5)]
    slots = prefill(model, cache, prompts)
    wide = TreeBatch.make_dummy(1, 9, seed=2, vocab_size=256)
    tree = TreeBatch.from_lists([[17], wide.tokens[0].tolist()], [[-1], wide.parents[0].tolist()])
    out = model(tree, slots, cache, logits_for="rows")
    torch.testing.assert_close(out.logits_of(0)[0], path_logits(model, prompts[0], [17]), atol=TOL, rtol=0)
    for node in range(9):
        path = [int(tree.tokens[1, i]) for i in tree.path_to(1, node)]
        torch.testing.assert_close(out.logits_of(1)[node], path_logits(model, prompts[1], path), atol=TOL, rtol=0)
