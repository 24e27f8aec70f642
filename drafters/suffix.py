"""Suffix decoding: draft the most frequent continuations of the history's longest match (Arctic Inference).

n draft nodes, D trie depth, m match length, L history length.
Two suffix tries of depth D with occurrence counts: one per sequence over its prompt and output,
extended by the new tokens each step, and one shared over recent finished outputs, bounded to a
number of tokens (oldest outputs evicted, their counts removed exactly). The longest suffix of the
history that the trie has seen continued is matched; the continuations under it are grown best-first
into a tree (branching where the counts split), at most factor·m + offset deep, each token at least
`min_prob` of its parent's continuations. The per-sequence and the global tree are each scored by
their expected accepted tokens under the counts; the better one is proposed. Deterministic: verified
by the target-only rule.
"""
from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass, field

import torch

from drafters.base import DraftRequest, Feedback, Prefill
from drafters.verify import Draft

_ROOT = 0
# A node's children: None (a leaf), one int `token << _SHIFT | child` (one child, the common case deep
# in the trie: 32 bytes instead of a 224-byte dict), or a dict {token: child} for two or more.
_SHIFT = 32
_MASK = (1 << _SHIFT) - 1


class SuffixTrie:
    """Every substring of at most `max_depth` tokens of the added sequences, with its occurrence count.

    Node 0 is the empty string. A node's count is how many times its string occurs; its children's
    counts sum to the occurrences that are followed by one more token. Nodes are ints into two flat
    lists (children, count) so that an update is a few dict operations per token and depth.
    """

    def __init__(self, max_depth: int):
        if max_depth < 2:
            raise ValueError(f"max_depth must be >= 2, got {max_depth}")
        self.max_depth = max_depth
        self._kids: list[int | dict[int, int] | None] = [None]  # see _SHIFT
        self._count: list[int] = [0]
        self._free: list[int] = []  # ids of removed nodes, reused before the lists grow

    @property
    def nodes(self) -> int:
        """Live nodes, the root included: the trie's size for metrics."""
        return len(self._count) - len(self._free)

    def _new(self) -> int:
        if self._free:
            node = self._free.pop()
            self._kids[node] = None
            self._count[node] = 0
            return node
        self._kids.append(None)
        self._count.append(0)
        return len(self._count) - 1

    def children(self, node: int) -> list[tuple[int, int]]:
        """(token, child node) of every continuation of `node`, oldest first."""
        row = self._kids[node]
        if row is None:
            return []
        if row.__class__ is int:
            return [(row >> _SHIFT, row & _MASK)]
        return list(row.items())

    def extend(self, active: list[int], token: int) -> list[int]:
        """Count `token` after every string in `active`; returns the new `active`.

        `active[j]` is the node of the sequence's last j+1 tokens (j + 1 < D), so appending a token
        touches at most D nodes. Start a sequence with `active = []`.
        """
        kids, count = self._kids, self._count
        out = []
        for node in [_ROOT, *active]:  # hot loop: one lookup (and rarely one insert) per depth
            row = kids[node]
            if row is None:
                child = self._new()
                kids[node] = token << _SHIFT | child
            elif row.__class__ is int:
                if row >> _SHIFT == token:
                    child = row & _MASK
                else:
                    child = self._new()
                    kids[node] = {row >> _SHIFT: row & _MASK, token: child}
            else:
                child = row.get(token)
                if child is None:
                    child = row[token] = self._new()
            count[child] += 1
            out.append(child)
        if len(out) == self.max_depth:
            out.pop()  # a depth-D string is never extended
        return out

    def add(self, tokens: list[int]) -> None:
        """Add one sequence (its substrings do not run into other sequences')."""
        active: list[int] = []
        for tok in tokens:
            active = self.extend(active, tok)

    def remove(self, tokens: list[int]) -> None:
        """Take back a sequence given earlier to `add`; nodes whose count reaches 0 are freed."""
        kids, count, depth = self._kids, self._count, self.max_depth
        for start in range(len(tokens)):
            node = _ROOT
            for tok in tokens[start: start + depth]:
                row = kids[node]
                child = row & _MASK if row.__class__ is int else row[tok]
                count[child] -= 1
                if count[child] == 0:
                    # A count of 1 meant this occurrence alone passed here: the rest of its path is
                    # freed by this same walk (the freed ids are reused only after it).
                    if row.__class__ is int:
                        kids[node] = None
                    else:
                        del row[tok]
                        if len(row) == 1:
                            [(t, c)] = row.items()
                            kids[node] = t << _SHIFT | c
                    self._free.append(child)
                node = child

    def find(self, tokens: list[int]) -> int | None:
        """The node of `tokens`, or None when that string was never added."""
        kids, node = self._kids, _ROOT
        for tok in tokens:
            row = kids[node]
            if row is None:
                return None
            if row.__class__ is int:
                if row >> _SHIFT != tok:
                    return None
                node = row & _MASK
            else:
                node = row.get(tok)
                if node is None:
                    return None
        return node

    def has_continuation(self, node: int) -> bool:
        return self._kids[node] is not None

    def counts(self) -> dict[tuple[int, ...], int]:
        """Every string in the trie with its count (tests and debugging; walks the whole trie)."""
        out: dict[tuple[int, ...], int] = {}
        stack: list[tuple[int, tuple[int, ...]]] = [(_ROOT, ())]
        while stack:
            node, path = stack.pop()
            for tok, child in self.children(node):
                out[path + (tok,)] = self._count[child]
                stack.append((child, path + (tok,)))
        return out

    def grow(self, node: int, max_len: int, budget: int, min_prob: float) -> tuple[list[int], list[int], float]:
        """The `budget` likeliest continuations of `node`, at most `max_len` deep, as a tree.

        Returns (tokens, parents, score): parents index earlier tokens (-1: a child of the match), so
        the order is topological; score is the sum of the nodes' path probabilities, i.e. the
        expected number of accepted tokens if the target followed the counts.
        """
        count = self._count
        tokens: list[int] = []
        parents: list[int] = []
        score = 0.0
        heap: list[tuple[float, int, int, int, int, int]] = []  # (-path prob, order, token, node, parent, depth)
        order = 0

        def push(at: int, prob: float, parent: int, depth: int) -> None:
            nonlocal order
            if depth >= max_len:
                return
            row = self.children(at)
            total = sum(count[c] for _, c in row)
            for tok, child in row:
                p = count[child] / total
                if p >= min_prob:
                    heapq.heappush(heap, (-prob * p, order, tok, child, parent, depth + 1))
                    order += 1

        push(node, 1.0, -1, 0)
        while heap and len(tokens) < budget:
            neg, _, tok, child, parent, depth = heapq.heappop(heap)
            tokens.append(tok)
            parents.append(parent)
            score -= neg
            push(child, -neg, len(tokens) - 1, depth)
        return tokens, parents, score


