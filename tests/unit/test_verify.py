"""Losslessness gate for drafters/verify.py.

V vocabulary, K siblings at one tree node, N Monte Carlo samples.
Four layers: (1) exact enumeration of the §2.2 rules, float64, no sampling; (2) chi-square of the
real verifier's output law on N = 2e5 seeded samples per case, each beside a deliberately wrong
verifier that the same statistic must reject; (3) the Gumbel-Top-k draft law; (4) greedy stubs with
100.0 logit spikes (vLLM style), p == q, and seeded determinism.
"""
from __future__ import annotations

import functools
import random
from bisect import bisect_right
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pytest
import torch
from scipy.stats import binomtest, chisquare

from drafters.recycling import TokenRecycling
from drafters.verify import Draft, Verified, verify, verify_greedy, verify_sampled
from moe.generate import SamplingParams, probs_from_logits

N = 100_000           # Monte Carlo samples per chi-square case (every negative control still gets p < 1e-300)
PASS, REJECT = 1e-3, 1e-6


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Every tensor here holds a few dozen floats. With two intra-op threads on a busy two-core box,
    each softmax or sort wakes the thread pool and one `verify` call takes milliseconds, not ~50 us."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _dirichlet(rng: np.random.Generator, v: int, zeros: tuple[int, ...] = ()) -> np.ndarray:
    """A random law over v tokens (float64), with the listed tokens given no mass."""
    x = rng.dirichlet(np.ones(v))
    x[list(zeros)] = 0.0
    return x / x.sum()


def _drop(x: np.ndarray, token: int) -> np.ndarray:
    """x with `token` removed and renormalized (left unnormalized when nothing is left)."""
    y = x.copy()
    y[token] = 0.0
    return y / y.sum() if y.sum() > 0 else y


def _chi2_pvalue(counts: np.ndarray, expected: np.ndarray) -> float:
    """Goodness of fit of counts to a law; a count where the law has no mass is an outright failure."""
    support = expected > 0
    if counts[~support].sum():
        return 0.0
    e = expected[support] / expected[support].sum()
    return float(chisquare(counts[support], counts.sum() * e).pvalue)


# ---------------------------------------------------------------- 1. exact enumeration (spec §2.2)

def _exact_sampled(p: np.ndarray, q_draw: np.ndarray, q_ver: np.ndarray, k: int,
                   draw_without_replacement: bool, verifier_removes: bool) -> tuple[np.ndarray, float]:
    """Exact law of the token emitted at a node with k sampled children, and P(a child is accepted).

    The children are drawn one by one from q_draw (with each earlier child removed when drawn
    without replacement); the verifier runs min(1, p/q) with its own q_ver, replaces p by the
    residual after each rejection and removes the rejected child from q_ver when `verifier_removes`.
    The correct rules have q_ver == q_draw throughout.
    """
    if k == 0:
        return p.copy(), 0.0
    law, acc = np.zeros_like(p), 0.0
    for x in np.flatnonzero(q_draw):
        w = q_draw[x]
        a = min(1.0, p[x] / q_ver[x]) if q_ver[x] > 0 else 0.0
        law[x] += w * a
        acc += w * a
        if a < 1.0:
            residual = np.maximum(p - q_ver, 0.0)
            residual = residual / residual.sum() if residual.sum() > 0 else p
            sub, sub_acc = _exact_sampled(
                residual,
                _drop(q_draw, x) if draw_without_replacement else q_draw,
                _drop(q_ver, x) if verifier_removes else q_ver,
                k - 1, draw_without_replacement, verifier_removes)
            law += w * (1 - a) * sub
            acc += w * (1 - a) * sub_acc
    return law, acc


