"""EAGLE-3 checkpoints as vLLM's `speculators` library and SpecForge (SGLang) write them: import and export.

D hidden, V target vocabulary, Vd draft vocabulary, K = number of aux layers (3 for every EAGLE-3 head).

A folder holds `config.json` and `model.safetensors`. What each layout uses, and where it was read
(vllm-project/vllm `vllm/model_executor/models/llama_eagle3.py`, `.../models/llama.py`,
`vllm/transformers_utils/configs/speculators/algos.py`; vllm-project/speculators
`src/speculators/models/eagle3.py`, `src/speculators/models/eagle3/config.py`,
`src/speculators/convert/eagle/eagle3_converter.py`; sgl-project/SpecForge
`specforge/modeling/draft/llama3_eagle.py`, `configs/*-eagle3.json`):

Weights (both layouts; the prefix P is `layers.0.` in speculators, `midlayer.` in SpecForge; vLLM's
loader renames `midlayer.` to `layers.0.`, and so does `import_eagle3`):
  fc.weight [D, K*D]               fuses the K aux states, concatenated in ascending layer order; raw
                                   states, no norm before fc (all three sources)
  P input_layernorm.weight         norm of the token embedding          (ours: input_norm)
  P hidden_norm.weight             norm of the fused/previous hidden    (ours: hidden_norm)
  P self_attn.{q,k,v,o}_proj.weight, q/k/v reading [norm(embed); norm(hidden)], 2D wide
                                   (ours: attn.qkv stacks q, k, v rows; attn.o_proj)
  P post_attention_layernorm.weight, P mlp.{gate,up,down}_proj.weight
                                   (ours: post_norm; mlp.gate_up stacks gate, up rows; mlp.down)
  norm.weight, lm_head.weight [Vd, D]   final norm and the draft-vocabulary head
  d2t int64 [Vd]                   target id of draft id i is i + d2t[i] (vLLM `compute_logits`,
                                   speculators `map_draft_to_target_tokens`); draft ids are in
                                   ascending target-id order
  t2d bool [V]                     which target ids the draft vocabulary covers (vLLM skips it)
  embed_tokens.weight [V, D]       optional: the target's embedding, frozen (speculators
                                   `embed_requires_grad: false`); vLLM shares the target's when absent
The layer: residual = the raw hidden (`norm_before_residual: false`; true would put hidden_norm
before the residual, which our head does not do), x = residual + attn, out = x + mlp(post_norm(x)),
logits = lm_head(norm(out)); `out`, before the final norm, is the next step's hidden (vLLM returns it
as `hidden_prenorm`). That is EagleHead with `feature_norm=False`.

Aux layer ids: vLLM captures id j *before* decoder layer j runs (hidden + residual), i.e. the output
of layer j-1, and defaults to (2, L//2, L-3); SpecForge takes HF `hidden_states[j]`, the same point.
Our feature layer i is the output of layer i, so id = i + 1. Id 0 (the embeddings) and id L (HF's
last entry is after the final norm; vLLM never captures it) have no feature layer here and are refused.

config.json, speculators: `speculators_model_type: "eagle3"`, `architectures: ["Eagle3Speculator"]`,
`transformer_layer_config` (a Llama config: hidden_size, intermediate_size, heads, kv heads,
head_dim, rms_norm_eps, rope_theta, rope_scaling, max_position_embeddings, vocab_size = V,
num_hidden_layers = 1), top level `draft_vocab_size`, `norm_before_residual`, `target_hidden_size`,
`eagle_aux_hidden_state_layer_ids`, and `speculators_config` {algorithm, proposal_methods,
default_proposal_method, verifier {name_or_path, architectures}}. vLLM's speculators translation
defaults a missing `norm_before_residual` to true while speculators' own class defaults it to
false, so export always writes it; import follows the writer (speculators) and reads a missing one
as false.
config.json, SpecForge: a flat Llama config with `architectures: ["LlamaForCausalLMEagle3"]`,
`num_hidden_layers: 1`, `vocab_size` = V, `draft_vocab_size`, and the aux ids under
`eagle_config.eagle_aux_hidden_state_layer_ids` (SGLang) - export also writes them at the top level,
where vLLM reads them; import refuses the two if they disagree.

Choices: export never writes biases (vLLM's fc has none); import refuses any bias or unknown tensor
except an all-zero `fc.bias` (old speculators heads declare one). A checkpoint's embed_tokens is
not used - the head keeps the target's frozen embedding, as everywhere in spectutor; one whose shape
differs is refused, one whose values differ gives a warning (the head was trained against other
embeddings and will draft worse, but stays exact). Export writes the target's embedding so the
folder loads in speculators' own model class too.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

from drafters.eagle import EagleConfig, EagleHead
from moe.config import ModelConfig
from moe.errors import CorruptModelError

LAYOUTS = ("speculators", "specforge")
Layout = Literal["speculators", "specforge"]
_PREFIXES = ("layers.0.", "midlayer.")
_NORMS = {"input_layernorm.weight": "input_norm.weight", "hidden_norm.weight": "hidden_norm.weight",
          "post_attention_layernorm.weight": "post_norm.weight"}


def _llama_fields(cfg: EagleConfig) -> dict:
    """The Llama config of the head's one layer, as both layouts spell it."""
    return {"model_type": "llama", "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
            "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
            "head_dim": cfg.head_dim, "rms_norm_eps": cfg.rms_eps, "rope_theta": cfg.rope_theta,
            "rope_scaling": dict(cfg.rope_scaling) if cfg.rope_scaling else None,
            "max_position_embeddings": cfg.max_position, "vocab_size": cfg.target_vocab_size,
            "num_hidden_layers": 1, "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
            "tie_word_embeddings": False}


