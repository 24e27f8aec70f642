"""Served acceptance per domain: notice drift (start training) and collapse (tell someone).

Each event's step records give the acceptance its drafter actually achieved in serving
(accepted / proposed draft tokens). An exponentially weighted mean per domain is compared with the
best it has been: a drop of `drop` marks the domain drifting (train it now); falling below
`collapse` x best marks it collapsed (reported on the display, MLflow and the log).
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class DriftConfig:
    """Thresholds on the served acceptance of each domain."""

    halflife_events: float = 20.0
    """Events over which the running mean forgets half of its past."""
    warmup_events: int = 20
    """Events before a domain's best is trusted."""
    drop: float = 0.05
    """Absolute fall below the best that counts as drift."""
    collapse: float = 0.5
    """Fraction of the best below which acceptance has collapsed."""

    def __post_init__(self) -> None:
        if self.halflife_events <= 0:
            raise ValueError(f"halflife_events={self.halflife_events}: must be > 0")
        if not 0 < self.collapse < 1:
            raise ValueError(f"collapse={self.collapse}: must be in (0, 1)")


@dataclass
class DomainAcceptance:
    mean: float = 0.0
    best: float = 0.0
    events: int = 0
    weight: float = 0.0  # bias correction of the running mean (as in Adam)


@dataclass
class DriftMonitor:
    cfg: DriftConfig = field(default_factory=DriftConfig)
    domains: dict[str, DomainAcceptance] = field(default_factory=dict)

    def observe(self, domain: str, accepted: int, proposed: int) -> None:
        """Add one event's served acceptance (events with no drafts are ignored)."""
        if proposed <= 0:
            return
        d = self.domains.setdefault(domain, DomainAcceptance())
        keep = 0.5 ** (1.0 / self.cfg.halflife_events)
        d.weight = keep * d.weight + (1 - keep)
        d.mean = keep * d.mean + (1 - keep) * accepted / proposed
        d.events += 1
        if d.events >= self.cfg.warmup_events:
            d.best = max(d.best, self.value(domain))

    def value(self, domain: str) -> float:
        d = self.domains.get(domain)
        return d.mean / d.weight if d and d.weight else 0.0

    def drifting(self, domain: str) -> bool:
        d = self.domains.get(domain)
        return bool(d and d.events >= self.cfg.warmup_events and self.value(domain) < d.best - self.cfg.drop)

    def collapsed(self, domain: str) -> bool:
        d = self.domains.get(domain)
        return bool(d and d.events >= self.cfg.warmup_events and self.value(domain) < self.cfg.collapse * d.best)
