"""Choosing how much to speculate: measured acceptance against the measured cost of verification.

B sequences in the batch, s the draft budget per sequence, a(s) expected accepted draft tokens,
w(s) the draft nodes actually verified per sequence (a drafter may propose fewer than s, or none).
Each step the policy picks the budget s (0 = plain decoding) that maximises
    sum_b (1 + a_b(s)) / (t_target(sum_b (1 + w_b(s))) + t_draft(B, s)),
over the sequences worth drafting for (see `_plan`; the target computes only real tree nodes),
the expected tokens per second of the step. a_b(s) and w(s) are learned per budget, from every step
given that budget (an empty draft counts as 0 accepted: a budget is judged by what it brought, not
only by the drafts that happened), the times from the engine's own clock. Choosing s = 0 is always
possible, so a drafter that does not pay for itself is switched off, sequence by sequence as well as
for the batch. A drafter that estimates its own acceptance (the controller, which scores shadow
drafts against the history) is asked instead, and then the policy needs no exploration steps.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Protocol


@dataclass
class CostModel:
    """Seconds of one target forward as a function of the tokens it processes (B * tree width), and of B.

    `table` is one sequence's curve, by row count: the start-up calibration (chains after a context)
    and every batch-1 step since. A row costs more inside a batch than inside one sequence's chain
    (each sequence attends over its own context), so a batch B is priced from its own steps:
        t(B, rows) = plain(B) + k(B) * (table(rows) - table(B)),
    plain(B) its smoothed plain step, k(B) how much dearer its extra rows are than the curve says,
    fitted by least squares over B's steps with more rows than B, recent ones weighing more (1 until
    B has had one). The curve keeps the shape measured where it runs (flat, then linear, on a GPU;
    linear from the first row on a CPU); B's own steps scale it.
    """

    ema: float = 0.3
    table: dict[int, float] = field(default_factory=dict)  # tokens -> seconds, smoothed
    plain: dict[int, float] = field(default_factory=dict)  # B -> seconds of a step of B rows
    _fit: dict[int, tuple[float, float]] = field(default_factory=dict)  # B -> (sum x y, sum x^2), decaying

    def observe(self, tokens: int, seconds: float, batch: int | None = None) -> None:
        """A forward of `tokens` rows took `seconds`; `batch` sequences shared it (None: one, a calibration)."""
        if batch is None or batch == 1:
            old = self.table.get(tokens)
            self.table[tokens] = seconds if old is None else (1 - self.ema) * old + self.ema * seconds
        if batch is None:
            return
        if tokens <= batch:
            old = self.plain.get(batch)
            self.plain[batch] = seconds if old is None else (1 - self.ema) * old + self.ema * seconds
        elif batch in self.plain:
            x = self._from_table(tokens) - self._from_table(batch)
            y = seconds - self.plain[batch]
            sxy, sxx = self._fit.get(batch, (0.0, 0.0))
            keep = 1 - self.ema
            self._fit[batch] = (keep * sxy + x * y, keep * sxx + x * x)

    K_RANGE = (0.5, 2.5)
    """Bounds of k(B). Measured on SmolLM2 at batch 16: 1.05-2.13. Where the curve is nearly flat (a
    tiny model, a GPU below its knee) a speculative step's fixed costs divided by a tiny curve
    difference would read as k = 10-20, pricing every draft out, and with no draft no step would
    ever correct it."""

    def row_factor(self, batch: int) -> float:
        """k(B): extra rows at `batch` against the one-sequence curve; a batch not measured yet borrows
        the nearest measured one's (1.0 before any)."""
        fit = self._fit.get(batch)
        if fit is None or fit[1] <= 0:
            fitted = [b for b, (_, sxx) in self._fit.items() if sxx > 0]
            if not fitted:
                return 1.0
            fit = self._fit[min(fitted, key=lambda b: (abs(b - batch), b))]
        low, high = self.K_RANGE
        return min(high, max(low, fit[0] / fit[1]))

    def predict(self, tokens: int, batch: int | None = None) -> float:
        """A forward of `tokens` rows shared by `batch` sequences (None: the one-sequence curve)."""
        if batch is None or batch not in self.plain:
            return self._from_table(tokens)
        extra = self._from_table(tokens) - self._from_table(batch) if tokens > batch else 0.0
        return self.plain[batch] + self.row_factor(batch) * extra

    def _from_table(self, tokens: int) -> float:
        """Piecewise-linear through the measured points; flat below the first, linear past the last."""
        if tokens in self.table:
            return self.table[tokens]
        xs = sorted(self.table)
        if not xs:
            return 1.0 * tokens  # uncalibrated: any monotone guess keeps the ordering of choices
        i = bisect.bisect_left(xs, tokens)
        if i == 0:
            return self.table[xs[0]]
        if i == len(xs):
            if len(xs) == 1:
                return self.table[xs[0]] * tokens / xs[0]
            x0, x1 = xs[-2], xs[-1]
            slope = max(0.0, (self.table[x1] - self.table[x0]) / (x1 - x0))
            return self.table[x1] + slope * (tokens - x1)
        x0, x1 = xs[i - 1], xs[i]
        w = (tokens - x0) / (x1 - x0)
        return (1 - w) * self.table[x0] + w * self.table[x1]


