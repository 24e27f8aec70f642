"""What a lineage trains: a draft-lm cut of the target or an EAGLE head, behind one interface.

The recipe (trainer.recipe) owns events, buffers, hold-outs, the gate and the registry; a kind owns
how its drafts are made, copied, saved, loaded, stepped and scored. Both kinds train on the same
`trainer.samples.Sample`s (one per served request) and are scored by the same `EvalMetrics`, so the
gate, per-domain lineages, MLflow versions and hot swaps treat them alike.

EAGLE samples need the target's hidden states. By default they are recomputed here, with one
teacher-forced target forward over prompt + output in idle compute, when a sample is first trained
on or scored; the target's own distribution from that forward is the teacher (its top K over the
draft vocabulary), not the event's logged top-k. Recomputed samples are kept in a bounded cache
keyed by event id (`TrainerConfig.eagle_feature_cache` samples, about 3.5 kB per token each).
"""
from __future__ import annotations

import collections
import copy
import dataclasses
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor, nn

from trainer.config import TrainerConfig
from trainer.distill import EvalMetrics
from trainer.samples import Sample


class StudentKind(Protocol):
    """One kind of draft the trainer can distill (see the module docstring)."""

    name: str
    """The drafter name serving builds these checkpoints with (drafters.registry.DRAFTERS)."""

    def base(self) -> nn.Module:
        """A lineage's starting draft while the registry has no champion for it."""

    def load(self, folder: Path) -> nn.Module:
        """A draft from a checkpoint folder this kind saved."""

    def save(self, model: nn.Module, folder: Path, version: str) -> str:
        """Write `model` to `folder`; returns the sha256 of its weights file."""

    def clone(self, model: nn.Module) -> nn.Module:
        """An independent copy (shared frozen parts, such as the target's embedding, stay shared)."""

    def parameters(self, model: nn.Module) -> list[nn.Parameter]:
        """What the optimiser steps."""

    def loss(self, model: nn.Module, samples: list[Sample]) -> tuple[Tensor, dict[str, float]]:
        """(loss with the student's graph, metrics including train/tokens) on a drawn batch."""

    def evaluate(self, model: nn.Module, samples: list[Sample], spec_len: int) -> EvalMetrics:
        """Teacher-forced scores on held-out samples as if `model` drafted chains of `spec_len`."""


class DraftLMKind:
    """The draft-lm cut (drafters.draft_lm): distilled on the events' logged top-k, or the full target law."""

    name = "draft-lm"

    def __init__(self, cfg: TrainerConfig, target: "TargetHandle"):
        self.cfg = cfg
        self.target = target
        self._base = None

    def base(self) -> nn.Module:
        from drafters.draft_lm import draft_from_target

        if self._base is None:
            self._base = draft_from_target(self.cfg.target, self.cfg.draft_layers, max_len=self.cfg.max_len)
        return copy.deepcopy(self._base)

    def load(self, folder: Path) -> nn.Module:
        from drafters.draft_lm import load_draft

        return load_draft(folder, max_len=self.cfg.max_len)[0]

    def save(self, model: nn.Module, folder: Path, version: str) -> str:
        from drafters.draft_lm import save_draft

        return save_draft(model, folder, version)

    def clone(self, model: nn.Module) -> nn.Module:
        return copy.deepcopy(model)

    def parameters(self, model: nn.Module) -> list[nn.Parameter]:
        return list(model.parameters())

    def loss(self, model: nn.Module, samples: list[Sample]) -> tuple[Tensor, dict[str, float]]:
        from trainer.distill import distill_loss
        from trainer.samples import collate

        cfg = self.cfg
        batch = collate(samples, cfg.all_weight, cfg.rejected_weight, cfg.bonus_is_rejected)
        teacher = self.target.model() if cfg.teacher == "target" else None
        value, metrics = distill_loss(model, batch, cfg.loss, cfg.jsd_beta, teacher)
        metrics["train/tokens"] = float(batch.attention_mask.sum())
        return value, metrics

    def evaluate(self, model: nn.Module, samples: list[Sample], spec_len: int) -> EvalMetrics:
        from trainer.distill import evaluate

        return evaluate(model, samples, spec_len)


