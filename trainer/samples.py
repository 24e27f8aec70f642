"""From token events to distillation samples, the recency-weighted buffer, and the shared support.

P prompt tokens, T output tokens, K logged top-k, L padded length, N supervised positions, V vocabulary.
An event's output token t was produced by the target's distribution after prompt + output[:t];
the engine logs that distribution's top-k as row t. So a sample's input is prompt + output[:-1]
and teacher row t supervises the student at input position P - 1 + t.

OSD marks "wrong" positions as the index of the corrected token and then (online) reads the student
at that index, which predicts the token *after* it: an off-by-one (seed-algorithms 5.2 item 5). Here
the rejected row is the row of the corrected token itself, i.e. the distribution the draft got wrong,
which is the position the paper's text means.
"""
from __future__ import annotations

import collections
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from streams.schema import TokenEvent


@dataclass(frozen=True)
class Sample:
    """One event, ready to train on."""

    event_id: str
    domain: str | None
    input_ids: np.ndarray      # [P + T - 1] int64: prompt + output[:-1] (truncated to max_len)
    first: int                 # input position supervised by teacher row 0 (P - 1)
    topk_ids: np.ndarray       # [T', K] int64 teacher rows kept (T' <= T after truncation)
    topk_logprobs: np.ndarray  # [T', K] float32
    rejected: np.ndarray       # [T'] bool: a draft token was rejected here (the corrected token's row)
    bonus: np.ndarray          # [T'] bool: every draft token of the step was accepted (bonus token's row)
    output_ids: np.ndarray     # [T'] int64: the tokens the target emitted (greedy acceptance is judged on them)

    @property
    def num_rows(self) -> int:
        return len(self.topk_ids)


def rejection_rows(ev: TokenEvent) -> tuple[np.ndarray, np.ndarray]:
    """([T] rejected, [T] bonus) rows from the per-step records; steps without drafts mark nothing."""
    t = ev.num_tokens
    rejected, bonus = np.zeros(t, dtype=bool), np.zeros(t, dtype=bool)
    pos = 0
    for proposed, accepted in zip(ev.step_proposed.tolist(), ev.step_accepted.tolist()):
        row = pos + accepted  # the token the target chose itself: corrected or bonus
        if row >= t:
            break
        if proposed > accepted:
            rejected[row] = True
        elif proposed > 0:
            bonus[row] = True
        pos = row + 1
    return rejected, bonus


def sample_from_event(ev: TokenEvent, max_len: int) -> Sample | None:
    """The sample of a whole-request event, or None when it cannot teach (no output, no top-k, a chunk)."""
    if ev.chunk != 0 or not ev.final or ev.num_tokens < 1 or ev.k == 0 or len(ev.prompt_ids) == 0:
        return None
    prompt = ev.prompt_ids.astype(np.int64)
    out = ev.output_ids.astype(np.int64)
    ids = np.concatenate([prompt, out[:-1]])[:max_len]
    first = len(prompt) - 1
    rows = max(0, min(ev.num_tokens, len(ids) - first))
    if rows == 0:
        return None
    rejected, bonus = rejection_rows(ev)
    return Sample(ev.event_id, ev.domain, ids, first, ev.topk_ids[:rows].astype(np.int64),
                  ev.topk_logprobs[:rows].astype(np.float32), rejected[:rows], bonus[:rows], out[:rows])


@dataclass
class Batch:
    """Right-padded samples and where their teacher rows sit."""

    input_ids: Tensor      # [B, L] int64
    attention_mask: Tensor # [B, L] int64
    seq: Tensor            # [N] which sequence each supervised position belongs to
    pos: Tensor            # [N] its input position
    topk_ids: Tensor       # [N, K]
    topk_logprobs: Tensor  # [N, K]
    weights: Tensor        # [N] loss weight (0 = masked)
    output_ids: Tensor     # [N] the emitted token at that position
    row: Tensor            # [N] teacher row index within its sample (for accepted-length runs)


def collate(samples: list[Sample], all_weight: float = 1.0, rejected_weight: float = 0.0,
            bonus_is_rejected: bool = False, sample_weights: list[float] | None = None) -> Batch:
    """Pad samples into one batch; a position's weight is all_weight + rejected_weight * [rejected].

    `sample_weights` scale each sample (recency); rows of a sample are weighted alike.
    """
    length = max(len(s.input_ids) for s in samples)
    ids = torch.zeros(len(samples), length, dtype=torch.long)
    mask = torch.zeros(len(samples), length, dtype=torch.long)
    seq, pos, tk, tl, w, out, row = [], [], [], [], [], [], []
    for b, s in enumerate(samples):
        ids[b, : len(s.input_ids)] = torch.from_numpy(s.input_ids)
        mask[b, : len(s.input_ids)] = 1
        n = s.num_rows
        seq.append(torch.full((n,), b))
        pos.append(torch.arange(s.first, s.first + n))
        tk.append(torch.from_numpy(s.topk_ids))
        tl.append(torch.from_numpy(s.topk_logprobs))
        marked = s.rejected | s.bonus if bonus_is_rejected else s.rejected
        scale = 1.0 if sample_weights is None else sample_weights[b]
        w.append(scale * (all_weight + rejected_weight * torch.from_numpy(marked).float()))
        out.append(torch.from_numpy(s.output_ids))
        row.append(torch.arange(n))
    return Batch(ids, mask, torch.cat(seq), torch.cat(pos), torch.cat(tk), torch.cat(tl), torch.cat(w),
                 torch.cat(out), torch.cat(row))


