"""Fitting Duo-LLM's small FFNs (moe/duo.py) to a dense lean decoder, and keeping them on disk.

- Layer-local distillation: each small FFN starts from its big FFN's most important inner units
  and is regressed onto the big FFN's outputs, on FFN inputs recorded from ShareGPT "train" text.
- The paper's stage 1: random big/small routing, KL to the dense model, only the small FFNs learn.
- Storage: safetensors + `duo.json` under $SPECTUTOR_HOME/models/<name>-duo-s<width>/, tied to the
  dense model's sha256, built on first use (seeded).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from moe.layers import GatedMLP
from moe.model import LeanDecoder
from moe.tree import TreeBatch
from moe.duo import BIG, DuoMLP, SMALL, attach_duo, detach_duo, duo_layers, routed_sequence_logits, sequence_logits


@dataclass(frozen=True)
class DistillConfig:
    """How the small FFNs are fitted to the big ones."""

    width: int | None = None
    """Inner width of each small FFN; None = the big width / 16 (96 for SmolLM2-135M)."""
    sequences: int = 32
    """ShareGPT "train" text chunks whose FFN inputs are recorded."""
    seq_len: int = 128
    steps: int = 300
    """Adam steps per layer."""
    batch_tokens: int = 512
    lr: float = 2e-3
    val_fraction: float = 0.125
    """Recorded tokens kept out of training, on which the relative MSE is reported."""
    seed: int = 0

    def __post_init__(self) -> None:
        if self.width is not None and self.width < 1:
            raise ValueError(f"width must be >= 1, got {self.width}")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.steps < 0 or self.sequences < 1 or self.seq_len < 2 or self.batch_tokens < 1:
            raise ValueError("steps >= 0, sequences >= 1, seq_len >= 2 and batch_tokens >= 1 are required")


def text_chunks(tokenizer, texts: Iterable[str], num: int, seq_len: int) -> Tensor:
    """[num, seq_len] token ids: texts joined by EOS into one stream, cut into consecutive chunks."""
    stream: list[int] = []
    sep = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for text in texts:
        stream += tokenizer.encode(text) + sep
        if len(stream) >= num * seq_len:
            break
    if len(stream) < num * seq_len:
        raise ValueError(f"only {len(stream)} tokens of text, {num * seq_len} needed")
    return torch.tensor(stream[: num * seq_len]).view(num, seq_len)


@torch.inference_mode()
def record_ffn_inputs(model: LeanDecoder, tokens: Tensor, batch: int = 8) -> list[Tensor]:
    """Each layer's FFN input (post-attention norm) over `tokens` [B, N]: L tensors [B*N, D] (forward hooks)."""
    ctx_inputs: list[list[Tensor]] = [[] for _ in model.layers]
    handles = [layer.mlp.register_forward_pre_hook(lambda _m, args, i=i: ctx_inputs[i].append(args[0].reshape(
        -1, args[0].shape[-1]).cpu())) for i, layer in enumerate(model.layers)]
    try:
        for s in range(0, tokens.shape[0], batch):
            part = tokens[s:s + batch]
            cache = model.new_cache(part.shape[0], part.shape[1])
            slots = [cache.allocate() for _ in range(part.shape[0])]
            model(TreeBatch.chains(part.tolist()), slots, cache, logits_for="last")
    finally:
        for h in handles:
            h.remove()
    return [torch.cat(parts) for parts in ctx_inputs]


@torch.inference_mode()
def init_small_from_big(big: GatedMLP, x: Tensor, width: int) -> GatedMLP:
    """A small FFN made of the big one's `width` most important inner units on inputs x [T, D].

    Importance of unit j: mean |silu(gate_j) * up_j| times the norm of its down-projection column.
    """
    gate_up, down = big.gate_up.weight.detach().float(), big.down.weight.detach().float()
    gate, up = (x.float() @ gate_up.T).split(big.inner, dim=-1)
    score = (F.silu(gate) * up).abs().mean(0) * down.norm(dim=0)         # [I]
    keep = score.topk(width).indices.sort().values                        # [S]
    small = GatedMLP(x.shape[-1], width)
    small.gate_up.weight.copy_(torch.cat([gate_up[:big.inner][keep], gate_up[big.inner:][keep]]))
    small.down.weight.copy_(down[:, keep])
    return small


def relative_mse(pred: Tensor, target: Tensor) -> float:
    return float(((pred - target) ** 2).sum() / (target ** 2).sum().clamp_min(1e-12))  # host sync: a report


