"""Duo-LLM (Alizadeh et al., arXiv 2410.10846) on a dense lean decoder: a small FFN beside each big one.

Each layer's FFN becomes a `DuoMLP` holding the model's own (big) GatedMLP and a small one about 16x
narrower; per token and layer a route picks big, small or skip. This module holds
  - the routed layer, `attach_duo` / `detach_duo` and route setters (fixed per layer or per token);
  - distillation of the small FFNs: layer-local regression small(x) -> big(x) on FFN inputs recorded
    from ShareGPT "train" text, saved under $SPECTUTOR_HOME/models/<name>-duo-s<width>/ with the dense
    model's identity;
  - oracle route search (spec §4.2 step 2) over a trie of routes that shares every common prefix;
  - the router budget loss (spec §4.2 step 3) and FFN FLOPs-per-token accounting.

Oracle semantics: a route applies to the whole sequence in one forward (every position's context is
computed with the same route). The per-token oracle at budget m then takes, for each token, the
minimum next-token loss over all routes with m big layers. This is a hindsight bound scored with
the label, slightly weaker than the paper's per-token search (where each token's context keeps the
routes chosen for earlier tokens), and not a deployable router.

L layers, B sequences, N positions, T tokens (B*N), D hidden, R routes, G layer groups.
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe.layers import GatedMLP, grouped_attention
from moe.model import DecoderLayer, LeanDecoder
from moe.tree import TreeBatch

BIG, SMALL, SKIP = 0, 1, 2
CODES = {"big": BIG, "small": SMALL, "skip": SKIP}
Route = tuple[int, ...]
"""One module code (BIG, SMALL or SKIP) per layer."""


class DuoMLP(nn.Module):
    """A big and a small GatedMLP side by side; `mode` routes every token alike, `route` per token.

    `route` (codes shaped like the input without its last dim) overrides `mode` when set. A fixed
    mode runs one module on the whole input, so mode BIG computes exactly what the dense layer does.
    """

    def __init__(self, big: nn.Module, small: GatedMLP):
        super().__init__()
        self.big, self.small = big, small
        self.mode = BIG
        self.route: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        if self.route is None:
            return self.run(x, self.mode)
        if self.route.shape != x.shape[:-1]:
            raise ValueError(f"route {tuple(self.route.shape)} does not match the input's tokens {tuple(x.shape[:-1])}")
        return mix_routes(x, self.route.to(x.device), self.big, self.small)

    def run(self, x: Tensor, code: int) -> Tensor:
        """One module on every token (skip = the zero update, leaving only the residual)."""
        if code == BIG:
            return self.big(x)
        if code == SMALL:
            return self.small(x)
        if code == SKIP:
            return torch.zeros_like(x)
        raise ValueError(f"route code must be BIG, SMALL or SKIP, got {code}")


def mix_routes(x: Tensor, route: Tensor, big: nn.Module, small: nn.Module) -> Tensor:
    """Per-token routing: each module runs only on its own tokens. x [..., D], route [...] codes."""
    d = x.shape[-1]
    flat, codes = x.reshape(-1, d), route.reshape(-1)                    # [T, D], [T]
    out = torch.zeros_like(flat)
    for code, module in ((BIG, big), (SMALL, small)):
        idx = (codes == code).nonzero().squeeze(1)                        # [T_code]
        if idx.numel():
            out = out.index_add(0, idx, module(flat[idx]))                # out of place: autograd-safe
    return out.view_as(x)


def mix_routes_reference(x: Tensor, route: Tensor, big: nn.Module, small: nn.Module) -> Tensor:
    """Slow reference for `mix_routes`: both modules on every token, then a select."""
    r = route[..., None]
    return torch.where(r == BIG, big(x), torch.where(r == SMALL, small(x), torch.zeros_like(x)))


# ---- attaching and routing ------------------------------------------------------------------------------

def attach_duo(model: LeanDecoder, small_modules: Sequence[GatedMLP]) -> list[DuoMLP]:
    """Swap each layer's FFN for a DuoMLP(big=that FFN, small); routes start all-big (the dense model)."""
    if len(small_modules) != len(model.layers):
        raise ValueError(f"{len(small_modules)} small modules for {len(model.layers)} layers")
    duos = []
    for layer, small in zip(model.layers, small_modules):
        big = layer.mlp.big if isinstance(layer.mlp, DuoMLP) else layer.mlp
        if not isinstance(big, GatedMLP):
            raise ValueError(f"Duo-LLM needs a dense model; layer FFN is {type(big).__name__}")
        layer.mlp = DuoMLP(big, small.to(device=model.embed.weight.device, dtype=model.dtype))
        duos.append(layer.mlp)
    return duos


def detach_duo(model: LeanDecoder) -> list[GatedMLP]:
    """Put the big FFNs back (the dense model again); returns the small modules taken out."""
    smalls = []
    for layer in model.layers:
        if isinstance(layer.mlp, DuoMLP):
            smalls.append(layer.mlp.small)
            layer.mlp = layer.mlp.big
    return smalls


