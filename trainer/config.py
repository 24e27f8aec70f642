"""TrainerConfig: everything one trainer process needs (trainer.recipe runs it).

Frozen; every field has a docstring; __post_init__ names the bad field. The defaults are the
measured ones (bench/online.py).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from moe.loader import DEFAULT_MODEL
from streams import DEFAULT_TOPIC
from trainer.distill import GateConfig
from trainer.drift import DriftConfig
from trainer.idle import IdleConfig
from trainer.losses import LossName

GENERAL = "general"


@dataclass(frozen=True)
class TrainerConfig:
    """Everything one trainer process needs; defaults are the measured ones (bench/online.py)."""

    target: str = DEFAULT_MODEL
    """Target model (the draft is cut from it when a lineage has no champion yet)."""
    events_url: str | None = None
    """Event log URL (kafka://..., file://...); default streams.default_url()."""
    topic: str = DEFAULT_TOPIC
    """Topic of token events."""
    group: str = "spectutor-trainer"
    """Consumer group."""
    poll_records: int = 256
    """Events one poll takes at most (between two chances to train and checkpoint)."""
    state_dir: str = str(Path(os.environ.get("SPECTUTOR_HOME", Path.home() / ".cache" / "spectutor")) / "trainer")
    """Checkpoints live here."""
    drafter: Literal["draft-lm", "eagle"] = "draft-lm"
    """What every lineage trains (trainer.students): a draft-lm cut of the target, or an EAGLE head."""
    draft_layers: int = 4
    """draft-lm: layers of the target a fresh draft keeps."""
    eagle_base: str | None = None
    """eagle: the head a lineage starts from while the registry has none (default: the cached
    warm-start head of `target`, made by `spectutor draft init`)."""
    eagle_ttt_steps: int = 3
    """eagle: draft steps unrolled by training-time test (as the warm start)."""
    eagle_step_decay: float = 0.8
    """eagle: loss weight of unrolled step j is eagle_step_decay ** j."""
    eagle_prompt_weight: float = 0.3
    """eagle: loss weight of prompt positions (outputs weigh all_weight + rejected_weight at rejections)."""
    eagle_feature_cache: int = 640
    """eagle: served requests whose recomputed target features stay in memory (about 3.5 kB per token)."""
    domains: tuple[str, ...] = ()
    """One lineage per listed domain; () trains one general lineage on all traffic."""
    general: bool = True
    """Keep a general lineage for traffic no listed domain claims (always on when `domains` is empty)."""
    lineage_tag: str | None = None
    """Inserted in registered names (spectutor-draft-<tag>-<domain>), e.g. the target's name."""
    loss: LossName = "fkl"
    """fkl, rkl, jsd (generalised, with jsd_beta), osd_jsd (0.9 FKL + 0.1 RKL) or tvd."""
    jsd_beta: float = 0.5
    """beta of the generalised JSD."""
    lr: float = 3e-4
    """AdamW learning rate, constant as in OSD (which used 1e-4/1e-5 on a 160M student with more data);
    bench/online.py: 3e-4 lifts the 4-layer SmolLM2 cut from 0.01 to 0.47 held-out HumanEval acceptance
    within 48 requests."""
    batch_size: int = 8
    """Samples per gradient step."""
    max_len: int = 512
    """Tokens of prompt + output kept per sample."""
    all_weight: float = 1.0
    """Loss weight of every supervised position."""
    rejected_weight: float = 0.0
    """Extra loss weight of positions where a draft token was rejected. OSD trains on those only
    (all_weight=0, rejected_weight=1); with a draft as far off as a fresh cut nearly every position
    is rejected, so the two coincide early; all positions is the default (not yet compared on the
    real model: bench/online.py --all-weight 0 --rejected-weight 1 does)."""
    bonus_is_rejected: bool = False
    """Treat bonus-token positions like rejected ones (what OSD's code does)."""
    buffer_size: int = 512
    """Samples a lineage's buffer keeps."""
    half_life: float = 128.0
    """Recency half-life of the buffer's draws, in arrivals."""
    holdout_size: int = 32
    """Newest samples per lineage held out for the gate."""
    train_every: int = 4
    """New samples a lineage needs before its next round of steps."""
    steps_per_sample: float = 1.0
    """Gradient steps a round runs per new sample (the replay ratio: each step draws batch_size samples);
    1.0 is what bench/online.py measured."""
    gate_every: int = 8
    """Steps between gate evaluations of a lineage."""
    gate: GateConfig = field(default_factory=GateConfig)
    checkpoint_every_s: float = 10.0
    """Checkpoint (and commit the consumer) at least this often while events arrive."""
    teacher: Literal["topk", "target"] = "topk"
    """topk: the logged top-k log-probabilities (+ a tail bucket); target: recompute the full distribution."""
    idle: IdleConfig = field(default_factory=IdleConfig)
    drift: DriftConfig = field(default_factory=DriftConfig)
    redis_url: str | None = None
    """Heartbeats and promotions; None = always idle, no announcements."""
    redis_prefix: str = "spectutor"
    registry: bool = True
    """Register and promote winners in MLflow (False: in-memory champions, for offline runs)."""
    registration_retry_s: float = 2.0
    """First wait before retrying a registration MLflow could not take; doubles per failure."""
    registration_retry_cap_s: float = 15.0
    """Longest wait between registration retries (a recovered server is used within this)."""
    seed: int = 0
    max_steps: int | None = None
    """Stop after this many steps in total (None: run until stopped)."""
    stop_when_drained_s: float | None = None
    """Stop once no event came for this long and no lineage has work (batch runs, tests); a pending
    registration holds the stop for up to 4 x registration_retry_cap_s more."""

    def __post_init__(self) -> None:
        if self.drafter not in ("draft-lm", "eagle"):
            raise ValueError(f"drafter={self.drafter!r}: must be draft-lm or eagle")
        if not 0 < self.eagle_step_decay <= 1:
            raise ValueError(f"eagle_step_decay={self.eagle_step_decay}: must be in (0, 1]")
        if self.eagle_prompt_weight < 0:
            raise ValueError(f"eagle_prompt_weight={self.eagle_prompt_weight}: must be >= 0")
        for name in ("eagle_ttt_steps", "eagle_feature_cache", "draft_layers", "batch_size", "max_len", "buffer_size", "holdout_size", "train_every",
                     "gate_every", "poll_records"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: must be >= 1")
        if self.lr <= 0:
            raise ValueError(f"lr={self.lr}: must be > 0")
        if self.all_weight < 0 or self.rejected_weight < 0 or self.all_weight + self.rejected_weight == 0:
            raise ValueError(f"all_weight={self.all_weight}, rejected_weight={self.rejected_weight}: "
                             "must be >= 0 and not both 0")
        if self.loss not in ("fkl", "rkl", "jsd", "osd_jsd", "tvd"):
            raise ValueError(f"loss={self.loss!r}: must be fkl, rkl, jsd, osd_jsd or tvd")
        if self.teacher not in ("topk", "target"):
            raise ValueError(f"teacher={self.teacher!r}: must be topk or target")
        if self.steps_per_sample <= 0:
            raise ValueError(f"steps_per_sample={self.steps_per_sample}: must be > 0")
        for name in ("registration_retry_s", "registration_retry_cap_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)}: must be > 0")
        if self.half_life <= 0:
            raise ValueError(f"half_life={self.half_life}: must be > 0")
        if len(set(self.domains)) != len(self.domains) or GENERAL in self.domains:
            raise ValueError(f"domains={self.domains}: must be distinct and not {GENERAL!r}")

    @property
    def lineage_keys(self) -> tuple[str, ...]:
        return self.domains + ((GENERAL,) if self.general or not self.domains else ())