def export_eagle3(head: EagleHead, folder: str | Path, layout: Layout = "speculators",
                  target_name: str = "", target_architectures: tuple[str, ...] = ("LlamaForCausalLM",)) -> Path:
    """Write `head` as an EAGLE-3 checkpoint folder in `layout`; returns the folder.

    Draft ids are renumbered in ascending target-id order (lm_head rows permuted to match) and the
    fc blocks put in ascending layer order. Raises ValueError for a head EAGLE-3 cannot express:
    `feature_norm` on, or `feature_layers` that are not three layers below the target's last.
    `target_name` and `target_architectures` (the target's config.json) name the verifier (speculators).
    """
    from safetensors.torch import save_file

    cfg = head.cfg
    if layout not in LAYOUTS:
        raise ValueError(f"eagle3 layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    if cfg.feature_norm:
        raise ValueError("eagle head has feature_norm=True (a norm per feature layer before fc); "
                         "EAGLE-3 feeds raw aux states to fc, so it cannot be exported exactly")
    layers = cfg.feature_layers
    if len(layers) != 3 or len(set(layers)) != 3 or max(layers) >= cfg.target_layers - 1:
        raise ValueError(f"eagle head feature_layers {layers}: EAGLE-3 needs 3 distinct layers, each below "
                         f"the target's last ({cfg.target_layers - 1}), whose output is not an aux state")
    d = cfg.hidden_size
    block_order = sorted(range(3), key=lambda i: layers[i])
    fc = head.fc.weight.detach()
    fc = torch.cat([fc[:, i * d:(i + 1) * d] for i in block_order], dim=1)           # [D, 3D]
    row_order = torch.argsort(head.vocab_ids)
    target_ids = head.vocab_ids[row_order].cpu()                                      # [Vd] ascending
    t2d = torch.zeros(cfg.target_vocab_size, dtype=torch.bool)
    t2d[target_ids] = True
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    wq, wk, wv = head.attn.qkv.weight.detach().split([q, kv, kv], dim=0)
    gate, up = head.mlp.gate_up.weight.detach().split(cfg.intermediate_size, dim=0)
    p = "layers.0." if layout == "speculators" else "midlayer."
    sd = {"fc.weight": fc, "norm.weight": head.norm.weight.detach(),
          "lm_head.weight": head.lm_head.weight.detach()[row_order.to(head.lm_head.weight.device)],
          "d2t": target_ids - torch.arange(target_ids.numel()), "t2d": t2d,
          "embed_tokens.weight": head.embed.weight.detach(),
          p + "self_attn.q_proj.weight": wq, p + "self_attn.k_proj.weight": wk, p + "self_attn.v_proj.weight": wv,
          p + "self_attn.o_proj.weight": head.attn.o_proj.weight.detach(),
          p + "mlp.gate_proj.weight": gate, p + "mlp.up_proj.weight": up,
          p + "mlp.down_proj.weight": head.mlp.down.weight.detach()}
    sd.update({p + theirs: head.get_parameter(ours).detach() for theirs, ours in _NORMS.items()})
    aux_ids = [i + 1 for i in sorted(layers)]
    llama = _llama_fields(cfg)
    if layout == "speculators":
        config = {"architectures": ["Eagle3Speculator"], "speculators_model_type": "eagle3",
                  "transformer_layer_config": llama, "draft_vocab_size": target_ids.numel(),
                  "norm_before_residual": False, "target_hidden_size": d,
                  "eagle_aux_hidden_state_layer_ids": aux_ids,
                  "speculators_config": {"algorithm": "eagle3",
                                         "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": 3}],
                                         "default_proposal_method": "greedy",
                                         "verifier": {"name_or_path": target_name,
                                                      "architectures": list(target_architectures)}}}
    else:
        config = {**llama, "architectures": ["LlamaForCausalLMEagle3"], "draft_vocab_size": target_ids.numel(),
                  "target_hidden_size": d, "eagle_aux_hidden_state_layer_ids": aux_ids,
                  "eagle_config": {"eagle_aux_hidden_state_layer_ids": aux_ids, "use_aux_hidden_state": True}}
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.cpu().contiguous() for k, v in sd.items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def detect_layout(config: dict, names: set[str] | None = None) -> Layout:
    """Which writer made `config` (and weight `names`): speculators or SpecForge; ValueError otherwise."""
    if config.get("speculators_model_type") == "eagle3":
        return "speculators"
    if "LlamaForCausalLMEagle3" in (config.get("architectures") or []) or any(
            n.startswith("midlayer.") for n in names or ()):
        return "specforge"
    raise ValueError("not an EAGLE-3 checkpoint: config.json has neither speculators_model_type 'eagle3' "
                     "nor architectures ['LlamaForCausalLMEagle3']")


