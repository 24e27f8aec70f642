"""The draft LM: a small decoder with the target's tokenizer and its own KV cache (the drafter OSD distills).

B sequences, n draft nodes, V target vocabulary, Vd draft head rows (V, or fewer with a reduced head),
D hidden, L draft layers.
By default it is cut from the target: its embeddings, its first L layers, its final norm and head.
A reduced head keeps only the rows of frequent tokens, which makes drafting cheaper; drafts then
never propose other tokens, which costs acceptance, never correctness. Checkpoints are a folder
with `draft.json` (config, head rows, version) and `model.safetensors`, so [trainer] can write
new versions and replicas can load and swap them while serving.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

from drafters.base import DraftRequest, Feedback, Prefill
from drafters.trees import Beam, beam_children, gumbel_topk, topk_children
from drafters.verify import Draft
from moe.config import ModelConfig
from moe.errors import CorruptModelError
from moe.generate import SamplingParams, probs_from_logits
from moe.loader import convert_state_dict, read_config, read_weights, resolve_model
from moe.model import LeanDecoder
from moe.tree import TreeBatch

TreeMode = Literal["chain", "topk", "gumbel", "beam"]


class DraftModel(nn.Module):
    """A LeanDecoder whose head may cover only `vocab_ids`; `full_logits` maps back to the whole vocabulary."""

    def __init__(self, cfg: ModelConfig, vocab_ids: Tensor | None = None, max_len: int | None = None):
        super().__init__()
        self.decoder = LeanDecoder(cfg, max_len=max_len)
        self.register_buffer("vocab_ids", vocab_ids if vocab_ids is not None else torch.zeros(0, dtype=torch.long),
                             persistent=False)
        if vocab_ids is not None:
            self.decoder.lm_head = nn.Linear(cfg.hidden_size, vocab_ids.shape[0], bias=False)

    @property
    def cfg(self) -> ModelConfig:
        return self.decoder.cfg

    @property
    def reduced(self) -> bool:
        return self.vocab_ids.numel() > 0

    def full_logits(self, logits: Tensor) -> Tensor:
        """[..., Vd] head logits -> [..., V], -inf for tokens the head does not cover."""
        if not self.reduced:
            return logits
        out = logits.new_full(logits.shape[:-1] + (self.cfg.vocab_size,), float("-inf"))
        return out.index_copy_(-1, self.vocab_ids, logits)

    def cost_ratio(self, target_cfg: ModelConfig) -> float:
        """Multiply-adds of one draft token over one target token (weights only, short contexts)."""
        def per_token(cfg: ModelConfig, head_rows: int) -> float:
            attn = cfg.hidden_size * cfg.head_dim * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)
            ffn = 3 * cfg.hidden_size * (cfg.intermediate_size if not cfg.is_moe else
                                         cfg.top_k * cfg.moe_intermediate_size)
            return cfg.num_layers * (attn + ffn) + cfg.hidden_size * head_rows
        rows = self.vocab_ids.numel() if self.reduced else self.cfg.vocab_size
        return per_token(self.cfg, rows) / per_token(target_cfg, target_cfg.vocab_size)


def draft_from_target(target_spec: str, num_layers: int | tuple[int, ...] = 4, vocab_ids: Tensor | None = None,
                      max_len: int | None = None) -> DraftModel:
    """A draft model cut from a target checkpoint: embeddings, some of its layers, final norm, head.

    `num_layers` = n keeps the first n layers; a tuple keeps those layer indices, in order
    (e.g. the first and last few, skipping the middle).
    """
    folder = resolve_model(target_spec)
    tcfg, _ = read_config(folder)
    layers = tuple(range(num_layers)) if isinstance(num_layers, int) else tuple(num_layers)
    if not layers or min(layers) < 0 or max(layers) >= tcfg.num_layers:
        raise ValueError(f"draft layers must be within [0, {tcfg.num_layers}), got {num_layers}")
    cfg = dataclasses.replace(tcfg, num_layers=len(layers),
                              tie_embeddings=tcfg.tie_embeddings and vocab_ids is None,
                              sparse_layers=tuple(i for i, src in enumerate(layers) if src in tcfg.sparse_layers))
    hf = read_weights(folder)
    renamed = {}
    for key, value in hf.items():
        parts = key.split(".")
        if "layers" in parts:
            at = parts.index("layers") + 1
            src = int(parts[at])
            if src not in layers:
                continue
            parts[at] = str(layers.index(src))
        renamed[".".join(parts)] = value
    hf.clear()
    sd = convert_state_dict(cfg, renamed)
    if vocab_ids is not None:
        head = sd.get("lm_head.weight", sd["embed.weight"])
        sd["lm_head.weight"] = head[vocab_ids].clone()
    elif cfg.tie_embeddings:
        sd.pop("lm_head.weight", None)
    model = DraftModel(cfg, vocab_ids, max_len)
    model.decoder.load_state_dict(sd, strict=False)
    if cfg.tie_embeddings:
        model.decoder.lm_head.weight = model.decoder.embed.weight
    return model.eval()


def save_draft(model: DraftModel, folder: str | Path, version: str) -> str:
    """Write a draft checkpoint; returns the sha256 of its weights file."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().contiguous() for k, v in model.decoder.state_dict().items() if "rotary" not in k}
    if model.cfg.tie_embeddings:
        sd.pop("lm_head.weight", None)
    save_file(sd, str(folder / "model.safetensors"))
    meta = {"version": version, "config": dataclasses.asdict(model.cfg),
            "vocab_ids": model.vocab_ids.tolist() if model.reduced else None}
    (folder / "draft.json").write_text(json.dumps(meta))
    return hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()


