"""The EAGLE-3 drafter: one decoder layer over the target's own hidden states, with a reduced draft vocabulary.

B sequences, N new draft entries per sequence, D hidden, F = len(feature_layers) * D fused features,
V target vocabulary, Vd draft vocabulary.

Entry i of a sequence reads the target's hidden states after token i (taken from the verification
or prefill forward that already ran, at `feature_layers`), fused by `fc`, and the target's own
embedding of token i+1; it predicts token i+2. q/k/v see both ([embedding; fused], 2D wide), the
layer keeps its own KV cache, and the head covers Vd frequent tokens (`vocab_ids`: draft id ->
target id). After the last entry backed by target features, each draft step feeds the layer's own
output hidden state in place of the fused features (as EAGLE-3 drafts). Drafts are chains with a
confidence stop by default; greedy requests propose argmax tokens, sampled ones draw from the draft
law q, which is 0 outside the draft vocabulary, so verification stays exact. With `tree_topk` they
are EAGLE-2's dynamic trees instead: the likeliest nodes by cumulative draft probability are
expanded depth by depth and the `budget` likeliest kept (deterministic, so verified exactly by the
target-only rule for sampled requests too).

Checkpoints are a folder with `eagle.json` (config, feature layers, draft vocabulary, version)
and `model.safetensors` (the head's own weights; the embedding is the target's and is not stored).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from drafters.base import DraftRequest, Feedback, Prefill
from drafters.verify import Draft
from moe.config import ModelConfig
from moe.errors import CorruptModelError
from moe.generate import SamplingParams, probs_from_logits
from moe.kv_cache import KVCache
from moe.layers import Attention, GatedMLP, RMSNorm, Rotary
from moe.model import step_layout
from moe.tree import TreeBatch

EAGLE_FORMAT = 1


def warm_start_dir(target_spec: str) -> Path:
    """Where the warm-start head of the target named `target_spec` is cached (`spectutor draft init` writes it)."""
    from moe.loader import spectutor_home

    return spectutor_home() / "drafters" / f"eagle-{Path(target_spec).name}"


def default_feature_layers(num_layers: int) -> tuple[int, ...]:
    """Low, middle and high: outputs of layers 1, L/2 - 1 and L - 4 (inputs of 2, L/2 and L - 3), as EAGLE-3."""
    if num_layers < 4:
        return tuple(sorted({0, num_layers // 2, num_layers - 1}))
    if num_layers < 7:  # the rule above would repeat a layer; keep three distinct, below the last
        return (0, num_layers // 2 - 1, num_layers - 2)
    return (1, num_layers // 2 - 1, num_layers - 4)


@dataclass(frozen=True)
class EagleConfig:
    """The shape of an EAGLE head; everything that must agree with the target is checked by `check_fits`."""

    hidden_size: int
    """D: the target's hidden size."""
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    """Width of the layer's SwiGLU MLP (the target's by default)."""
    rms_eps: float
    rope_theta: float
    max_position: int
    target_vocab_size: int
    """V of the target the head was made for."""
    feature_layers: tuple[int, ...]
    """Target layers whose output hidden states are fused."""
    target_layers: int
    """Number of layers of that target (feature layers are only meaningful for it)."""
    rope_scaling: tuple | None = None
    feature_norm: bool = True
    """Each feature layer's state gets its own RMSNorm before `fc` (ours); False feeds them raw, as EAGLE-3 does."""

    @staticmethod
    def for_target(cfg: ModelConfig, feature_layers: tuple[int, ...] | None = None,
                   intermediate_size: int | None = None) -> "EagleConfig":
        layers = tuple(feature_layers) if feature_layers else default_feature_layers(cfg.num_layers)
        bad = [i for i in layers if not 0 <= i < cfg.num_layers]
        if bad:
            raise ValueError(f"eagle feature_layers {layers}: the target has {cfg.num_layers} layers")
        return EagleConfig(cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                           intermediate_size or cfg.intermediate_size, cfg.rms_eps, cfg.rope_theta,
                           cfg.max_position, cfg.vocab_size, layers, cfg.num_layers, cfg.rope_scaling)

    def model_config(self) -> ModelConfig:
        """A one-layer ModelConfig with this head's attention shape (for the shared attention code)."""
        return ModelConfig(model_type="llama", vocab_size=self.target_vocab_size, hidden_size=self.hidden_size,
                           intermediate_size=self.intermediate_size, num_layers=1, num_heads=self.num_heads,
                           num_kv_heads=self.num_kv_heads, head_dim=self.head_dim, rms_eps=self.rms_eps,
                           rope_theta=self.rope_theta, rope_scaling=self.rope_scaling,
                           max_position=self.max_position, tie_embeddings=False)

    def check_fits(self, target: ModelConfig) -> None:
        """Raise ValueError naming the first mismatch between this head and `target`."""
        for name, mine, theirs in (("hidden_size", self.hidden_size, target.hidden_size),
                                   ("vocab_size", self.target_vocab_size, target.vocab_size),
                                   ("num_layers", self.target_layers, target.num_layers)):
            if mine != theirs:
                raise ValueError(f"eagle head does not fit the target: {name} is {mine} in the head, "
                                 f"{theirs} in the target")
        if max(self.feature_layers) >= target.num_layers:
            raise ValueError(f"eagle head reads layers {self.feature_layers}; the target has {target.num_layers}")