def _aux_ids(config: dict, layout: Layout, num_layers: int) -> list[int]:
    top = config.get("eagle_aux_hidden_state_layer_ids")
    nested = (config.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids")
    if top and nested and list(top) != list(nested):
        raise ValueError(f"eagle3 checkpoint: eagle_aux_hidden_state_layer_ids {list(top)} at the top level but "
                         f"{list(nested)} in eagle_config")
    ids = list(top or nested or ())
    if not ids:
        ids = [2, num_layers // 2, num_layers - 3]  # vLLM's default when a head names none
    bad = [j for j in ids if not isinstance(j, int) or not 1 <= j < num_layers]
    if bad or len(set(ids)) != len(ids):
        raise ValueError(f"eagle3 checkpoint eagle_aux_hidden_state_layer_ids {ids}: each must be a distinct "
                         f"layer input in [1, {num_layers}) of the {num_layers}-layer target")
    return ids


def import_eagle3(folder: str | Path, target_cfg: ModelConfig, embed: nn.Embedding,
                  max_len: int | None = None) -> EagleHead:
    """Read an EAGLE-3 checkpoint in either layout as an EagleHead (feature_norm off) over `embed`.

    A checkpoint whose hidden size, aux layer ids, target vocabulary, d2t map, layer arrangement or
    tensors do not fit `target_cfg` raises ValueError naming the field; an unreadable folder raises
    CorruptModelError.
    """
    from safetensors.torch import load_file

    folder = Path(folder)
    try:
        config = json.loads((folder / "config.json").read_text())
        sd = load_file(str(folder / "model.safetensors"))
    except (OSError, ValueError) as exc:
        raise CorruptModelError(f"cannot read the eagle3 checkpoint in {folder}: {exc}") from exc
    layout = detect_layout(config, set(sd))
    llama = config.get("transformer_layer_config", {}) if layout == "speculators" else config
    for name, bad in (("num_hidden_layers", llama.get("num_hidden_layers", 1) != 1),
                      ("hidden_act", llama.get("hidden_act", "silu") != "silu"),
                      ("attention_bias", bool(llama.get("attention_bias", False))),
                      ("mlp_bias", bool(llama.get("mlp_bias", False))),
                      ("norm_before_residual", bool(config.get("norm_before_residual", False)))):
        if bad:
            raise ValueError(f"eagle3 checkpoint {name}={llama.get(name, config.get(name))!r}: this head has "
                             f"one silu layer without biases, residual over the raw hidden")
    try:
        d, heads = int(llama["hidden_size"]), int(llama["num_attention_heads"])
        hd = int(llama.get("head_dim") or d // heads)
        rope_theta = float(llama.get("rope_theta", 10000.0))
        scaling = llama.get("rope_scaling") or None
        cfg = EagleConfig(
            hidden_size=d, num_heads=heads, num_kv_heads=int(llama.get("num_key_value_heads", heads)),
            head_dim=hd, intermediate_size=int(llama["intermediate_size"]),
            rms_eps=float(llama.get("rms_norm_eps", 1e-6)), rope_theta=rope_theta,
            max_position=int(llama.get("max_position_embeddings", target_cfg.max_position)),
            target_vocab_size=int(llama["vocab_size"]),
            feature_layers=tuple(j - 1 for j in _aux_ids(config, layout, target_cfg.num_layers)),
            target_layers=target_cfg.num_layers,
            rope_scaling=tuple(sorted(scaling.items())) if scaling and scaling.get(
                "rope_type", scaling.get("type", "default")) != "default" else None,
            feature_norm=False)
    except (KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"eagle3 checkpoint config.json lacks or garbles {exc}") from exc
    th = config.get("target_hidden_size")
    if th is not None and int(th) != d:
        raise ValueError(f"eagle3 checkpoint target_hidden_size is {th} but hidden_size is {d}: "
                         f"this head needs them equal")
    cfg.check_fits(target_cfg)

    weights = {}
    for k, v in sd.items():
        for p in _PREFIXES:
            if k.startswith(p):
                k = "layer." + k[len(p):]
        weights[k] = v
    d2t = weights.pop("d2t", None)
    if d2t is None:
        raise ValueError("eagle3 checkpoint has no d2t (draft id -> target id offsets)")
    vocab_ids = torch.arange(d2t.numel()) + d2t.long()                               # [Vd]
    v = target_cfg.vocab_size
    if int(vocab_ids.min()) < 0 or int(vocab_ids.max()) >= v or vocab_ids.unique().numel() != vocab_ids.numel():
        raise ValueError(f"eagle3 checkpoint d2t maps draft ids to target ids outside [0, {v}) or to one id twice")
    draft_vocab = config.get("draft_vocab_size")
    if draft_vocab is not None and int(draft_vocab) != vocab_ids.numel():
        raise ValueError(f"eagle3 checkpoint draft_vocab_size is {draft_vocab} but d2t has {vocab_ids.numel()} entries")
    t2d = weights.pop("t2d", None)
    if t2d is not None:
        covered = torch.zeros(v, dtype=torch.bool)
        covered[vocab_ids] = True
        if t2d.shape != (v,) or not torch.equal(t2d.bool(), covered):
            raise ValueError("eagle3 checkpoint t2d does not mark exactly the target ids that d2t maps to")
    _check_embed(weights.pop("embed_tokens.weight", None), embed)
    fc_bias = weights.pop("fc.bias", None)
    if fc_bias is not None and bool(fc_bias.any()):
        raise ValueError("eagle3 checkpoint has a nonzero fc.bias; this head's fc has no bias")

    head = EagleHead(cfg, vocab_ids, embed, max_len)
    a, m = "layer.self_attn.", "layer.mlp."
    try:
        ours = {"fc.weight": weights.pop("fc.weight"), "norm.weight": weights.pop("norm.weight"),
                "lm_head.weight": weights.pop("lm_head.weight"),
                "attn.qkv.weight": torch.cat([weights.pop(a + "q_proj.weight"), weights.pop(a + "k_proj.weight"),
                                              weights.pop(a + "v_proj.weight")]),
                "attn.o_proj.weight": weights.pop(a + "o_proj.weight"),
                "mlp.gate_up.weight": torch.cat([weights.pop(m + "gate_proj.weight"),
                                                 weights.pop(m + "up_proj.weight")]),
                "mlp.down.weight": weights.pop(m + "down_proj.weight")}
        ours.update({mine: weights.pop("layer." + theirs) for theirs, mine in _NORMS.items()})
    except KeyError as exc:
        raise ValueError(f"eagle3 checkpoint lacks the tensor {exc}") from exc
    if weights:
        raise ValueError(f"eagle3 checkpoint has tensors this head does not have: {sorted(weights)[:3]}")
    expected = {k: t.shape for k, t in head.state_dict().items() if not k.startswith("embed")}
    for k, t in ours.items():
        if t.shape != expected[k]:
            raise ValueError(f"eagle3 checkpoint {k} has shape {tuple(t.shape)}; its config asks for "
                             f"{tuple(expected[k])}")
    head.load_state_dict(ours, strict=False)
    return head.eval()


def _check_embed(theirs: Tensor | None, embed: nn.Embedding) -> None:
    """Refuse an embed_tokens of another shape; warn when its values are not the target's."""
    if theirs is None:
        return
    mine = embed.weight.detach()
    if theirs.shape != mine.shape:
        raise ValueError(f"eagle3 checkpoint embed_tokens has shape {tuple(theirs.shape)}, the target's "
                         f"embedding {tuple(mine.shape)}")
    diff = float((theirs.float() - mine.float().cpu()).abs().max())
    scale = float(mine.float().abs().max()) or 1.0
    if diff > 1e-2 * scale:  # bf16 rounding of the same table stays well below this
        warnings.warn(f"eagle3 checkpoint embed_tokens differs from the target's embedding (max |diff| {diff:.3g}); "
                      f"the head uses the target's, so it may draft worse than it did where it was trained",
                      stacklevel=3)