def coarsen(student_logprobs: Tensor, topk_ids: Tensor, topk_logprobs: Tensor) -> tuple[Tensor, Tensor]:
    """Student [N, V] and a top-k teacher [N, K] onto one support [N, K + 1]: the K ids and a tail bucket.

    The teacher's tail is the mass its top-k leaves (1 - sum exp); the student's is everything it puts
    outside those K ids. Every loss is then exact on this coarsened distribution; TVD there is a lower
    bound of the full TVD, and it is exact when the teacher's top-k hold all its mass.
    """
    s_top = student_logprobs.gather(-1, topk_ids).clamp_min(-80.0)                  # [N, K]
    outside = student_logprobs.scatter(-1, topk_ids, float("-inf"))                 # [N, V]
    s_tail = torch.logsumexp(outside, dim=-1, keepdim=True).clamp_min(-80.0)        # [N, 1]
    t_top = topk_logprobs.float()
    left = (1.0 - t_top.exp().sum(-1, keepdim=True)).clamp_min(1e-30)
    t_tail = left.log()                                                             # [N, 1]
    return torch.cat([s_top, s_tail], -1), torch.cat([t_top, t_tail], -1)


class RecencyBuffer:
    """The most recent `capacity` samples of one domain; draws favour new ones (half-life in arrivals)."""

    def __init__(self, capacity: int, half_life: float):
        self.capacity, self.half_life = capacity, half_life
        self.items: collections.deque[tuple[int, Sample]] = collections.deque(maxlen=capacity)
        self.arrivals = 0

    def __len__(self) -> int:
        return len(self.items)

    def add(self, sample: Sample) -> None:
        self.items.append((self.arrivals, sample))
        self.arrivals += 1

    def weights(self) -> np.ndarray:
        """Recency weight of each held sample: 0.5 ** (age / half_life), newest = 1."""
        ages = np.array([self.arrivals - 1 - a for a, _ in self.items], dtype=np.float64)
        return np.power(0.5, ages / max(self.half_life, 1e-9))

    def draw(self, n: int, rng: np.random.Generator) -> list[Sample]:
        """Up to n distinct samples, drawn with probability proportional to recency weight."""
        if not self.items:
            return []
        w = self.weights()
        picks = rng.choice(len(self.items), size=min(n, len(self.items)), replace=False, p=w / w.sum())
        return [self.items[i][1] for i in picks]


class Holdout:
    """The newest `size` samples of a domain, never trained on while held: a time split.

    A sample enters here first; the one it pushes out goes to training. So the gate always scores
    on traffic newer than anything the challenger has seen.
    """

    def __init__(self, size: int):
        self.items: collections.deque[Sample] = collections.deque()
        self.size = size

    def __len__(self) -> int:
        return len(self.items)

    def push(self, sample: Sample) -> Sample | None:
        """Hold `sample`; returns the oldest held one once more than `size` are held."""
        self.items.append(sample)
        return self.items.popleft() if len(self.items) > self.size else None


def expected_accepted_length(matches: Tensor, spec_len: int) -> Tensor:
    """Teacher-forced tokens per target forward at chain length spec_len: per start row, 1 + the run of
    consecutive matches from that row (capped at spec_len) within its sample. matches [S, T] bool -> [S, T]."""
    run = torch.zeros_like(matches, dtype=torch.long)
    nxt = torch.zeros(matches.shape[0], dtype=torch.long)
    for t in range(matches.shape[1] - 1, -1, -1):  # suffix runs, right to left
        nxt = torch.where(matches[:, t], nxt + 1, torch.zeros_like(nxt))
        run[:, t] = nxt
    return 1 + run.clamp_max(spec_len)


def speedup_model(alpha: float, k: int, c: float) -> float:
    """OSD's cost model: E = (1 - alpha^(k+1)) / (1 - alpha) tokens per forward, over c k + 1 cost."""
    e = k + 1.0 if math.isclose(alpha, 1.0) else (1 - alpha ** (k + 1)) / (1 - alpha)
    return e / (c * k + 1)
