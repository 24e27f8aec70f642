"""Online training of eagle heads: the recipe trains, gates, checkpoints and resumes eagle lineages like
draft-lm ones, and a promoted head drafts losslessly in the engine, swapped in mid-request."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from drafters.base import NoDrafter
from drafters.eagle import EagleDrafter, head_from_target, is_eagle_checkpoint, save_eagle
from moe.generate import SamplingParams
from moe.loader import load_model
from serving.engine import Engine, EngineConfig, Request
from streams import open_producer
from trainer import checkpoint as ckpt
from trainer import students
from trainer.distill import GateConfig
from trainer.recipe import Trainer, TrainerConfig
from trainer.samples import sample_from_event
from trainer.testing import served_events

VOCAB = torch.arange(0, 256)  # the tiny target's whole vocabulary: every target token can be drafted


@pytest.fixture(scope="module")
def target_folder(tiny_model) -> Path:
    return tiny_model("llama")


@pytest.fixture(scope="module")
def target(target_folder):
    return load_model(str(target_folder), with_tokenizer=False, kernels="default").model


@pytest.fixture(scope="module")
def events(target_folder):
    return served_events(target_folder, 40, seed=5, pool=6)


def _cfg(tmp: Path, target_folder: Path, base: Path, **kw) -> TrainerConfig:
    opts = dict(target=str(target_folder), drafter="eagle", eagle_base=str(base),
                events_url=(tmp / "log").resolve().as_uri(), state_dir=str(tmp / "state"), registry=False,
                batch_size=4, holdout_size=8, train_every=2, steps_per_sample=1.0, gate_every=4, lr=2e-3,
                gate=GateConfig(min_samples=8, min_positions=64, margin=0.01, spec_len=3),
                stop_when_drained_s=0.5, checkpoint_every_s=0.0)
    opts.update(kw)
    return TrainerConfig(**opts)


def _base_head(target, folder: Path) -> Path:
    save_eagle(head_from_target(target, VOCAB, seed=4), folder, version="base")
    return folder


def test_eagle_lineage_trains_promotes_checkpoints_resumes_and_drafts_exactly(tmp_path, target_folder, target,
                                                                              events) -> None:
    cfg = _cfg(tmp_path, target_folder, _base_head(target, tmp_path / "base"))
    prod = open_producer(cfg.events_url)
    for ev in events:
        prod.publish(ev)
    prod.close()
    t = Trainer(cfg)
    t.setup()
    try:
        before = t.kind.evaluate(t.lineages["general"].champion, list(t.lineages["general"].holdout.items), 3)
        stats = t.train()
        lin = t.lineages["general"]
        after = t.kind.evaluate(lin.champion, list(lin.holdout.items), 3)
        assert t.kind.feature_forwards >= 40  # one teacher-forced target forward per absorbed request
        assert lin.name == "spectutor-eagle"
        print(f"held-out acceptance {before.acceptance:.3f} -> {after.acceptance:.3f}, accepted length "
              f"{before.accepted_length:.3f} -> {after.accepted_length:.3f}; {stats.promotions} promotions")
    finally:
        t.cleanup()
    assert stats.events_consumed == 40 and stats.steps > 0
    assert stats.promotions >= 1, stats.last_decision
    assert after.acceptance >= before.acceptance + 0.01  # the champion the gate crowned beats the base
    assert lin.champion.embed is lin.student.embed  # the target's embedding is shared, never copied
    folder, state = ckpt.latest(Path(cfg.state_dir))
    assert is_eagle_checkpoint(folder / "general") and state["events_consumed"] == 40

    # A second start resumes the eagle student from the checkpoint: same weights, nothing absorbed again.
    t2 = Trainer(cfg)
    t2.setup()
    try:
        assert t2.stats.events_consumed == 40
        mine, theirs = lin.student.state_dict(), t2.lineages["general"].student.state_dict()
        assert all(torch.equal(mine[k], theirs[k]) for k in mine if not k.startswith("embed"))
    finally:
        t2.cleanup()

    # The promoted head drafts in the engine, swapped in mid-request, and changes no output token.
    prompts = [list(ev.prompt_ids) for ev in events[:6]]
    params = SamplingParams(max_new_tokens=20)
    ref = _run(target, NoDrafter(), prompts, params)
    engine = Engine(target, NoDrafter(), EngineConfig(max_batch=4, max_len=256, speculation=4))
    for i, p in enumerate(prompts):
        engine.add_request(Request(str(i), tuple(p), params))
    out, steps = {}, 0
    while engine.has_work():
        if steps == 3:
            engine.set_drafter(EagleDrafter(lin.champion, "v1", max_batch=4, max_len=256, min_confidence=0.0))
        for o in engine.step():
            if o.finished is not None:
                out[o.request_id] = o.finished.output_ids
        steps += 1
    assert out == ref
    assert engine.stats.draft_tokens > 0 and engine.stats.accepted_tokens > 0


def _run(target, drafter, prompts, params) -> dict:
    e = Engine(target, drafter, EngineConfig(max_batch=4, max_len=256, speculation=4))
    for i, p in enumerate(prompts):
        e.add_request(Request(str(i), tuple(p), params))
    return {f.request_id: f.output_ids for f in e.run_to_completion()}


def test_feature_samples_weigh_outputs_and_rejections(tmp_path, target_folder, target, events) -> None:
    cfg = _cfg(tmp_path, target_folder, tmp_path / "unused", eagle_prompt_weight=0.25, all_weight=1.0,
               rejected_weight=2.0)
    kind = students.EagleKind(cfg, students.TargetHandle(cfg))
    head = head_from_target(target, VOCAB, seed=4)
    ev = next(e for e in events if e.step_proposed.sum() > e.step_accepted.sum())  # one with rejections
    s = sample_from_event(ev, cfg.max_len)
    fs = kind.features(head, s)
    assert kind.features(head, s) is fs and kind.feature_forwards == 1  # cached by event id
    rows = torch.arange(s.first, s.first + s.num_rows)
    expect = torch.full((len(s.input_ids),), 0.25)
    expect[rows] = 1.0 + 2.0 * torch.from_numpy(s.rejected).float()
    assert torch.equal(fs.weights, expect)  # VOCAB covers every token: nothing is masked
    assert int(torch.from_numpy(s.rejected).sum()) >= 1
    only = kind.output_only(head, s)
    assert float(only.weights[: s.first].abs().sum()) == 0.0 and torch.equal(only.weights[rows], expect[rows])


def test_no_base_head_says_how_to_make_one(tmp_path, target_folder) -> None:
    cfg = _cfg(tmp_path, target_folder, tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="spectutor draft init"):
        students.student_kind(cfg).base()
    with pytest.raises(ValueError, match="drafter='medusa'"):
        _cfg(tmp_path, target_folder, tmp_path / "missing", drafter="medusa")


class _Head:
    """Stands in for an EagleHead in chain_metrics: ttt_forward is replaced, logits are its input."""

    @staticmethod
    def logits(out):
        return out


def test_chain_metrics_count_runs_of_draft_steps_by_hand(monkeypatch) -> None:
    # One sequence of 6 entries, draft vocabulary of 3; the label (target top) is token 0 everywhere.
    # hit[j][i]: unrolled step j at entry i agrees with the target.
    hit = torch.tensor([[1, 1, 0, 1, 1, 1],    # step 0
                        [0, 1, 1, 0, 1, 1],    # step 1
                        [0, 0, 1, 1, 0, 1]],   # step 2
                       dtype=torch.bool)
    outs = [torch.where(h[None, :, None], torch.tensor([5.0, 0.0, 0.0]), torch.tensor([0.0, 5.0, 0.0]))
            for h in hit]
    monkeypatch.setattr("trainer.eagle_train.ttt_forward", lambda head, batch, steps: outs[:steps])
    weights = torch.tensor([[1.0, 1, 1, 1, 1, 0]])  # entry 5 has no label: never a start, never a hit

    class Batch:
        pass

    batch = Batch()
    batch.weights, batch.label_ids = weights, torch.zeros(1, 6, 1, dtype=torch.long)
    batch.label_p = torch.ones(1, 6, 1)
    monkeypatch.setattr("trainer.eagle_train.make_batch", lambda samples, max_tokens: batch)
    m = students.chain_metrics(_Head(), [object()], spec_len=3)
    # Chains from entries 0..4 (a chain from i uses step j at entry i + j, and stops at the first miss):
    # i=0: s0[0]=1, s1[1]=1, s2[2]=1 -> 3; i=1: s0[1]=1, s1[2]=1, s2[3]=1 -> 3; i=2: s0[2]=0 -> 0;
    # i=3: s0[3]=1, s1[4]=1, s2[5] unlabelled -> 2; i=4: s0[4]=1, s1[5] unlabelled -> 1.
    assert m.positions == 5 and m.samples == 1
    assert m.acceptance == pytest.approx(4 / 5)
    assert m.accepted_length == pytest.approx(1 + (3 + 3 + 0 + 2 + 1) / 5)