class TargetHandle:
    """The target model, loaded on first use and shared by every lineage (teacher and feature source)."""

    def __init__(self, cfg: TrainerConfig):
        self.cfg = cfg
        self._model = None

    def model(self):
        if self._model is None:
            from moe.loader import load_model

            self._model = load_model(self.cfg.target, with_tokenizer=False, kernels="default",
                                     max_len=self.cfg.max_len).model
        return self._model


class EagleKind:
    """EAGLE heads (drafters.eagle), trained with training-time test (trainer.eagle_train).

    The starting head is `cfg.eagle_base`, or the cached warm-start head of the target (made by
    `spectutor draft init`); a lineage never starts from random weights.
    """

    name = "eagle"

    def __init__(self, cfg: TrainerConfig, target: TargetHandle):
        self.cfg = cfg
        self.target = target
        self._features: collections.OrderedDict[tuple[str, tuple[int, ...]], object] = collections.OrderedDict()
        self.feature_forwards = 0
        """Target forwards run to recompute features (a cache miss each)."""

    # ---- making, copying, storing --------------------------------------------------------------
    def base_folder(self) -> Path:
        from drafters.eagle import is_eagle_checkpoint, warm_start_dir

        folder = Path(self.cfg.eagle_base) if self.cfg.eagle_base else warm_start_dir(self.cfg.target)
        if not is_eagle_checkpoint(folder):
            raise FileNotFoundError(f"no eagle head to start from in {folder}: make it with "
                                    f"`spectutor draft init --model {self.cfg.target}` or set eagle_base")
        return folder

    def base(self) -> nn.Module:
        return self.load(self.base_folder())

    def load(self, folder: Path) -> nn.Module:
        from drafters.eagle import load_eagle

        target = self.target.model()
        head, _ = load_eagle(folder, target.cfg, target.embed, self.cfg.max_len)
        return head

    def save(self, model: nn.Module, folder: Path, version: str) -> str:
        from drafters.eagle import save_eagle

        return save_eagle(model, folder, version)

    def clone(self, model: nn.Module) -> nn.Module:
        return copy.deepcopy(model, memo={id(model.embed): model.embed})

    def parameters(self, model: nn.Module) -> list[nn.Parameter]:
        model.embed.weight.requires_grad_(False)
        return [p for n, p in model.named_parameters() if not n.startswith("embed")]

    # ---- features --------------------------------------------------------------------------------
    def features(self, head: nn.Module, sample: Sample):
        """The FeatureSample of a served request for `head`'s feature layers and draft vocabulary (cached)."""
        from trainer.eagle_train import collect

        key = (sample.event_id, head.cfg.feature_layers, _vocab_key(head.vocab_ids))
        hit = self._features.get(key)
        if hit is not None:
            self._features.move_to_end(key)
            return hit
        cfg = self.cfg
        tokens = sample.input_ids.tolist()
        weights = torch.full((len(tokens),), cfg.eagle_prompt_weight)
        marked = torch.from_numpy(sample.rejected | sample.bonus if cfg.bonus_is_rejected else sample.rejected)
        rows = torch.arange(sample.first, sample.first + sample.num_rows)
        weights[rows] = cfg.all_weight + cfg.rejected_weight * marked.float()
        fs = collect(self.target.model(), tokens, head.cfg.feature_layers, head.vocab_ids, weights,
                     domain=sample.domain or "")
        self.feature_forwards += 1
        self._features[key] = fs
        while len(self._features) > self.cfg.eagle_feature_cache:
            self._features.popitem(last=False)
        return fs

    def output_only(self, head: nn.Module, sample: Sample):
        """The FeatureSample with weight only where the target emitted an output token (what gets drafted)."""
        fs = self.features(head, sample)
        keep = torch.zeros_like(fs.weights)
        keep[sample.first: sample.first + sample.num_rows] = 1.0
        return dataclasses.replace(fs, weights=fs.weights * keep)

    # ---- training and scoring --------------------------------------------------------------------
    def loss(self, model: nn.Module, samples: list[Sample]) -> tuple[Tensor, dict[str, float]]:
        from trainer.eagle_train import make_batch, ttt_loss

        fs = [self.features(model, s) for s in samples]
        batch = make_batch(fs, self.cfg.max_len)
        value, agree = ttt_loss(model, batch, self.cfg.eagle_ttt_steps, self.cfg.eagle_step_decay)
        metrics = {"train/loss": float(value.detach()), "train/tokens": float(sum(f.num_tokens for f in fs)),
                   "train/positions": float((batch.weights > 0).sum())}
        metrics.update({f"train/agreement_step{j}": a for j, a in enumerate(agree)})
        return value, metrics

    @torch.no_grad()
    def evaluate(self, model: nn.Module, samples: list[Sample], spec_len: int) -> EvalMetrics:
        if not samples:
            return EvalMetrics(0.0, 1.0, 0.0, 0, 0)
        was_training = model.training
        model.eval()
        try:
            fs = [self.output_only(model, s) for s in samples]
            return chain_metrics(model, fs, spec_len, self.cfg.max_len)
        finally:
            model.train(was_training)