class EagleHead(nn.Module):
    """fc fusion + one decoder layer over [embedding; hidden] + final norm + head over the draft vocabulary."""

    def __init__(self, cfg: EagleConfig, vocab_ids: Tensor, embed: nn.Embedding, max_len: int | None = None):
        super().__init__()
        self.cfg = cfg
        d = cfg.hidden_size
        mc = cfg.model_config()
        self.embed = embed  # the target's, frozen and shared: never trained, never saved here
        self.feature_norms = (nn.ModuleList(RMSNorm(d, cfg.rms_eps) for _ in cfg.feature_layers)
                              if cfg.feature_norm else None)
        self.fc = nn.Linear(len(cfg.feature_layers) * d, d, bias=False)
        self.input_norm = RMSNorm(d, cfg.rms_eps)
        self.hidden_norm = RMSNorm(d, cfg.rms_eps)
        self.attn = Attention(mc)
        self.attn.qkv = nn.Linear(2 * d, self.attn.qkv.out_features, bias=False)
        self.post_norm = RMSNorm(d, cfg.rms_eps)
        self.mlp = GatedMLP(d, cfg.intermediate_size)
        self.norm = RMSNorm(d, cfg.rms_eps)
        self.lm_head = nn.Linear(d, vocab_ids.numel(), bias=False)
        self.register_buffer("vocab_ids", vocab_ids.to(torch.long).clone(), persistent=False)
        self.max_len = min(max_len or cfg.max_position, cfg.max_position)
        self.rotary = Rotary(mc, self.max_len)

    @property
    def draft_vocab(self) -> int:
        return self.vocab_ids.numel()

    def new_cache(self, num_slots: int, max_len: int | None = None) -> KVCache:
        c = self.cfg
        w = self.fc.weight
        return KVCache(1, num_slots, c.num_kv_heads, min(max_len or self.max_len, self.max_len), c.head_dim,
                       dtype=w.dtype, device=w.device)

    def fuse(self, features: Tensor) -> Tensor:
        """[..., F] target hidden states -> [..., D]: each layer's state normalized (unless
        `feature_norm` is off), then fused."""
        if self.feature_norms is None:
            return self.fc(features)
        parts = features.split(self.cfg.hidden_size, dim=-1)
        return self.fc(torch.cat([n(p) for n, p in zip(self.feature_norms, parts)], dim=-1))

    def layer_input(self, tokens: Tensor, hidden: Tensor) -> Tensor:
        """[B, N] next tokens and [B, N, D] hidden -> [B, N, 2D] what q/k/v read."""
        return torch.cat([self.input_norm(self.embed(tokens)), self.hidden_norm(hidden)], dim=-1)

    def block(self, hidden: Tensor, attn_out: Tensor) -> Tensor:
        """Residual over the hidden input, then the MLP: the layer's output hidden state [.., D]."""
        x = hidden + attn_out
        return x + self.mlp(self.post_norm(x))

    def logits(self, out: Tensor) -> Tensor:
        """[..., D] output hidden -> [..., Vd] draft logits (fp32)."""
        return self.lm_head(self.norm(out)).float()

    def full_logits(self, logits: Tensor) -> Tensor:
        """[..., Vd] -> [..., V]: -inf for target tokens outside the draft vocabulary."""
        out = logits.new_full(logits.shape[:-1] + (self.cfg.target_vocab_size,), float("-inf"))
        return out.index_copy_(-1, self.vocab_ids, logits)

    def forward(self, tokens: Tensor, hidden: Tensor, tree: TreeBatch, slots: list[int], cache: KVCache) -> Tensor:
        """One cached forward over new entries laid out as `tree`; returns output hidden [B, N, D].

        Keys/values are written after each slot's committed entries; commit them with `cache.commit`.
        """
        layout = step_layout(tree, slots, cache, self.rotary, self.fc.weight.dtype, None, self.fc.weight.device)
        x = self.layer_input(tokens, hidden)
        return self.block(hidden, self.attn(x, layout, cache.k[0], cache.v[0]))

    def cost_ratio(self, target: ModelConfig) -> float:
        """Multiply-adds of one draft step over one target token (weights only; fc is paid once per real entry)."""
        c = self.cfg
        attn = 2 * c.hidden_size * c.head_dim * (c.num_heads + 2 * c.num_kv_heads) + c.num_heads * c.head_dim * c.hidden_size
        mine = attn + 3 * c.hidden_size * c.intermediate_size + c.hidden_size * self.draft_vocab
        t_attn = target.hidden_size * target.head_dim * (2 * target.num_heads + 2 * target.num_kv_heads)
        t_ffn = 3 * target.hidden_size * (target.intermediate_size if not target.is_moe else
                                          target.top_k * target.moe_intermediate_size)
        return mine / (target.num_layers * (t_attn + t_ffn) + target.hidden_size * target.vocab_size)


