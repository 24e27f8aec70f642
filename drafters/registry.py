"""Build a drafter by name: the one place that knows every drafter's constructor."""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

from drafters.base import Drafter, NoDrafter

log = logging.getLogger(__name__)
DRAFTERS = ("none", "prompt-lookup", "token-recycling", "hybrid", "draft-lm", "suffix", "eagle", "auto")
AUTO_PARTS = ("suffix", "prompt-lookup", "token-recycling")
"""What the controller ("auto") chooses among, with eagle too where an eagle head exists."""


@dataclass(frozen=True)
class DrafterConfig:
    """Which drafter to run and how."""

    name: str = "token-recycling"
    """One of DRAFTERS."""
    draft_layers: int | tuple[int, ...] = 4
    """draft-lm cut from the target: keep its first n layers, or these layer indices."""
    draft_checkpoint: str | None = None
    """draft-lm: a folder written by `save_draft` (e.g. a version the trainer promoted) instead of a cut;
    eagle: a folder written by `save_eagle` instead of the cached warm-start head."""
    eagle_min_confidence: float = 0.1
    """eagle: a chain stops after a token whose draft probability is below this."""
    eagle_tree_topk: int = 0
    """eagle: 0 drafts chains; k >= 2 drafts trees of each expanded node's k likeliest children."""
    fallback: str | None = None
    """eagle: the drafter to serve with while no eagle head exists (None: refuse to start)."""
    draft_mode: str = "chain"
    """draft-lm: chain, topk, gumbel (RSD-C) or beam (RSD-S)."""
    branching: tuple[int, ...] = (2, 2, 1, 1)
    """draft-lm topk/gumbel trees: children per node at each depth."""
    recycling_k: int = 8
    """token-recycling: candidates kept per token."""
    suffix_max_depth: int = 32
    """suffix: depth of the suffix tries (longest match plus draft, in tokens)."""
    suffix_global_tokens: int = 16384
    """suffix: most tokens of recent outputs the shared trie holds (oldest evicted; 0: no shared trie)."""
    suffix_min_prob: float = 0.1
    """suffix: a draft token must be at least this share of its parent's continuations."""
    kernels: str = "auto"
    """draft-lm: the fp32 CPU kernels of its linear layers (moe.kernels.KERNELS; auto = measured here)."""

    def __post_init__(self) -> None:
        if self.name not in DRAFTERS:
            raise ValueError(f"unknown drafter {self.name!r}; choose one of {', '.join(DRAFTERS)}")
        if self.draft_mode not in ("chain", "topk", "gumbel", "beam"):
            raise ValueError(f"draft_mode must be chain, topk, gumbel or beam, got {self.draft_mode!r}")
        if isinstance(self.draft_layers, int) and self.draft_layers < 1:
            raise ValueError(f"draft_layers must be >= 1, got {self.draft_layers}")
        if self.suffix_max_depth < 2:
            raise ValueError(f"suffix_max_depth must be >= 2, got {self.suffix_max_depth}")
        if self.suffix_global_tokens < 0:
            raise ValueError(f"suffix_global_tokens must be >= 0, got {self.suffix_global_tokens}")
        if not 0.0 <= self.suffix_min_prob <= 1.0:
            raise ValueError(f"suffix_min_prob must be in [0, 1], got {self.suffix_min_prob}")
        if not 0.0 <= self.eagle_min_confidence < 1.0:
            raise ValueError(f"eagle_min_confidence must be in [0, 1), got {self.eagle_min_confidence}")
        from drafters.eagle import check_tree_topk

        check_tree_topk(self.eagle_tree_topk, "eagle_tree_topk")
        from moe.kernels import check_kernels

        check_kernels(self.kernels)
        others = [d for d in DRAFTERS if d != "eagle"]
        if self.fallback is not None and self.fallback not in others:
            raise ValueError(f"fallback must be a drafter other than eagle ({', '.join(others)}), "
                             f"got {self.fallback!r}")


