"""The speculative engine on tiny random models: exact greedy output, the target's sampling law, bookkeeping."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from drafters.base import NoDrafter
from drafters.draft_lm import DraftLMDrafter, draft_from_target, load_draft, save_draft
from drafters.hybrid import HybridDrafter, merge_trees
from drafters.lookup import PromptLookup
from drafters.recycling import TokenRecycling
from drafters.registry import DrafterConfig, build_drafter
from moe.errors import ContextTooLongError
from moe.generate import SamplingParams, generate
from moe.loader import load_model
from serving.engine import Engine, EngineConfig, Request

GREEDY = SamplingParams(max_new_tokens=24)


def _prompts(n: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        # Repeated fragments give prompt lookup and Token Recycling something to find.
        base = torch.randint(vocab, (int(torch.randint(2, 12, (), generator=g)),), generator=g).tolist()
        out.append((base * 3)[: int(torch.randint(3, 30, (), generator=g))])
    return out


def _drafters(folder: Path, vocab: int, max_batch: int, max_len: int):
    yield "none", NoDrafter()
    yield "prompt-lookup", PromptLookup()
    yield "token-recycling", TokenRecycling(vocab)
    yield "hybrid", HybridDrafter([PromptLookup(), TokenRecycling(vocab)])
    for mode in ("chain", "topk", "gumbel", "beam"):
        yield f"draft-lm-{mode}", DraftLMDrafter(draft_from_target(str(folder), 2, max_len=max_len), mode=mode,
                                                 max_batch=max_batch, max_len=max_len)


class _count_forwards:
    """Counts forward calls of a model from now until `remove()`."""

    def __init__(self, model: torch.nn.Module):
        self.count = 0
        self._handle = model.register_forward_pre_hook(self._hook)

    def _hook(self, *_) -> None:
        self.count += 1

    def remove(self) -> None:
        self._handle.remove()


def _run(engine: Engine, prompts: list[list[int]], params: SamplingParams) -> dict[str, tuple[int, ...]]:
    for i, p in enumerate(prompts):
        engine.add_request(Request(str(i), tuple(p), params))
    return {f.request_id: f.output_ids for f in engine.run_to_completion()}


@pytest.mark.parametrize("model_name", ["llama", "mixtral"])
@pytest.mark.parametrize("max_batch", [1, 8])
def test_greedy_output_equals_target_alone(tiny_model, model_name, max_batch):
    folder = tiny_model(model_name)
    target = load_model(str(folder), with_tokenizer=False, moe_backend="local").model
    prompts = _prompts(8, target.cfg.vocab_size)
    expected = {str(i): tuple(generate(target, p, GREEDY)) for i, p in enumerate(prompts)}
    for name, drafter in _drafters(folder, target.cfg.vocab_size, max_batch, 128):
        for spec in (4, "adaptive"):
            engine = Engine(target, drafter, EngineConfig(max_batch=max_batch, max_len=128, speculation=spec))
            calls = _count_forwards(target)
            got = _run(engine, prompts, GREEDY)
            calls.remove()
            assert got == expected, f"{name} speculation={spec}"
            if spec == 4 and name != "none":
                assert engine.stats.draft_tokens > 0, name
            # Verification never costs an extra target forward: one per step, plus the prefills.
            assert calls.count == engine.stats.steps + engine.stats.prefill_forwards


def test_full_depth_draft_accepts_everything(tiny_model):
    """A draft with all the target's layers is the target: every greedy draft token is accepted."""
    folder = tiny_model("llama")
    target = load_model(str(folder), with_tokenizer=False).model
    drafter = DraftLMDrafter(draft_from_target(str(folder), target.cfg.num_layers, max_len=128), max_len=128)
    engine = Engine(target, drafter, EngineConfig(max_batch=1, max_len=128, speculation=4))
    engine.add_request(Request("a", (1, 2, 3), SamplingParams(max_new_tokens=21)))
    [done] = engine.run_to_completion()
    assert [(s.proposed, s.accepted) for s in done.steps] == [(4, 4)] * 4 + [(0, 0)]
    assert done.mean_accepted_length == 21 / 5