def _exact_target_only(p: np.ndarray, siblings: list[int], renormalize: bool = True) -> np.ndarray:
    """Exact law of the emitted token for fixed siblings: each tried with its share of the mass left."""
    law, rest, cur = np.zeros_like(p), 1.0, p.copy()
    for x in siblings:
        law[x] += rest * cur[x]
        rest *= 1.0 - cur[x]
        if renormalize:
            cur = _drop(cur, x)
    return law + rest * cur


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_exact_rrs_without_replacement_emits_the_target_law(k, seed):
    rng = np.random.default_rng(seed)
    v = 5 + seed % 2
    p, q = _dirichlet(rng, v), _dirichlet(rng, v)
    law, acc = _exact_sampled(p, q, q, k, draw_without_replacement=True, verifier_removes=True)
    np.testing.assert_allclose(law, p, rtol=0, atol=1e-12)
    if k == 1:  # a chain step: P(accept) = sum min(p, q) = 1 - TV(p, q)
        assert acc == pytest.approx(np.minimum(p, q).sum(), abs=1e-12)
    # Power of the enumeration: keeping the original q for later siblings is visibly wrong.
    wrong, _ = _exact_sampled(p, q, q, k, draw_without_replacement=True, verifier_removes=False)
    if k >= 2:
        assert np.abs(wrong - p).max() > 1e-3


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_exact_rrs_with_replacement_emits_the_target_law(k, seed):
    rng = np.random.default_rng(100 + seed)
    v = 5 + seed % 2
    p, q = _dirichlet(rng, v), _dirichlet(rng, v)
    law, _ = _exact_sampled(p, q, q, k, draw_without_replacement=False, verifier_removes=False)
    np.testing.assert_allclose(law, p, rtol=0, atol=1e-12)


def test_exact_rrs_with_disjoint_supports():
    """Truncated laws (top-k/top-p): q puts mass where p has none and the other way round."""
    rng = np.random.default_rng(7)
    p, q = _dirichlet(rng, 6, zeros=(4, 5)), _dirichlet(rng, 6, zeros=(0,))
    for k in (1, 2, 3):
        for wor in (True, False):
            law, _ = _exact_sampled(p, q, q, k, wor, wor)
            np.testing.assert_allclose(law, p, rtol=0, atol=1e-12)


@pytest.mark.parametrize("siblings", [[2], [0, 1, 2, 3], [3, 3, 1], [4, 0, 4, 0, 2], [5, 1]])
@pytest.mark.parametrize("seed", range(4))
def test_exact_target_only_emits_the_target_law(siblings, seed):
    rng = np.random.default_rng(200 + seed)
    p = _dirichlet(rng, 6, zeros=(5,) if seed % 2 else ())  # sibling 5 may have no target mass
    np.testing.assert_allclose(_exact_target_only(p, siblings), p, rtol=0, atol=1e-12)
    assert np.abs(_exact_target_only(p, siblings, renormalize=False) - p).max() > 1e-3


def test_exact_target_only_when_the_siblings_hold_all_the_mass():
    p = np.array([0.0, 0.3, 0.0, 0.7, 0.0])
    np.testing.assert_allclose(_exact_target_only(p, [3, 1, 3]), p, rtol=0, atol=1e-12)


# ---------------------------------------------------------------- 2. chi-square on the real verifier