def distill_layer(big: GatedMLP, x: Tensor, width: int, cfg: DistillConfig, generator: torch.Generator) -> tuple[GatedMLP, float, float]:
    """Fit small(x) to big(x) with Adam; returns (small, relative MSE at init, after) on held-out rows of x."""
    x = x.float().clone()  # a normal tensor: recorded ones are inference tensors
    with torch.inference_mode():
        y = big(x)
    y = y.clone()
    n_val = max(1, int(len(x) * cfg.val_fraction))
    perm = torch.randperm(len(x), generator=generator)
    val, train = perm[:n_val], perm[n_val:]
    init = init_small_from_big(big, x[train], width)
    small = GatedMLP(x.shape[-1], width)  # built outside inference mode, so its parameters take gradients
    small.load_state_dict({k: v.clone() for k, v in init.state_dict().items()})
    with torch.no_grad():
        before = relative_mse(small(x[val]), y[val])
    opt = torch.optim.Adam(small.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(cfg.steps, 1))
    scale = y[train].pow(2).mean()
    for _ in range(cfg.steps):
        idx = train[torch.randint(len(train), (min(cfg.batch_tokens, len(train)),), generator=generator)]
        loss = F.mse_loss(small(x[idx]), y[idx]) / scale
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    small.requires_grad_(False)
    with torch.no_grad():
        after = relative_mse(small(x[val]), y[val])
    return small.eval(), before, after


def distill_small_modules(model: LeanDecoder, tokens: Tensor, cfg: DistillConfig,
                          progress: bool = True) -> tuple[list[GatedMLP], list[dict]]:
    """One small FFN per layer, distilled layer-locally on FFN inputs of `tokens`; returns them and per-layer stats."""
    from tqdm import tqdm

    if any(i in model.cfg.sparse_layers for i in range(model.cfg.num_layers)):
        raise ValueError("Duo-LLM small modules are distilled from a dense model")
    width = cfg.width or max(1, model.cfg.intermediate_size // 16)
    g = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    inputs = record_ffn_inputs(model, tokens)
    smalls, stats = [], []
    for i in tqdm(range(len(inputs)), desc=f"distilling small FFNs (width {width})", disable=not progress):
        big = model.layers[i].mlp.big if isinstance(model.layers[i].mlp, DuoMLP) else model.layers[i].mlp
        small, before, after = distill_layer(big, inputs[i], width, cfg, g)
        inputs[i] = None  # free as we go
        smalls.append(small)
        stats.append({"layer": i, "rel_mse_init": before, "rel_mse": after})
    return smalls, stats


@dataclass(frozen=True)
class RandomRoutingConfig:
    """Stage 1 of the paper (spec §4.2), small FFNs only: random big/small routes, KL to the dense model."""

    steps: int = 40
    p_big: float = 0.5
    """Probability that a token uses the big FFN in a layer (else the small one)."""
    batch: int = 4
    """Sequences per step."""
    lr: float = 1e-3
    sequences: int = 64
    """ShareGPT "train" text chunks to draw batches from."""
    seq_len: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.p_big <= 1:
            raise ValueError(f"p_big must be in [0, 1], got {self.p_big}")
        if self.steps < 0 or self.batch < 1 or self.lr <= 0:
            raise ValueError("steps >= 0, batch >= 1 and lr > 0 are required")


def train_random_routing(model: LeanDecoder, tokens: Tensor, cfg: RandomRoutingConfig,
                         progress: bool = True) -> list[float]:
    """Fine-tune the attached small FFNs end to end; returns the KL(dense || routed) per step (nats/token).

    Per token and layer the route is big with probability `p_big`, else small. Only the small FFNs
    learn: big FFNs, attention, embeddings and head stay frozen. The model's weights must be plain
    (autograd-capable) tensors: load it with kernels="default".
    """
    from tqdm import tqdm

    duos = duo_layers(model)
    model.requires_grad_(False)
    params = [p for d in duos for p in d.small.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=cfg.lr)
    g = torch.Generator().manual_seed(cfg.seed)
    L, (b, n) = len(duos), (min(cfg.batch, tokens.shape[0]), tokens.shape[1])
    history = []
    for _ in tqdm(range(cfg.steps), desc=f"random-routing fine-tune (p_big {cfg.p_big})", disable=not progress):
        toks = tokens[torch.randperm(tokens.shape[0], generator=g)[:b]]
        with torch.no_grad():
            teacher = sequence_logits(model, toks, [BIG] * L).log_softmax(-1)           # [b, N, V]
        routes = torch.where(torch.rand(L, b, n, generator=g) < cfg.p_big, BIG, SMALL)  # [L, b, N]
        student = routed_sequence_logits(model, toks, routes).log_softmax(-1)
        loss = F.kl_div(student, teacher, log_target=True, reduction="sum") / (b * n)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        history.append(loss.item())  # host sync: a progress figure, once per step
    for p in params:
        p.requires_grad_(False)
    return history


# ---- saving, loading, building once -----------------------------------------------------------------------

def duo_folder(name: str, width: int) -> Path:
    from moe.loader import spectutor_home

    return spectutor_home() / "models" / f"{Path(name).name}-duo-s{width}"


def dense_identity(folder: Path) -> str:
    """sha256 over the dense checkpoint's config and weight files (names the weights the small FFNs mimic)."""
    h = hashlib.sha256()
    for f in sorted(folder.glob("config.json")) + sorted(folder.glob("*.safetensors")):
        h.update(f.name.encode())
        with f.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 24), b""):
                h.update(block)
    return h.hexdigest()