def _exact_two_token_law(target, prompt: list[int], params: SamplingParams) -> torch.Tensor:
    """[V, V] probability of each pair of first two output tokens, from the target alone."""
    from moe.generate import probs_from_logits
    from moe.tree import TreeBatch

    v = target.cfg.vocab_size
    cache = target.new_cache(1, len(prompt) + v)
    slot = cache.allocate()
    first = probs_from_logits(target(TreeBatch.chains([prompt]), [slot], cache, logits_for="last")[0], params)
    cache.commit([slot], [list(range(len(prompt)))])
    # All V continuations at once: a tree of V siblings hanging off the prompt.
    tree = TreeBatch(torch.arange(v)[None], torch.full((1, v), -1), torch.tensor([v]))
    second = probs_from_logits(target(tree, [slot], cache)[0], params)                  # [V, V]
    return first[:, None] * second


def _chi_square_pvalue(counts: torch.Tensor, expected: torch.Tensor) -> float:
    from scipy.stats import chisquare

    keep = expected > 0
    assert counts[~keep].sum() == 0, "a pair the target can never produce came out"
    exp = expected[keep].double()
    exp = exp * counts.sum() / exp.sum()  # float32 laws do not sum to exactly 1
    return float(chisquare(counts[keep].double().numpy(), exp.numpy()).pvalue)


@pytest.fixture(scope="module")
def small_vocab_model(tmp_path_factory):
    """A tiny Llama with an 8-token vocabulary, so whole output sequences can be counted."""
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=8, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   initializer_range=0.5, tie_word_embeddings=False)
    torch.manual_seed(3)
    folder = tmp_path_factory.mktemp("vocab8")
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("drafter_name", ["token-recycling", "draft-lm-chain", "draft-lm-gumbel", "draft-lm-beam"])
def test_sampled_sequences_follow_the_target_law(small_vocab_model, drafter_name):
    """20,000 two-token outputs through the engine vs the target's exact law; a wrong law is rejected."""
    folder = small_vocab_model
    target = load_model(str(folder), with_tokenizer=False).model
    prompt = [1, 5, 2, 7]
    params = SamplingParams(temperature=0.9, top_p=0.95, max_new_tokens=2)
    batch, rounds = 500, 40
    if drafter_name == "token-recycling":
        drafter = TokenRecycling(8, k=4)
    else:
        mode = drafter_name.removeprefix("draft-lm-")
        drafter = DraftLMDrafter(draft_from_target(str(folder), 1, max_len=16), mode=mode,
                                 branching=(3, 2), beam_width=3, max_batch=batch, max_len=16)
    engine = Engine(target, drafter, EngineConfig(max_batch=batch, max_len=16, speculation=6, topk_log=0))
    counts = torch.zeros(8, 8, dtype=torch.long)
    for r in range(rounds):
        for i in range(batch):
            engine.add_request(Request(f"{r}-{i}", tuple(prompt), SamplingParams(
                temperature=params.temperature, top_p=params.top_p, max_new_tokens=2, seed=r * batch + i)))
        for f in engine.run_to_completion():
            counts[f.output_ids[0], f.output_ids[1]] += 1
    assert engine.stats.accepted_tokens > 0  # drafts were really verified, not just the root
    n = batch * rounds
    law = _exact_two_token_law(target, prompt, params)
    assert _chi_square_pvalue(counts.flatten(), n * law.flatten()) > 1e-3
    # Negative control: the same counts against the law at another temperature must be rejected.
    wrong = _exact_two_token_law(target, prompt, SamplingParams(temperature=1.3, top_p=0.95))
    keep = (law.flatten() > 0) & (wrong.flatten() > 0)
    assert _chi_square_pvalue(counts.flatten()[keep], wrong.flatten()[keep]) < 1e-6