def chain_metrics(head: nn.Module, samples: list, spec_len: int, max_tokens: int | None = None,
                  batch_size: int = 8) -> EvalMetrics:
    """Score an EAGLE head as if it drafted greedy chains of `spec_len` after each supervised position.

    Unrolled step j at entry i is the j-th draft step after target-backed entry i - j
    (trainer.eagle_train.ttt_forward). A chain started at entry i accepts step j when steps 0..j all
    match the target's top token at entries i..i+j; accepted length counts the bonus token, as
    `trainer.samples.expected_accepted_length` does for draft-lm. acceptance is step 0's agreement;
    alpha is sum_k min(p_target, p_draft) over the target's kept candidates at step 0.
    """
    from trainer.eagle_train import make_batch, ttt_forward

    hits = positions = 0.0
    lengths = alphas = 0.0
    for i in range(0, len(samples), batch_size):
        batch = make_batch(samples[i: i + batch_size], max_tokens)
        outs = ttt_forward(head, batch, spec_len)
        valid = batch.weights > 0                                                 # [B, E]
        alive = torch.ones_like(valid)
        run = torch.ones(valid.shape)
        for j, out in enumerate(outs):
            logits = head.logits(out)                                             # [B, E, Vd]
            hit = (logits.argmax(-1) == batch.label_ids[..., 0]) & valid          # [B, E]
            if j == 0:
                p = logits.softmax(-1).gather(-1, batch.label_ids)                 # [B, E, K]
                alphas += float((torch.minimum(p, batch.label_p).sum(-1) * valid).sum())
                hits += float(hit.sum())
            ahead = torch.zeros_like(hit)
            ahead[:, : hit.shape[1] - j] = hit[:, j:]                             # step j of the chain from entry i
            alive = alive & ahead
            run += alive.float()
        lengths += float((run * valid).sum())
        positions += float(valid.sum())
    n = max(positions, 1.0)
    return EvalMetrics(hits / n, lengths / n if positions else 1.0, alphas / n, len(samples), int(positions))


def _vocab_key(vocab_ids: Tensor) -> tuple[int, int, int]:
    """A cheap identity of a draft vocabulary: its size and two checksums of its ids."""
    return (vocab_ids.numel(), int(vocab_ids.sum()), int((vocab_ids * torch.arange(vocab_ids.numel())).sum()))


def student_kind(cfg: TrainerConfig, target: TargetHandle | None = None) -> StudentKind:
    """The kind `cfg.drafter` names."""
    target = target or TargetHandle(cfg)
    return EagleKind(cfg, target) if cfg.drafter == "eagle" else DraftLMKind(cfg, target)
