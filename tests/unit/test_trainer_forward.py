"""The training forward equals the inference forward; events become correctly aligned samples."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from drafters.draft_lm import draft_from_target
from moe.loader import load_model
from moe.tree import TreeBatch
from streams.schema import TokenEvent
from trainer.forward import causal_logits
from trainer.samples import Holdout, RecencyBuffer, coarsen, collate, expected_accepted_length, rejection_rows, \
    sample_from_event, speedup_model


@pytest.mark.parametrize("name", ["llama", "mistral", "mixtral"])
def test_causal_forward_equals_inference_forward(tiny_model, name: str) -> None:
    model = load_model(str(tiny_model(name)), with_tokenizer=False, moe_backend="local", kernels="default").model
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (40, 17, 29)]
    cache = model.new_cache(3, 64)
    slots = [cache.allocate() for _ in seqs]
    ref = model(TreeBatch.chains(seqs), slots, cache)                        # [B, N, V]
    ids = torch.zeros(3, 40, dtype=torch.long)
    mask = torch.zeros(3, 40, dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, : len(s)] = torch.tensor(s)
        mask[b, : len(s)] = 1
    got = causal_logits(model, ids, mask)
    for b, s in enumerate(seqs):
        torch.testing.assert_close(got[b, : len(s)], ref[b, : len(s)], atol=2e-4, rtol=1e-4)


def test_draft_gets_gradients_through_the_training_forward(tiny_model) -> None:
    draft = draft_from_target(str(tiny_model("llama")), 2)
    ids = torch.randint(0, 256, (2, 12))
    causal_logits(draft.decoder, ids, torch.ones_like(ids)).sum().backward()
    assert draft.decoder.layers[0].attn.qkv.weight.grad is not None


def _event(**fields) -> TokenEvent:
    # steps: 4 proposed / 2 accepted (rows 0,1 accepted, row 2 corrected), 4/4 (rows 3-6, bonus row 7),
    # 4/0 (row 8 corrected), then a last step of 0 drafts (row 9)
    base = dict(num_tokens=10, k=4, prompt_len=5, step_proposed=[4, 4, 4, 0], step_accepted=[2, 4, 0, 0],
                step_drafter=[0, 0, 0, 0])
    base.update(fields)
    return TokenEvent.make_dummy(**base)


def test_rejection_rows_mark_the_corrected_token_not_the_next() -> None:
    rejected, bonus = rejection_rows(_event())
    assert np.flatnonzero(rejected).tolist() == [2, 8]
    assert np.flatnonzero(bonus).tolist() == [7]


def test_sample_alignment_and_collate() -> None:
    ev = _event()
    s = sample_from_event(ev, max_len=64)
    assert s is not None
    assert s.input_ids.tolist() == ev.prompt_ids.tolist() + ev.output_ids[:-1].tolist()
    assert s.first == 4 and s.num_rows == 10
    # Row t is supervised at input position first + t, whose next token is output t.
    full = ev.prompt_ids.tolist() + ev.output_ids.tolist()
    assert all(full[s.first + t + 1] == ev.output_ids[t] for t in range(s.num_rows))
    short = sample_from_event(ev, max_len=8)
    assert short is not None and short.num_rows == 4 and len(short.input_ids) == 8
    assert sample_from_event(_event(num_tokens=0, step_proposed=[], step_accepted=[], step_drafter=[]), 64) is None
    b = collate([s, short], all_weight=1.0, rejected_weight=2.0)
    assert b.input_ids.shape == (2, 14) and b.attention_mask[1].sum() == 8
    assert b.weights[:10].tolist() == [1, 1, 3, 1, 1, 1, 1, 1, 3, 1]
    assert b.pos[10:].tolist() == [4, 5, 6, 7] and b.seq[10:].tolist() == [1] * 4
    only = collate([s], all_weight=0.0, rejected_weight=1.0, bonus_is_rejected=True)
    assert torch.nonzero(only.weights).flatten().tolist() == [2, 7, 8]


def test_coarsen_gives_distributions_on_k_plus_one() -> None:
    student = torch.randn(3, 50).log_softmax(-1)
    ids = torch.tensor([[0, 1], [5, 7], [49, 3]])
    teacher = torch.log(torch.tensor([[0.5, 0.2], [0.9, 0.05], [0.6, 0.4]]))
    s, t = coarsen(student, ids, teacher)
    torch.testing.assert_close(s.exp().sum(-1), torch.ones(3))
    torch.testing.assert_close(t.exp().sum(-1), torch.ones(3), atol=1e-5, rtol=0)
    assert t[0, 2].exp().item() == pytest.approx(0.3, abs=1e-6)


def test_expected_accepted_length_and_cost_model() -> None:
    m = torch.tensor([[True, True, False, True, True, True]])
    assert expected_accepted_length(m, 2).tolist() == [[3, 2, 1, 3, 3, 2]]
    # seed-algorithms 5.5: alpha = 0.8, k = 4 -> E = 3.3616; alpha = 0.6, c = 0.1: k = 3 is best, 1.674
    assert speedup_model(0.8, 4, 0.0) == pytest.approx(3.3616)
    assert speedup_model(0.6, 3, 0.1) == pytest.approx(1.674, abs=1e-3)
    assert max(range(1, 10), key=lambda k: speedup_model(0.6, k, 0.01)) == 7


def test_buffer_recency_and_holdout_time_split() -> None:
    buf = RecencyBuffer(capacity=4, half_life=1.0)
    samples = [sample_from_event(_event(seed=i), 64) for i in range(6)]
    for s in samples:
        buf.add(s)
    assert len(buf) == 4 and buf.weights().tolist() == [0.125, 0.25, 0.5, 1.0]
    rng = np.random.default_rng(0)
    counts = {}
    for _ in range(400):
        for s in buf.draw(1, rng):
            counts[s.event_id] = counts.get(s.event_id, 0) + 1
    assert counts[samples[-1].event_id] > counts[samples[2].event_id] * 4
    hold = Holdout(2)
    assert hold.push(samples[0]) is None and hold.push(samples[1]) is None
    assert hold.push(samples[2]) is samples[0]  # the oldest leaves the held-out window first


def test_recomputed_full_teacher_and_topk_teacher_agree_where_they_should(tiny_model) -> None:
    from trainer.distill import distill_loss

    folder = tiny_model("llama")
    target = load_model(str(folder), with_tokenizer=False, kernels="default").model
    whole = draft_from_target(str(folder), 3, max_len=512)   # every layer: the target itself
    part = draft_from_target(str(folder), 1, max_len=512)
    s = sample_from_event(_event(vocab=256), 64)
    # A teacher row set that is really the target's: recompute top-8 from the target.
    b = collate([s])
    logp = causal_logits(target, b.input_ids, b.attention_mask)[b.seq, b.pos].log_softmax(-1)
    top = logp.topk(8, dim=-1)
    b.topk_ids, b.topk_logprobs = top.indices, top.values
    for teacher in (None, target):
        same, _ = distill_loss(whole, b, "fkl", target=teacher)
        assert same.item() == pytest.approx(0.0, abs=1e-4)
        worse, _ = distill_loss(part, b, "fkl", target=teacher)
        assert worse.item() > 0.01
    # The top-k + tail support loses information, never invents it: its FKL is at most the full one.
    full, _ = distill_loss(part, b, "fkl", target=target)
    coarse, _ = distill_loss(part, b, "fkl")
    assert coarse.item() <= full.item() + 1e-5
