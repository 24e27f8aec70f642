"""The lean decoder's view of a model: one frozen dataclass read from a Hugging Face config."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from moe.errors import UnsupportedArchitectureError

# model_type -> family the lean decoder knows how to run
SUPPORTED = {
    "llama": "dense",
    "mistral": "dense",
    "qwen2": "dense",
    "mixtral": "mixtral",
    "qwen2_moe": "qwen2_moe",
    "olmoe": "olmoe",
}

ROUTER_WEIGHTINGS = ("softmax", "none")


@dataclass(frozen=True)
class ModelConfig:
    """Shapes and numerics of one decoder-only transformer."""

    model_type: str
    """Hugging Face `model_type` (llama, mistral, qwen2, mixtral, qwen2_moe, olmoe)."""
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    """Width of the dense MLP (also used by dense layers of a partly-sparse model)."""
    max_position: int
    """Longest context the model was trained for; prompts past it are refused."""
    rms_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, Any], ...] | None = None
    """`rope_scaling` dict as sorted items (hashable); None for plain RoPE."""
    tie_embeddings: bool = False
    attention_bias: bool = False
    """q/k/v projections carry a bias (Qwen2 family)."""
    qk_norm: bool = False
    """RMSNorm over the full q and k projections before RoPE (OLMoE)."""
    clip_qkv: float | None = None
    sliding_window: int | None = None
    """Keys further back than this many positions are masked (Mistral-style); None = full."""
    # MoE; num_experts == 0 means a dense model.
    num_experts: int = 0
    top_k: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    """Renormalise the top-k routing weights to sum to 1 (Mixtral always does)."""
    router_weighting: str = "softmax"
    """How chosen experts are weighted: "softmax" (the router's probabilities, as trained MoE
    models do) or "none" (every chosen expert counts 1, MoEfication's convention: experts that
    split a dense FFN's neurons then sum back to that FFN when k = E). Read from the config key
    `spectutor_router_weighting`, which only spectutor's MoEfied checkpoints carry."""
    shared_expert_intermediate_size: int = 0
    """Width of Qwen2-MoE's always-on shared expert (0 = none)."""
    sparse_layers: tuple[int, ...] = ()
    """Indices of the layers whose MLP is an MoE block."""

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def family(self) -> str:
        return SUPPORTED[self.model_type]


def _get(cfg: Mapping[str, Any], *names: str, default: Any = None) -> Any:
    for name in names:
        if cfg.get(name) is not None:
            return cfg[name]
    return default


def _rope_params(cfg: Mapping[str, Any]) -> tuple[float, tuple[tuple[str, Any], ...] | None]:
    # transformers 5 moved rope settings into `rope_parameters`; older configs keep them flat.
    params = cfg.get("rope_parameters") or {}
    theta = float(_get(params, "rope_theta", default=_get(cfg, "rope_theta", default=10000.0)))
    scaling = cfg.get("rope_scaling") or {k: v for k, v in params.items() if k != "rope_theta"}
    kind = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    if kind == "default":
        return theta, None
    if kind not in ("llama3", "linear"):
        raise UnsupportedArchitectureError(f"rope scaling type {kind!r} is not supported (supported: default, linear, llama3)")
    return theta, tuple(sorted((k, v) for k, v in scaling.items() if not isinstance(v, (list, dict))))


def config_from_hf(cfg: Mapping[str, Any]) -> ModelConfig:
    """Read a Hugging Face `config.json` dict; raise UnsupportedArchitectureError for others."""
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED:
        archs = cfg.get("architectures") or [model_type]
        raise UnsupportedArchitectureError(
            f"architecture {archs[0]!r} (model_type={model_type!r}) is not supported; "
            f"supported model types: {', '.join(sorted(SUPPORTED))}"
        )
    hidden = int(cfg["hidden_size"])
    heads = int(cfg["num_attention_heads"])
    layers = int(cfg["num_hidden_layers"])
    theta, scaling = _rope_params(cfg)
    family = SUPPORTED[model_type]
    window = cfg.get("sliding_window") if model_type == "mistral" or cfg.get("use_sliding_window") else None
    if model_type == "mixtral":
        window = cfg.get("sliding_window")

    num_experts = 0
    top_k = 0
    moe_inter = 0
    shared = 0
    sparse: tuple[int, ...] = ()
    norm_topk = False
    if family == "mixtral":
        num_experts = int(cfg["num_local_experts"])
        top_k = int(cfg["num_experts_per_tok"])
        moe_inter = int(cfg["intermediate_size"])
        norm_topk = True
        sparse = tuple(range(layers))
    elif family in ("qwen2_moe", "olmoe"):
        num_experts = int(cfg["num_experts"])
        top_k = int(cfg["num_experts_per_tok"])
        moe_inter = int(_get(cfg, "moe_intermediate_size", "intermediate_size"))
        norm_topk = bool(cfg.get("norm_topk_prob", False))
        if family == "qwen2_moe":
            shared = int(cfg.get("shared_expert_intermediate_size") or 0)
            step = int(cfg.get("decoder_sparse_step", 1) or 1)
            skip = set(cfg.get("mlp_only_layers") or [])
            sparse = tuple(i for i in range(layers) if i not in skip and (i + 1) % step == 0)
        else:
            sparse = tuple(range(layers))

    weighting = str(cfg.get("spectutor_router_weighting") or "softmax")
    if weighting not in ROUTER_WEIGHTINGS:
        raise UnsupportedArchitectureError(
            f"spectutor_router_weighting={weighting!r} is not supported (supported: {', '.join(ROUTER_WEIGHTINGS)})")

    return ModelConfig(
        model_type=model_type,
        vocab_size=int(cfg["vocab_size"]),
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=int(_get(cfg, "num_key_value_heads", default=heads)),
        head_dim=int(_get(cfg, "head_dim", default=hidden // heads)),
        intermediate_size=int(cfg.get("intermediate_size") or 0),
        max_position=int(_get(cfg, "max_position_embeddings", default=2048)),
        rms_eps=float(_get(cfg, "rms_norm_eps", default=1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        attention_bias=model_type in ("qwen2", "qwen2_moe") or bool(cfg.get("attention_bias", False)),
        qk_norm=model_type == "olmoe",
        clip_qkv=cfg.get("clip_qkv"),
        sliding_window=int(window) if window else None,
        num_experts=num_experts,
        top_k=top_k,
        moe_intermediate_size=moe_inter,
        norm_topk_prob=norm_topk,
        router_weighting=weighting,
        shared_expert_intermediate_size=shared,
        sparse_layers=sparse,
    )