def new_head(target_cfg: ModelConfig, embed: nn.Embedding, vocab_ids: Tensor, lm_head: Tensor | None = None,
             feature_layers: tuple[int, ...] | None = None,
             seed: int = 0, max_len: int | None = None, feature_norm: bool = True) -> EagleHead:
    """A fresh head: small random weights, the head rows copied from the target's when given.

    Starting the draft head from the target's own rows puts its output space where the target's is.
    `feature_norm=False` makes EAGLE-3's exact layer (exportable, drafters/eagle3_format.py).
    """
    cfg = dataclasses.replace(EagleConfig.for_target(target_cfg, feature_layers), feature_norm=feature_norm)
    g = torch.Generator().manual_seed(seed)
    head = EagleHead(cfg, vocab_ids, embed, max_len)
    with torch.no_grad():
        for name, p in head.named_parameters():
            if name.startswith("embed"):
                continue
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        # The layer's output projections start near zero: the output hidden starts as the fused input.
        head.attn.o_proj.weight.mul_(0.1)
        head.mlp.down.weight.mul_(0.1)
        if lm_head is not None:
            head.lm_head.weight.copy_(lm_head[vocab_ids])
    return head


def head_from_target(target, vocab_ids: Tensor, feature_layers: tuple[int, ...] | None = None, seed: int = 0,
                     max_len: int | None = None, feature_norm: bool = True) -> EagleHead:
    """`new_head` for a loaded LeanDecoder `target` (its embedding and head rows)."""
    return new_head(target.cfg, target.embed, vocab_ids, target.lm_head.weight.detach(), feature_layers, seed, max_len,
                    feature_norm)


