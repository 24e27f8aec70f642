"""Per-domain drafters: each domain's requests are drafted by its own drafter, output stays exact."""
from __future__ import annotations

from drafters.by_domain import DomainDrafter
from drafters.draft_lm import DraftLMDrafter, draft_from_target
from drafters.lookup import PromptLookup
from drafters.recycling import TokenRecycling
from moe.generate import SamplingParams, generate
from moe.loader import load_model
from serving.engine import Engine, EngineConfig, Request

GREEDY = SamplingParams(max_new_tokens=16)


def test_domains_route_to_their_drafters_and_swaps_replace_one_domain(tiny_model):
    folder = tiny_model("llama")
    target = load_model(str(folder), with_tokenizer=False, moe_backend="local").model
    vocab = target.cfg.vocab_size

    def draft(version: str) -> DraftLMDrafter:
        return DraftLMDrafter(draft_from_target(str(folder), 1, max_len=128), version, max_batch=6, max_len=128)

    recycling = TokenRecycling(vocab)
    drafter = DomainDrafter(PromptLookup(), {"code": draft("7"), "math": recycling})
    engine = Engine(target, drafter, EngineConfig(max_batch=6, max_len=128, speculation=3))
    prompts = {f"{dom}{i}": ([3 + i, 9, 4, 11] * 3, dom) for i in range(2) for dom in ("code", "math", None)}
    for rid, (p, dom) in prompts.items():
        engine.add_request(Request(rid, tuple(p), GREEDY, domain=dom))
    for _ in range(4):
        engine.step()
    swapped = drafter.replace("code", draft("8"))
    rv = recycling.version
    assert swapped.version == f"default=0,code=8,math={rv}" and drafter.version == f"default=0,code=7,math={rv}"
    engine.set_drafter(swapped)
    done = {f.request_id: f for f in engine.run_to_completion()}
    for rid, (p, dom) in prompts.items():
        assert done[rid].output_ids == tuple(generate(target, p, GREEDY)), rid
        served = [(s.drafter, s.drafter_version) for s in done[rid].steps]
        if dom == "code":
            assert served[0] == ("draft-lm", "7") and served[-1] == ("draft-lm", "8")
            assert set(served) == {("draft-lm", "7"), ("draft-lm", "8")}
        else:
            assert set(served) == {("token-recycling", rv) if dom == "math" else ("prompt-lookup", "0")}, rid
    assert engine.stats.draft_tokens > 0
    assert swapped.budgets() == tuple(sorted(set(PromptLookup().budgets()) | set(TokenRecycling(vocab).budgets())
                                             | set(draft("x").budgets())))
