"""Build and evaluate MoEfied checkpoints: read a dense model and sample text, write a Mixtral folder.

The named targets `smollm2-135m-moe` (the default cut) and `smollm2-135m-moe-e<E>-k<K>` are
built here on first use, like the GGUF conversion of the dense default, into
`$SPECTUTOR_HOME/models/<name>`; a marker file records the cut's settings and its quality.
"""
from __future__ import annotations

import dataclasses
import json
import re
import shutil
from itertools import islice
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import Tensor

from moe.atomic import atomic_folder
from moe.config import ModelConfig
from moe.moefy import LayerCut, MoefyConfig, cut_layer
from moe.tree import TreeBatch

MARKER = "spectutor-moefy.json"
DEFAULT_MOE = "smollm2-135m-moe"
DEFAULT_CUT = MoefyConfig(experts=16, top_k=12)
"""The default MoE target's cut: the smallest k of the quality table (k = E/4, E/2, 3E/4) whose
held-out perplexity stays within 2x the dense model's; see bench/moe.py and the README."""
_NAMED = re.compile(r"^smollm2-135m-moe(?:-e(\d+)-k(\d+))?$")

Progress = Callable[[Iterable], Iterable]


def named_cut(spec: str) -> MoefyConfig | None:
    """The cut a named MoE target stands for, or None when `spec` is not such a name."""
    match = _NAMED.match(spec)
    if not match:
        return None
    if match.group(1) is None:
        return DEFAULT_CUT
    return dataclasses.replace(DEFAULT_CUT, experts=int(match.group(1)), top_k=int(match.group(2)))


def sample_texts(count: int, split: str = "train") -> list[str]:
    """`count` ShareGPT conversations' first user turns of the given split (fixed hash split)."""
    from serving.traffic import sharegpt_prompts

    return [p.text for p in islice(sharegpt_prompts(split), count)]


def encode_texts(tokenizer: Any, texts: Sequence[str], max_tokens: int) -> list[list[int]]:
    """Chat-templated prompts, each cut to its first `max_tokens` tokens (at least 2 kept)."""
    from moe.loader import encode_prompt

    out = [encode_prompt(tokenizer, t)[:max_tokens] for t in texts]
    return [ids for ids in out if len(ids) >= 2]


def sequence_logits(model: torch.nn.Module, ids: list[int]) -> Tensor:
    """Logits [len(ids), V] of one sequence, run as a single prefill on a fresh cache."""
    cache = model.new_cache(1, len(ids))
    slot = cache.allocate()
    with torch.inference_mode():
        return model(TreeBatch.chains([ids]), [slot], cache)[0, :len(ids)].float()


def record_ffn_inputs(model: torch.nn.Module, token_lists: Sequence[list[int]], progress: Progress = iter) -> list[Tensor]:
    """What each layer's FFN sees (the post-attention norm's output) on these sequences: [N, D] per layer."""
    seen: list[list[Tensor]] = [[] for _ in model.layers]
    hooks = [layer.mlp.register_forward_pre_hook(lambda _m, args, i=i: seen[i].append(args[0].reshape(-1, args[0].shape[-1]).clone()))
             for i, layer in enumerate(model.layers)]
    try:
        for ids in progress(token_lists):
            sequence_logits(model, ids)
    finally:
        for h in hooks:
            h.remove()
    return [torch.cat(parts) for parts in seen]


def _dense_ffn(sd: dict[str, Tensor], layer: int) -> tuple[Tensor, Tensor]:
    return sd[f"layers.{layer}.mlp.gate_up.weight"], sd[f"layers.{layer}.mlp.down.weight"]


def mixtral_config(dense_raw: dict[str, Any], cfg: MoefyConfig) -> dict[str, Any]:
    """The dense model's config.json rewritten as a Mixtral whose experts split its FFN."""
    inner = int(dense_raw["intermediate_size"])
    theta = (dense_raw.get("rope_parameters") or {}).get("rope_theta", dense_raw.get("rope_theta", 10000.0))
    keep = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "head_dim", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings", "bos_token_id",
            "eos_token_id", "pad_token_id")
    out = {k: dense_raw[k] for k in keep if k in dense_raw}
    out.update(model_type="mixtral", architectures=["MixtralForCausalLM"], rope_theta=theta,
               intermediate_size=inner // cfg.experts, num_local_experts=cfg.experts,
               num_experts_per_tok=cfg.top_k, sliding_window=None, hidden_act="silu",
               spectutor_router_weighting="none")
    return out


