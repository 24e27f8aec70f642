"""The speculative decoding engine: a synchronous step loop over a batch of running sequences, no I/O.

B running sequences, N tree width (root + draft nodes, padded), V vocabulary, k logged top-k.
One `step()`: abort what was cancelled, admit waiting requests (prefill), draft for every running
sequence, run ONE batched target forward over all their trees, verify each tree, commit the
accepted paths to the KV cache, emit tokens and finish sequences on EOS, stop strings or length.
Requests join and leave between steps. Threads, queues, HTTP and Kafka live in wrappers around it.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from drafters.base import Drafter, DraftRequest, Feedback, Prefill
from drafters.verify import Draft, Verified, verify
from moe.errors import ContextTooLongError
from moe.generate import SamplingParams
from moe.model import LeanDecoder, TreeOutput, rows_computed
from moe.tree import TreeBatch
from serving.adaptive import AdaptivePolicy


@dataclass(frozen=True)
class EngineConfig:
    """How the engine batches and speculates."""

    max_batch: int = 16
    """Sequences decoded together (KV cache slots)."""
    max_len: int = 2048
    """Positions per sequence, prompt included; capped by the model's context."""
    speculation: str | int = "adaptive"
    """"adaptive" picks the draft size each step; an int fixes it (0 = plain decoding)."""
    topk_log: int = 8
    """Target top-k ids and log-probabilities kept per output position (0 = none)."""
    explore_every: int = 16
    """Adaptive mode: every this many steps one step probes another affordable draft size, in turn."""
    calibrate: bool = True
    """Adaptive mode: time target forwards of a few widths at start-up to seed the cost model."""
    prefill_chunk: int = 128
    """Prompt tokens prefilled per step while other sequences decode: a long prompt is prefilled in
    chunks interleaved with their decode steps, so their inter-token latency stays even. With
    nothing decoding, prompts go in by forwards of this many tokens. 0: always whole."""
    prefill_stall: float = 1.5
    """While sequences decode, a prompt chunk rides in their step's own forward (vLLM's mixed
    batches), sized from the measured cost curve so that the step is predicted to take at most this
    multiple of the step without it (at least `MIN_RIDE` tokens, at most prefill_chunk). 0: chunks of
    prefill_chunk run as forwards of their own before the step, which then waits for them."""

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {self.max_batch}")
        if self.max_len < 2:
            raise ValueError(f"max_len must be >= 2, got {self.max_len}")
        if self.speculation != "adaptive" and not (isinstance(self.speculation, int) and self.speculation >= 0):
            raise ValueError(f"speculation must be 'adaptive' or an int >= 0, got {self.speculation!r}")
        if self.topk_log < 0:
            raise ValueError(f"topk_log must be >= 0, got {self.topk_log}")
        if self.prefill_chunk < 0:
            raise ValueError(f"prefill_chunk must be >= 0, got {self.prefill_chunk}")
        if self.prefill_stall != 0 and self.prefill_stall <= 1:
            raise ValueError(f"prefill_stall must be 0 (off) or > 1, got {self.prefill_stall}")


MIN_RIDE = 8
"""Prompt tokens a decode step carries at least while a prompt waits (so it always progresses)."""


@dataclass(frozen=True)
class Request:
    """A generation request as the engine sees it: token ids in, sampling parameters, stop strings."""

    request_id: str
    prompt_ids: tuple[int, ...]
    params: SamplingParams = SamplingParams()
    stop: tuple[str, ...] = ()
    """Finish when the output text contains one of these (needs the engine's detokenizer)."""
    domain: str | None = None
    """Traffic label (e.g. "sharegpt", "humaneval") carried into the step records."""
    speculate: bool = True
    """False: decoded without drafts, whatever the engine's speculation (a baseline beside the rest)."""


@dataclass(frozen=True)
class StepRecord:
    """One engine step of one sequence."""

    proposed: int          # draft nodes the target verified
    accepted: int          # draft tokens accepted; the step emitted accepted + 1 tokens (fewer at the end)
    drafter: str
    drafter_version: str


