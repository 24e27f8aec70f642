"""The controller: per sequence and step, the drafter whose drafts are expected to pay most (ATLAS-style).

P parts (drafters), b a draft budget, a_p(b) expected accepted draft tokens of part p at budget b.
The engine's adaptive policy picks each step's budget; the controller picks, for every sequence,
the part that maximises (1 + a_p(b)) / (t_step + c_p + r * w_p(b)): expected tokens per second of
the step, with t_step the measured time between steps, c_p the part's measured seconds per
proposal, w_p(b) the nodes its tree brings and r what a verified node costs at the batch's rows
(the policy's measured width curve, `price_rows`).

a_p(b) is learned from the history itself: a proposed tree is matched against the tokens the
target then emitted (the longest root path that the continuation follows). For the drafted tree
this is exactly the verifier's acceptance. For a cheap deterministic part that did not draft, the
controller also proposes in the shadow (every `shadow_every` steps per sequence, the parts in turn,
each at its largest budget: a part's draft at a smaller budget is that draft's first nodes, so one
tree scores every budget), and scores that tree the same way. Under greedy decoding the shadow
score is exactly what verification would have accepted; under sampling, a deterministic tree is
accepted along the tokens the target samples, so the score has the acceptance's law. Shadow
estimates stay fresh while a part is not chosen, or while the policy is not speculating at all, so
a part that starts to pay is picked up again without spending a verification on it, and a shadowed
part is not speculated on before it is measured. A costly part (a learned head) is not shadowed:
it starts optimistic and is given the sequence every `explore_every` steps. Estimates are per
sequence, shrunk toward the domain's, and scaled by what the verified drafts really got
(`calibration`): the drafts picked are those whose estimates came out high.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

from drafters.base import Drafter, DraftRequest, Feedback, Prefill
from drafters.verify import Draft

NONE = ("none", "0")
"""(name, version) named for a step on which nothing was drafted."""


@dataclass
class Ema:
    """Exponentially smoothed mean, the first value taken as is."""

    mean: float = 0.0
    count: int = 0

    def add(self, value: float, ema: float) -> None:
        self.mean = value if self.count == 0 else (1 - ema) * self.mean + ema * value
        self.count += 1


@dataclass
class _Pending:
    """A proposed tree waiting for the tokens that decide how much of it the target followed."""

    part: int
    budget: int
    size: int                             # nodes proposed
    start: int                            # len(history) when proposed: the continuation is history[start:]
    kids: dict[int, dict[int, int]]       # node (-1 the root) -> {token: child node}
    offered: int = 0                      # a verified draft: the budget the policy offered ...
    predicted: float | None = None        # ... and the accepted tokens expected of it (None: a shadow)

    def path(self, history: list[int], final: bool) -> list[int] | None:
        """Nodes of the longest root path the continuation follows, or None while it is too short to tell."""
        node, out = -1, []
        for tok in history[self.start:]:
            nxt = self.kids.get(node, {}).get(tok)
            if nxt is None:
                return out
            node = nxt
            out.append(node)
        return out if final or node not in self.kids else None

    def score(self, history: list[int], final: bool) -> int | None:
        """Draft tokens the continuation follows (what verification accepts under greedy), or None."""
        path = self.path(history, final)
        return None if path is None else len(path)


def _pending(part: int, budget: int, start: int, draft: Draft) -> _Pending:
    kids: dict[int, dict[int, int]] = {}
    for i, (tok, par) in enumerate(zip(draft.tokens.tolist(), draft.parents.tolist())):
        kids.setdefault(par, {})[tok] = i
    return _Pending(part, budget, draft.size, start, kids)


@dataclass
class _Seq:
    domain: str | None
    steps: int = 0
    drafted_by: int | None = None         # part index of this step's draft (None: nothing drafted)
    pending: list[_Pending] = field(default_factory=list)
    accepted: dict[tuple[int, int], Ema] = field(default_factory=dict)   # (part, budget) -> own record
    last_tried: dict[int, int] = field(default_factory=dict)             # costly part -> step it last drafted


class Controller:
    """Routes each sequence's draft to the part expected to pay most; learns from shadow drafts and the history."""

    name = "auto"

    def __init__(self, parts: list[Drafter], ema: float = 0.2, explore_every: int = 16, prior_weight: float = 1.0,
                 shadow_every: int = 2, clock: Callable[[], float] = time.perf_counter, own_ema: float = 0.5):
        if not parts:
            raise ValueError("the controller needs at least one drafter")
        names = [p.name for p in parts]
        if len(set(names)) != len(names):
            raise ValueError(f"the controller's drafters must have distinct names, got {names}")
        layers = {p.feature_layers for p in parts if p.feature_layers}
        if len(layers) > 1:
            raise ValueError(f"the controller's drafters read different target layers {sorted(layers)}")
        self.parts = list(parts)
        self.feature_layers: tuple[int, ...] = layers.pop() if layers else ()
        self.needs_topk = max(p.needs_topk for p in parts)
        self.cost_hint = 0.0  # a part's cost is measured and weighed here, per sequence
        self.ema, self.explore_every, self.prior_weight = ema, explore_every, prior_weight
        self.own_ema = own_ema
        """A sequence's own record follows its text fast (a copied passage ends abruptly)."""
        if shadow_every < 0:
            raise ValueError(f"shadow_every must be >= 0, got {shadow_every}")
        self.shadow_every = shadow_every
        """A sequence gets one shadow proposal every this many steps (0: none)."""
        self._clock = clock
        # Cheap deterministic parts are shadowed; the others are explored on policy.
        self._cheap = [i for i, p in enumerate(parts) if p.cost_hint == 0.0]
        self._costly = [i for i, p in enumerate(parts) if p.cost_hint > 0.0]
        self._budgets = tuple(sorted({b for p in parts for b in p.budgets()}))
        self._menu = [tuple(sorted(p.budgets())) for p in parts]   # each part drafts at most its largest
        self._judged: list[dict[int, int]] = [{} for _ in parts]   # budget offered -> budget judged at (_clamp)
        self._seqs: dict[int, _Seq] = {}
        self._domain: dict[tuple[str | None, int, int], Ema] = {}   # (domain, part, budget) -> record
        self._sizes: dict[tuple[int, int], Ema] = {}                  # (part, budget) -> draft nodes proposed
        self._plans: dict[tuple[int, int], tuple[float, float]] = {}  # this step's (seq, budget) -> _plan
        self._calibration: dict[int, list[float]] = {}               # budget offered -> decayed [expected, accepted]
        self._pooled = [0.0, 0.0]                                     # the same over every budget
        self.calibration_ema = 0.1
        self._seconds = [Ema() for _ in parts]                        # seconds per proposal, per part
        self._step = Ema()                                            # seconds between two propose() calls
        self._row_seconds = 0.0                                       # one more verified node, this step
        self._last_call: float | None = None
        self.drafted = [0] * len(parts)                               # sequences drafted, per part
        self.shadowed = [0] * len(parts)                              # shadow proposals, per part

    @property
    def version(self) -> str:
        return "+".join(f"{p.name}={p.version}" for p in self.parts)

    def budgets(self) -> tuple[int, ...]:
        return self._budgets

    def served_by(self, seq_id: int) -> tuple[str, str]:
        """(name, version) of the part that drafted `seq_id` this step; ("none", "0") if nothing was."""
        st = self._seqs.get(seq_id)
        if st is None or st.drafted_by is None:
            return NONE
        p = self.parts[st.drafted_by]
        return p.name, p.version

    def with_part(self, drafter: Drafter) -> "Controller":
        """A controller with `drafter` in place of the part of its name (or added): a promoted head joins.

        What was learned about the other parts carries over; the new part starts unmeasured.
        """
        names = [p.name for p in self.parts]
        i = names.index(drafter.name) if drafter.name in names else len(names)
        parts = self.parts[:i] + [drafter] + self.parts[i + 1:]
        new = Controller(parts, self.ema, self.explore_every, self.prior_weight, self.shadow_every, self._clock,
                         self.own_ema)
        new._domain = {k: v for k, v in self._domain.items() if k[1] != i}
        new._sizes = {k: v for k, v in self._sizes.items() if k[0] != i}
        new._seconds = [Ema() if j == i else s for j, s in enumerate(self._seconds + [Ema()])][: len(parts)]
        new._step = self._step
        new._calibration, new._pooled = self._calibration, self._pooled  # the selection bias is the policy's
        return new

    # ---- estimates ---------------------------------------------------------------------------------
    def _clamp(self, part: int, budget: int) -> int:
        """The budget `part` is judged at when offered `budget`: the largest of its menu not above it (else `budget`)."""
        judged = self._judged[part].get(budget)
        if judged is None:
            judged = self._judged[part][budget] = max((b for b in self._menu[part] if b <= budget), default=budget)
        return judged

    def _cap(self, part: int, budget: int) -> int:
        """The budget `part` drafts at when offered `budget`: no more than the largest of its menu."""
        return min(budget, self._menu[part][-1]) if self._menu[part] else budget

    def expected_accepted(self, seq_id: int, part: int, budget: int) -> float:
        """a_p(b) for one sequence: its own record, shrunk toward its domain's (a guess while unseen)."""
        budget = self._clamp(part, budget)
        st = self._seqs.get(seq_id)
        domain = self._domain.get((st.domain if st else None, part, budget))
        if domain is not None and domain.count:
            prior = domain.mean
        elif self.shadow_every and part in self._cheap:
            prior = 0.0   # a shadowed part is measured within a few steps at no cost: no speculating on hope
        else:
            prior = min(float(budget), 1.0 + 0.25 * budget)  # optimistic, so that a costly part gets tried
        own = st.accepted.get((part, budget)) if st else None
        if own is None or own.count == 0:
            return prior
        n = min(own.count, 8)
        return (n * own.mean + self.prior_weight * prior) / (n + self.prior_weight)

    def _plan(self, seq_id: int, budget: int) -> tuple[float, float]:
        """(expected accepted tokens, expected draft nodes) at `budget` with the part the controller would pick.

        Computed once per sequence, budget and step (the policy asks for every budget of its menu),
        since nothing is learned between two propose() calls.
        """
        key = (seq_id, budget)
        plan = self._plans.get(key)
        if plan is None:
            part = self._best(seq_id, budget)
            plan = self._plans[key] = (self.expected_accepted(seq_id, part, budget) * self.calibration(budget),
                                       self._nodes(part, budget))
        return plan

    def _calibration_key(self, budget: int) -> int:
        return max((b for b in self._budgets if b <= budget), default=budget)

    def calibration(self, budget: int) -> float:
        """Accepted over expected tokens of the drafts verified at `budget` (recent ones weigh most).

        Estimates are unbiased one by one, but the drafts verified are those whose estimates came out
        highest, among parts and budgets, and text drifts after a run of accepted drafts (on SmolLM2
        at concurrency 4, drafts verified at budget 8 got 0.4 of the tokens expected of them, at
        budgets 1 and 4 about all). The ratio measured on the verified drafts corrects for it: per
        budget, shrunk toward the ratio over all budgets (itself toward 1), and kept within
        [0.2, 1.25] so that a budget judged on a few bad drafts is not shut out for good.
        """
        exp, got = self._pooled
        pooled = (got + 2.0) / (exp + 2.0)
        sums = self._calibration.get(self._calibration_key(budget))
        if sums is None:
            return min(1.25, max(0.2, pooled))
        return min(1.25, max(0.2, (sums[1] + 4.0 * pooled) / (sums[0] + 4.0)))

    def estimate(self, seq_id: int, budget: int) -> float:
        """Expected accepted draft tokens at `budget` with the part the controller would pick (for the policy)."""
        return self._plan(seq_id, budget)[0]

    def expected_size(self, seq_id: int, budget: int) -> float:
        """Draft nodes the part the controller would pick proposes at `budget` (for the policy's cost)."""
        return self._plan(seq_id, budget)[1]

    def price_rows(self, seconds: float) -> None:
        """What one more verified node costs this step (the policy's measured width curve at the batch's rows)."""
        self._row_seconds = seconds
        self._plans.clear()

    def _draft_seconds(self, part: int) -> float:
        s = self._seconds[part]
        return s.mean if s.count else self.parts[part].cost_hint * self._step.mean

    def pick(self, seq_id: int, budget: int) -> int:
        """The part to draft `seq_id` at `budget` this step."""
        st = self._seqs[seq_id]
        if self._costly and self.explore_every and st.steps % self.explore_every == 0:
            # A costly part is not shadowed: try the least recently tried one on the sequence itself.
            return min(self._costly, key=lambda i: st.last_tried.get(i, -1))
        return self._best(seq_id, budget)

    def _nodes(self, part: int, budget: int) -> float:
        """Draft nodes `part` proposes when offered `budget` (measured; the budget until then)."""
        judged = self._clamp(part, budget)
        size = self._sizes.get((part, judged))
        return size.mean if size is not None and size.count else float(judged)

    def _best(self, seq_id: int, budget: int) -> int:
        """The part with the most expected tokens per second: the step, the part's own drafting time,
        and the verification rows its tree adds (a wide tree that is rarely followed costs the batch)."""
        step, best, rate = self._step.mean, 0, -1.0
        for i in range(len(self.parts)):
            cost = step + self._draft_seconds(i) + self._row_seconds * self._nodes(i, budget)
            r = (1.0 + self.expected_accepted(seq_id, i, budget)) / max(cost, 1e-9)
            if r > rate:
                best, rate = i, r
        return best

    # ---- the step ----------------------------------------------------------------------------------
    def _learn(self, st: _Seq, history: list[int], final: bool) -> None:
        """Score the trees whose outcome is known, at every budget up to the one they were proposed at.

        A part's draft at budget b is its larger draft's first b nodes (prompt lookup and Token
        Recycling exactly; suffix trees are grown best-first, so nearly), and a path's nodes come in
        increasing order, so the draft at b would have had the path's nodes below b accepted.
        """
        still = []
        for p in st.pending:
            path = p.path(history, final)
            if path is None:
                still.append(p)
                continue
            if p.predicted is not None:
                keep = 1.0 - self.calibration_ema
                for sums in (self._pooled, self._calibration.setdefault(self._calibration_key(p.offered), [0.0, 0.0])):
                    sums[0] = keep * sums[0] + p.predicted
                    sums[1] = keep * sums[1] + len(path)
            for b in self._menu[p.part]:
                if b > p.budget:
                    break
                n = sum(1 for node in path if node < b)
                st.accepted.setdefault((p.part, b), Ema()).add(n, self.own_ema)
                self._domain.setdefault((st.domain, p.part, b), Ema()).add(n, self.ema)
                self._sizes.setdefault((p.part, b), Ema()).add(min(p.size, b), self.ema)
        st.pending = still

    def propose(self, requests: list[DraftRequest]) -> list[Draft]:
        self._plans.clear()
        now = self._clock()
        if self._last_call is not None:
            self._step.add(now - self._last_call, self.ema)
        self._last_call = now
        chosen: dict[int, list[DraftRequest]] = {}   # part -> the requests it drafts (at its own budgets)
        index: dict[int, list[int]] = {}             # part -> their positions in `requests`
        shadows: dict[int, list[DraftRequest]] = {}
        for i, r in enumerate(requests):
            st = self._seqs.setdefault(r.seq_id, _Seq(r.domain))
            self._learn(st, r.history, final=False)
            st.steps += 1
            st.drafted_by = None
            part = self.pick(r.seq_id, r.budget) if r.budget > 0 else None
            if part is not None:
                chosen.setdefault(part, []).append(DraftRequest(r.seq_id, r.history, self._cap(part, r.budget),
                                                                r.params, r.generator, r.domain))
                index.setdefault(part, []).append(i)
                if part in self._costly:
                    st.last_tried[part] = st.steps
            shadow = self._shadow(st, part)
            if shadow is not None:
                j, budget = shadow
                shadows.setdefault(j, []).append(DraftRequest(r.seq_id, r.history, budget, r.params, r.generator,
                                                              r.domain))
        out: list[Draft] = [Draft.empty() for _ in requests]
        for part, reqs in chosen.items():
            for i, r, d in zip(index[part], reqs, self._timed(part, reqs)):
                out[i] = d
                st = self._seqs[r.seq_id]
                if d.size:
                    st.drafted_by = part
                    self.drafted[part] += 1
                offered = requests[i].budget
                self._proposed(st, part, r, d, offered, self.expected_accepted(r.seq_id, part, offered))
        for part, reqs in shadows.items():
            for r, d in zip(reqs, self._timed(part, reqs)):
                self.shadowed[part] += 1
                self._proposed(self._seqs[r.seq_id], part, r, d)
        return out

    def _shadow(self, st: _Seq, drafting: int | None) -> tuple[int, int] | None:
        """(part, budget) of this step's shadow proposal for the sequence, or None.

        The cheap parts not drafting it take turns, each at its largest budget: that one tree scores
        every smaller budget too (see `_learn`), so the policy knows what each budget would bring with
        each part and starts speculating when one pays, with no verification spent to find out.
        """
        if not self.shadow_every or st.steps % self.shadow_every:
            return None
        others = [j for j in self._cheap if j != drafting and self._menu[j]]
        if not others:
            return None
        j = others[(st.steps // self.shadow_every) % len(others)]
        return j, self._menu[j][-1]

    def _proposed(self, st: _Seq, part: int, r: DraftRequest, d: Draft, offered: int = 0,
                  predicted: float | None = None) -> None:
        p = _pending(part, r.budget, len(r.history), d)
        p.offered, p.predicted = offered, predicted
        st.pending.append(p)

    def _timed(self, part: int, requests: list[DraftRequest]) -> list[Draft]:
        t0 = self._clock()
        drafts = self.parts[part].propose(requests)
        self._seconds[part].add((self._clock() - t0) / len(requests), self.ema)
        return drafts

    def observe(self, feedback: list[Feedback]) -> None:
        """Every part sees every sequence's feedback (each its own top-k width): they keep learning while not chosen."""
        for p in self.parts:
            if not (p.needs_topk or p.feature_layers):
                p.observe([])
                continue
            k = p.needs_topk
            p.observe([fb if fb.topk_ids.shape[1] == k else
                       Feedback(fb.seq_id, fb.tree_tokens, fb.topk_ids[:, :k], fb.verified, fb.features)
                       for fb in feedback])

    def observe_prefill(self, prefills: list[Prefill]) -> None:
        for p in self.parts:
            if p.feature_layers:
                p.observe_prefill(prefills)

    def finish(self, seq_id: int, history: list[int]) -> None:
        """Score the sequence's last trees against its final history (called before `release`)."""
        st = self._seqs.get(seq_id)
        if st is not None:
            self._learn(st, history, final=True)

    def release(self, seq_id: int) -> None:
        self._seqs.pop(seq_id, None)
        for p in self.parts:
            p.release(seq_id)