def test_seeded_request_is_reproducible_whatever_the_batch(tiny_model):
    folder = tiny_model("llama")
    target = load_model(str(folder), with_tokenizer=False).model
    params = SamplingParams(temperature=1.0, top_k=50, max_new_tokens=20, seed=1234)
    outs = []
    for others in (0, 5):
        drafter = DraftLMDrafter(draft_from_target(str(folder), 1, max_len=128), max_batch=8, max_len=128)
        engine = Engine(target, drafter, EngineConfig(max_batch=8, max_len=128, speculation=3))
        engine.add_request(Request("seeded", (4, 8, 15, 16), params))
        for i in range(others):
            engine.add_request(Request(f"other{i}", (23, 42, i), SamplingParams(temperature=1.0, max_new_tokens=30)))
        outs.append({f.request_id: f.output_ids for f in engine.run_to_completion()}["seeded"])
    assert outs[0] == outs[1]


def test_step_records_and_topk_come_from_verification(tiny_model):
    folder = tiny_model("llama")
    target = load_model(str(folder), with_tokenizer=False).model
    engine = Engine(target, TokenRecycling(target.cfg.vocab_size), EngineConfig(max_batch=4, max_len=128, speculation=8,
                                                                                 topk_log=5))
    for i, p in enumerate(_prompts(4, 256, seed=1)):
        engine.add_request(Request(str(i), tuple(p), GREEDY, domain="unit"))
    for f in engine.run_to_completion():
        assert len(f.output_ids) == 24 and f.finish_reason == "length" and f.domain == "unit"
        assert f.topk_ids.shape == (24, 5) and f.topk_logprobs.shape == (24, 5)
        # Greedy: the emitted token is the target's top-1 at every position.
        assert f.topk_ids[:, 0].tolist() == list(f.output_ids)
        assert bool((f.topk_logprobs[:, :-1] >= f.topk_logprobs[:, 1:]).all())
        assert sum(s.accepted + 1 for s in f.steps) == 24
        assert all(s.proposed <= 8 and s.drafter == "token-recycling" for s in f.steps)


def test_requests_join_and_leave_between_steps(tiny_model):
    folder = tiny_model("llama")
    target = load_model(str(folder), with_tokenizer=False).model
    prompts = _prompts(6, 256, seed=2)
    engine = Engine(target, PromptLookup(), EngineConfig(max_batch=2, max_len=128, speculation=4))
    got: dict[str, tuple[int, ...]] = {}
    lengths = [5, 30, 12, 1, 24, 17]
    for i, p in enumerate(prompts[:3]):
        engine.add_request(Request(str(i), tuple(p), SamplingParams(max_new_tokens=lengths[i])))
    steps = 0
    while engine.has_work():
        assert len(engine.running) <= 2
        for o in engine.step():
            if o.finished:
                got[o.request_id] = o.finished.output_ids
        steps += 1
        if steps == 3:  # later arrivals join a running batch
            for i in range(3, 6):
                engine.add_request(Request(str(i), tuple(prompts[i]), SamplingParams(max_new_tokens=lengths[i])))
    for i, p in enumerate(prompts):
        assert got[str(i)] == tuple(generate(target, p, SamplingParams(max_new_tokens=lengths[i]))), i


def test_eos_stop_strings_abort_and_context(tiny_model):
    folder = tiny_model("llama")
    target = load_model(str(folder), with_tokenizer=False).model
    prompt = (3, 1, 4, 1, 5)
    ref = generate(target, list(prompt), SamplingParams(max_new_tokens=30))
    eos = ref[7]
    first = ref.index(eos)
    engine = Engine(target, TokenRecycling(256), EngineConfig(max_batch=4, max_len=64, speculation=8),
                    eos_ids={eos}, detokenize=lambda ids: " ".join(map(str, ids)))
    engine.add_request(Request("eos", prompt, SamplingParams(max_new_tokens=30)))
    stop_at = " ".join(map(str, ref[2:4]))
    engine.add_request(Request("stop", prompt, SamplingParams(max_new_tokens=30), stop=(stop_at,)))
    engine.add_request(Request("abort", prompt, SamplingParams(max_new_tokens=30)))
    engine.step()
    engine.abort("abort")
    done = {f.request_id: f for f in engine.run_to_completion()}
    assert done["eos"].output_ids == tuple(ref[: first + 1]) and done["eos"].finish_reason == "stop"
    stop_ids = done["stop"].output_ids
    assert stop_ids[-2:] == tuple(ref[2:4]) and stop_ids == tuple(ref[: len(stop_ids)])
    assert done["abort"].finish_reason == "abort"
    assert not engine.running and len(engine.cache._free) == 4  # every slot came back
    # The context caps the output; a prompt that fills it is refused with a clear error.
    engine = Engine(target, TokenRecycling(256), EngineConfig(max_batch=4, max_len=64, speculation=8))
    engine.add_request(Request("long", tuple(range(60)), SamplingParams(max_new_tokens=30)))
    [f] = engine.run_to_completion()
    assert len(f.output_ids) == 4 and f.finish_reason == "length"
    with pytest.raises(ContextTooLongError, match="64"):
        engine.add_request(Request("too-long", tuple(range(64)), SamplingParams()))
    with pytest.raises(ValueError, match="token ids"):
        engine.add_request(Request("bad", (1, 999), SamplingParams()))


