"""Training an EAGLE head: target features and teacher labels, and the training-time-test (TTT) loss.

B sequences, T tokens per sequence, E = T - 1 entries, F fused features, D hidden, H heads,
Vd draft vocabulary, K teacher candidates kept per position, S unrolled draft steps.

Entry i of a sequence reads the target's features after token i and the embedding of token i+1;
its label is the target's distribution after token i+1 (what the draft must predict: token i+2),
restricted to the draft vocabulary, its top K kept. Positions whose target top token lies outside
the draft vocabulary are masked (the draft cannot propose it anyway).

TTT unrolls S draft steps the way `EagleDrafter` drafts: step j at entry i stands for the j-th
draft step after the last target-backed entry i - j. Its hidden input is step j-1's output at entry
i-1, its token the true token i+1, and it attends to step 0's keys at entries <= i-j plus step k's
key at entry i-j+k for k = 1..j (its own chain of draft steps). Step j's loss weighs `decay**j`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import Tensor

from drafters.eagle import EagleHead
from moe.model import LeanDecoder
from moe.tree import TreeBatch


@dataclass
class FeatureSample:
    """One teacher-forced sequence: tokens, the target's features after each, and its labels."""

    tokens: Tensor     # [T] int64
    features: Tensor   # [T, F] bfloat16: target hidden states after each token
    label_ids: Tensor  # [T, K] int64: draft-vocabulary indices of the target's top candidates after each token
    label_p: Tensor    # [T, K] float16: their target probabilities (temperature 1)
    weights: Tensor    # [T] float32: loss weight of predicting the token after position t (0 = masked)
    domain: str = ""

    @property
    def num_tokens(self) -> int:
        return self.tokens.numel()


def target_to_draft(vocab_ids: Tensor, vocab_size: int) -> Tensor:
    """[V] int64: draft index of each target token, -1 outside the draft vocabulary (the t2d map)."""
    t2d = torch.full((vocab_size,), -1, dtype=torch.long)
    t2d[vocab_ids] = torch.arange(vocab_ids.numel())
    return t2d


def collect(target: LeanDecoder, tokens: list[int], layers: tuple[int, ...], vocab_ids: Tensor,
            weights: Tensor | None = None, k: int = 16, domain: str = "") -> FeatureSample:
    """One teacher-forced target forward over `tokens`: its features at `layers` and top-k labels."""
    cache = target.new_cache(1, len(tokens))
    slot = cache.allocate()
    with torch.inference_mode():
        logits, feats = target.forward_features(TreeBatch.chains([tokens]), [slot], cache, layers)  # [1, T, V], [1, T, F]
        probs = logits[0].float().softmax(-1)                              # [T, V]
        top_full = probs.argmax(-1).cpu()                                  # [T]
        sub = probs[:, vocab_ids.to(probs.device)]                         # [T, Vd]
        p, ids = sub.topk(min(k, sub.shape[-1]), dim=-1)                   # [T, K]
        feats = feats[0].to(torch.bfloat16).cpu()
    # Clones made outside inference mode: the trainer writes to these (masks) and autograd reads them.
    t2d = target_to_draft(vocab_ids, target.cfg.vocab_size)
    w = torch.ones(len(tokens)) if weights is None else weights.float().clone()
    w = w * (t2d[top_full.clone()] >= 0).float()
    return FeatureSample(torch.tensor(tokens, dtype=torch.long), feats.clone(), ids.cpu().clone(),
                         p.to(torch.float16).cpu().clone(), w, domain)


@dataclass
class TTTBatch:
    """Padded entries of B sequences, ready for `ttt_loss`."""

    features: Tensor   # [B, E, F] float32
    tokens: Tensor     # [B, E] int64: the token after each entry's position (its embedding input)
    label_ids: Tensor  # [B, E, K] int64
    label_p: Tensor    # [B, E, K] float32
    weights: Tensor    # [B, E] float32, 0 on padding


