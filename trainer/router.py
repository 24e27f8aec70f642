"""Which traffic domain a request belongs to, from its prompt tokens (OSD's per-distribution drafts).

Configured rules come first: a domain claims a prompt containing at least `min_hits` of its marker
token ids. Otherwise a multinomial naive Bayes over prompt token ids, learned online from labelled
events, picks the most likely domain when it has seen enough examples of each and is confident;
otherwise the request goes to the general drafter (None). The router is plain JSON so serving
loads the same one the trainer learned (Redis blob "router" or a file).
"""
from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass
from typing import Iterable


@dataclass(frozen=True)
class Rule:
    """A configured domain: prompts holding >= min_hits of `tokens` belong to it."""

    domain: str
    tokens: frozenset[int]
    min_hits: int = 1


class Router:
    """route(prompt_ids) -> domain or None; learn(prompt_ids, domain) updates the learned part."""

    def __init__(self, rules: Iterable[Rule] = (), min_examples: int = 8, min_log_odds: float = 2.0):
        self.rules = list(rules)
        self.min_examples, self.min_log_odds = min_examples, min_log_odds
        self.counts: dict[str, Counter[int]] = {}
        self.totals: dict[str, int] = {}
        self.examples: dict[str, int] = {}
        self.vocab: set[int] = set()

    def learn(self, prompt_ids: Iterable[int], domain: str) -> None:
        """Count one labelled prompt's tokens for `domain`."""
        toks = [int(t) for t in prompt_ids]
        self.counts.setdefault(domain, Counter()).update(toks)
        self.totals[domain] = self.totals.get(domain, 0) + len(toks)
        self.examples[domain] = self.examples.get(domain, 0) + 1
        self.vocab.update(toks)

    def scores(self, prompt_ids: Iterable[int]) -> dict[str, float]:
        """Log-posterior (up to a constant) of each learned domain, Laplace-smoothed."""
        toks = [int(t) for t in prompt_ids]
        n_ex = sum(self.examples.values())
        v = len(self.vocab) + 1
        out = {}
        for d, c in self.counts.items():
            denom = math.log(self.totals[d] + v)
            out[d] = math.log(self.examples[d] / n_ex) + sum(math.log(c.get(t, 0) + 1) - denom for t in toks)
        return out

    def route(self, prompt_ids: Iterable[int]) -> str | None:
        """The prompt's domain, or None for the general drafter."""
        toks = [int(t) for t in prompt_ids]
        present = set(toks)
        for rule in self.rules:
            if len(present & rule.tokens) >= rule.min_hits:
                return rule.domain
        ready = [d for d, n in self.examples.items() if n >= self.min_examples]
        if len(ready) < 2:
            return ready[0] if len(ready) == 1 and len(self.examples) == 1 else None
        s = self.scores(toks)
        ranked = sorted(ready, key=lambda d: s[d], reverse=True)
        return ranked[0] if s[ranked[0]] - s[ranked[1]] >= self.min_log_odds else None

    def to_json(self) -> str:
        return json.dumps({
            "rules": [{"domain": r.domain, "tokens": sorted(r.tokens), "min_hits": r.min_hits} for r in self.rules],
            "min_examples": self.min_examples, "min_log_odds": self.min_log_odds,
            "counts": {d: {str(t): n for t, n in c.items()} for d, c in self.counts.items()},
            "totals": self.totals, "examples": self.examples,
        })

    @classmethod
    def from_json(cls, text: str) -> "Router":
        raw = json.loads(text)
        r = cls([Rule(x["domain"], frozenset(x["tokens"]), x["min_hits"]) for x in raw["rules"]],
                raw["min_examples"], raw["min_log_odds"])
        r.counts = {d: Counter({int(t): n for t, n in c.items()}) for d, c in raw["counts"].items()}
        r.totals, r.examples = dict(raw["totals"]), dict(raw["examples"])
        r.vocab = {t for c in r.counts.values() for t in c}
        return r