def load_draft(folder: str | Path, max_len: int | None = None) -> tuple[DraftModel, str]:
    """Read a checkpoint written by `save_draft`; returns the model and its version."""
    from safetensors.torch import load_file

    folder = Path(folder)
    try:
        meta = json.loads((folder / "draft.json").read_text())
        raw = meta["config"]
        raw["rope_scaling"] = tuple(tuple(x) for x in raw["rope_scaling"]) if raw.get("rope_scaling") else None
        raw["sparse_layers"] = tuple(raw.get("sparse_layers") or ())
        cfg = ModelConfig(**raw)
        sd = load_file(str(folder / "model.safetensors"))
    except (OSError, KeyError, TypeError, ValueError) as exc:
        raise CorruptModelError(f"cannot read the draft checkpoint in {folder}: {exc}") from exc
    vocab = torch.tensor(meta["vocab_ids"], dtype=torch.long) if meta.get("vocab_ids") else None
    model = DraftModel(cfg, vocab, max_len)
    missing, unexpected = model.decoder.load_state_dict(sd, strict=False)
    missing = [k for k in missing if "rotary" not in k and not (cfg.tie_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise CorruptModelError(f"draft checkpoint {folder} does not fit its config: missing {missing[:3]}, "
                                f"unexpected {unexpected[:3]}")
    if cfg.tie_embeddings:
        model.decoder.lm_head.weight = model.decoder.embed.weight
    return model.eval(), str(meta["version"])


class DraftLMDrafter:
    """Proposes chains or trees with a draft model, keeping each sequence's context in its own cache."""

    name = "draft-lm"
    needs_topk = 0
    feature_layers = ()

    def __init__(self, model: DraftModel, version: str = "base", mode: TreeMode = "chain",
                 branching: tuple[int, ...] = (2, 2, 1, 1), beam_width: int = 4, max_batch: int = 16,
                 max_len: int = 2048, cost_hint: float = 0.25, budgets: tuple[int, ...] | None = None,
                 kernels: str = "auto"):
        if mode not in ("chain", "topk", "gumbel", "beam"):
            raise ValueError(f"mode must be chain, topk, gumbel or beam, got {mode!r}")
        from moe.kernels import choose
        from moe.loader import kernel_cache

        # Serving copy only: the trainer keeps its own on the default kernels (autograd runs there).
        self.kernels = choose(model, kernels, kernel_cache(), timed=model.decoder)
        self.model = model
        self._version = version
        self.mode = mode
        self.branching, self.beam_width = branching, beam_width
        self.cost_hint = cost_hint
        self.cache = model.decoder.new_cache(max_batch, max_len)
        self._slots: dict[int, int] = {}
        self._cached: dict[int, list[int]] = {}  # tokens whose keys/values sit in the slot, in order
        if budgets is None:
            budgets = (1, 2, 3, 4, 6, 8) if mode == "chain" else (2, 4, 8, 12, 16)
        self._budgets = budgets

    @property
    def version(self) -> str:
        return self._version

    def budgets(self) -> tuple[int, ...]:
        return self._budgets

    # ---- per-sequence cache bookkeeping -----------------------------------------------------------
    def _catch_up(self, requests: list[DraftRequest]) -> Tensor:
        """Feed each sequence's tokens the cache lacks; returns the draft logits after the root [B, Vd]."""
        chains, slots = [], []
        for r in requests:
            if r.seq_id not in self._slots:
                self._slots[r.seq_id] = self.cache.allocate()
                self._cached[r.seq_id] = []
            slot, cached = self._slots[r.seq_id], self._cached[r.seq_id]
            keep = 0
            for a, b in zip(cached, r.history):
                if a != b:
                    break
                keep += 1
            keep = min(keep, len(r.history) - 1)  # the root is always fed, for its logits
            self.cache.truncate(slot, keep)
            del cached[keep:]
            chains.append(r.history[keep:])
            slots.append(slot)
        logits = self.model.decoder(TreeBatch.chains(chains), slots, self.cache, logits_for="last")
        self.cache.commit(slots, [list(range(len(c))) for c in chains])
        for r, c in zip(requests, chains):
            self._cached[r.seq_id].extend(c)
        return logits

    def _law(self, logits: Tensor, params: SamplingParams) -> tuple[Tensor, Tensor | None]:
        """(log-law over V used to pick children, the law verification needs or None if deterministic)."""
        full = self.model.full_logits(logits.float())
        if params.greedy:
            return full, None
        probs = probs_from_logits(full, params)
        return probs.log(), probs

    # ---- proposing ------------------------------------------------------------------------------------
    @torch.inference_mode()
    def propose(self, requests: list[DraftRequest]) -> list[Draft]:
        drafts = [Draft.empty() for _ in requests]
        active = [i for i, r in enumerate(requests) if r.budget > 0]
        if not active:
            return drafts
        reqs = [requests[i] for i in active]
        root_logits = self._catch_up(reqs)
        build = self._chains if self.mode == "chain" else self._trees
        for i, d in zip(active, build(reqs, root_logits)):
            drafts[i] = d
        return drafts

    def _chains(self, reqs: list[DraftRequest], logits: Tensor) -> list[Draft]:
        """Each draft token is fed back through the draft model (and kept in its cache) to get the next."""
        toks: list[list[int]] = [[] for _ in reqs]
        laws: list[list[Tensor]] = [[] for _ in reqs]
        live = list(range(len(reqs)))
        while live:
            for j, i in enumerate(live):
                r = reqs[i]
                logq, q = self._law(logits[j], r.params)
                tok = int(logq.argmax()) if q is None else int(torch.multinomial(q, 1, generator=r.generator))
                toks[i].append(tok)
                if q is not None:
                    laws[i].append(q)
            live = [i for i in live if len(toks[i]) < reqs[i].budget]
            if not live:
                break
            slots = [self._slots[reqs[i].seq_id] for i in live]
            logits = self.model.decoder(TreeBatch.chains([[toks[i][-1]] for i in live]), slots, self.cache,
                                        logits_for="last")
            self.cache.commit(slots, [[0]] * len(live))
            for i in live:
                self._cached[reqs[i].seq_id].append(toks[i][-1])
        out = []
        for i, r in enumerate(reqs):
            q = None
            if laws[i]:
                # Row n (after the last token) is never used: that node has no children.
                q = torch.stack(laws[i] + [torch.zeros_like(laws[i][0])])
            out.append(Draft.chain(toks[i], q))
        return out

    def _trees(self, reqs: list[DraftRequest], root_logits: Tensor) -> list[Draft]:
        """Level by level: pick children of the newest nodes, then one draft forward over each tree so far."""
        tokens: list[list[int]] = [[] for _ in reqs]
        parents: list[list[int]] = [[] for _ in reqs]
        laws: list[list[Tensor | None]] = [[] for _ in reqs]  # law at the root, then at each node
        logq_new: list[list[tuple[int, Tensor]]] = []          # per request: (node, log-law) to expand
        beams: list[list[Beam]] = [[Beam(-1, 0.0, 0.0)] for _ in reqs]
        for j, r in enumerate(reqs):
            logq, q = self._law(root_logits[j], r.params)
            laws[j].append(q)
            logq_new.append([(-1, logq)])
        depth = len(self.branching) if self.mode != "beam" else max(1, max(r.budget for r in reqs) // self.beam_width)
        for level in range(depth):
            new_nodes: list[list[int]] = []
            for j, r in enumerate(reqs):
                added = self._expand(j, r, level, tokens, parents, logq_new[j], beams)
                new_nodes.append(added)
            if level == depth - 1 or not any(new_nodes):
                break
            # Draft laws at the new nodes: one forward over every tree built so far (nothing committed).
            grow = [j for j in range(len(reqs)) if new_nodes[j]]
            tree = TreeBatch.from_lists([tokens[j] for j in grow], [parents[j] for j in grow])
            logits = self.model.decoder(tree, [self._slots[reqs[j].seq_id] for j in grow], self.cache)
            for j in range(len(reqs)):
                logq_new[j] = []
            for row, j in enumerate(grow):
                for node in new_nodes[j]:
                    logq, q = self._law(logits[row, node], reqs[j].params)
                    logq_new[j].append((node, logq))
                    while len(laws[j]) < node + 2:
                        laws[j].append(None)
                    laws[j][node + 1] = q
        out = []
        for j, r in enumerate(reqs):
            n = len(tokens[j])
            q = None
            if r.params.temperature > 0 and self.mode == "gumbel":
                ref = laws[j][0]
                rows = [laws[j][i] if i < len(laws[j]) and laws[j][i] is not None else torch.zeros_like(ref)
                        for i in range(n + 1)]
                q = torch.stack(rows)
            out.append(Draft(torch.tensor(tokens[j], dtype=torch.long), torch.tensor(parents[j], dtype=torch.long), q)
                       if n else Draft.empty())
        return out

    def _expand(self, j: int, r: DraftRequest, level: int, tokens: list[list[int]], parents: list[list[int]],
                frontier: list[tuple[int, Tensor]], beams: list[list[Beam]]) -> list[int]:
        """Add one level of children under `frontier` within the budget; returns the new node indices."""
        added: list[int] = []
        room = r.budget - len(tokens[j])
        if room <= 0 or not frontier:
            return added
        if self.mode == "beam":
            by_node = {b.node: b for b in beams[j]}
            live = [by_node[node] for node, _ in frontier if node in by_node]
            picks = beam_children(live, [lq for node, lq in frontier if node in by_node],
                                  min(self.beam_width, room), r.generator)
            beams[j] = []
            for i, tok, child in picks:
                child.node = len(tokens[j])
                tokens[j].append(tok)
                parents[j].append(live[i].node)
                beams[j].append(child)
                added.append(child.node)
            return added
        b = self.branching[level]
        for node, logq in frontier:
            if room <= 0:
                break
            k = min(b, room)
            kids = topk_children(logq, k) if (self.mode == "topk" or r.params.greedy) else gumbel_topk(logq, k, r.generator)
            for tok in kids.tolist():
                tokens[j].append(tok)
                parents[j].append(node)
                added.append(len(tokens[j]) - 1)
            room -= len(kids)
        return added

    def observe(self, feedback: list[Feedback]) -> None:
        pass

    def observe_prefill(self, prefills: list[Prefill]) -> None:
        pass

    def release(self, seq_id: int) -> None:
        slot = self._slots.pop(seq_id, None)
        self._cached.pop(seq_id, None)
        if slot is not None:
            self.cache.release(slot)