@dataclass(frozen=True)
class FinishedRequest:
    """Everything a finished request leaves behind: output, per-step records, the target's top-k."""

    request_id: str
    prompt_ids: tuple[int, ...]
    output_ids: tuple[int, ...]
    params: SamplingParams
    domain: str | None
    finish_reason: str     # "stop" (EOS or stop string), "length" or "abort"
    steps: tuple[StepRecord, ...]
    topk_ids: Tensor       # [T, k] int32: target's top-k after each output position's context
    topk_logprobs: Tensor  # [T, k] float32: their log-probabilities at temperature 1
    ttft_s: float
    total_s: float

    @property
    def draft_tokens(self) -> int:
        return sum(s.proposed for s in self.steps)

    @property
    def accepted_tokens(self) -> int:
        return sum(s.accepted for s in self.steps)

    @property
    def mean_accepted_length(self) -> float:
        """Tokens emitted per target forward, the bonus token included (plain decoding: 1.0)."""
        return len(self.output_ids) / max(len(self.steps), 1)


@dataclass(frozen=True)
class RequestOutput:
    """What one step produced for one request."""

    request_id: str
    new_tokens: list[int]
    finished: FinishedRequest | None = None


@dataclass
class _Sequence:
    request: Request
    seq_id: int
    slot: int
    history: list[int]
    generator: torch.Generator
    limit: int                   # output tokens allowed (max_new_tokens capped by the context)
    arrived: float
    first_token: float | None = None
    steps: list[StepRecord] = field(default_factory=list)
    topk_ids: list[Tensor] = field(default_factory=list)
    topk_logprobs: list[Tensor] = field(default_factory=list)
    finish_reason: str | None = None
    prefilled: int = 0           # prompt tokens whose keys/values are in the cache

    @property
    def ready(self) -> bool:
        """Prefilled up to the last prompt token, the root of its first draft tree."""
        return self.prefilled >= len(self.request.prompt_ids) - 1

    @property
    def emitted(self) -> int:
        return len(self.history) - len(self.request.prompt_ids)


@dataclass
class EngineStats:
    """Counters the serving layer turns into metrics; the engine only adds to them."""

    steps: int = 0
    prefill_forwards: int = 0
    prefill_tokens: int = 0
    draft_tokens: int = 0
    accepted_tokens: int = 0
    emitted_tokens: int = 0
    accepted_per_position: list[int] = field(default_factory=list)  # [i]: steps that accepted > i tokens
    target_seconds: float = 0.0
    draft_seconds: float = 0.0
    finished: int = 0


def _prefill_groups(chunks: list[tuple[_Sequence, int]]) -> list[list[tuple[_Sequence, int]]]:
    """(sequence, tokens to prefill) of similar sizes prefilled together, so padding stays under half the work."""
    groups: list[list[tuple[_Sequence, int]]] = []
    for chunk in sorted(chunks, key=lambda c: c[1]):
        group = groups[-1] if groups else None
        if group is not None:
            widest = chunk[1]
            real = sum(n for _, n in group) + widest
            if widest * (len(group) + 1) <= 1.5 * real + 32:
                group.append(chunk)
                continue
        groups.append([chunk])
    return groups


def _chunks(pending: list[_Sequence], limit: int | None, budget: int | None) -> list[tuple[_Sequence, int]]:
    """(sequence, prompt tokens to prefill now), oldest request first: at most `limit` tokens each and
    `budget` in all (None: no bound)."""
    chunks = []
    for s in pending:  # insertion order: oldest first
        n = len(s.request.prompt_ids) - 1 - s.prefilled
        if limit is not None:
            n = min(n, limit if budget is None else budget)
        if budget is not None:
            budget -= n
        if n > 0:
            chunks.append((s, n))
        if budget == 0:
            break
    return chunks


def _estimator(drafter: Drafter):
    """The drafter itself when it estimates its own acceptance (the controller), else None."""
    return drafter if all(hasattr(drafter, m) for m in ("estimate", "expected_size", "price_rows")) else None