def make_batch(samples: list[FeatureSample], max_tokens: int | None = None) -> TTTBatch:
    """Entries 0..T-2 of each sample (labels from positions 1..T-1), right-padded."""
    cut = [s if max_tokens is None or s.num_tokens <= max_tokens else _crop(s, max_tokens) for s in samples]
    e = max(s.num_tokens - 1 for s in cut)
    b, f, kk = len(cut), cut[0].features.shape[-1], cut[0].label_ids.shape[-1]
    out = TTTBatch(torch.zeros(b, e, f), torch.zeros(b, e, dtype=torch.long), torch.zeros(b, e, kk, dtype=torch.long),
                   torch.zeros(b, e, kk), torch.zeros(b, e))
    for i, s in enumerate(cut):
        n = s.num_tokens - 1
        out.features[i, :n] = s.features[:n].float()
        out.tokens[i, :n] = s.tokens[1:]
        out.label_ids[i, :n] = s.label_ids[1:]
        out.label_p[i, :n] = s.label_p[1:].float()
        out.weights[i, :n] = s.weights[1:]
    return out


def _crop(s: FeatureSample, n: int) -> FeatureSample:
    """The last n tokens of a sample (the answer is at the end)."""
    return FeatureSample(s.tokens[-n:], s.features[-n:], s.label_ids[-n:], s.label_p[-n:], s.weights[-n:], s.domain)


def sparse_soft_xent(logits: Tensor, label_ids: Tensor, label_p: Tensor) -> Tensor:
    """-sum_k p_k log softmax(logits)[id_k] / sum_k p_k per entry: [..., Vd], [..., K], [..., K] -> [...].

    The teacher's kept candidates are renormalized: soft cross-entropy against the target's law over
    its top K draft-vocabulary tokens.
    """
    lse = torch.logsumexp(logits.float(), dim=-1, keepdim=True)            # [..., 1]
    picked = logits.float().gather(-1, label_ids) - lse                    # [..., K]
    mass = label_p.sum(-1).clamp_min(1e-12)
    return -(label_p * picked).sum(-1) / mass


def _shift_right(x: Tensor, s: int) -> Tensor:
    """x[:, :, i] <- x[:, :, i - s] along dim 2 (zeros where i < s)."""
    if s == 0:
        return x
    out = torch.zeros_like(x)
    out[:, :, s:] = x[:, :, :-s]
    return out


def ttt_forward(head: EagleHead, batch: TTTBatch, steps: int) -> list[Tensor]:
    """Output hidden states of each unrolled step: a list of S tensors [B, E, D] (entries i < j invalid at step j)."""
    attn = head.attn
    b, e, _ = batch.features.shape
    dev = head.fc.weight.device
    positions = torch.arange(e, device=dev).expand(b, e)
    cos, sin = head.rotary(positions, head.fc.weight.dtype)
    g = attn.h // attn.hkv
    scale = attn.hd ** -0.5
    tokens = batch.tokens.to(dev)
    hidden = head.fuse(batch.features.to(dev))                               # [B, E, D]
    idx = torch.arange(e, device=dev)
    keys: list[tuple[Tensor, Tensor]] = []
    outs: list[Tensor] = []
    for j in range(steps):
        if j > 0:
            hidden = torch.cat([torch.zeros_like(outs[-1][:, :1]), outs[-1][:, :-1]], dim=1)  # step j-1 at i-1
        q, k, v = attn.project(head.layer_input(tokens, hidden), cos, sin)  # [B, H, E, hd], [B, Hkv, E, hd] x2
        k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)  # [B, H, E, hd]
        keys.append((k, v))
        k0, v0 = keys[0]
        scores = torch.matmul(q, k0.transpose(-1, -2)) * scale               # [B, H, E, E]
        seen = idx[None, :] <= idx[:, None] - j                              # [E, E] step-0 keys at <= i - j
        scores = scores.masked_fill(~seen, float("-inf"))
        diag = [((q * _shift_right(kk, j - s)).sum(-1) * scale)[..., None]   # [B, H, E, 1] key of step s at i-j+s
                for s, (kk, _) in enumerate(keys[1:], start=1)]
        allsc = torch.cat([scores, *diag], dim=-1)                           # [B, H, E, E + j]
        # Entries i < j see no step-0 key; their own key (the last column) keeps the softmax finite.
        probs = allsc.softmax(-1)
        ctx = torch.matmul(probs[..., :e], v0)                               # [B, H, E, hd]
        for s, (_, vv) in enumerate(keys[1:], start=1):
            ctx = ctx + probs[..., e + s - 1: e + s] * _shift_right(vv, j - s)
        o = attn.o_proj(ctx.transpose(1, 2).reshape(b, e, attn.h * attn.hd))  # [B, E, D]
        outs.append(head.block(hidden, o))
    return outs