# ---- checkpoints ----------------------------------------------------------------------------------
def save_eagle(head: EagleHead, folder: str | Path, version: str, extra: dict | None = None) -> str:
    """Write an eagle checkpoint folder; returns the sha256 of its weights file."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().contiguous() for k, v in head.state_dict().items()
          if not k.startswith("embed") and "rotary" not in k}
    save_file(sd, str(folder / "model.safetensors"))
    cfg = dataclasses.asdict(head.cfg)
    meta = {"format": EAGLE_FORMAT, "kind": "eagle", "version": version, "config": cfg,
            "vocab_ids": head.vocab_ids.tolist(), **(extra or {})}
    (folder / "eagle.json").write_text(json.dumps(meta))
    return hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()


def is_eagle_checkpoint(folder: str | Path) -> bool:
    return (Path(folder) / "eagle.json").is_file()


def load_eagle(folder: str | Path, target_cfg: ModelConfig, embed: nn.Embedding,
               max_len: int | None = None) -> tuple[EagleHead, str]:
    """Read a checkpoint written by `save_eagle`, checked against the target; returns the head and its version.

    A head whose hidden size, feature layers or vocabulary does not fit the target raises ValueError
    naming the mismatch; an unreadable folder raises CorruptModelError.
    """
    from safetensors.torch import load_file

    folder = Path(folder)
    try:
        meta = json.loads((folder / "eagle.json").read_text())
        raw = dict(meta["config"])
        raw["feature_layers"] = tuple(raw["feature_layers"])
        raw["rope_scaling"] = tuple(tuple(x) for x in raw["rope_scaling"]) if raw.get("rope_scaling") else None
        cfg = EagleConfig(**raw)
        vocab_ids = torch.tensor(meta["vocab_ids"], dtype=torch.long)
        sd = load_file(str(folder / "model.safetensors"))
    except (OSError, KeyError, TypeError, ValueError) as exc:
        raise CorruptModelError(f"cannot read the eagle checkpoint in {folder}: {exc}") from exc
    cfg.check_fits(target_cfg)
    if vocab_ids.numel() == 0 or int(vocab_ids.max()) >= target_cfg.vocab_size or int(vocab_ids.min()) < 0:
        raise ValueError(f"eagle head's draft vocabulary has ids outside the target's [0, {target_cfg.vocab_size})")
    head = EagleHead(cfg, vocab_ids, embed, max_len)
    missing, unexpected = head.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.startswith("embed") and "rotary" not in k]
    if missing or unexpected:
        raise CorruptModelError(f"eagle checkpoint {folder} does not fit its config: missing {missing[:3]}, "
                                f"unexpected {unexpected[:3]}")
    return head.eval(), str(meta["version"])


# ---- the drafter ----------------------------------------------------------------------------------
def check_tree_topk(k: int, name: str) -> None:
    """Draft shapes: 0 for chains, k >= 2 for trees (one child per node would be a chain drawn the slow way)."""
    if k < 0 or k == 1:
        raise ValueError(f"{name} must be 0 (chains) or >= 2, got {k}")


@dataclass
class _SeqState:
    slot: int
    pending_feats: list[Tensor]   # [n_i, F] target features not yet fed to the head
    pending_tokens: list[Tensor]  # [n_i] the token that followed each of them


class EagleDrafter:
    """Drafts chains from target features with an EagleHead; one head KV slot per running sequence."""

    name = "eagle"
    needs_topk = 0

    def __init__(self, head: EagleHead, version: str = "base", max_batch: int = 16, max_len: int = 2048,
                 budgets: tuple[int, ...] | None = None, min_confidence: float = 0.1,
                 cost_hint: float = 0.07, kernels: str = "default", tree_topk: int = 0, tree_beam: int = 4,
                 tree_min_prob: float = 0.02):
        from moe.kernels import apply

        self.head = head.eval()
        apply(head, kernels)  # a serving copy: the trainer keeps its own head on the default kernels
        self._version = version
        self.feature_layers = head.cfg.feature_layers
        self.min_confidence = min_confidence
        """A chain stops after a token whose draft probability is below this (the first token is always drafted)."""
        self.cost_hint = cost_hint
        check_tree_topk(tree_topk, "tree_topk")
        if tree_beam < 1 or not 0.0 <= tree_min_prob < 1.0:
            raise ValueError(f"eagle tree: tree_beam must be >= 1 and tree_min_prob in [0, 1); "
                             f"got {tree_beam}, {tree_min_prob}")
        self.tree_topk = tree_topk
        """0: chains. k >= 2: trees; each expanded node offers its k likeliest children (EAGLE-2's dynamic tree)."""
        self.tree_beam = tree_beam
        """Trees: at most this many nodes are expanded per depth, the likeliest by cumulative draft probability."""
        self.tree_min_prob = tree_min_prob
        """Trees: a node whose cumulative draft probability is below this is not expanded."""
        self.cache = head.new_cache(max_batch, max_len)
        self._seqs: dict[int, _SeqState] = {}
        self._budgets = budgets or ((2, 4, 6, 8, 12, 16) if tree_topk else (1, 2, 3, 4, 5, 6, 8))
        """Draft sizes the adaptive policy may choose (nodes: a tree holds more of them than a chain for a depth)."""

    @property
    def version(self) -> str:
        return self._version

    def budgets(self) -> tuple[int, ...]:
        return self._budgets

    # ---- what the target computed ------------------------------------------------------------------
    def _state(self, seq_id: int) -> _SeqState:
        st = self._seqs.get(seq_id)
        if st is None:
            st = self._seqs[seq_id] = _SeqState(self.cache.allocate(), [], [])
        return st

    def observe_prefill(self, prefills: list[Prefill]) -> None:
        """The prompt's features (all but its last token) and the tokens that followed them."""
        for p in prefills:
            st = self._state(p.seq_id)
            st.pending_feats.append(p.features)
            st.pending_tokens.append(p.next_tokens)

    def observe(self, feedback: list[Feedback]) -> None:
        """Features of the verified path (root, accepted nodes), each followed by the token emitted after it."""
        for fb in feedback:
            if fb.features is None:
                continue
            path = fb.verified.path
            st = self._state(fb.seq_id)
            st.pending_feats.append(fb.features[path])
            st.pending_tokens.append(torch.tensor(fb.verified.tokens[: len(path)], dtype=torch.long))

    def release(self, seq_id: int) -> None:
        st = self._seqs.pop(seq_id, None)
        if st is not None:
            self.cache.release(st.slot)

    # ---- proposing ---------------------------------------------------------------------------------
    def _catch_up(self, reqs: list[DraftRequest]) -> tuple[Tensor, list[int]]:
        """Feed every sequence's pending entries; returns the output hidden of each one's last entry [B, D]."""
        feats, toks, slots = [], [], []
        for r in reqs:
            st = self._seqs[r.seq_id]
            feats.append(torch.cat(st.pending_feats))
            toks.append(torch.cat(st.pending_tokens))
            st.pending_feats, st.pending_tokens = [], []
            slots.append(st.slot)
        n = max(t.numel() for t in toks)
        d = self.head.cfg.hidden_size
        tok = torch.zeros(len(reqs), n, dtype=torch.long)
        fea = torch.zeros(len(reqs), n, feats[0].shape[-1], dtype=feats[0].dtype)
        for b, (f, t) in enumerate(zip(feats, toks)):
            tok[b, : t.numel()] = t
            fea[b, : t.numel()] = f
        dev = self.head.fc.weight.device
        tree = TreeBatch.chains([t.tolist() for t in toks])
        out = self.head(tok.to(dev), self.head.fuse(fea.to(dev, self.head.fc.weight.dtype)), tree, slots, self.cache)
        self.cache.commit(slots, [list(range(t.numel())) for t in toks])
        last = torch.tensor([t.numel() - 1 for t in toks])
        assert out.shape[-1] == d
        return out[torch.arange(len(reqs)), last.to(dev)], slots

    def _pick(self, logits: Tensor, r: DraftRequest) -> tuple[int, float, Tensor | None]:
        """(next draft token as a target id, its draft probability, the law q over [V] it was drawn from or None).

        Greedy requests take the argmax of the draft vocabulary: no full-vocabulary row is built.
        """
        if r.params.greedy:
            conf, idx = logits.softmax(-1).max(-1)
            return int(self.head.vocab_ids[idx]), float(conf), None  # host sync: the token feeds the next step
        q = probs_from_logits(self.head.full_logits(logits), r.params)
        tok = int(torch.multinomial(q, 1, generator=r.generator))
        return tok, float(q[tok]), q

    @torch.inference_mode()
    def propose(self, requests: list[DraftRequest]) -> list[Draft]:
        drafts = [Draft.empty() for _ in requests]
        active = [i for i, r in enumerate(requests) if r.budget > 0 and r.seq_id in self._seqs
                  and self._seqs[r.seq_id].pending_tokens]
        if not active:
            return drafts
        reqs = [requests[i] for i in active]
        hidden, slots = self._catch_up(reqs)                             # [B, D]
        if self.tree_topk:
            for i, d in zip(active, self._trees(reqs, hidden, slots)):
                drafts[i] = d
            return drafts
        real_lens = [int(self.cache.lens[s]) for s in slots]  # host sync: restored after drafting
        toks: list[list[int]] = [[] for _ in reqs]
        laws: list[list[Tensor]] = [[] for _ in reqs]
        live = list(range(len(reqs)))
        try:
            while True:
                logits = self.head.logits(hidden)                          # [b, Vd]
                still = []
                for j, i in enumerate(live):
                    r = reqs[i]
                    tok, conf, q = self._pick(logits[j], r)
                    if q is not None:
                        laws[i].append(q)
                    toks[i].append(tok)
                    if len(toks[i]) < r.budget and conf >= self.min_confidence:
                        still.append((j, i))
                if not still:
                    break
                live = [i for _, i in still]
                rows = torch.tensor([j for j, _ in still])
                step_slots = [slots[i] for i in live]
                new = torch.tensor([[toks[i][-1]] for i in live])
                out = self.head(new.to(hidden.device), hidden[rows.to(hidden.device)][:, None],
                                TreeBatch.chains([[toks[i][-1]] for i in live]), step_slots, self.cache)
                self.cache.commit(step_slots, [[0]] * len(live))
                hidden = out[:, 0]
        finally:
            for s, n in zip(slots, real_lens):
                self.cache.truncate(s, n)  # draft-step entries are guesses: only target-backed ones stay
        for j, i in enumerate(active):
            q = None
            if laws[j]:
                # Row n (after the last token) is never read: that node has no children.
                q = torch.stack(laws[j] + [torch.zeros_like(laws[j][0])])
            drafts[i] = Draft.chain(toks[j], q)
        return drafts

    def _trees(self, reqs: list[DraftRequest], hidden: Tensor, slots: list[int]) -> list[Draft]:
        """EAGLE-2's dynamic trees: expand the likeliest nodes depth by depth, keep the `budget` likeliest.

        A node's value is its cumulative draft probability, which tracks how likely the target is to
        accept it; a child is never likelier than its parent, so the `budget` likeliest nodes form a
        tree. Each depth runs the head once over every node expanded so far (tree attention in the
        head's cache, above the committed entries, never committed). The trees are deterministic
        (q = None): sampled requests are verified by target-only recursive rejection, still exact.
        """
        k = self.tree_topk
        vocab = self.head.vocab_ids
        # Per request: candidate nodes (target token, parent node or -1, log-probability, depth) ...
        nodes: list[list[tuple[int, int, float, int]]] = [[] for _ in reqs]
        expanded: list[list[int]] = [[] for _ in reqs]  # ... and the nodes fed to the head, in feeding order
        outs: list[dict[int, Tensor]] = [{} for _ in reqs]  # expanded node -> the head's output hidden [D]

        def offer(logits: Tensor, parents: list[tuple[int, int]]) -> None:
            """Children of each row's (request, node) from the head's logits [rows, Vd] (node -1: the root)."""
            lp, idx = logits.log_softmax(-1).topk(min(k, logits.shape[-1]), dim=-1)   # [rows, k]
            lp, toks = lp.tolist(), vocab[idx].tolist()  # host sync: the tree is built on the host
            for (i, n), ps, ts in zip(parents, lp, toks):
                base, depth = (0.0, 1) if n < 0 else (nodes[i][n][2], nodes[i][n][3] + 1)
                nodes[i].extend((t, n, base + p, depth) for p, t in zip(ps, ts))

        offer(self.head.logits(hidden), [(i, -1) for i in range(len(reqs))])
        floor = math.log(self.tree_min_prob) if self.tree_min_prob > 0 else -math.inf
        for depth in range(1, max(r.budget for r in reqs)):
            live, picks = [], []  # picks: (batch row, request, node, index in the head's tree)
            for i, r in enumerate(reqs):
                if depth >= r.budget:
                    continue
                frontier = [n for n, (_, _, p, d) in enumerate(nodes[i]) if d == depth and p >= floor]
                frontier = sorted(frontier, key=lambda n: -nodes[i][n][2])[: self.tree_beam]
                if frontier:
                    picks += [(len(live), i, n, len(expanded[i]) + c) for c, n in enumerate(frontier)]
                    live.append(i)
                    expanded[i].extend(frontier)
            if not live:
                break
            toks, pars, ins = [], [], []
            for i in live:
                where = {n: j for j, n in enumerate(expanded[i])}
                toks.append([nodes[i][n][0] for n in expanded[i]])
                pars.append([where.get(nodes[i][n][1], -1) for n in expanded[i]])
                ins.append(torch.stack([hidden[i] if nodes[i][n][1] < 0 else outs[i][nodes[i][n][1]]
                                        for n in expanded[i]]))
            x = torch.zeros(len(live), max(len(t) for t in toks), hidden.shape[-1], dtype=hidden.dtype,
                            device=hidden.device)
            for b, h in enumerate(ins):
                x[b, : h.shape[0]] = h
            tree = TreeBatch.from_lists(toks, pars)
            out = self.head(tree.tokens.to(hidden.device), x, tree, [slots[i] for i in live], self.cache)
            sel = out[[b for b, _, _, _ in picks], [j for _, _, _, j in picks]]      # [rows, D]
            for row, (_, i, n, _) in enumerate(picks):
                outs[i][n] = sel[row]
            offer(self.head.logits(sel), [(i, n) for _, i, n, _ in picks])
        return [_best_tree(nodes[i], r.budget) for i, r in enumerate(reqs)]


def serving_drafter(head: EagleHead, version: str, target, max_batch: int, max_len: int,
                    min_confidence: float = 0.1, tree_topk: int = 0) -> "EagleDrafter":
    """An EagleDrafter for `head` beside the loaded `target`: on its device, on the kernels it runs,
    priced by the two models' shapes (the registry, a replica's hot swap and the benches build it so)."""
    from moe.kernels import running

    head.to(target.embed.weight.device)
    return EagleDrafter(head, version, max_batch=max_batch, max_len=max_len, kernels=running(target),
                        min_confidence=min_confidence, cost_hint=head.cost_ratio(target.cfg), tree_topk=tree_topk)


def _best_tree(nodes: list[tuple[int, int, float, int]], budget: int) -> Draft:
    """The `budget` likeliest nodes (ties to the shallower, then the earlier), as a draft in creation order."""
    keep = sorted(sorted(range(len(nodes)), key=lambda n: (-nodes[n][2], nodes[n][3], n))[:budget])
    where = {n: j for j, n in enumerate(keep)}
    return Draft(torch.tensor([nodes[n][0] for n in keep], dtype=torch.long),
                 torch.tensor([where[nodes[n][1]] if nodes[n][1] >= 0 else -1 for n in keep], dtype=torch.long))


def draft_vocab_from_counts(counts: Tensor, size: int) -> Tensor:
    """The `size` most frequent token ids (ties to the lower id), sorted by id: the d2t map of a draft head."""
    size = min(size, counts.numel())
    order = torch.argsort(-counts.to(torch.float64) + torch.arange(counts.numel()) * 1e-12, stable=True)
    return order[:size].sort().values


def soft_xent(student_logits: Tensor, teacher_probs: Tensor, weights: Tensor) -> Tensor:
    """Weighted mean over rows of -sum p_teacher log softmax(student): [N, C], [N, C], [N] -> scalar."""
    per_row = -(teacher_probs * F.log_softmax(student_logits.float(), dim=-1)).sum(-1)
    total = weights.sum()
    if float(total) <= 0:  # host sync: decides the empty case once per batch
        return (per_row * 0.0).sum()
    return (per_row * weights).sum() / total
