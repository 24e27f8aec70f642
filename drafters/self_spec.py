"""Duo-LLM's "small FFN everywhere" path as a self-speculative drafter (seed-algorithms §4.4).

The draft model is the target itself with every layer's FFN swapped for its distilled small FFN
(moe/duo_train.py): the target's embeddings, attention, norms and head, a ~16x narrower SwiGLU. It is an
ordinary `DraftModel` (config `intermediate_size` = the small width), so `DraftLMDrafter` runs it with
its own KV cache; sharing the target's cache is left for later.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

from drafters.draft_lm import DraftLMDrafter, DraftModel, TreeMode, draft_from_target
from moe.config import ModelConfig
from moe.layers import GatedMLP
from moe.loader import read_config, resolve_model


def small_everywhere_model(target_spec: str, small_modules: Sequence[GatedMLP], max_len: int | None = None) -> DraftModel:
    """A DraftModel with the dense target's weights except each layer's FFN, which is `small_modules[i]`."""
    tcfg, _ = read_config(resolve_model(target_spec))
    if tcfg.is_moe:
        raise ValueError("the small-FFN drafter needs a dense target")
    if len(small_modules) != tcfg.num_layers:
        raise ValueError(f"{len(small_modules)} small FFNs for a {tcfg.num_layers}-layer target")
    widths = {m.inner for m in small_modules}
    if len(widths) != 1:
        raise ValueError(f"small FFNs must share one width, got {sorted(widths)}")
    full = draft_from_target(target_spec, tcfg.num_layers, max_len=max_len)
    cfg = dataclasses.replace(full.cfg, intermediate_size=widths.pop())
    model = DraftModel(cfg, None, max_len)
    sd = {k: v for k, v in full.decoder.state_dict().items() if ".mlp." not in k and "rotary" not in k}
    for i, small in enumerate(small_modules):
        sd.update({f"layers.{i}.mlp.{k}": v.detach().to(full.decoder.dtype) for k, v in small.state_dict().items()})
    if cfg.tie_embeddings:
        sd.pop("lm_head.weight", None)
    model.decoder.load_state_dict(sd, strict=False)
    if cfg.tie_embeddings:
        model.decoder.lm_head.weight = model.decoder.embed.weight
    return model.eval()


def duo_small_drafter(target_spec: str, small_modules: Sequence[GatedMLP], max_batch: int, max_len: int,
                      target_cfg: ModelConfig | None = None, mode: TreeMode = "chain",
                      kernels: str = "auto") -> DraftLMDrafter:
    """The "small FFN everywhere" drafter, version "duo-small-<width>"; its cost hint is its MAC ratio to the target."""
    model = small_everywhere_model(target_spec, small_modules, max_len=max_len)
    hint = model.cost_ratio(target_cfg) if target_cfg is not None else 0.5
    return DraftLMDrafter(model, f"duo-small-{model.cfg.intermediate_size}", mode=mode, max_batch=max_batch,
                          max_len=max_len, cost_hint=hint, kernels=kernels)