def test_draft_checkpoint_round_trip_and_hot_swap(tiny_model, tmp_path):
    folder = tiny_model("llama_tied")
    target = load_model(str(folder), with_tokenizer=False).model
    model = draft_from_target(str(folder), 2, max_len=128)
    sha = save_draft(model, tmp_path / "v1", version="1")
    loaded, version = load_draft(tmp_path / "v1", max_len=128)
    assert version == "1" and len(sha) == 64
    for (k, a), (_, b) in zip(model.decoder.state_dict().items(), loaded.decoder.state_dict().items()):
        assert torch.equal(a, b), k
    prompts = _prompts(4, 256, seed=5)
    expected = {str(i): tuple(generate(target, p, GREEDY)) for i, p in enumerate(prompts)}
    engine = Engine(target, DraftLMDrafter(model, "0", max_batch=4, max_len=128),
                    EngineConfig(max_batch=4, max_len=128, speculation=3))
    for i, p in enumerate(prompts):
        engine.add_request(Request(str(i), tuple(p), GREEDY))
    got, versions = {}, set()
    for n in range(200):
        if n == 3:  # swap between two steps, mid-request
            engine.set_drafter(DraftLMDrafter(loaded, version, max_batch=4, max_len=128))
        for o in engine.step():
            if o.finished:
                got[o.request_id] = o.finished.output_ids
                versions |= {s.drafter_version for s in o.finished.steps}
        if not engine.has_work():
            break
    assert got == expected and versions == {"0", "1"}


def test_reduced_vocabulary_head_stays_lossless(tiny_model):
    folder = tiny_model("llama")
    target = load_model(str(folder), with_tokenizer=False).model
    vocab_ids = torch.arange(0, 256, 3)
    model = draft_from_target(str(folder), 2, vocab_ids=vocab_ids, max_len=128)
    assert model.cost_ratio(target.cfg) < draft_from_target(str(folder), 2).cost_ratio(target.cfg)
    drafter = DraftLMDrafter(model, max_batch=4, max_len=128)
    prompts = _prompts(4, 256, seed=6)
    engine = Engine(target, drafter, EngineConfig(max_batch=4, max_len=128, speculation=3))
    got = _run(engine, prompts, GREEDY)
    assert got == {str(i): tuple(generate(target, p, GREEDY)) for i, p in enumerate(prompts)}


def test_bad_drafter_config_names_the_value():
    with pytest.raises(ValueError, match="unknown drafter 'medusa'"):
        DrafterConfig("medusa")
    with pytest.raises(ValueError, match="speculation"):
        EngineConfig(speculation="sometimes")
    with pytest.raises(ValueError, match="draft_mode"):
        DrafterConfig("draft-lm", draft_mode="wide")


