"""MoEfication: cut a dense model's FFNs into experts and train a router per layer to pick them.

N tokens, D hidden, I FFN width, E experts of I / E neurons each, k experts per token.

A SwiGLU FFN is a sum over its I neurons: `down[:, j] * silu(gate_j . x) * (up_j . x)`. Splitting
the neurons into E groups of I / E turns it into E experts whose outputs sum to the FFN's. With
every chosen expert weighted 1 (`spectutor_router_weighting: "none"` in the checkpoint, see
moe/config.py), k = E is exactly the dense model, and a router that picks the k experts
contributing most to each token approximates it with k / E of the FFN's work.

1. **Neurons to experts.** Balanced spherical k-means on each neuron's activation pattern over
   sample tokens: neurons that fire together share an expert, so a token needs few experts.
   Every expert gets exactly I / E neurons.
2. **Router.** For each sample token, the norm of each expert's output is its contribution;
   the router is a linear map `[E, D]` fitted by ridge regression to the log-contributions
   (centred per token: only their order matters to top-k). Closed form, deterministic.
3. **Checkpoint.** A Mixtral-format folder (same attention, norms, embeddings and tokenizer),
   loadable by the lean decoder with either MoE backend, DeepSpeed's included.

Pure computation here; `moe/moefy_build.py` reads the dense model and sample text and writes the
folder.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class MoefyConfig:
    """How a dense model is cut (the checkpoint's marker records every field)."""

    experts: int = 16
    top_k: int = 4
    texts: int = 64
    """ShareGPT training-split conversations whose tokens feed clustering and router fitting."""
    tokens_per_text: int = 256
    cluster_tokens: int = 4096
    """Sample tokens that describe each neuron's activation pattern for the clustering."""
    kmeans_iters: int = 25
    ridge: float = 1e-2
    """Ridge penalty, relative to the mean diagonal of the router inputs' Gram matrix."""
    seed: int = 0

    def __post_init__(self) -> None:
        if self.experts < 2:
            raise ValueError(f"experts={self.experts} must be at least 2")
        if not 1 <= self.top_k <= self.experts:
            raise ValueError(f"top_k={self.top_k} must be in 1..experts={self.experts}")
        for name in ("texts", "tokens_per_text", "cluster_tokens", "kmeans_iters"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be positive")


def neuron_activations(x: Tensor, gate_up: Tensor) -> Tensor:
    """x [N, D], gate_up [2I, D] (gate rows then up rows) -> SwiGLU activations [N, I]."""
    gate, up = F.linear(x, gate_up).chunk(2, dim=-1)
    return F.silu(gate) * up


def balanced_kmeans(features: Tensor, clusters: int, iters: int, seed: int = 0) -> Tensor:
    """Spherical k-means whose clusters all get exactly n / `clusters` points.

    features [n, f] -> labels [n] int64. Each assignment step hands out points in order of
    decreasing similarity, a point to its best centroid that still has room (greedy balanced
    assignment); centroids are the normalised means. Stops early when no label changes.
    """
    n = features.shape[0]
    if n % clusters:
        raise ValueError(f"{n} points cannot be split into {clusters} equal clusters")
    size = n // clusters
    points = F.normalize(features.double(), dim=1)
    gen = torch.Generator().manual_seed(seed)
    centroids = points[torch.randperm(n, generator=gen)[:clusters]]
    labels = torch.full((n,), -1, dtype=torch.long)
    for _ in range(iters):
        new = _balanced_assign(points @ centroids.T, size)
        if torch.equal(new, labels):
            break
        labels = new
        sums = torch.zeros_like(centroids).index_add_(0, labels, points)
        centroids = F.normalize(sums, dim=1)
    return labels


def _balanced_assign(similarity: Tensor, size: int) -> Tensor:
    """similarity [n, c] -> labels [n]: best pairs first, each cluster capped at `size` points."""
    n, c = similarity.shape
    order = similarity.flatten().argsort(descending=True).tolist()
    labels = [-1] * n
    room = [size] * c
    left = n
    for flat in order:
        point, cluster = divmod(flat, c)
        if labels[point] < 0 and room[cluster]:
            labels[point] = cluster
            room[cluster] -= 1
            left -= 1
            if not left:
                break
    return torch.tensor(labels, dtype=torch.long)


def split_ffn(gate_up: Tensor, down: Tensor, labels: Tensor, experts: int) -> tuple[Tensor, Tensor]:
    """Dense gate_up [2I, D] and down [D, I] -> stacked expert weights [E, 2I/E, D], [E, D, I/E].

    Expert e holds the neurons labelled e, in ascending order, gate rows then up rows, so that
    `moe.moe_block.StackedExperts` reads it as one SwiGLU FFN of width I / E.
    """
    inner = down.shape[1]
    gate, up = gate_up[:inner], gate_up[inner:]
    groups = [torch.nonzero(labels == e).flatten() for e in range(experts)]
    stacked_gate_up = torch.stack([torch.cat([gate[g], up[g]]) for g in groups])
    stacked_down = torch.stack([down[:, g] for g in groups])
    return stacked_gate_up, stacked_down


def expert_contributions(x: Tensor, gate_up: Tensor, down: Tensor) -> Tensor:
    """x [N, D] and stacked experts -> [N, E]: the norm of each expert's output on each token."""
    out = []
    for e in range(gate_up.shape[0]):
        out.append(F.linear(neuron_activations(x, gate_up[e]), down[e]).norm(dim=-1))
    return torch.stack(out, dim=1)


def fit_router(x: Tensor, contributions: Tensor, ridge: float) -> Tensor:
    """Router weight [E, D] whose logits x @ W.T track each token's log-contributions.

    Targets are centred per token, so the fit spends nothing on a per-token offset that top-k
    ignores. Ridge regression in float64, penalty relative to the Gram matrix's mean diagonal.
    """
    xd = x.double()
    target = contributions.double().clamp_min(1e-12).log()
    target = target - target.mean(dim=1, keepdim=True)
    gram = xd.T @ xd
    penalty = ridge * gram.diagonal().mean()
    weight = torch.linalg.solve(gram + penalty * torch.eye(gram.shape[0], dtype=gram.dtype), xd.T @ target)
    return weight.T.contiguous().to(x.dtype)


def topk_recall(logits: Tensor, contributions: Tensor, top_k: int) -> float:
    """Share of each token's k largest contributors that the router's top-k also picks."""
    want = contributions.topk(top_k, dim=1).indices
    got = logits.topk(top_k, dim=1).indices
    hits = (want.unsqueeze(2) == got.unsqueeze(1)).any(dim=2).sum()
    return float(hits) / want.numel()


def captured_norm(x: Tensor, gate_up: Tensor, down: Tensor, chosen: Tensor) -> float:
    """Relative error of the k-expert FFN output against the dense one: ||sum_chosen - sum_all|| / ||sum_all||."""
    full = torch.zeros(x.shape[0], down.shape[1], dtype=x.dtype)
    part = torch.zeros_like(full)
    for e in range(gate_up.shape[0]):
        y = F.linear(neuron_activations(x, gate_up[e]), down[e])
        full += y
        part += y * (chosen == e).any(dim=1, keepdim=True)
    return float((part - full).norm() / full.norm().clamp_min(1e-12))


@dataclass(frozen=True)
class LayerCut:
    """One layer's experts and router, with how well the router picks on its own training tokens."""

    gate_up: Tensor
    down: Tensor
    router: Tensor
    recall: float
    """Top-k recall of the router on the fitting tokens (1.0 = always the best k experts)."""
    rel_error: float
    """Relative error of the routed k-expert output against the dense FFN, on the fitting tokens."""


def cut_layer(x: Tensor, gate_up: Tensor, down: Tensor, cfg: MoefyConfig) -> LayerCut:
    """One dense FFN (gate_up [2I, D], down [D, I]) and its inputs x [N, D] -> experts and router."""
    inner = down.shape[1]
    if inner % cfg.experts:
        raise ValueError(f"FFN width {inner} is not divisible by experts={cfg.experts}")
    gen = torch.Generator().manual_seed(cfg.seed)
    sample = x[torch.randperm(x.shape[0], generator=gen)[:cfg.cluster_tokens]]
    pattern = neuron_activations(sample, gate_up).abs().T          # [I, n]: when each neuron fires
    labels = balanced_kmeans(pattern, cfg.experts, cfg.kmeans_iters, cfg.seed)
    stacked_gate_up, stacked_down = split_ffn(gate_up, down, labels, cfg.experts)
    contrib = expert_contributions(x, stacked_gate_up, stacked_down)
    router = fit_router(x, contrib, cfg.ridge)
    logits = x @ router.T
    chosen = logits.topk(cfg.top_k, dim=1).indices
    return LayerCut(stacked_gate_up, stacked_down, router, topk_recall(logits, contrib, cfg.top_k),
                    captured_norm(x, stacked_gate_up, stacked_down, chosen))