class Engine:
    """Continuous batching with speculative decoding over one target and one (swappable) drafter."""

    def __init__(self, target: LeanDecoder, drafter: Drafter, cfg: EngineConfig = EngineConfig(),
                 eos_ids: set[int] | frozenset[int] = frozenset(),
                 detokenize: Callable[[list[int]], str] | None = None):
        self.target = target
        self.cfg = cfg
        self.max_len = min(cfg.max_len, target.max_len)
        self.cache = target.new_cache(cfg.max_batch, self.max_len)
        self.eos_ids = frozenset(eos_ids)
        self.detokenize = detokenize
        self.drafter = drafter
        self.policy = AdaptivePolicy(drafter.budgets(), getattr(drafter, "cost_hint", 0.0),
                                     explore_every=cfg.explore_every, estimator=_estimator(drafter))
        self.stats = EngineStats()
        self.waiting: deque[Request] = deque()
        self.running: dict[int, _Sequence] = {}
        self._aborted: set[str] = set()
        self._next_seq = 0
        if cfg.speculation == "adaptive" and cfg.calibrate:
            self.calibrate()

    def calibrate(self, context: int = 128, repeats: int = 2) -> None:
        """Seed the adaptive policy's cost model: time forwards of 1, 2, 4, ... tokens after a dummy context."""
        widest = (1 + max(self.drafter.budgets(), default=0)) * self.cfg.max_batch
        context = min(context, self.max_len // 2)
        slot = self.cache.allocate()
        try:
            self.target(TreeBatch.chains([[0] * context]), [slot], self.cache, logits_for="last")
            self.cache.commit([slot], [list(range(context))])
            width = 1
            while width <= min(widest, 256, self.max_len - context):
                tree = TreeBatch.chains([[0] * width])
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    self.target(tree, [slot], self.cache)
                    self.policy.target_cost.observe(width, time.perf_counter() - t0)
                width *= 2
        finally:
            self.cache.release(slot)

    # ---- requests in and out -------------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        """Queue a request; it is admitted at the start of a step when a slot is free."""
        if not request.prompt_ids:
            raise ValueError(f"request {request.request_id}: the prompt is empty")
        if len(request.prompt_ids) >= self.max_len:
            raise ContextTooLongError(
                f"request {request.request_id}: prompt has {len(request.prompt_ids)} tokens, "
                f"the context holds {self.max_len}")
        vocab = self.target.cfg.vocab_size
        if min(request.prompt_ids) < 0 or max(request.prompt_ids) >= vocab:
            raise ValueError(f"request {request.request_id}: token ids must be in [0, {vocab})")
        if request.stop and self.detokenize is None:
            raise ValueError("stop strings need an engine built with a detokenizer")
        self.waiting.append(request)

    def abort(self, request_id: str) -> None:
        """Cancel a waiting or running request; it finishes with reason "abort" at the next step."""
        self._aborted.add(request_id)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def set_drafter(self, drafter: Drafter) -> None:
        """Swap the drafter between two steps; running sequences continue with the new one."""
        for seq in self.running.values():
            self.drafter.release(seq.seq_id)
        self.drafter = drafter
        costs = self.policy.target_cost
        self.policy.reset_drafter(drafter.budgets(), getattr(drafter, "cost_hint", 0.0), _estimator(drafter))
        self.policy.target_cost = costs  # the target did not change

    # ---- the step --------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Admit, draft, verify in one target forward, commit and emit; returns what changed."""
        outputs: list[RequestOutput] = []
        self._apply_aborts(outputs)
        self._admit()
        seqs = [s for s in self.running.values() if s.ready]
        if not seqs:
            return outputs
        riders = self._riders(len(seqs))  # prompt chunks that ride in this step's forward
        budgets = self._budgets(seqs, sum(n for _, n in riders))
        requests = [DraftRequest(s.seq_id, s.history, n, s.request.params, s.generator, s.request.domain)
                    for s, n in zip(seqs, budgets)]
        t0 = time.perf_counter()
        drafts = self.drafter.propose(requests)
        t1 = time.perf_counter()
        for d, n in zip(drafts, budgets):
            if d.size > n:
                raise RuntimeError(f"drafter {self.drafter.name} proposed {d.size} nodes over a budget of {n}")
        tree = TreeBatch.from_lists(
            [[s.history[-1]] + d.tokens.tolist() for s, d in zip(seqs, drafts)]
            + [s.history[s.prefilled: s.prefilled + n] for s, n in riders],
            [[-1] + (d.parents + 1).tolist() for d in drafts] + [list(range(-1, n - 1)) for _, n in riders])
        slots = [s.slot for s in seqs] + [s.slot for s, _ in riders]
        heads = [True] * len(seqs) + [False] * len(riders)   # a prompt chunk needs no logits
        layers = self.drafter.feature_layers
        out: TreeOutput = self.target.forward_features(tree, slots, self.cache, layers, logits_for="rows",
                                                       heads=heads) \
            if layers else self.target(tree, slots, self.cache, logits_for="rows", heads=heads)
        t2 = time.perf_counter()
        self._account(seqs, budgets, drafts, tree, t1 - t0, t2 - t1)

        verified = [verify(d, out.logits_of(b), s.request.params, s.generator)
                    for b, (s, d) in enumerate(zip(seqs, drafts))]
        self.cache.commit(slots, [v.path for v in verified] + [list(range(n)) for _, n in riders])
        self._prefilled(riders, [out.feats_of(len(seqs) + j) for j in range(len(riders))] if layers else None)
        self._feedback(seqs, drafts, verified, tree, out)
        now = time.monotonic()
        for b, (s, d, v, n) in enumerate(zip(seqs, drafts, verified, budgets)):
            outputs.append(self._emit(s, d, v, n, out.logits_of(b), now))
        return outputs

    def run_to_completion(self) -> list[FinishedRequest]:
        """Step until nothing is waiting or running (tests, benchmarks, the CLI)."""
        done: list[FinishedRequest] = []
        while self.has_work():
            done += [o.finished for o in self.step() if o.finished is not None]
        return done

    # ---- pieces of the step ------------------------------------------------------------------------
    def _apply_aborts(self, outputs: list[RequestOutput]) -> None:
        if not self._aborted:
            return
        for req in [r for r in self.waiting if r.request_id in self._aborted]:
            self.waiting.remove(req)
            seq = _Sequence(req, -1, -1, list(req.prompt_ids), torch.Generator(), 0, time.monotonic())
            seq.finish_reason = "abort"
            outputs.append(RequestOutput(req.request_id, [], self._finished(seq)))
        for seq in [s for s in self.running.values() if s.request.request_id in self._aborted]:
            seq.finish_reason = "abort"
            outputs.append(RequestOutput(seq.request.request_id, [], self._retire(seq)))
        self._aborted.clear()

    def _admit(self) -> None:
        while self.waiting and len(self.running) < self.cfg.max_batch:
            req = self.waiting.popleft()
            slot = self.cache.allocate()
            gen = torch.Generator()
            gen.manual_seed(req.params.seed if req.params.seed is not None else int(torch.seed()))
            limit = min(req.params.max_new_tokens, self.max_len - len(req.prompt_ids))
            seq = _Sequence(req, self._next_seq, slot, list(req.prompt_ids), gen, limit, time.monotonic())
            self._next_seq += 1
            self.running[seq.seq_id] = seq
        self._prefill()

    def _prefill(self) -> None:
        """Put prompts into the cache: all but the last token, which is the root of the first draft tree.

        A forward takes at most cfg.prefill_chunk tokens of a prompt: a whole long prompt in one
        forward is slower (its attention is quadratic in one piece: 12.3 s against 5.7 s in chunks of
        128 for 1,500 tokens on a 2-core EPYC, bench/chunked_prefill.py). While some sequence decodes, at most that many prompt
        tokens go in per step (oldest request first), so a long prompt does not stall the running
        streams for its whole prefill; with nothing decoding, every chunk goes in this step.
        """
        while True:
            pending = [s for s in self.running.values() if not s.ready]
            if not pending:
                return
            decoding = len(pending) < len(self.running)
            if decoding and self._rides:
                return  # the chunks ride in the decode step's forward (`_riders`)
            self._prefill_chunks(pending, decoding)
            if decoding:
                return

    @property
    def _rides(self) -> bool:
        """Prompt chunks ride in decode steps (prefill_stall set, and prompts are chunked at all)."""
        return bool(self.cfg.prefill_stall and self.cfg.prefill_chunk)

    def _riders(self, batch: int) -> list[tuple[_Sequence, int]]:
        """(sequence, prompt tokens) to prefill inside this step's forward, oldest request first.

        The chunk is the largest (at most prefill_chunk, at least MIN_RIDE) whose step the cost model
        predicts at no more than prefill_stall times the plain decode step of the `batch` sequences."""
        pending = [s for s in self.running.values() if not s.ready]
        if not pending or not self._rides:
            return []
        cost = self.policy.target_cost
        bound = self.cfg.prefill_stall * cost.predict(batch, batch)
        budget = self.cfg.prefill_chunk
        while budget > MIN_RIDE and cost.predict(batch + budget, batch) > bound:
            budget -= 1 if budget <= 32 else budget // 8
        return _chunks(pending, budget, budget)

    def _prefilled(self, chunks: list[tuple[_Sequence, int]], feats: list[Tensor | None] | None) -> None:
        """Prompt chunks went through a forward (their own or a decode step's): hand a feature-reading
        drafter their hidden states, and advance them."""
        if feats is not None:
            self.drafter.observe_prefill([
                Prefill(s.seq_id, s.request.domain, f,
                        torch.tensor(s.history[s.prefilled + 1: s.prefilled + n + 1], dtype=torch.long))
                for (s, n), f in zip(chunks, feats)])
        for s, n in chunks:
            s.prefilled += n
            self.stats.prefill_tokens += n

    def _prefill_chunks(self, pending: list[_Sequence], decoding: bool) -> None:
        limit = self.cfg.prefill_chunk or None
        budget = limit if decoding else None
        for group in _prefill_groups(_chunks(pending, limit, budget)):
            chains = [s.history[s.prefilled: s.prefilled + n] for s, n in group]
            slots = [s.slot for s, _ in group]
            layers = self.drafter.feature_layers
            if layers:
                # A feature-reading drafter gets the prompt's hidden states from this same forward.
                _, feats = self.target.forward_features(TreeBatch.chains(chains), slots, self.cache, layers,
                                                        logits_for="last")  # [G, T, F]
                self._prefilled(group, [feats[b, :n] for b, (_, n) in enumerate(group)])
            else:
                self.target(TreeBatch.chains(chains), slots, self.cache, logits_for="last")
                self._prefilled(group, None)
            self.cache.commit(slots, [list(range(n)) for _, n in group])
            self.stats.prefill_forwards += 1

    def _budgets(self, seqs: list[_Sequence], extra_rows: int = 0) -> list[int]:
        spec = self.cfg.speculation
        drafting = [s.seq_id for s in seqs if s.request.speculate]
        if spec == "adaptive":
            # Sequences that opted out ride as plain rows of the same forward.
            picked = dict(zip(drafting, self.policy.choose(drafting, extra_rows + len(seqs) - len(drafting))))
            wanted = [picked.get(s.seq_id, 0) for s in seqs]
        else:
            wanted = [spec if s.request.speculate else 0 for s in seqs]
        out = []
        for s, n in zip(seqs, wanted):
            # No deeper than the tokens still allowed, and the tree must fit the cache slot.
            room = self.max_len - len(s.history)
            out.append(max(0, min(n, s.limit - s.emitted - 1, room)))
        return out

    def _account(self, seqs: list[_Sequence], budgets: list[int], drafts: list[Draft], tree: TreeBatch,
                 t_draft: float, t_target: float) -> None:
        self.stats.steps += 1
        self.stats.draft_seconds += t_draft
        self.stats.target_seconds += t_target
        # A batch of unequal trees runs packed: the target computed its real nodes only.
        self.policy.target_cost.observe(rows_computed(tree), t_target, len(seqs))
        top = max(budgets)
        self.policy.record_step(top, len(seqs), t_draft, [d.size for d, n in zip(drafts, budgets) if n == top])

    def _feedback(self, seqs: list[_Sequence], drafts: list[Draft], verified: list[Verified],
                  tree: TreeBatch, out: TreeOutput) -> None:
        k = self.drafter.needs_topk
        if not k and out.feats is None:
            self.drafter.observe([])
            return
        fb = []
        # One top-k over the batch when no tree has drafts (the common step at high batch), else per tree.
        flat = out.logits.topk(k, dim=-1).indices.cpu() if k and tree.width == 1 else None   # [B, k]
        for b, (s, d, v) in enumerate(zip(seqs, drafts, verified)):
            n = d.size + 1
            if flat is not None:
                top = flat[b: b + 1]
            else:
                top = out.logits_of(b).topk(k, dim=-1).indices.cpu() if k else torch.zeros(n, 0, dtype=torch.long)
            fb.append(Feedback(s.seq_id, tree.tokens[b, :n], top, v, out.feats_of(b)))
        self.drafter.observe(fb)

    def _emit(self, seq: _Sequence, draft: Draft, v: Verified, budget: int, logits: Tensor,
              now: float) -> RequestOutput:
        tokens = v.tokens[: seq.limit - seq.emitted]
        reason = None
        for i, tok in enumerate(tokens):
            if tok in self.eos_ids:
                tokens, reason = tokens[: i + 1], "stop"
                break
        if seq.request.stop:
            tokens, hit = self._cut_at_stop(seq, tokens)
            reason = "stop" if hit else reason
        seq.history.extend(tokens)
        if reason is None and seq.emitted >= seq.limit:
            reason = "length"
        if self.cfg.topk_log and tokens:
            rows = logits[v.path[: len(tokens)]].log_softmax(-1)          # [T, V]
            top = rows.topk(self.cfg.topk_log, dim=-1)
            seq.topk_ids.append(top.indices.to(torch.int32).cpu())
            seq.topk_logprobs.append(top.values.cpu())
        accepted = min(v.accepted, len(tokens))
        # A drafter that routes sequences to sub-drafters (per domain) names the one that drafted.
        served_by = getattr(self.drafter, "served_by", None)
        name, version = served_by(seq.seq_id) if served_by else (self.drafter.name, self.drafter.version)
        seq.steps.append(StepRecord(draft.size, accepted, name, version))
        self.policy.record(seq.seq_id, budget, v.accepted)
        st = self.stats
        st.draft_tokens += draft.size
        st.accepted_tokens += accepted
        st.emitted_tokens += len(tokens)
        while len(st.accepted_per_position) < v.accepted:
            st.accepted_per_position.append(0)
        for i in range(v.accepted):
            st.accepted_per_position[i] += 1
        if seq.first_token is None and tokens:
            seq.first_token = now
        if reason is None:
            return RequestOutput(seq.request.request_id, tokens)
        seq.finish_reason = reason
        return RequestOutput(seq.request.request_id, tokens, self._retire(seq))

    def _cut_at_stop(self, seq: _Sequence, tokens: list[int]) -> tuple[list[int], bool]:
        """Tokens up to the one that completes a stop string, and whether one was found."""
        assert self.detokenize is not None
        out = seq.history[len(seq.request.prompt_ids):]
        for i in range(len(tokens)):
            text = self.detokenize(out + tokens[: i + 1])
            if any(stop in text for stop in seq.request.stop):
                return tokens[: i + 1], True
        return tokens, False

    def _retire(self, seq: _Sequence) -> FinishedRequest:
        del self.running[seq.seq_id]
        self.cache.release(seq.slot)
        finish = getattr(self.drafter, "finish", None)
        if finish is not None:  # a drafter that scores its drafts against the history gets the last tokens
            finish(seq.seq_id, seq.history)
        self.drafter.release(seq.seq_id)
        self.policy.forget(seq.seq_id)
        return self._finished(seq)

    def _finished(self, seq: _Sequence) -> FinishedRequest:
        self.stats.finished += 1
        k = self.cfg.topk_log
        now = time.monotonic()
        return FinishedRequest(
            request_id=seq.request.request_id,
            prompt_ids=tuple(seq.request.prompt_ids),
            output_ids=tuple(seq.history[len(seq.request.prompt_ids):]),
            params=seq.request.params,
            domain=seq.request.domain,
            finish_reason=seq.finish_reason or "abort",
            steps=tuple(seq.steps),
            topk_ids=torch.cat(seq.topk_ids) if seq.topk_ids else torch.zeros(0, k, dtype=torch.int32),
            topk_logprobs=torch.cat(seq.topk_logprobs) if seq.topk_logprobs else torch.zeros(0, k),
            ttft_s=(seq.first_token or now) - seq.arrived,
            total_s=now - seq.arrived,
        )
