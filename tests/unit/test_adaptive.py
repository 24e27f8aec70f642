"""Adaptive speculation: the cost model and the draft-size choice, on synthetic costs and acceptance."""
from __future__ import annotations

import pytest

from serving.adaptive import AdaptivePolicy, CostModel

# The shape measured on this project's CPU (ms per forward by tokens): flat at first, then linear.
CPU_CURVE = {1: 40.0, 2: 45.5, 4: 48.2, 8: 53.7, 16: 69.9, 32: 92.8, 64: 153.9, 128: 280.0, 256: 540.0}


def _policy(menu=(2, 4, 8, 16), explore_every=0, draft_hint=0.0) -> AdaptivePolicy:
    p = AdaptivePolicy(menu, draft_cost_hint=draft_hint, explore_every=explore_every)
    for tokens, ms in CPU_CURVE.items():
        p.target_cost.observe(tokens, ms / 1000)
    return p


def _teach(p: AdaptivePolicy, seq: int, accepted_at: dict[int, float], times: int = 20) -> None:
    for _ in range(times):
        for s, a in accepted_at.items():
            p.record(seq, s, a)


def test_cost_model_interpolates_and_extrapolates():
    c = CostModel()
    c.observe(1, 1.0)
    c.observe(9, 5.0)
    assert c.predict(5) == pytest.approx(3.0)
    assert c.predict(1) == 1.0 and c.predict(0) == 1.0
    assert c.predict(13) == pytest.approx(7.0)     # linear past the last point
    c.observe(9, 7.0)                              # smoothed, not replaced
    assert 5.0 < c.predict(9) < 7.0


def test_no_speculation_when_drafts_are_never_accepted():
    p = _policy()
    _teach(p, 0, {2: 0.0, 4: 0.0, 8: 0.0, 16: 0.0})
    assert p.choose([0]) == [0]


def test_picks_the_size_with_the_most_tokens_per_second():
    p = _policy()
    # Acceptance that saturates: 8 nodes buy 2.5 tokens, 16 nodes only 2.7. By hand from the curve:
    # tokens/ms 1/40 = .025 (s=0), 1.9/46.9 = .041, 2.6/49.6 = .052, 3.5/55.7 = .063 (s=8), 3.7/71.3 = .052.
    _teach(p, 0, {2: 0.9, 4: 1.6, 8: 2.5, 16: 2.7})
    assert p.choose([0]) == [8]


def test_a_costly_draft_lowers_the_chosen_size():
    cheap, costly = _policy(), _policy()
    for p in (cheap, costly):
        _teach(p, 0, {2: 1.2, 4: 1.9, 8: 2.6, 16: 2.9})
    for s in (2, 4, 8, 16):  # measured draft time: 10 ms per draft node
        costly.record_step(s, 1, 0.010 * s, [s])
    assert costly.choose([0])[0] < cheap.choose([0])[0]


def test_batch_of_sixteen_speculates_less_than_batch_one():
    p = _policy()
    for seq in range(16):
        _teach(p, seq, {2: 0.8, 4: 1.2, 8: 1.5, 16: 1.6})
    one, sixteen = p.choose([0])[0], p.choose(list(range(16)))[0]
    assert sixteen < one


def test_a_sequence_that_never_accepts_stops_drafting_alone():
    p = _policy()
    _teach(p, 0, {2: 1.5, 4: 2.5, 8: 3.0, 16: 3.2}, times=40)
    _teach(p, 1, {2: 0.0, 4: 0.0, 8: 0.0, 16: 0.0}, times=40)
    p.prior_weight = 0.1  # let each sequence's own record dominate
    sizes = p.choose([0, 1])
    assert sizes[0] > 0 and sizes[1] == 0


def test_exploration_visits_a_neighbouring_size():
    p = _policy(explore_every=4)
    _teach(p, 0, {2: 0.0, 4: 0.0, 8: 0.0, 16: 0.0})
    chosen = [p.choose([0])[0] for _ in range(16)]
    assert chosen.count(0) >= 12 and any(s > 0 for s in chosen)


def test_untried_sizes_are_tried_first():
    p = _policy()
    assert p.choose([0])[0] > 0  # optimistic prior: speculation gets measured before being judged



def _curve() -> CostModel:
    c = CostModel()
    for tokens, ms in CPU_CURVE.items():
        c.observe(tokens, ms / 1000)
    return c


def _batch_truth(rows: int, factor: float, batch: int = 16) -> float:
    """Seconds of a batch-16 forward: an 80 ms plain step, each extra row `factor` times dearer than in one chain."""
    curve = _curve()
    return 0.080 + factor * (curve.predict(rows) - curve.predict(batch))


def test_a_batch_is_priced_from_its_own_steps():
    c = _curve()
    one_chain_32 = c.predict(32)
    assert c.predict(32, batch=16) == one_chain_32           # nothing measured at 16 yet: the curve
    for _ in range(5):
        c.observe(16, _batch_truth(16, 1.5), batch=16)
    for rows in (20, 24, 40, 20, 32):
        c.observe(rows, _batch_truth(rows, 1.5), batch=16)
    assert c.row_factor(16) == pytest.approx(1.5, rel=1e-6)
    for rows in (16, 18, 32, 64):
        assert c.predict(rows, batch=16) == pytest.approx(_batch_truth(rows, 1.5), rel=1e-6)
    assert c.predict(32) == one_chain_32                      # batch steps do not bend the one-chain curve
    assert c.row_factor(12) == pytest.approx(1.5, rel=1e-6)   # an unmeasured batch borrows the nearest
    assert c.predict(20, batch=12) == c.predict(20)           # but without its own plain step: the curve


def test_batch_rows_dearer_than_the_curve_turn_speculation_off():
    p = _policy(menu=(2,))
    seqs = list(range(16))
    for q in seqs:
        _teach(p, q, {2: 1.4})
    # At the curve's prices (16 rows 69.9 ms, 48 rows 123.35 ms): (16 + 16 * 1.4) / 123.35 = 0.311
    # tokens/ms against 16 / 69.9 = 0.229 plain: the 2-node drafts pay.
    assert p.choose(seqs) == [2] * 16
    for _ in range(5):
        p.target_cost.observe(16, _batch_truth(16, 2.0), batch=16)
        p.target_cost.observe(48, _batch_truth(48, 2.0), batch=16)
    # Measured at batch 16: plain 80 ms, 48 rows 80 + 2 * 53.45 = 186.9 ms: 38.4 / 186.9 = 0.205
    # tokens/ms, below plain's 0.200 with the policy's 10% margin (0.220).
    assert p.target_cost.predict(48, 16) == pytest.approx(0.1869, abs=1e-4)
    assert p.choose(seqs) == [0] * 16