def test_merged_trees_share_common_paths_and_respect_the_budget():
    from drafters.verify import Draft

    a = Draft.chain([5, 6, 7])
    b = Draft(torch.tensor([5, 9, 6, 8]), torch.tensor([-1, -1, 0, 1]))   # 5->6 repeats a's path
    m = merge_trees([a, b], budget=5)
    assert m.tokens.tolist() == [5, 6, 7, 9, 8] and m.parents.tolist() == [-1, 0, 1, -1, 3]
    cut = merge_trees([a, b], budget=4)
    assert cut.tokens.tolist() == [5, 6, 7, 9] and cut.parents.tolist() == [-1, 0, 1, -1]
    with pytest.raises(ValueError, match="deterministic"):
        merge_trees([Draft.chain([1], q=torch.ones(2, 4) / 4)], budget=3)


def _stream_while_long_prompts_arrive(target, drafter, chunk: int, stall: float = 1.5,
                                      engine_out: list | None = None, calls=None) -> tuple[dict, list[int], list[int]]:
    """A running stream; two long prompts arrive at its third step. Returns the finished requests by
    id, the prompt tokens prefilled at each step, and the tokens the stream got at each step."""
    g = torch.Generator().manual_seed(5)
    short = torch.randint(256, (6,), generator=g).tolist()
    longs = [torch.randint(256, (n,), generator=g).tolist() for n in (200, 150)]
    engine = Engine(target, drafter, EngineConfig(max_batch=4, max_len=512, speculation=3, prefill_chunk=chunk,
                                                  prefill_stall=stall))
    if engine_out is not None:
        engine_out.append(engine)
    engine.add_request(Request("stream", tuple(short), SamplingParams(max_new_tokens=60)))
    got, prefilled, streamed = {}, [], []
    while engine.has_work():
        before = engine.stats.prefill_tokens
        outs = engine.step()
        prefilled.append(engine.stats.prefill_tokens - before)
        streamed.append(sum(len(o.new_tokens) for o in outs if o.request_id == "stream"))
        got.update({o.request_id: o.finished for o in outs if o.finished})
        if len(prefilled) == 3:
            for i, p in enumerate(longs):
                engine.add_request(Request(f"long{i}", tuple(p), SamplingParams(max_new_tokens=10)))
    if calls is not None:
        calls.remove()  # the engine's forwards only, not the reference decoding below
    refs = {"stream": short, "long0": longs[0], "long1": longs[1]}
    for rid, p in refs.items():
        limit = 60 if rid == "stream" else 10
        assert got[rid].output_ids == tuple(generate(target, p, SamplingParams(max_new_tokens=limit))), rid
    return got, prefilled, streamed


def test_long_prompts_are_prefilled_in_chunks_between_the_running_streams_steps(tiny_model):
    target = load_model(str(tiny_model("llama")), with_tokenizer=False).model
    _, prefilled, streamed = _stream_while_long_prompts_arrive(target, PromptLookup(), chunk=32, stall=0)
    assert prefilled[0] == 5 and prefilled[1:3] == [0, 0]  # the stream's own prompt, whole: nothing else ran
    # From the arrival: 32 prompt tokens a step, oldest request first, until both are in (199 + 149).
    assert prefilled[3:3 + 11] == [32] * 10 + [199 + 149 - 320] and sum(prefilled[3:]) == 199 + 149
    assert all(n >= 1 for n in streamed[3:3 + 11])  # the stream emitted at every one of those steps
    # Unchunked, the same arrival is one prefill step of both prompts.
    _, whole, _ = _stream_while_long_prompts_arrive(target, PromptLookup(), chunk=0)
    assert whole[3] == 199 + 149
    # With nothing decoding, a long prompt goes in at once, in forwards of at most one chunk.
    engine = Engine(target, PromptLookup(), EngineConfig(max_batch=2, max_len=512, speculation=3, prefill_chunk=32))
    prompt = torch.randint(256, (200,), generator=torch.Generator().manual_seed(9)).tolist()
    engine.add_request(Request("alone", tuple(prompt), SamplingParams(max_new_tokens=6)))
    outs = engine.step()
    assert engine.stats.prefill_tokens == 199 and engine.stats.prefill_forwards == 7 and outs[0].new_tokens
    done = {}
    while True:
        done.update({o.request_id: o.finished.output_ids for o in outs if o.finished})
        if not engine.has_work():
            break
        outs = engine.step()
    assert done["alone"] == tuple(generate(target, prompt, SamplingParams(max_new_tokens=6)))