def save_small_modules(smalls: Sequence[GatedMLP], folder: Path, meta: dict) -> None:
    """`small.safetensors` (layers.<i>.gate_up / .down) and `duo.json` (meta: dense identity, stats)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    sd = {f"layers.{i}.{k}": v.detach().float().contiguous() for i, m in enumerate(smalls)
          for k, v in m.state_dict().items()}
    save_file(sd, str(folder / "small.safetensors"))
    (folder / "duo.json").write_text(json.dumps(meta, indent=2))


def load_small_modules(folder: Path) -> tuple[list[GatedMLP], dict]:
    from safetensors.torch import load_file

    meta = json.loads((folder / "duo.json").read_text())
    sd = load_file(str(folder / "small.safetensors"))
    smalls = []
    for i in range(meta["num_layers"]):
        w = sd[f"layers.{i}.down.weight"]
        m = GatedMLP(w.shape[0], w.shape[1])
        m.load_state_dict({"gate_up.weight": sd[f"layers.{i}.gate_up.weight"], "down.weight": w})
        smalls.append(m.eval().requires_grad_(False))
    return smalls, meta


def ensure_small_modules(name: str, folder: Path, model: LeanDecoder, tokenizer,
                         cfg: DistillConfig = DistillConfig(), progress: bool = True) -> tuple[list[GatedMLP], dict]:
    """Load the small FFNs for the dense model in `folder`, distilling (seeded) and saving them when missing or stale."""
    width = cfg.width or max(1, model.cfg.intermediate_size // 16)
    out = duo_folder(name, width)
    identity = dense_identity(folder)
    want = {"dense_model": name, "dense_identity": identity, "distill": dataclasses.asdict(cfg)}
    if (out / "duo.json").is_file() and (out / "small.safetensors").is_file():
        smalls, meta = load_small_modules(out)
        if all(meta.get(k) == v for k, v in want.items()):
            return smalls, meta
    from serving.traffic import sharegpt_prompts

    tokens = text_chunks(tokenizer, (p.text for p in sharegpt_prompts("train")), cfg.sequences, cfg.seq_len)
    smalls, stats = distill_small_modules(model, tokens, cfg, progress)
    meta = {**want, "width": width, "num_layers": len(smalls), "layers": stats,
            "version": f"duo-small-{width}-{identity[:12]}"}
    save_small_modules(smalls, out, meta)
    return smalls, meta


def ensure_random_routing(name: str, smalls: Sequence[GatedMLP], base_meta: dict, tokenizer,
                          cfg: RandomRoutingConfig = RandomRoutingConfig(),
                          progress: bool = True) -> tuple[list[GatedMLP], dict]:
    """The small FFNs of `base_meta` after `train_random_routing`, cached beside them as <...>-rr<steps>/."""
    import copy

    from moe.loader import load_model
    from serving.traffic import sharegpt_prompts

    base = duo_folder(name, base_meta["width"])
    out = base.with_name(f"{base.name}-rr{cfg.steps}")
    want = {"base_version": base_meta["version"], "random_routing": dataclasses.asdict(cfg)}
    if (out / "duo.json").is_file() and (out / "small.safetensors").is_file():
        tuned, meta = load_small_modules(out)
        if all(meta.get(k) == v for k, v in want.items()):
            return tuned, meta
    model = load_model(name, kernels="default", with_tokenizer=False).model  # plain weights: autograd runs through them
    tuned = [copy.deepcopy(s) for s in smalls]
    attach_duo(model, tuned)
    tokens = text_chunks(tokenizer, (p.text for p in sharegpt_prompts("train")), cfg.sequences, cfg.seq_len)
    torch.manual_seed(cfg.seed)
    history = train_random_routing(model, tokens, cfg, progress)
    tuned = [t.eval() for t in detach_duo(model)]
    meta = {**base_meta, **want, "version": f"{base_meta['version']}-rr{cfg.steps}", "kl_history": history}
    save_small_modules(tuned, out, meta)
    return tuned, meta


def perplexity(mean_loss: float) -> float:
    return math.exp(mean_loss)