def ttt_loss(head: EagleHead, batch: TTTBatch, steps: int = 4, decay: float = 0.8,
             extra: Tensor | None = None) -> tuple[Tensor, list[float]]:
    """Weighted TTT loss and each step's top-1 agreement with the target (on unmasked entries).

    `extra` [B, E] adds to the weights of step 0 (OSD: positions where served drafts were rejected).
    """
    outs = ttt_forward(head, batch, steps)
    dev = outs[0].device
    ids, p = batch.label_ids.to(dev), batch.label_p.to(dev)
    total, norm, agree = outs[0].new_zeros(()), 0.0, []
    for j, out in enumerate(outs):
        w = batch.weights.to(dev).clone()
        w[:, :j] = 0.0
        if j == 0 and extra is not None:
            w = w + extra.to(dev) * (w > 0)
        logits = head.logits(out)                                          # [B, E, Vd]
        per = sparse_soft_xent(logits, ids, p)                             # [B, E]
        ws = float(w.sum())  # host sync: the step's normalizer
        if ws > 0:
            total = total + (decay ** j) * (per * w).sum() / ws
            hit = (logits.argmax(-1) == ids[..., 0]).float()
            agree.append(float((hit * (w > 0)).sum() / (w > 0).sum()))
        else:
            agree.append(0.0)
        norm += decay ** j
    return total / norm, agree


def train(head: EagleHead, samples: list[FeatureSample], epochs: float, steps: int = 4, lr: float = 1e-3,
          batch_tokens: int = 2048, max_tokens: int = 384, seed: int = 0,
          progress: Callable[[Iterable], Iterable] | None = None,
          log: Callable[[int, float, list[float]], None] | None = None) -> list[float]:
    """AdamW with warm-up and cosine decay over `epochs` passes of length-bucketed batches; returns losses."""
    params = [p for n, p in head.named_parameters() if not n.startswith("embed")]
    head.embed.weight.requires_grad_(False)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, betas=(0.9, 0.95))
    rng = torch.Generator().manual_seed(seed)
    batches = _batches(samples, batch_tokens, max_tokens)
    total = max(1, int(math.ceil(epochs * len(batches))))
    warm = max(1, total // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda t: min(1.0, (t + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(t, total) / total)))
    order: list[int] = []
    losses = []
    head.train()
    it = range(total)
    for t in (progress(it) if progress else it):
        if not order:
            order = torch.randperm(len(batches), generator=rng).tolist()
        batch = make_batch([samples[i] for i in batches[order.pop()]], max_tokens)
        loss, agree = ttt_loss(head, batch, steps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss))  # host sync: progress and the returned curve
        if log:
            log(t, losses[-1], agree)
    head.eval()
    return losses


def _batches(samples: list[FeatureSample], batch_tokens: int, max_tokens: int) -> list[list[int]]:
    """Indices grouped by similar length so that each batch holds about `batch_tokens` tokens."""
    order = sorted(range(len(samples)), key=lambda i: min(samples[i].num_tokens, max_tokens))
    out, cur, widest = [], [], 0
    for i in order:
        n = min(samples[i].num_tokens, max_tokens)
        if cur and max(widest, n) * (len(cur) + 1) > batch_tokens:
            out.append(cur)
            cur, widest = [], 0
        cur.append(i)
        widest = max(widest, n)
    if cur:
        out.append(cur)
    return out


@torch.no_grad()
def acceptance_by_step(head: EagleHead, samples: list[FeatureSample], steps: int = 6,
                       max_tokens: int = 384) -> list[float]:
    """Teacher-forced top-1 agreement of each unrolled draft step with the target's argmax (held-out check)."""
    hits = [0.0] * steps
    count = [0.0] * steps
    for i in range(0, len(samples), 8):
        batch = make_batch(samples[i: i + 8], max_tokens)
        outs = ttt_forward(head, batch, steps)
        for j, out in enumerate(outs):
            w = batch.weights.clone()
            w[:, :j] = 0
            hit = (head.logits(out).argmax(-1) == batch.label_ids[..., 0]).float()
            hits[j] += float((hit * (w > 0)).sum())
            count[j] += float((w > 0).sum())
    return [h / max(c, 1.0) for h, c in zip(hits, count)]