@dataclass
class _Indexed:
    """One sequence's own trie and how much of its history it holds."""

    trie: SuffixTrie
    prompt_len: int
    tokens: list[int] = field(default_factory=list)  # the history indexed so far
    active: list[int] = field(default_factory=list)  # nodes of its last 1..D-1 tokens


class SuffixDrafter:
    """Drafts from suffix tries over the sequence's own text and over recent served outputs."""

    name = "suffix"
    needs_topk = 0
    cost_hint = 0.0
    feature_layers = ()

    def __init__(self, max_depth: int = 32, global_tokens: int = 16384, min_prob: float = 0.1,
                 spec_factor: float = 1.0, spec_offset: float = 0.0,
                 budgets: tuple[int, ...] = (1, 2, 4, 8, 16)):
        if max_depth < 2:
            raise ValueError(f"max_depth must be >= 2, got {max_depth}")
        if global_tokens < 0:
            raise ValueError(f"global_tokens must be >= 0, got {global_tokens}")
        if not 0.0 <= min_prob <= 1.0:
            raise ValueError(f"min_prob must be in [0, 1], got {min_prob}")
        if spec_factor < 0:
            raise ValueError(f"spec_factor must be >= 0, got {spec_factor}")
        self.max_depth, self.global_limit, self.min_prob = max_depth, global_tokens, min_prob
        self.spec_factor, self.spec_offset = spec_factor, spec_offset
        self._budgets = budgets
        self._seqs: dict[int, _Indexed] = {}
        self.global_trie = SuffixTrie(max_depth)
        self._outputs: deque[list[int]] = deque()  # what the global trie holds, oldest first
        self.global_tokens = 0
        """Tokens the global trie holds now (at most `global_limit`)."""

    @property
    def version(self) -> str:
        # The tries change every step; the version names the rule, not the contents.
        return f"d{self.max_depth}-f{self.spec_factor:g}+{self.spec_offset:g}-p{self.min_prob:g}"

    @property
    def nodes(self) -> int:
        """Trie nodes held now, per-sequence and global together (memory metric)."""
        return self.global_trie.nodes + sum(s.trie.nodes for s in self._seqs.values())

    def budgets(self) -> tuple[int, ...]:
        return self._budgets

    # ---- state -------------------------------------------------------------------------------------
    def add_output(self, tokens: list[int]) -> None:
        """Put a served output in the global trie, evicting the oldest outputs past `global_limit` tokens."""
        if self.global_limit == 0 or not tokens:
            return
        tokens = list(tokens[-self.global_limit:])
        while self._outputs and self.global_tokens + len(tokens) > self.global_limit:
            old = self._outputs.popleft()
            self.global_trie.remove(old)
            self.global_tokens -= len(old)
        self.global_trie.add(tokens)
        self._outputs.append(tokens)
        self.global_tokens += len(tokens)

    def _index(self, r: DraftRequest) -> _Indexed:
        """The sequence's trie, extended by the history it gained since the last step."""
        state = self._seqs.get(r.seq_id)
        if state is None or len(r.history) < len(state.tokens):
            # First sight: the history is the prompt (the engine drafts after every prefill).
            state = self._seqs[r.seq_id] = _Indexed(SuffixTrie(self.max_depth), len(r.history))
        trie, active = state.trie, state.active
        for tok in r.history[len(state.tokens):]:
            active = trie.extend(active, tok)
        state.active = active
        state.tokens.extend(r.history[len(state.tokens):])
        return state

    # ---- drafting ----------------------------------------------------------------------------------
    def _max_len(self, match: int) -> int:
        return int(self.spec_factor * match + self.spec_offset)

    def _candidates(self, longest: int) -> list[int]:
        """Match lengths worth a tree: the longest, and the one leaving the most depth below it.

        A match of m tokens sits at depth m, so its tree is at most min(factor·m + offset, D - m) deep;
        past the balance point a shorter match allows a longer draft.
        """
        balance = max(1, int((self.max_depth - self.spec_offset) / (1.0 + self.spec_factor)))
        return [longest] if longest <= balance else [longest, balance]

    def _best(self, trie: SuffixTrie, matches: list[tuple[int, int]], budget: int) -> tuple[list[int], list[int], float]:
        best: tuple[list[int], list[int], float] = ([], [], 0.0)
        for m, node in matches:
            tokens, parents, score = trie.grow(node, min(self._max_len(m), budget), budget, self.min_prob)
            if score > best[2]:
                best = (tokens, parents, score)
        return best

    def _own_matches(self, state: _Indexed) -> list[tuple[int, int]]:
        """(m, node) for the candidate match lengths in the sequence's own trie."""
        active, trie = state.active, state.trie
        # active[m-1] is the node of the last m tokens: the history's own occurrence (never continued)
        # plus every earlier one, so a node with children has been seen continued before.
        longest = next((m for m in range(len(active), 0, -1) if trie.has_continuation(active[m - 1])), 0)
        if longest == 0:
            return []
        return [(m, active[m - 1]) for m in self._candidates(longest)]

    def _global_matches(self, history: list[int]) -> list[tuple[int, int]]:
        """(m, node) for the candidate match lengths in the global trie."""
        trie = self.global_trie
        longest, node = 0, None
        for m in range(min(self.max_depth - 1, len(history)), 0, -1):
            node = trie.find(history[-m:])  # a miss usually fails within a token or two
            if node is not None and trie.has_continuation(node):
                longest = m
                break
        if longest == 0:
            return []
        out = [(longest, node)]
        for m in self._candidates(longest)[1:]:
            out.append((m, trie.find(history[-m:])))  # a suffix of a match is a match
        return [(m, n) for m, n in out if n is not None and trie.has_continuation(n)]

    def draft_for(self, r: DraftRequest) -> Draft:
        """Index the request's new tokens, then the better of its own and the global tree."""
        state = self._index(r)
        if r.budget <= 0:
            return Draft.empty()
        own = self._best(state.trie, self._own_matches(state), r.budget)
        tokens, parents, score = own
        if self.global_tokens:
            glob = self._best(self.global_trie, self._global_matches(r.history), r.budget)
            if glob[2] > score:  # ties go to the sequence's own text
                tokens, parents, score = glob
        if not tokens:
            return Draft.empty()
        return Draft(torch.tensor(tokens, dtype=torch.long), torch.tensor(parents, dtype=torch.long))

    def propose(self, requests: list[DraftRequest]) -> list[Draft]:
        return [self.draft_for(r) for r in requests]

    def observe(self, feedback: list[Feedback]) -> None:
        pass  # the history already holds what was accepted

    def observe_prefill(self, prefills: list[Prefill]) -> None:
        pass

    def release(self, seq_id: int) -> None:
        """Forget the sequence's trie; its output (as far as the last draft saw it) joins the global trie."""
        state = self._seqs.pop(seq_id, None)
        if state is not None:
            self.add_output(state.tokens[state.prompt_len:])


def suffix_drafters(drafter: object) -> list[SuffixDrafter]:
    """Every SuffixDrafter in `drafter`: itself, a controller's parts, a per-domain drafter's drafters."""
    if isinstance(drafter, SuffixDrafter):
        return [drafter]
    inner = list(getattr(drafter, "parts", None) or [])
    if hasattr(drafter, "per_domain"):
        inner += [getattr(drafter, "default")] + list(getattr(drafter, "per_domain").values())
    found: list[SuffixDrafter] = []
    for d in inner:
        found += [s for s in suffix_drafters(d) if all(s is not f for f in found)]
    return found