def duo_layers(model: LeanDecoder) -> list[DuoMLP]:
    out = [layer.mlp for layer in model.layers]
    if not all(isinstance(m, DuoMLP) for m in out):
        raise ValueError("call attach_duo first")
    return out


def set_route(model: LeanDecoder, route: Sequence[int] | str) -> None:
    """One code per layer for every token ("big"/"small"/"skip" sets all layers alike)."""
    duos = duo_layers(model)
    codes = [CODES[route]] * len(duos) if isinstance(route, str) else list(route)
    if len(codes) != len(duos):
        raise ValueError(f"route has {len(codes)} codes for {len(duos)} layers")
    for duo, code in zip(duos, codes):
        duo.mode, duo.route = int(code), None


def set_token_routes(model: LeanDecoder, routes: Tensor) -> None:
    """Per-token codes [L, B, N] for the next forward(s) over [B, N] tokens."""
    duos = duo_layers(model)
    if routes.shape[0] != len(duos):
        raise ValueError(f"routes have {routes.shape[0]} layers, the model {len(duos)}")
    for duo, r in zip(duos, routes):
        duo.route = r


# ---- a cacheless full-sequence forward, split per layer (oracle search and training) ---------------------

@dataclass
class SeqContext:
    """Causal layout of B whole sequences of N tokens, shared by every layer."""

    cos: Tensor   # [B, 1, N, hd]
    sin: Tensor   # [B, 1, N, hd]
    mask: Tensor  # [B, 1, N, N] bool, True where a query sees a key


def seq_context(model: LeanDecoder, tokens: Tensor) -> SeqContext:
    b, n = tokens.shape
    positions = torch.arange(n, device=model.embed.weight.device).expand(b, n)
    cos, sin = model.rotary(positions, model.dtype)
    mask = torch.ones(n, n, dtype=torch.bool, device=positions.device).tril().expand(b, 1, n, n)
    if model.cfg.sliding_window is not None:
        pos = torch.arange(n, device=positions.device)
        mask = mask & ((pos[:, None] - pos[None, :]) < model.cfg.sliding_window)
    return SeqContext(cos, sin, mask)


def attention_part(layer: DecoderLayer, x: Tensor, ctx: SeqContext) -> Tensor:
    """x + attention(norm(x)) over the whole causal sequence: x [B, N, D] -> [B, N, D]."""
    attn = layer.attn
    b, n, _ = x.shape
    q, k, v = attn.project(layer.input_norm(x), ctx.cos, ctx.sin)
    out = grouped_attention(q, k, v, ctx.mask)                           # [B, H, N, hd]
    return x + attn.o_proj(out.transpose(1, 2).reshape(b, n, attn.h * attn.hd))


def ffn_part(layer: DecoderLayer, h: Tensor, code: int) -> Tensor:
    """h + FFN(norm(h)) with the module `code` names (the layer must hold a DuoMLP)."""
    if code == SKIP:
        return h
    return h + layer.mlp.run(layer.post_norm(h), code)


def token_losses(model: LeanDecoder, x: Tensor, tokens: Tensor, chunk: int = 4) -> Tensor:
    """Next-token cross-entropy [B, N-1] from final hidden states x [B, N, D] (head run in chunks of sequences)."""
    out = []
    for s in range(0, x.shape[0], chunk):
        logits = model.lm_head(model.norm(x[s:s + chunk, :-1])).float()  # [b, N-1, V]
        out.append(F.cross_entropy(logits.transpose(1, 2), tokens[s:s + chunk, 1:].to(logits.device),
                                   reduction="none"))
    return torch.cat(out)


def sequence_logits(model: LeanDecoder, tokens: Tensor, route: Sequence[int]) -> Tensor:
    """Logits [B, N, V] of whole sequences under one per-layer route, without a KV cache."""
    ctx = seq_context(model, tokens)
    x = model.embed(tokens.to(model.embed.weight.device))
    for layer, code in zip(model.layers, route):
        x = ffn_part(layer, attention_part(layer, x, ctx), code)
    return model.lm_head(model.norm(x)).float()


@torch.inference_mode()
def route_losses(model: LeanDecoder, tokens: Tensor, routes: Sequence[Route],
                 on_leaf: Callable[[], None] | None = None) -> Tensor:
    """Per-token next-token loss [R, B, N-1] of each route, by depth-first search over the routes' trie.

    Routes sharing their first l codes share the hidden states of those l layers, so e.g. the 64
    routes of 6 layer groups cost about a third of 64 forwards. Identical routes are computed once.
    `on_leaf` is called once per distinct route (progress bars).
    """
    L = len(model.layers)
    if any(len(r) != L for r in routes):
        raise ValueError(f"every route needs {L} codes")
    ctx = seq_context(model, tokens)
    out = torch.empty(len(routes), tokens.shape[0], tokens.shape[1] - 1)

    def visit(depth: int, x: Tensor, idxs: list[int]) -> None:
        if depth == L:
            out[idxs] = token_losses(model, x, tokens).cpu()
            if on_leaf is not None:
                on_leaf()
            return
        layer = model.layers[depth]
        h = attention_part(layer, x, ctx)  # shared by every child: the route only changes the FFN
        children: dict[int, list[int]] = defaultdict(list)
        for i in idxs:
            children[routes[i][depth]].append(i)
        for code in sorted(children):
            visit(depth + 1, ffn_part(layer, h, code), children[code])

    visit(0, model.embed(tokens.to(model.embed.weight.device)), list(range(len(routes))))
    return out


