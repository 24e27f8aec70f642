"""Duo-LLM (Alizadeh et al., arXiv 2410.10846) on a dense lean decoder: a small FFN beside each big one.

Each layer's FFN becomes a `DuoMLP` holding the model's own (big) GatedMLP and a small one about 16x
narrower; per token and layer a route picks big, small or skip. This module holds
  - the routed layer, `attach_duo` / `detach_duo` and route setters (fixed per layer or per token);
  - (the small FFNs are fitted and stored by moe/duo_train.py);
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

import itertools
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe.layers import GatedMLP, grouped_attention
from moe.model import DecoderLayer, LeanDecoder

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
