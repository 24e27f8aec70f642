"""Per-domain drafters (OSD's one draft per query distribution) behind the one Drafter protocol.

Each request's domain (DraftRequest.domain) picks a sub-drafter; requests of a domain without one
go to the default. Hot swap of one domain builds a new DomainDrafter with `replace` and hands it to
`Engine.set_drafter`, so the engine still swaps one reference between two steps.
"""
from __future__ import annotations

from drafters.base import DraftRequest, Drafter, Feedback, Prefill
from drafters.verify import Draft


class DomainDrafter:
    """Routes each sequence to its domain's drafter; step records name the sub-drafter that drafted."""

    name = "by-domain"

    def __init__(self, default: Drafter, per_domain: dict[str, Drafter] | None = None):
        self.default = default
        self.per_domain: dict[str, Drafter] = dict(per_domain or {})
        self._seq_drafter: dict[int, Drafter] = {}
        everyone = self._all()
        self.needs_topk = max((d.needs_topk for d in everyone), default=0)
        self.cost_hint = max((d.cost_hint for d in everyone), default=0.0)
        layers = {d.feature_layers for d in everyone if d.feature_layers}
        if len(layers) > 1:
            raise ValueError(f"per-domain drafters read different target layers {sorted(layers)}; they must agree")
        self.feature_layers: tuple[int, ...] = layers.pop() if layers else ()

    def _all(self) -> list[Drafter]:
        return [self.default, *self.per_domain.values()]

    def drafter_for(self, domain: str | None) -> Drafter:
        """The drafter that serves `domain`."""
        return self.per_domain.get(domain, self.default) if domain is not None else self.default

    def replace(self, domain: str | None, drafter: Drafter) -> "DomainDrafter":
        """A new DomainDrafter with `drafter` serving `domain` (None: the default); self is unchanged."""
        if domain is None:
            return DomainDrafter(drafter, self.per_domain)
        return DomainDrafter(self.default, {**self.per_domain, domain: drafter})

    @property
    def version(self) -> str:
        """Every sub-drafter's version: "default=<v>,<domain>=<v>,..." (domains sorted)."""
        parts = [f"default={self.default.version}"]
        parts += [f"{dom}={d.version}" for dom, d in sorted(self.per_domain.items())]
        return ",".join(parts)

    def served_by(self, seq_id: int) -> tuple[str, str]:
        """(name, version) of the drafter that drafts for `seq_id`."""
        d = self._seq_drafter.get(seq_id, self.default)
        return d.name, d.version

    def budgets(self) -> tuple[int, ...]:
        return tuple(sorted({b for d in self._all() for b in d.budgets()}))

    def propose(self, requests: list[DraftRequest]) -> list[Draft]:
        groups: dict[int, tuple[Drafter, list[int]]] = {}
        for i, r in enumerate(requests):
            d = self._seq_drafter.setdefault(r.seq_id, self.drafter_for(r.domain))
            groups.setdefault(id(d), (d, []))[1].append(i)
        out: list[Draft | None] = [None] * len(requests)
        for d, idx in groups.values():
            for i, draft in zip(idx, d.propose([requests[i] for i in idx])):
                out[i] = draft
        return out  # type: ignore[return-value]

    def observe(self, feedback: list[Feedback]) -> None:
        groups: dict[int, tuple[Drafter, list[Feedback]]] = {id(d): (d, []) for d in self._all()}
        for fb in feedback:
            d = self._seq_drafter.get(fb.seq_id, self.default)
            if d.needs_topk:
                # Each sub-drafter gets the top-k width it asked for.
                fb = Feedback(fb.seq_id, fb.tree_tokens, fb.topk_ids[:, : d.needs_topk], fb.verified, fb.features)
            groups.setdefault(id(d), (d, []))[1].append(fb)
        for d, fbs in groups.values():
            d.observe(fbs if (d.needs_topk or d.feature_layers) else [])

    def observe_prefill(self, prefills: list[Prefill]) -> None:
        groups: dict[int, tuple[Drafter, list[Prefill]]] = {}
        for p in prefills:
            d = self._seq_drafter.setdefault(p.seq_id, self.drafter_for(p.domain))
            if d.feature_layers:
                groups.setdefault(id(d), (d, []))[1].append(p)
        for d, ps in groups.values():
            d.observe_prefill(ps)

    def release(self, seq_id: int) -> None:
        d = self._seq_drafter.pop(seq_id, None)
        if d is not None:
            d.release(seq_id)
