"""Shared fixtures: tiny random models saved as real checkpoints, so the real loader runs on them."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import pytest
import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu" if not torch.cuda.is_available() else "cuda")
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))

TINY_COMMON = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                   initializer_range=0.2, tie_word_embeddings=False)

# name -> (config class name, model class name, extra config)
TINY_MODELS: dict[str, tuple[str, str, dict]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "llama_tied": ("LlamaConfig", "LlamaForCausalLM", {"tie_word_embeddings": True}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 24}),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", {"num_local_experts": 8, "num_experts_per_tok": 2}),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  {"num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                   "shared_expert_intermediate_size": 48, "mlp_only_layers": [1], "norm_topk_prob": False}),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM",
              {"num_experts": 8, "num_experts_per_tok": 2, "norm_topk_prob": True}),
}
MOE_MODELS = ("mixtral", "qwen2_moe", "olmoe")


def build_tiny_model(name: str, folder: Path, seed: int = 0) -> Path:
    """Save a randomly initialised Hugging Face model `name` (see TINY_MODELS) into `folder`."""
    import transformers

    cfg_cls, model_cls, extra = TINY_MODELS[name]
    cfg = getattr(transformers, cfg_cls)(**{**TINY_COMMON, **extra})
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(cfg)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Callable[[str], Path]:
    """Factory: tiny_model("mixtral") -> folder of a saved random tiny Mixtral (built once per session)."""
    built: dict[str, Path] = {}

    def make(name: str) -> Path:
        if name not in built:
            built[name] = build_tiny_model(name, tmp_path_factory.mktemp(name))
        return built[name]

    return make


@pytest.fixture(scope="session")
def hf_reference() -> Callable[[Path], torch.nn.Module]:
    """Factory: the Hugging Face model loaded from a folder, fp32, eval mode."""
    from transformers import AutoModelForCausalLM

    def load(folder: Path) -> torch.nn.Module:
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()

    return load


SERVICE_VARS = ("SPECTUTOR_KAFKA_BOOTSTRAP", "SPECTUTOR_REDIS_URL", "MLFLOW_TRACKING_URI")


@pytest.fixture(scope="session")
def services() -> dict[str, str]:
    """The local Kafka, Redis and MLflow addresses (deploy/local/env.sh); skips when they are not set."""
    missing = [k for k in SERVICE_VARS if not os.environ.get(k)]
    if missing:
        pytest.skip(f"{', '.join(missing)} not set; run under deploy/local/with-services.sh kafka redis mlflow")
    return {k: os.environ[k] for k in SERVICE_VARS}