def routed_sequence_logits(model: LeanDecoder, tokens: Tensor, routes: Tensor) -> Tensor:
    """Logits [B, N, V] of whole sequences with per-token codes routes [L, B, N]; differentiable (training)."""
    ctx = seq_context(model, tokens)
    x = model.embed(tokens.to(model.embed.weight.device))
    for layer, r in zip(model.layers, routes):
        h = attention_part(layer, x, ctx)
        x = h + mix_routes(layer.post_norm(h), r.to(h.device), layer.mlp.big, layer.mlp.small)
    return model.lm_head(model.norm(x)).float()


# ---- route sets and the oracle ----------------------------------------------------------------------------

def layer_groups(num_layers: int, num_groups: int) -> list[tuple[int, ...]]:
    """`num_groups` runs of consecutive layers, as equal as possible (earlier groups take the remainder)."""
    if not 1 <= num_groups <= num_layers:
        raise ValueError(f"num_groups must be in [1, {num_layers}], got {num_groups}")
    sizes = [num_layers // num_groups + (g < num_layers % num_groups) for g in range(num_groups)]
    starts = list(itertools.accumulate([0] + sizes[:-1]))
    return [tuple(range(s, s + n)) for s, n in zip(starts, sizes)]


def routes_with_budget(num_layers: int, budget: int, groups: Sequence[Sequence[int]] | None = None,
                       other: int = SMALL) -> list[Route]:
    """Every route with exactly `budget` big layers (or big groups when `groups` is given), others `other`.

    There are C(L, m) of them, or C(G, m) at group granularity.
    """
    units = [tuple(g) for g in groups] if groups is not None else [(i,) for i in range(num_layers)]
    out = []
    for chosen in itertools.combinations(range(len(units)), budget):
        codes = [other] * num_layers
        for u in chosen:
            for layer in units[u]:
                codes[layer] = BIG
        out.append(tuple(codes))
    return out


def fixed_route(num_layers: int, budget: int, where: str, other: int = SMALL) -> Route:
    """Big in the first or last `budget` layers ("first" / "last"), `other` elsewhere."""
    big = range(budget) if where == "first" else range(num_layers - budget, num_layers)
    return tuple(BIG if i in big else other for i in range(num_layers))


def random_routes(num_layers: int, budget: int, n: int, generator: torch.Generator, other: int = SMALL) -> list[Route]:
    """`n` routes with `budget` big layers drawn uniformly (with replacement) from the C(L, m)."""
    out = []
    for _ in range(n):
        big = set(torch.randperm(num_layers, generator=generator)[:budget].tolist())
        out.append(tuple(BIG if i in big else other for i in range(num_layers)))
    return out


def oracle(losses: Tensor) -> tuple[Tensor, Tensor]:
    """Per-token minimum over routes: losses [R, ...] -> (min loss [...], index of the best route [...])."""
    return losses.min(dim=0)


def layer_preference(routes: Sequence[Route], best: Tensor) -> Tensor:
    """Fraction of tokens whose oracle route uses the big module in each layer: best [...] route indices -> [L]."""
    big = torch.tensor([[c == BIG for c in r] for r in routes], dtype=torch.float32)  # [R, L]
    return big[best.reshape(-1)].mean(0)


# ---- router budget loss and compute accounting ------------------------------------------------------------

def budget_loss(p_big: Tensor, target: float) -> Tensor:
    """Global budget loss (mean over layers and tokens of P(big) - target)^2, replacing per-layer balancing."""
    return (p_big.mean() - target) ** 2


def ffn_flops(hidden: int, inner: int) -> int:
    """FLOPs of one token through a SwiGLU FFN: three hidden x inner matmuls, 2 FLOPs per multiply-add."""
    return 2 * 3 * hidden * inner


def route_flops(codes: Tensor, hidden: int, big_inner: int, small_inner: int) -> Tensor:
    """FFN FLOPs per token: codes [L, ...] -> [...] = sum over layers of the chosen module's cost (skip = 0)."""
    cost = torch.tensor([ffn_flops(hidden, big_inner), ffn_flops(hidden, small_inner), 0], dtype=torch.float64)
    return cost[codes.long()].sum(0)


# ---- distillation of the small FFNs ------------------------------------------------------------------------

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
    (autograd-capable) tensors: load it with fast_kernels=False.
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
    model = load_model(name, fast_kernels=False, with_tokenizer=False).model  # plain weights: autograd runs through them
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