def test_prompt_chunks_ride_in_the_decode_steps_forward(tiny_model):
    """With prefill_stall, the long prompts go in inside the stream's own steps: every step from the
    arrival carries between MIN_RIDE and prefill_chunk prompt tokens (oldest first) and emits stream
    tokens, no forward runs for the prefill alone, and every output equals the target's own (checked
    inside, speculating 3 deep beside the chunks)."""
    from serving.engine import MIN_RIDE

    target = load_model(str(tiny_model("llama")), with_tokenizer=False).model
    calls = _count_forwards(target)
    engines: list = []
    _, prefilled, streamed = _stream_while_long_prompts_arrive(target, PromptLookup(), chunk=32, stall=1.5,
                                                               engine_out=engines, calls=calls)
    engine = engines[0]
    ride = prefilled[3:]
    ride = ride[: next((i for i, n in enumerate(ride) if n == 0), len(ride))]
    assert sum(ride) == 199 + 149 == sum(prefilled[3:])
    assert all(n <= 32 for n in ride) and all(n >= MIN_RIDE for n in ride[:-1])
    assert all(n >= 1 for n in streamed[3:3 + len(ride)])
    assert engine.stats.prefill_forwards == 1  # the stream's own prompt, alone before anything decoded
    assert calls.count == engine.stats.steps + 1


def test_a_feature_drafter_sees_the_same_features_chunked_or_whole(tiny_model):
    from drafters.eagle import EagleDrafter, head_from_target

    target = load_model(str(tiny_model("llama")), with_tokenizer=False, kernels="default").model
    proposals = []
    for chunk in (0, 32):
        head = head_from_target(target, torch.arange(0, 256), seed=1)
        drafter = EagleDrafter(head, max_batch=4, max_len=512, min_confidence=0.0)
        seen: dict[int, list[list[int]]] = {}
        propose = drafter.propose

        def recording(requests, propose=propose, seen=seen):
            drafts = propose(requests)
            for r, d in zip(requests, drafts):
                seen.setdefault(r.seq_id, []).append(d.tokens.tolist())
            return drafts

        drafter.propose = recording
        _stream_while_long_prompts_arrive(target, drafter, chunk)  # exact either way (checked inside)
        proposals.append(seen)
    # The head reads the prompt's hidden states: had a chunk's features been lost or misaligned, it
    # would draft differently for the long prompts (sequences 1 and 2, admitted after the stream).
    whole, chunked = proposals
    assert sum(len(t) for t in chunked[1]) > 0
    assert chunked[1] == whole[1] and chunked[2] == whole[2]


@pytest.mark.parametrize("spec", [4, "adaptive"])
def test_a_request_that_opts_out_of_speculation_gets_no_drafts_beside_one_that_drafts(tiny_model, spec):
    folder = tiny_model("llama")
    target = load_model(str(folder), with_tokenizer=False).model
    # A full-depth draft LM is the target itself: every draft it makes is accepted, so it always drafts.
    drafter = DraftLMDrafter(draft_from_target(str(folder), target.cfg.num_layers, max_len=128), max_batch=2,
                             max_len=128)
    engine = Engine(target, drafter, EngineConfig(max_batch=2, max_len=128, speculation=spec))
    prompts = _prompts(2, target.cfg.vocab_size, seed=3)
    engine.add_request(Request("on", tuple(prompts[0]), GREEDY))
    engine.add_request(Request("off", tuple(prompts[1]), GREEDY, speculate=False))
    done = {f.request_id: f for f in engine.run_to_completion()}
    assert done["off"].draft_tokens == 0 and all(s.proposed == 0 for s in done["off"].steps)
    assert len(done["off"].steps) == GREEDY.max_new_tokens  # one token per step: plain decoding
    assert done["on"].draft_tokens > 0
    for name, p in (("on", prompts[0]), ("off", prompts[1])):
        assert done[name].output_ids == tuple(generate(target, p, GREEDY)), name