def _hf_tensors(sd: dict[str, Tensor], cuts: Sequence[LayerCut], dense: ModelConfig) -> dict[str, Tensor]:
    """Lean-decoder dense tensors + per-layer cuts -> Mixtral's Hugging Face tensor names."""
    out = {"model.embed_tokens.weight": sd["embed.weight"], "model.norm.weight": sd["norm.weight"]}
    q_rows, kv_rows = dense.num_heads * dense.head_dim, dense.num_kv_heads * dense.head_dim
    if not dense.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    for i, cut in enumerate(cuts):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = sd[f"layers.{i}.input_norm.weight"]
        out[p + "post_attention_layernorm.weight"] = sd[f"layers.{i}.post_norm.weight"]
        q, k, v = sd[f"layers.{i}.attn.qkv.weight"].split([q_rows, kv_rows, kv_rows])
        out.update({p + "self_attn.q_proj.weight": q, p + "self_attn.k_proj.weight": k,
                    p + "self_attn.v_proj.weight": v, p + "self_attn.o_proj.weight": sd[f"layers.{i}.attn.o_proj.weight"]})
        m = p + "block_sparse_moe."
        out[m + "gate.weight"] = cut.router
        width = cut.down.shape[2]
        for e in range(cut.gate_up.shape[0]):
            out[m + f"experts.{e}.w1.weight"] = cut.gate_up[e, :width]
            out[m + f"experts.{e}.w3.weight"] = cut.gate_up[e, width:]
            out[m + f"experts.{e}.w2.weight"] = cut.down[e]
    return {k: v.contiguous().clone() for k, v in out.items()}


def build(dense_spec: str, out_dir: Path, cfg: MoefyConfig, token_lists: Sequence[list[int]] | None = None,
          progress: Progress = iter) -> Path:
    """Cut the dense model `dense_spec` into a MoEfied Mixtral folder at `out_dir` (written atomically).

    The sample tokens are `token_lists`, or else `cfg.texts` ShareGPT training prompts.
    """
    from safetensors.torch import save_file

    from moe.loader import convert_state_dict, load_model, read_config, read_weights, resolve_model

    folder = resolve_model(dense_spec)
    dense_cfg, raw = read_config(folder)
    if dense_cfg.is_moe:
        raise ValueError(f"{dense_spec} is already a mixture of experts; MoEfication cuts dense FFNs")
    if dense_cfg.attention_bias or dense_cfg.qk_norm:
        raise ValueError(f"{dense_spec}: MoEfication writes a Mixtral checkpoint, which has no attention biases or q/k norms")
    if dense_cfg.intermediate_size % cfg.experts:
        raise ValueError(f"experts={cfg.experts} does not divide the FFN width {dense_cfg.intermediate_size} of {dense_spec}")
    loaded = load_model(str(folder), kernels="default", with_tokenizer=token_lists is None)
    if token_lists is None:
        token_lists = encode_texts(loaded.tokenizer, sample_texts(cfg.texts), cfg.tokens_per_text)
    if not token_lists:
        raise ValueError("no sample text to cut the model with")
    inputs = record_ffn_inputs(loaded.model, token_lists, progress)
    sd = convert_state_dict(dense_cfg, read_weights(folder))
    cuts = []
    for layer in progress(range(dense_cfg.num_layers)):
        gate_up, down = _dense_ffn(sd, layer)
        cuts.append(cut_layer(inputs[layer], gate_up, down, cfg))
        inputs[layer] = torch.empty(0)  # free as we go
    with atomic_folder(out_dir) as tmp:
        (tmp / "config.json").write_text(json.dumps(mixtral_config(raw, cfg), indent=2))
        save_file(_hf_tensors(sd, cuts, dense_cfg), str(tmp / "model.safetensors"))
        for f in folder.iterdir():
            if f.name.startswith(("tokenizer", "chat_template", "special_tokens")):
                shutil.copy2(f, tmp / f.name)
        marker = {"source": str(folder), "cut": dataclasses.asdict(cfg), "tokens": sum(map(len, token_lists)),
                  "recall_k": cfg.top_k, "router_recall": [round(c.recall, 4) for c in cuts],
                  "routed_rel_error": [round(c.rel_error, 4) for c in cuts]}
        (tmp / MARKER).write_text(json.dumps(marker, indent=2))
    return out_dir