def _gumbel_topk_local(logq: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """[..., V] log-probs -> [..., k] tokens, distributed like k sequential draws without replacement."""
    gumbel = -torch.empty(logq.shape, dtype=torch.float64).exponential_(generator=generator).log()
    return (logq.double() + gumbel).topk(k, dim=-1).indices


def _buggy_verify(draft: Draft, p_rows: list[list[float]], q_rows: list[list[float]] | None,
                  rng: random.Random, bug: str) -> list[int]:
    """The §2.2 tree walk in plain Python with one deliberate bug; the negative controls.

    Bugs: "correction_from_p" (no residual), "keep_q" (rejected siblings stay in q),
    "no_renorm" (target-only: rejected siblings keep their mass), "parent_row" (each node is
    verified against its parent's target row, an off-by-one-level bug).
    """
    tokens, parents = draft.tokens.tolist(), draft.parents.tolist()
    node, out = 0, []
    while True:
        row = parents[node - 1] + 1 if bug == "parent_row" and node else node
        p = np.array(p_rows[row])
        q = None if q_rows is None else np.array(q_rows[node])
        for child in [i for i, par in enumerate(parents) if par + 1 == node]:
            x, u = tokens[child], rng.random()
            if q is None:
                if u < p[x]:
                    break
                p = p if bug == "no_renorm" else _drop(p, x)
            else:
                if u * q[x] < p[x]:
                    break
                residual = np.maximum(p - q, 0.0)
                if bug != "correction_from_p" and residual.sum() > 0:
                    p = residual / residual.sum()
                if bug != "keep_q" and not draft.with_replacement:
                    q = _drop(q, x)
        else:
            return out + rng.choices(range(len(p)), weights=p.tolist())
        node = child + 1
        out.append(x)


@dataclass(frozen=True)
class _Case:
    """One chi-square case: N drafts, the target at each node, and the law of the output cell."""

    draft: Callable[[int], Draft]                  # sample index -> its draft
    probs: Callable[[int], torch.Tensor]           # sample index -> [n+1, V] target law at each node
    p_rows: Callable[[int], list[list[float]]]     # the same as plain lists (for the buggy walker)
    q_rows: Callable[[int], list[list[float]] | None]
    cell: Callable[[list[int], int], int]          # (emitted tokens, sample index) -> cell
    expected: np.ndarray                           # [V, C] law of the cell: first token, then C sub-cells
    accept: float                                  # exact P(some root child is accepted)
    n: int = N                                     # samples


def _first(tokens: list[int], i: int) -> int:
    return tokens[0]


def _chain_case() -> _Case:
    """One chain step: x ~ q, q puts mass on a token p excludes and misses one p has."""
    rng = np.random.default_rng(1)
    p, q = _dirichlet(rng, 6, zeros=(5,)), _dirichlet(rng, 6, zeros=(0,))
    xs = torch.multinomial(torch.tensor(q), N, replacement=True, generator=torch.Generator().manual_seed(1)).tolist()
    qt = torch.tensor(np.stack([q, q]), dtype=torch.float32)
    drafts = [Draft.chain([x], qt) for x in range(6)]
    probs = torch.tensor(np.stack([p, p]), dtype=torch.float32)
    return _Case(lambda i: drafts[xs[i]], lambda i: probs, lambda i: [p.tolist()] * 2, lambda i: [q.tolist()] * 2,
                 _first, p[:, None], float(np.minimum(p, q).sum()))


def _specinfer_case() -> _Case:
    """One node, K = 3 children drawn i.i.d. from q (SpecInfer), so duplicates happen; 1e5 samples,
    as it only adds the with-replacement branch to what the other cases cover."""
    rng = np.random.default_rng(3)
    p, q = _dirichlet(rng, 6), _dirichlet(rng, 6)
    g = torch.Generator().manual_seed(3)
    kids = torch.multinomial(torch.tensor(q).expand(N, 6), 3, replacement=True, generator=g).tolist()
    qt = torch.tensor(np.stack([q] * 4), dtype=torch.float32)
    parents = torch.full((3,), -1, dtype=torch.long)

    @functools.cache
    def make(triple: tuple[int, ...]) -> Draft:
        return Draft(torch.tensor(triple), parents, qt, with_replacement=True)

    _, acc = _exact_sampled(p, q, q, 3, draw_without_replacement=False, verifier_removes=False)
    probs = torch.tensor(np.stack([p] * 4), dtype=torch.float32)
    return _Case(lambda i: make(tuple(kids[i])), lambda i: probs, lambda i: [p.tolist()] * 4,
                 lambda i: [q.tolist()] * 4, _first, p[:, None], acc, n=N // 2)


def _recycling_case() -> _Case:
    """A Token Recycling tree (root children 3, 1, 3: a duplicate, and token 1 cut by top-k) under
    the target's law at temperature 0.8, top-k 5, as `verify` computes it from raw logits."""
    tr = TokenRecycling(vocab_size=6, k=4, template=[(0,), (1,), (2,)], budgets=(3,))
    tr.matrix[0] = torch.tensor([3, 1, 3, 5], dtype=torch.int32)
    draft = tr.draft_tree(0, 3)
    assert draft.tokens.tolist() == [3, 1, 3] and draft.parents.tolist() == [-1, -1, -1]
    logits = torch.randn(6, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    logits[:, 1] = logits.min() - 1.0  # token 1 is the one top-k 5 removes
    logits[0, 3] = logits[0].max()     # the duplicate sibling holds a good share of the mass
    z = (logits / 0.8).exp()
    z[:, 1] = 0.0
    law = (z / z.sum(-1, keepdim=True)).numpy()  # the target law, worked out here, not by moe.generate
    # `verify` is verify_sampled over probs_from_logits; check that step once rather than 2e5 times.
    probs = probs_from_logits(logits.float(), SamplingParams(temperature=0.8, top_k=5))
    np.testing.assert_allclose(probs.double().numpy(), law, rtol=0, atol=1e-6)
    return _Case(lambda i: draft, lambda i: probs, lambda i: law.tolist(), lambda i: None,
                 _first, law[0][:, None], float(law[0, [3, 1]].sum()))


def _rsd_tree_case() -> _Case:
    """A depth-2 RSD-C tree, branching [3, 2] by Gumbel-Top-k, under bigram target and draft models.

    The cell is the pair of the first two emitted tokens, completed from p(.|first) when only one
    came out (as the next step would); its first-token marginal is the one-step K = 3 test.
    """
    v, root = 6, 0
    # Seed 2: at the root p > q on three tokens, and both stale-q bugs (in the ratio, or only in the
    # residual) move the law far; some seeds make the residual one-hot, which hides the latter.
    rng = np.random.default_rng(2)
    P = np.stack([_dirichlet(rng, v) for _ in range(v)])  # [V, V] p(.|prev)
    Q = np.stack([_dirichlet(rng, v) for _ in range(v)])
    g = torch.Generator().manual_seed(4)
    logq = torch.tensor(Q).log()
    top = _gumbel_topk_local(logq[root].expand(N, v), 3, g)           # [N, 3]
    below = _gumbel_topk_local(logq[top], 2, g)                        # [N, 3, 2]
    tokens = torch.cat([top, below.flatten(1)], 1)                     # [N, 9]
    tree = torch.cat([torch.full((N, 1), root), tokens], 1)            # [N, 10]
    p_rows = torch.tensor(P, dtype=torch.float32)[tree]                # [N, 10, V]
    q_rows = torch.tensor(Q, dtype=torch.float32)[tree]
    parents = torch.tensor([-1, -1, -1, 0, 0, 1, 1, 2, 2])
    cdf = np.cumsum(P, 1).tolist()
    u2 = np.random.default_rng(5).random(N)
    trees, P_list, Q_list = tree.tolist(), P.tolist(), Q.tolist()

    def cell(out: list[int], i: int) -> int:
        second = out[1] if len(out) > 1 else min(bisect_right(cdf[out[0]], u2[i]), v - 1)
        return out[0] * v + second

    _, acc = _exact_sampled(P[root], Q[root], Q[root], 3, True, True)
    return _Case(lambda i: Draft(tokens[i], parents, q_rows[i]), lambda i: p_rows[i],
                 lambda i: [P_list[t] for t in trees[i]], lambda i: [Q_list[t] for t in trees[i]], cell,
                 P[root][:, None] * P, acc)


_CASES: dict[str, Callable[[], _Case]] = {
    "chain": _chain_case,
    "rsd_tree_3x2": _rsd_tree_case,
    "specinfer_iid3": _specinfer_case,
    "token_recycling": _recycling_case,
}


# The deliberate bugs each case's statistic must catch (see _buggy_verify).
_BUGS: dict[str, tuple[str, ...]] = {
    "chain": ("correction_from_p",),
    "rsd_tree_3x2": ("keep_q", "parent_row"),
    "specinfer_iid3": ("correction_from_p",),
    "token_recycling": ("no_renorm",),
}


@functools.cache
def _case(name: str) -> _Case:
    return _CASES[name]()


def _run(case: _Case, bug: str | None) -> tuple[np.ndarray, int]:
    """[V, C] counts over the case's seeded samples, and how many steps accepted a root child."""
    gen, rng = torch.Generator().manual_seed(1234), random.Random(1234)
    cells, accepted = np.empty(case.n, dtype=np.int64), 0
    for i in range(case.n):
        d = case.draft(i)
        out = (verify_sampled(d, case.probs(i), gen).tokens if bug is None
               else _buggy_verify(d, case.p_rows(i), case.q_rows(i), rng, bug))
        cells[i] = case.cell(out, i)
        accepted += len(out) > 1
    return np.bincount(cells, minlength=case.expected.size).reshape(case.expected.shape), accepted


@pytest.mark.parametrize("name", list(_CASES))
def test_real_verifier_follows_the_target_law(name):
    case = _case(name)
    counts, accepted = _run(case, bug=None)
    p_first = _chi2_pvalue(counts.sum(1), case.expected.sum(1))
    p_all = _chi2_pvalue(counts.ravel(), case.expected.ravel())
    p_acc = binomtest(accepted, case.n, case.accept).pvalue
    print(f"\n{name}: first token p = {p_first:.4g}, all {counts.size} cells p = {p_all:.4g}; "
          f"acceptance {accepted / case.n:.4f} vs exact {case.accept:.4f} (p = {p_acc:.3g})")
    assert p_first > PASS and p_all > PASS, f"{name}: output law differs from the target"
    assert p_acc > PASS, f"{name}: acceptance rate {accepted / case.n:.4f}, exact {case.accept:.4f}"


@pytest.mark.parametrize("name, bug", [(n, b) for n, bugs in _BUGS.items() for b in bugs])
def test_negative_control_is_rejected(name, bug):
    case = _case(name)
    counts, _ = _run(case, bug)
    p_all = _chi2_pvalue(counts.ravel(), case.expected.ravel())
    p_first = _chi2_pvalue(counts.sum(1), case.expected.sum(1))
    print(f"\n{name} with bug {bug}: all cells p = {p_all:.4g} (first token p = {p_first:.4g})")
    assert p_all < REJECT, f"the chi-square test cannot tell the {bug} bug apart (p = {p_all:.3g})"


def test_buggy_walker_without_its_bug_passes():
    """The negative controls fail for their bug alone: the same walker with no bug passes."""
    case = _case("rsd_tree_3x2")
    counts, _ = _run(case, bug="")
    assert _chi2_pvalue(counts.ravel(), case.expected.ravel()) > PASS


# ---------------------------------------------------------------- 3. Gumbel-Top-k law

def _trees_gumbel_topk(logq: torch.Tensor, k: int, n: int, g: torch.Generator) -> torch.Tensor:
    trees = pytest.importorskip("drafters.trees")
    return torch.stack([torch.as_tensor(trees.gumbel_topk(logq, k, g)) for _ in range(n)])


def _order_lost(logq: torch.Tensor, k: int, n: int, g: torch.Generator) -> torch.Tensor:
    """Negative control: the right set of tokens, reported in order of q instead of draw order."""
    idx = _gumbel_topk_local(logq.expand(n, -1), k, g)
    return idx.gather(1, logq[idx].argsort(1, descending=True))


_SAMPLERS = {
    "local": lambda logq, k, n, g: _gumbel_topk_local(logq.expand(n, -1), k, g),
    "drafters.trees": _trees_gumbel_topk,
}


def _topk_law_pvalues(sample, seed: int = 9) -> tuple[float, float, bool]:
    """(p-value of the first draw ~ q, p-value of the ordered pair ~ q(a)q(b)/(1-q(a)), any duplicates)."""
    v, n, k = 6, 100_000, 3
    q = _dirichlet(np.random.default_rng(seed), v)
    draws = sample(torch.tensor(q).log(), k, n, torch.Generator().manual_seed(seed)).long()
    assert draws.shape == (n, k)
    dup = bool((draws.sort(1).values.diff(dim=1) == 0).any())
    pair = np.outer(q, q) / (1 - q)[:, None]
    np.fill_diagonal(pair, 0.0)
    first = np.bincount(draws[:, 0].numpy(), minlength=v)
    pairs = np.bincount((draws[:, 0] * v + draws[:, 1]).numpy(), minlength=v * v)
    return _chi2_pvalue(first, q), _chi2_pvalue(pairs, pair.ravel()), dup


@pytest.mark.parametrize("impl", list(_SAMPLERS))
def test_gumbel_topk_samples_without_replacement_in_draw_order(impl):
    p_first, p_pair, dup = _topk_law_pvalues(_SAMPLERS[impl])
    print(f"\ngumbel_topk[{impl}]: first p = {p_first:.4g}, pair p = {p_pair:.4g}")
    assert not dup
    assert p_first > PASS and p_pair > PASS


def test_gumbel_topk_stays_in_the_support():
    trees = pytest.importorskip("drafters.trees")
    logq = torch.tensor([0.1, float("-inf"), 0.3, 0.2, float("-inf"), 0.4]).log_softmax(0)
    g = torch.Generator().manual_seed(3)
    for _ in range(200):
        draw = torch.as_tensor(trees.gumbel_topk(logq, 5, g)).tolist()
        assert len(draw) == 4 and sorted(draw) == [0, 2, 3, 5]


def test_gumbel_topk_law_test_has_power():
    p_first, p_pair, _ = _topk_law_pvalues(_order_lost)
    print(f"\ngumbel_topk order lost: first p = {p_first:.3g}, pair p = {p_pair:.3g}")
    assert p_first < REJECT and p_pair < REJECT


# ---------------------------------------------------------------- 4. stubs, p == q, determinism

V_STUB = 8


def _spikes(argmaxes: list[int]) -> torch.Tensor:
    """[len, V] logits that put 100.0 on one token per row, 0 elsewhere."""
    logits = torch.zeros(len(argmaxes), V_STUB)
    logits[torch.arange(len(argmaxes)), torch.tensor(argmaxes)] = 100.0
    return logits


# (draft tokens, parents, target argmax per tree row, expected path, expected tokens, sampling agrees)
GREEDY_CASES = {
    "accept_all_with_bonus": ([1, 2, 3], [-1, 0, 1], [1, 2, 3, 4], [0, 1, 2, 3], [1, 2, 3, 4], True),
    "reject_all": ([1, 2, 3], [-1, 0, 1], [5, 2, 3, 4], [0], [5], True),
    "accept_2_of_3": ([1, 2, 3], [-1, 0, 1], [1, 2, 6, 4], [0, 1, 2], [1, 2, 6], True),
    "second_sibling_matches": ([1, 2, 3], [-1, -1, 1], [2, 7, 3, 5], [0, 2, 3], [2, 3, 5], True),
    "child_of_rejected_node_ignored": ([2, 3], [-1, 0], [1, 3, 4], [0], [1], True),
    "tie_goes_to_earliest_node": ([1, 1, 4, 4], [-1, -1, 0, 1], [1, 4, 4, 6, 7], [0, 1, 3], [1, 4, 6], True),
    "deeper_later_path_wins": ([1, 1, 4], [-1, -1, 1], [1, 5, 4, 6], [0, 2, 3], [1, 4, 6], False),
    "empty_draft": ([], [], [4], [0], [4], True),
}


@pytest.mark.parametrize("name", list(GREEDY_CASES))
def test_greedy_stub_exact_outputs(name):
    tokens, parents, argmaxes, path, out, _ = GREEDY_CASES[name]
    draft = Draft(torch.tensor(tokens, dtype=torch.long), torch.tensor(parents, dtype=torch.long))
    logits = _spikes(argmaxes)
    for got in (verify_greedy(draft, logits), verify(draft, logits, SamplingParams(), None)):
        assert (got.path, got.tokens, got.accepted) == (path, out, len(path) - 1)


@pytest.mark.parametrize("name", [n for n, c in GREEDY_CASES.items() if c[5]])
def test_sampling_on_spikes_gives_the_greedy_outputs(name):
    """With near one-hot laws, target-only and min(1, p/q) sampling must land on the greedy result."""
    tokens, parents, argmaxes, path, out, _ = GREEDY_CASES[name]
    draft = Draft(torch.tensor(tokens, dtype=torch.long), torch.tensor(parents, dtype=torch.long))
    params, g = SamplingParams(temperature=1.0), torch.Generator().manual_seed(0)
    drafts = [draft]
    if parents == list(range(-1, len(tokens) - 1)):  # a chain: also as a sampled draft, q on its tokens
        q = torch.softmax(_spikes(tokens + [0]), -1)
        drafts.append(Draft(draft.tokens, draft.parents, q))
    for d in drafts:
        for _ in range(50):
            got = verify(d, _spikes(argmaxes), params, g)
            assert (got.path, got.tokens) == (path, out)


def test_p_equal_q_always_accepts_and_stays_finite():
    rng = np.random.default_rng(11)
    rows = np.stack([_dirichlet(rng, 6, zeros=(2,) if r % 2 else ()) for r in range(4)])
    probs = torch.tensor(rows, dtype=torch.float32)
    g = torch.Generator().manual_seed(11)
    for _ in range(500):
        chain = [int(torch.multinomial(probs[r], 1, generator=g)) for r in range(3)]
        got = verify_sampled(Draft.chain(chain, probs), probs, g)
        assert got.path == [0, 1, 2, 3] and got.tokens[:3] == chain and rows[3, got.tokens[3]] > 0
        for wr in (False, True):
            kids = torch.multinomial(probs[0], 3, replacement=wr, generator=g)
            star = Draft(kids, torch.full((3,), -1), probs, wr)
            assert verify_sampled(star, probs, g).tokens[0] == int(kids[0])


def _seeded_outputs(seed: int, params: SamplingParams) -> list[Verified]:
    g_draft = torch.Generator().manual_seed(99)
    logits = torch.randn(4, 6, generator=g_draft)
    q = torch.softmax(torch.randn(4, 6, generator=g_draft), -1)
    g = torch.Generator().manual_seed(seed)
    outs = []
    for _ in range(200):
        kids = _gumbel_topk_local(q[0].log(), 3, g_draft)
        outs.append(verify(Draft(kids, torch.full((3,), -1), q), logits, params, g))
        outs.append(verify(Draft(kids, torch.full((3,), -1)), logits, params, g))
    return outs


def test_seeded_verification_is_reproducible():
    params = SamplingParams(temperature=0.9, top_p=0.9)
    first = _seeded_outputs(5, params)
    assert first == _seeded_outputs(5, params)
    assert first != _seeded_outputs(6, params)


def test_sampling_without_a_generator_is_refused():
    with pytest.raises(ValueError, match="Generator"):
        verify(Draft.empty(), torch.zeros(1, 4), SamplingParams(temperature=1.0), None)


@pytest.mark.parametrize("tokens, parents, q_rows", [([1, 2], [-1], None), ([1, 2], [-1, 0], 2)])
def test_malformed_drafts_are_refused(tokens, parents, q_rows):
    q = None if q_rows is None else torch.full((q_rows, 4), 0.25)
    with pytest.raises(ValueError):
        Draft(torch.tensor(tokens), torch.tensor(parents), q)
