"""Speculative MoE's offline logic: profiling, expert grouping, token tables, placement, shuffles, accounting."""
from __future__ import annotations

import torch

from moe.smoe import (apply_placement, coactivation, contiguous_placement, group_experts, inverse_order,
                      nearest_profiled, placement_permutation, plain_token_rank, profile_layer, remote_destinations,
                      shuffle_order, token_table, volume)

E, EP, K, VOCAB = 16, 4, 2, 200


def planted(num_tokens: int, seed: int, noise: float = 0.05) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Experts in EP hidden groups (a random permutation); each token id prefers one group.

    Returns token ids [T], top-k experts [T, K] (distinct per token) and the hidden expert -> group map [E].
    """
    gen = torch.Generator().manual_seed(seed)
    group_of = torch.randperm(E, generator=torch.Generator().manual_seed(99)) % EP  # [E]
    members = [(group_of == g).nonzero().squeeze(1) for g in range(EP)]
    token_group = torch.randint(0, EP, (VOCAB,), generator=torch.Generator().manual_seed(7))
    ids = torch.randint(0, VOCAB, (num_tokens,), generator=gen)
    experts = torch.empty(num_tokens, K, dtype=torch.long)
    for t, tok in enumerate(ids.tolist()):
        pool = members[int(token_group[tok])]
        if torch.rand((), generator=gen) < noise:
            pool = torch.arange(E)
        experts[t] = pool[torch.randperm(pool.numel(), generator=gen)[:K]]
    return ids, experts, group_of


def test_profile_counts_every_route():
    ids = torch.tensor([5, 3, 5, 5])
    experts = torch.tensor([[0, 1], [1, 2], [0, 2], [0, 1]])
    p = profile_layer(ids, experts, 3)
    assert p.tokens.tolist() == [3, 5] and p.freq.tolist() == [1, 3]
    assert p.count.tolist() == [[0, 1, 1], [3, 2, 1]]
    torch.testing.assert_close(p.cp.sum(1), torch.ones(2, dtype=torch.float64))


def test_coactivation_counts_shared_tokens():
    m = coactivation(torch.tensor([[0, 1], [1, 2], [0, 1]]), 3)
    assert m.tolist() == [[2, 2, 0], [2, 3, 1], [0, 1, 1]]


def test_solver_recovers_planted_groups_and_balances_experts():
    ids, experts, group_of = planted(3000, seed=0)
    g = group_experts(profile_layer(ids, experts, E), EP, seed=0)
    assert torch.bincount(g.placement, minlength=EP).tolist() == [E // EP] * EP
    # Same partition as the planted one, up to renaming the ranks.
    for grp in range(EP):
        assert g.placement[group_of == grp].unique().numel() == 1
    # Held-out traffic from the same distribution, predicted by the token table.
    ids2, experts2, _ = planted(2000, seed=1)
    table = token_table(profile_layer(ids, experts, E), g, VOCAB, EP)
    spec = volume(experts2, table.predict(ids2), g.placement, EP, hidden=8)
    assert spec.lar >= 0.9
    assert (table.confidence[table.seen] > 0.5).float().mean() > 0.9      # Tp: most tokens are predictable
    greedy = token_table(profile_layer(ids, experts, E), g, VOCAB, EP, balanced=False)
    assert volume(experts2, greedy.predict(ids2), g.placement, EP, hidden=8).lar >= spec.lar - 0.01
    plain = volume(experts2, plain_token_rank(ids2.numel(), EP), contiguous_placement(E, EP), EP, hidden=8)
    assert abs(plain.lar - 1 / EP) < 0.05
    # Remote pairs fall by the predicted fraction: what is left is (1 - LAR) of all pairs.
    assert spec.remote_pairs == round((1 - spec.lar) * spec.pairs)
    assert spec.remote_pairs < 0.2 * plain.remote_pairs and spec.bytes < 0.2 * plain.bytes


def test_solver_is_deterministic_and_balances_token_load():
    ids, experts, _ = planted(1500, seed=2)
    prof = profile_layer(ids, experts, E)
    a, b = group_experts(prof, EP, seed=3), group_experts(prof, EP, seed=3)
    assert torch.equal(a.placement, b.placement) and torch.equal(a.token_rank, b.token_rank)
    load = torch.zeros(EP, dtype=torch.float64).index_add_(0, a.token_rank, prof.freq)
    assert load.max() <= 1.1 * prof.freq.sum() / EP + prof.freq.max()


def test_unseen_tokens_copy_their_nearest_neighbour():
    ids, experts, _ = planted(1000, seed=4)
    ids = ids % 100                                                        # ids 100.. never profiled
    prof = profile_layer(ids, experts, E)
    g = group_experts(prof, EP)
    emb = torch.randn(VOCAB, 16, generator=torch.Generator().manual_seed(0))
    emb[100:] = emb[:100] * 2.0                                            # token 100 + j points like token j
    table = token_table(prof, g, VOCAB, EP, neighbours=nearest_profiled(prof.tokens, emb))
    seen = prof.tokens
    assert table.seen[seen].all() and not table.seen[100:].any()
    assert torch.equal(table.rank[seen + 100], table.rank[seen])
    bare = token_table(prof, g, VOCAB, EP)
    assert torch.equal(bare.rank[150:], torch.arange(150, VOCAB) % EP)    # documented hash fallback


def test_placement_permutation_leaves_routing_and_output_unchanged():
    from tests.unit.test_ep_dispatch import make_block

    block = make_block(5, num_experts=8, top_k=3)
    placement = torch.tensor([2, 0, 1, 3, 3, 0, 2, 1])
    perm = placement_permutation(placement)
    assert placement[perm].tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    moved = make_block(5, num_experts=8, top_k=3)
    assert torch.equal(apply_placement(moved, placement), perm)
    assert torch.equal(moved.experts.down[2], block.experts.down[perm[2]])
    x = torch.randn(2, 9, 32)
    w0, e0 = block.router(x.reshape(-1, 32))
    w1, e1 = moved.router(x.reshape(-1, 32))
    # Routing choices are exact; the softmax sums the same logits in another order, so weights and
    # outputs may differ in the last bit (fp32 rounding), never more.
    assert torch.equal(perm[e1], e0)
    torch.testing.assert_close(w1, w0, atol=1e-7, rtol=1e-6)
    torch.testing.assert_close(moved(x), block(x), atol=1e-6, rtol=1e-6)


def test_shuffle_round_trip_with_uneven_groups():
    gen = torch.Generator().manual_seed(0)
    pred = torch.tensor([3, 0, 3, 3, 1, 3, 0, 3, 3, 3, 1])                 # rank 2 empty, rank 3 large
    order, sizes = shuffle_order(pred, 4)
    assert sizes.tolist() == [2, 2, 0, 7]
    assert pred[order].tolist() == sorted(pred.tolist())
    x = torch.randn(11, 5, generator=gen)
    positions, slots = torch.arange(11) * 3, torch.randperm(11, generator=gen)
    inv = inverse_order(order)
    for meta in (x, positions, slots):
        assert torch.equal(meta[order][inv], meta)
    # Each rank's slice of the shuffled order holds exactly its predicted tokens.
    bounds = torch.cumsum(torch.cat([torch.zeros(1, dtype=torch.long), sizes]), 0)
    for r in range(4):
        assert (pred[order[bounds[r]:bounds[r + 1]]] == r).all()


def test_volume_dedups_sends_to_the_same_rank():
    experts = torch.tensor([[0, 1], [0, 2], [2, 3]])
    placement = torch.tensor([0, 0, 1, 1])                                 # experts 0,1 on rank 0
    owner = torch.tensor([1, 0, 0])
    v = volume(experts, owner, placement, 2, hidden=10)
    assert v.local_pairs == 0 + 1 + 0 and v.remote_pairs == 5
    # token 0 goes once to rank 0 (two experts there), token 1 once to rank 1, token 2 once to rank 1.
    assert remote_destinations(experts, owner, placement, 2).sum() == 3 == v.remote_sends
    assert v.bytes == 2 * 3 * 10 * 4