@dataclass
class _Acceptance:
    """Smoothed accepted draft tokens per step at one draft size."""

    mean: float = 0.0
    count: int = 0

    def add(self, value: float, ema: float) -> None:
        self.mean = value if self.count == 0 else (1 - ema) * self.mean + ema * value
        self.count += 1


class Estimator(Protocol):
    """A drafter that knows its own expected acceptance and draft size per sequence and budget."""

    def estimate(self, seq_id: int, budget: int) -> float:
        ...

    def expected_size(self, seq_id: int, budget: int) -> float:
        ...

    def price_rows(self, seconds: float) -> None:
        """What one more verified node costs this step (set before the estimates are asked for)."""
        ...


class AdaptivePolicy:
    """Picks each step's draft size for every sequence from learned acceptance and measured costs."""

    def __init__(self, menu: tuple[int, ...], draft_cost_hint: float = 0.0, ema: float = 0.2,
                 explore_every: int = 16, prior_weight: float = 2.0, estimator: Estimator | None = None,
                 margin: float = 0.1):
        self.menu = tuple(sorted(set(s for s in menu if s > 0)))
        self.draft_cost_hint = draft_cost_hint
        """Guess of one draft node's cost relative to a one-token target forward, until measured."""
        self.ema, self.explore_every, self.prior_weight = ema, explore_every, prior_weight
        self.estimator = estimator
        self.margin = margin
        """Speculate only when that is expected to be this much faster than not (estimates err, and
        the drafts taken are those whose estimates erred high: a close call is more often a loss)."""
        self.target_cost = CostModel()
        self.draft_cost: dict[tuple[int, int], float] = {}  # (s, B) -> seconds of one propose()
        self._global: dict[int, _Acceptance] = {s: _Acceptance() for s in self.menu}
        self._per_seq: dict[int, dict[int, _Acceptance]] = {}
        self._width: dict[int, _Acceptance] = {s: _Acceptance() for s in self.menu}  # s -> draft nodes verified
        self.steps = 0

    def reset_drafter(self, menu: tuple[int, ...], draft_cost_hint: float, estimator: Estimator | None = None) -> None:
        """A different drafter took over: what was learned about the old one no longer applies."""
        self.__init__(menu, draft_cost_hint, self.ema, self.explore_every, self.prior_weight,  # type: ignore[misc]
                      estimator, self.margin)

    def expected_accepted(self, seq_id: int, s: int) -> float:
        """a_b(s): the drafter's own estimate if it has one, else the sequence's record shrunk toward the drafter-wide one."""
        if s == 0:
            return 0.0
        if self.estimator is not None:
            return self.estimator.estimate(seq_id, s)
        g = self._global[s]
        # Never tried: optimistic, so that every size gets measured once.
        prior = g.mean if g.count else min(float(s), 1.0 + 0.25 * s)
        own = self._per_seq.get(seq_id, {}).get(s)
        if own is None or own.count == 0:
            return prior
        n = min(own.count, 8)
        return (n * own.mean + self.prior_weight * prior) / (n + self.prior_weight)

    def expected_size(self, seq_id: int, s: int) -> float:
        """w(s): draft nodes the sequence's tree will carry at budget s (a drafter may find fewer)."""
        if s == 0:
            return 0.0
        if self.estimator is not None:
            return self.estimator.expected_size(seq_id, s)
        w = self._width[s]
        return w.mean if w.count else float(s)

    def _draft_seconds(self, s: int, batch: int) -> float:
        measured = self.draft_cost.get((s, batch))
        if measured is not None:
            return measured
        return self.draft_cost_hint * s * self.target_cost.predict(batch, batch)

    def _plan(self, seq_ids: list[int], s: int, extra: int = 0) -> tuple[float, list[bool]]:
        """(expected tokens per second, which sequences draft) for budget s.

        The target runs only the real tree nodes (moe.model packs the rows), so the step costs
        t_target(B + sum of the drafting sequences' w_b(s)). A sequence drafts when its draft is
        accepted at all (a_b(s) >= 5% of s) and its expected tokens at least pay for its rows at the
        step's rate, with the policy's margin: a_b(s) >= (1 + margin) * rate * (t(rows) - t(rows - w_b(s))).
        `extra` rows ride in the same forward (prompt chunks: serving.engine.Engine._riders).
        """
        b = len(seq_ids)
        if s == 0:
            return b / max(self.target_cost.predict(b + extra, b), 1e-9), [False] * b
        acc = [self.expected_accepted(i, s) for i in seq_ids]
        size = [self.expected_size(i, s) for i in seq_ids]
        on = [a >= 0.05 * s and w > 0 for a, w in zip(acc, size)]
        draft = self._draft_seconds(s, b)

        def rate(on: list[bool]) -> tuple[float, float]:
            rows = b + extra + sum(w for w, o in zip(size, on) if o)
            return (b + sum(a for a, o in zip(acc, on) if o)) / max(self.target_cost.predict(round(rows), b) + draft,
                                                                    1e-9), rows
        r, rows = rate(on)
        t = self.target_cost.predict(round(rows), b)
        keep = 1.0 + self.margin
        on = [o and a >= keep * r * (t - self.target_cost.predict(round(rows - w), b)) for a, w, o in zip(acc, size, on)]
        if not any(on):
            return 0.0, on
        return rate(on)[0], on

    def choose(self, seq_ids: list[int], extra_rows: int = 0) -> list[int]:
        """Draft size per sequence for this step (`extra_rows` other rows ride in its forward)."""
        self.steps += 1
        b = len(seq_ids)
        if not self.menu or b == 0:
            return [0] * b
        if self.estimator is not None:
            rows = b + extra_rows
            self.estimator.price_rows(max(0.0, self.target_cost.predict(rows + 8, b) - self.target_cost.predict(rows, b)) / 8)
        plain, _ = self._plan(seq_ids, 0, extra_rows)
        best_s, best_rate, best_on = 0, plain * (1.0 + self.margin), [False] * b
        for s in self.menu:
            rate, on = self._plan(seq_ids, s, extra_rows)
            if rate > best_rate:
                best_s, best_rate, best_on = s, rate, on
        if self.estimator is None and self.explore_every and self.steps % self.explore_every == 0:
            # Keep every affordable size's estimate fresh, in turn: acceptance drifts with the text
            # (and a Token Recycling matrix warms up), so a size judged once while cold must be retried.
            # Only sizes whose step costs at most twice the chosen one's are probed.
            limit = 2 * self.target_cost.predict(b * (1 + best_s), b)
            probes = [s for s in self.menu if s != best_s and self.target_cost.predict(b * (1 + s), b) <= limit]
            probes = probes or [self.menu[0]]
            return [probes[(self.steps // self.explore_every) % len(probes)]] * b
        return [best_s if o else 0 for o in best_on]

    def record(self, seq_id: int, s: int, accepted: int) -> None:
        """One sequence's step at budget `s` (whatever the drafter made of it) accepted `accepted` tokens."""
        if s == 0 or s not in self._global:
            return
        self._global[s].add(accepted, self.ema)
        self._per_seq.setdefault(seq_id, {}).setdefault(s, _Acceptance()).add(accepted, self.ema)

    def record_step(self, s: int, batch: int, draft_seconds: float, sizes: list[int]) -> None:
        """A step whose largest budget was `s`: its propose() time, and the draft sizes of the sequences given s."""
        if s == 0:
            return
        old = self.draft_cost.get((s, batch))
        self.draft_cost[(s, batch)] = draft_seconds if old is None else (1 - self.ema) * old + self.ema * draft_seconds
        if s in self._width and sizes:
            self._width[s].add(sum(sizes) / len(sizes), self.ema)

    def forget(self, seq_id: int) -> None:
        self._per_seq.pop(seq_id, None)