def is_built(out_dir: Path, cfg: MoefyConfig) -> bool:
    """True when `out_dir` holds a finished cut with exactly these settings."""
    try:
        marker = json.loads((out_dir / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return marker.get("cut") == dataclasses.asdict(cfg)


def with_top_k(src: Path, out_dir: Path, top_k: int) -> Path:
    """A copy of the cut in `src` that routes each token to `top_k` experts (written atomically).

    Neurons, experts and router do not depend on k (the router ranks all E experts), so another k
    is a config change, not a new cut.
    """
    marker = json.loads((src / MARKER).read_text())
    marker["cut"]["top_k"] = top_k
    MoefyConfig(**marker["cut"])  # validates k against E
    with atomic_folder(out_dir) as tmp:
        shutil.copytree(src, tmp, dirs_exist_ok=True)
        config = json.loads((tmp / "config.json").read_text())
        config["num_experts_per_tok"] = top_k
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        (tmp / MARKER).write_text(json.dumps(marker, indent=2))
    return out_dir


def _same_cut_other_k(models: Path, cfg: MoefyConfig) -> Path | None:
    """A built cut in `models` that differs from `cfg` only in top_k, if any."""
    for folder in sorted(models.glob("smollm2-135m-moe*")):
        try:
            cut = json.loads((folder / MARKER).read_text())["cut"]
        except (OSError, ValueError, KeyError):
            continue
        if {**cut, "top_k": cfg.top_k} == dataclasses.asdict(cfg):
            return folder
    return None


def resolve_named(spec: str, cfg: MoefyConfig) -> Path:
    """The folder of a named MoE target, cutting it from the dense default on first use."""
    from moe.loader import DEFAULT_MODEL, spectutor_home

    out = spectutor_home() / "models" / spec
    if is_built(out, cfg):
        return out
    sibling = _same_cut_other_k(out.parent, cfg) if out.parent.is_dir() else None
    if sibling is not None:
        return with_top_k(sibling, out, cfg.top_k)
    from tqdm import tqdm

    print(f"spectutor: building {spec} from {DEFAULT_MODEL} (one time, a few minutes)", flush=True)
    return build(DEFAULT_MODEL, out, cfg, progress=lambda it: tqdm(it, desc=f"moefy {spec}", leave=False))


@torch.inference_mode()
def quality(moe_model: torch.nn.Module, dense_model: torch.nn.Module, token_lists: Sequence[list[int]],
            ks: Sequence[int], progress: Progress = iter) -> list[dict[str, float]]:
    """Per k: next-token agreement with the dense model and perplexity on the sequences' own next tokens.

    Both models run every sequence as one prefill. Returns one row per k (and the dense model's
    perplexity in each row), in the order of `ks`.
    """
    blocks = [layer.mlp for layer in moe_model.layers]
    served_k = [b.router.top_k for b in blocks]
    dense = [sequence_logits(dense_model, ids) for ids in token_lists]
    rows = []
    for k in progress(ks):
        for b in blocks:
            b.router.top_k = k
        agree = total = 0
        nll = dense_nll = 0.0
        for ids, ref in zip(token_lists, dense):
            logits = sequence_logits(moe_model, ids)
            agree += int((logits[:-1].argmax(-1) == ref[:-1].argmax(-1)).sum())
            target = torch.tensor(ids[1:])
            nll += float(torch.nn.functional.cross_entropy(logits[:-1], target, reduction="sum"))
            dense_nll += float(torch.nn.functional.cross_entropy(ref[:-1], target, reduction="sum"))
            total += len(ids) - 1
        rows.append({"k": k, "agreement": agree / total, "ppl": float(torch.exp(torch.tensor(nll / total))),
                     "dense_ppl": float(torch.exp(torch.tensor(dense_nll / total))), "tokens": total})
    for b, k in zip(blocks, served_k):
        b.router.top_k = k
    return rows