def build_drafter(cfg: DrafterConfig, target_spec: str, vocab_size: int, max_batch: int, max_len: int,
                  target_cfg=None, target=None) -> Drafter:
    """The drafter `cfg` names, sized for an engine with `max_batch` sequences of `max_len` tokens.

    `target` (the loaded LeanDecoder) is needed by eagle, which shares its embedding.
    """
    if cfg.name == "none":
        return NoDrafter()
    if cfg.name == "eagle":
        return _eagle(cfg, target_spec, vocab_size, max_batch, max_len, target_cfg, target)
    if cfg.name == "auto":
        return _controller(cfg, target_spec, vocab_size, max_batch, max_len, target_cfg, target)
    if cfg.name == "prompt-lookup":
        from drafters.lookup import PromptLookup

        return PromptLookup()
    if cfg.name == "token-recycling":
        from drafters.recycling import TokenRecycling

        return TokenRecycling(vocab_size, k=cfg.recycling_k)
    if cfg.name == "hybrid":
        from drafters.hybrid import HybridDrafter
        from drafters.lookup import PromptLookup
        from drafters.recycling import TokenRecycling

        return HybridDrafter([PromptLookup(), TokenRecycling(vocab_size, k=cfg.recycling_k)])
    if cfg.name == "suffix":
        from drafters.suffix import SuffixDrafter

        return SuffixDrafter(cfg.suffix_max_depth, cfg.suffix_global_tokens, cfg.suffix_min_prob)
    from drafters.draft_lm import DraftLMDrafter, draft_from_target, load_draft

    if cfg.draft_checkpoint:
        model, version = load_draft(cfg.draft_checkpoint, max_len=max_len)
    else:
        model = draft_from_target(target_spec, cfg.draft_layers, max_len=max_len)
        version = f"cut-{model.cfg.num_layers}"
    if target is not None:
        model.to(target.embed.weight.device)  # where the target runs (a GPU replica drafts on its GPU)
    hint = model.cost_ratio(target_cfg) if target_cfg is not None else 0.25
    return DraftLMDrafter(model, version, mode=cfg.draft_mode, branching=cfg.branching, max_batch=max_batch,
                          max_len=max_len, cost_hint=hint, kernels=cfg.kernels)


def _eagle(cfg: DrafterConfig, target_spec: str, vocab_size: int, max_batch: int, max_len: int, target_cfg,
           target) -> Drafter:
    """An EagleDrafter from `cfg.draft_checkpoint` or the cached warm-start head; the fallback while none exists."""
    from drafters.eagle import is_eagle_checkpoint, load_eagle, serving_drafter, warm_start_dir

    if target is None:
        raise ValueError("the eagle drafter needs the target model itself (it reads its hidden states)")
    if cfg.draft_checkpoint:
        folder = cfg.draft_checkpoint
        if not is_eagle_checkpoint(folder):
            raise ValueError(f"draft_checkpoint {folder!r} is not an eagle checkpoint (it has no eagle.json)")
    else:
        folder = str(warm_start_dir(target_spec))
        if not is_eagle_checkpoint(folder):
            how = f"make it with `spectutor draft init --model {target_spec}`"
            if cfg.fallback is None:
                raise FileNotFoundError(f"no eagle head for {target_spec} in {folder}: {how}")
            log.warning("no eagle head for %s yet (%s); drafting with %s meanwhile", target_spec, how, cfg.fallback)
            return build_drafter(dataclasses.replace(cfg, name=cfg.fallback), target_spec, vocab_size, max_batch,
                                 max_len, target_cfg, target)
        log.info("eagle: no checkpoint given, using the warm-start head in %s", folder)
    head, version = load_eagle(folder, target.cfg, target.embed, max_len)
    return serving_drafter(head, version, target, max_batch, max_len, cfg.eagle_min_confidence, cfg.eagle_tree_topk)


def _controller(cfg: DrafterConfig, target_spec: str, vocab_size: int, max_batch: int, max_len: int, target_cfg,
                target) -> Drafter:
    """The controller over AUTO_PARTS, and over eagle as well when an eagle head is there to load."""
    from drafters.controller import Controller
    from drafters.eagle import is_eagle_checkpoint, warm_start_dir

    names = list(AUTO_PARTS)
    folder = cfg.draft_checkpoint or str(warm_start_dir(target_spec))
    if target is not None and is_eagle_checkpoint(folder):
        names.insert(0, "eagle")
    parts = [build_drafter(dataclasses.replace(cfg, name=n, draft_checkpoint=folder if n == "eagle" else None),
                           target_spec, vocab_size, max_batch, max_len, target_cfg, target) for n in names]
    log.info("auto: choosing per sequence and step among %s", ", ".join(p.name for p in parts))
    return Controller(parts)
