"""Engine runs become wire events that survive encoding with every step's drafter version intact."""
from __future__ import annotations

import numpy as np

from drafters.draft_lm import DraftLMDrafter, draft_from_target
from drafters.lookup import PromptLookup
from moe.generate import SamplingParams
from moe.loader import load_model
from serving.engine import Engine, EngineConfig, Request
from serving.events import event_from_finished
from streams.schema import ModelRef, decode_event, encode


def test_events_carry_steps_topk_and_both_drafter_versions_across_a_swap(tiny_model):
    folder = tiny_model("llama")
    target = load_model(str(folder), with_tokenizer=False, moe_backend="local").model
    engine = Engine(target, PromptLookup(), EngineConfig(max_batch=2, max_len=128, speculation=3, topk_log=4))
    prompt = tuple([5, 6, 7, 8] * 4)
    engine.add_request(Request("a", prompt, SamplingParams(max_new_tokens=20), domain="code"))
    for _ in range(3):
        engine.step()
    engine.set_drafter(DraftLMDrafter(draft_from_target(str(folder), 1, max_len=128), "7", max_batch=2, max_len=128))
    finished = engine.run_to_completion()
    assert len(finished) == 1
    fin = finished[0]
    event = decode_event(encode(event_from_finished(fin, "replica-3", ModelRef("tiny", "1"))))
    assert [d.name for d in event.drafters] == ["prompt-lookup", "draft-lm"]
    assert event.drafters[1].version == "7"
    assert event.step_drafter.tolist() == [0 if r.drafter == "prompt-lookup" else 1 for r in fin.steps]
    assert event.step_accepted.tolist() == [r.accepted for r in fin.steps]
    assert event.step_proposed.tolist() == [r.proposed for r in fin.steps]
    assert event.output_ids.tolist() == list(fin.output_ids)
    assert event.prompt_ids.tolist() == list(prompt)
    assert event.topk_ids.shape == (20, 4)
    # Greedy: the emitted token is the target's top-1 at every position.
    assert (event.topk_ids[:, 0] == event.output_ids).all()
    assert np.allclose(event.topk_logprobs, fin.topk_logprobs.numpy(), atol=2e-3)
    assert event.domain == "code" and event.finish_reason == "length" and event.replica_id == "replica-3"


def test_aborted_request_before_any_step_is_still_a_valid_event(tiny_model):
    folder = tiny_model("llama")
    target = load_model(str(folder), with_tokenizer=False, moe_backend="local").model
    engine = Engine(target, PromptLookup(), EngineConfig(max_batch=2, max_len=128, speculation=3))
    engine.add_request(Request("b", (1, 2, 3), SamplingParams(max_new_tokens=5)))
    engine.abort("b")
    finished = [o.finished for o in engine.step() if o.finished is not None]
    assert len(finished) == 1
    event = event_from_finished(finished[0], "r", ModelRef("tiny", "1"))
    assert event.finish_reason == "cancelled" and event.num_tokens == 0
    assert decode_event(encode(event)).request_id == "b"
