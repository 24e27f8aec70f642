"""Distillation losses over one shared support: small pure functions, tested alone.

N positions, C classes of the support (the whole vocabulary, or the teacher's top-k ids plus one
"tail" bucket holding the rest of the mass; see trainer.samples.coarsen).
Every loss takes student and teacher log-probabilities [N, C] and per-position weights [N]
(0 = masked) and returns the weighted mean over positions; with every position masked it returns
a zero that still carries the student's graph, so a step on an empty batch is a no-op, not a crash.
The teacher never receives gradients (it is detached here).
"""
from __future__ import annotations

from typing import Callable, Literal

import torch
from torch import Tensor

LossName = Literal["fkl", "rkl", "jsd", "tvd", "osd_jsd"]


def weighted_mean(per_pos: Tensor, weights: Tensor) -> Tensor:
    """sum(w * x) / sum(w); 0 (with x's graph) when every weight is 0."""
    total = weights.sum()
    if float(total) <= 0:  # host sync: decides the empty case once per batch
        return (per_pos * 0.0).sum()
    return (per_pos * weights).sum() / total


def _kl(logp: Tensor, logq: Tensor) -> Tensor:
    """KL(p || q) per row [N]; 0 * log 0 terms count as 0."""
    p = logp.exp()
    return torch.where(p > 0, p * (logp - logq), torch.zeros_like(p)).sum(-1)


def forward_kl(student: Tensor, teacher: Tensor, weights: Tensor) -> Tensor:
    """KL(p_T || p_S): mass-covering; the student must put mass wherever the teacher does."""
    return weighted_mean(_kl(teacher.detach(), student), weights)


def reverse_kl(student: Tensor, teacher: Tensor, weights: Tensor) -> Tensor:
    """KL(p_S || p_T): mode-seeking."""
    return weighted_mean(_kl(student, teacher.detach()), weights)


def jsd(student: Tensor, teacher: Tensor, weights: Tensor, beta: float = 0.5) -> Tensor:
    """Generalised Jensen-Shannon (GKD): beta KL(p_T || m) + (1 - beta) KL(p_S || m), m = beta p_T + (1 - beta) p_S.

    Symmetric for beta = 0.5; tends to 0 at both ends, so beta must lie strictly inside (0, 1).
    """
    if not 0.0 < beta < 1.0:
        raise ValueError(f"beta={beta}: must be in (0, 1)")
    teacher = teacher.detach()
    m = torch.logsumexp(torch.stack([teacher + torch.log(torch.tensor(beta)),
                                     student + torch.log(torch.tensor(1.0 - beta))]), dim=0)
    return weighted_mean(beta * _kl(teacher, m) + (1.0 - beta) * _kl(student, m), weights)


def osd_jsd(student: Tensor, teacher: Tensor, weights: Tensor) -> Tensor:
    """What OSD's code calls "JSD": 0.9 FKL + 0.1 RKL (not a Jensen-Shannon divergence)."""
    return 0.9 * forward_kl(student, teacher, weights) + 0.1 * reverse_kl(student, teacher, weights)


def tvd(student: Tensor, teacher: Tensor, weights: Tensor) -> Tensor:
    """Total variation 1/2 sum |p_T - p_S| = 1 - sum min(p_T, p_S) = 1 - the acceptance rate."""
    return weighted_mean(0.5 * (teacher.detach().exp() - student.exp()).abs().sum(-1), weights)


def acceptance(student: Tensor, teacher: Tensor) -> Tensor:
    """Per-position probability that a token drawn from the student is accepted: sum min(p_T, p_S) [N]."""
    return torch.minimum(teacher.exp(), student.exp()).sum(-1)


def loss_fn(name: LossName, jsd_beta: float = 0.5) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    """The loss called `name` as a function (student, teacher, weights) -> scalar."""
    table: dict[str, Callable[[Tensor, Tensor, Tensor], Tensor]] = {
        "fkl": forward_kl, "rkl": reverse_kl, "tvd": tvd, "osd_jsd": osd_jsd,
        "jsd": lambda s, t, w: jsd(s, t, w, jsd_beta),
    }
    if name not in table:
        raise ValueError(f"loss={name!r}: must be one of {sorted(table)}")
    return table[name]
