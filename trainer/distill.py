"""One distillation step and the teacher-forced evaluation, as functions of a model and a batch.

N supervised positions, K logged top-k, V vocabulary, S samples, T rows per sample.
No I/O here: the recipe (trainer.recipe) feeds batches, steps the optimiser and writes checkpoints.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from drafters.draft_lm import DraftModel
from moe.model import LeanDecoder
from trainer.forward import hidden_states, logits_at
from trainer.losses import LossName, acceptance, loss_fn
from trainer.samples import Batch, Sample, coarsen, collate, expected_accepted_length


def student_logprobs(model: DraftModel, batch: Batch) -> Tensor:
    """Student log-probabilities over the whole vocabulary at the supervised positions [N, V]."""
    h = hidden_states(model.decoder, batch.input_ids, batch.attention_mask)   # [B, L, D]
    logits = model.full_logits(logits_at(model.decoder, h[batch.seq, batch.pos]))  # [N, V]
    return logits.log_softmax(-1)


@torch.no_grad()
def target_logprobs(target: LeanDecoder, batch: Batch) -> Tensor:
    """The target's full distribution at the supervised positions [N, V] (the "recomputed" teacher)."""
    h = hidden_states(target, batch.input_ids, batch.attention_mask)
    return logits_at(target, h[batch.seq, batch.pos]).log_softmax(-1)


def distill_loss(model: DraftModel, batch: Batch, loss: LossName, jsd_beta: float = 0.5,
                 target: LeanDecoder | None = None) -> tuple[Tensor, dict[str, float]]:
    """(loss with the student's graph, metrics): on the top-k support, or the full vocabulary with `target`."""
    keep = batch.weights > 0
    s = student_logprobs(model, batch)[keep] if keep.any() else student_logprobs(model, batch)[:0]
    if target is not None:
        t = target_logprobs(target, batch)[keep]
        student, teacher = s, t
    else:
        student, teacher = coarsen(s, batch.topk_ids[keep], batch.topk_logprobs[keep])
    w = batch.weights[keep]
    value = loss_fn(loss, jsd_beta)(student, teacher, w)
    with torch.no_grad():
        alpha = float(acceptance(student, teacher).mean()) if len(w) else 0.0  # host sync: a metric
    return value, {"train/loss": float(value.detach()), "train/alpha": alpha, "train/positions": float(len(w))}


@dataclass(frozen=True)
class EvalMetrics:
    """Teacher-forced scores of one draft on held-out samples."""

    acceptance: float        # fraction of positions where the draft's greedy token is the emitted one
    accepted_length: float   # expected tokens per target forward at the serving chain length (bonus included)
    alpha: float             # mean sum_x min(p_T, p_S) over the logged top-k ids (a lower bound of OSD's alpha)
    samples: int
    positions: int

    def as_dict(self, prefix: str = "eval/") -> dict[str, float]:
        return {f"{prefix}acceptance": self.acceptance, f"{prefix}accepted_length": self.accepted_length,
                f"{prefix}alpha": self.alpha, f"{prefix}samples": float(self.samples),
                f"{prefix}positions": float(self.positions)}


@torch.no_grad()
def evaluate(model: DraftModel, samples: list[Sample], spec_len: int, batch_size: int = 8) -> EvalMetrics:
    """Score `model` on `samples` as if it had drafted chains of `spec_len` along the target's own output."""
    if not samples:
        return EvalMetrics(0.0, 1.0, 0.0, 0, 0)
    was_training = model.training
    model.eval()
    hits, lengths, alphas = [], [], []
    for i in range(0, len(samples), batch_size):
        part = samples[i: i + batch_size]
        batch = collate(part)
        logp = student_logprobs(model, batch)                                  # [N, V]
        match = logp.argmax(-1) == batch.output_ids                            # [N]
        top = logp.gather(-1, batch.topk_ids).exp()                             # [N, K]
        alphas.append(torch.minimum(top, batch.topk_logprobs.exp()).sum(-1))
        hits.append(match.float())
        # Runs of matches within each sample: lay rows out as [S, T], pad with misses.
        t = max(s.num_rows for s in part)
        grid = torch.zeros(len(part), t, dtype=torch.bool)
        grid[batch.seq, batch.row] = match
        runs = expected_accepted_length(grid, spec_len)                        # [S, T]
        lengths.append(runs[batch.seq, batch.row].float())
    model.train(was_training)
    hit, length, alpha = torch.cat(hits), torch.cat(lengths), torch.cat(alphas)
    return EvalMetrics(float(hit.mean()), float(length.mean()), float(alpha.mean()), len(samples), len(hit))


@dataclass(frozen=True)
class GateConfig:
    """When a challenger may replace the champion."""

    min_samples: int = 16
    """Held-out samples needed before any decision (fewer: keep training)."""
    min_positions: int = 256
    """Held-out token positions needed, likewise."""
    margin: float = 0.01
    """Absolute gain in teacher-forced acceptance the challenger must show."""
    spec_len: int = 4
    """Chain length at which expected accepted length is scored (the serving speculation length)."""

    def __post_init__(self) -> None:
        for name in ("min_samples", "min_positions", "spec_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: must be >= 1")
        if self.margin < 0:
            raise ValueError(f"margin={self.margin}: must be >= 0")


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str


def decide(champion: EvalMetrics, challenger: EvalMetrics, cfg: GateConfig) -> Decision:
    """Promote only with enough held-out data, an acceptance gain of at least `margin`, and no loss
    of expected accepted length."""
    if challenger.samples < cfg.min_samples or challenger.positions < cfg.min_positions:
        return Decision(False, f"too little held-out data ({challenger.samples} samples, "
                               f"{challenger.positions} positions)")
    gain = challenger.acceptance - champion.acceptance
    if gain < cfg.margin:
        return Decision(False, f"acceptance gain {gain:+.4f} below the margin {cfg.margin}")
    if challenger.accepted_length < champion.accepted_length:
        return Decision(False, f"accepted length fell {champion.accepted_length:.3f} -> "
                               f"{challenger.accepted_length:.3f}")
    return Decision(True, f"acceptance {champion.acceptance:.4f} -> {challenger.acceptance:.4f}")
