"""The recipe end to end without services: embedded log, no registry, null tracker, tiny models."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from streams import open_producer
from trainer import checkpoint as ckpt
from trainer.distill import GateConfig
from trainer.recipe import Trainer, TrainerConfig
from trainer.router import Router, Rule
from trainer.drift import DriftConfig, DriftMonitor
from trainer.testing import served_events


@pytest.fixture(scope="module")
def events(tiny_model):
    return served_events(tiny_model("llama"), 40, seed=3, pool=6)


def _cfg(tmp: Path, target: Path, **kw) -> TrainerConfig:
    base = dict(target=str(target), events_url=(tmp / "log").resolve().as_uri(), state_dir=str(tmp / "state"),
                draft_layers=2, registry=False, batch_size=4, holdout_size=8, train_every=2, steps_per_sample=1.0,
                gate_every=4, lr=1e-3, gate=GateConfig(min_samples=8, min_positions=64, margin=0.01, spec_len=3),
                stop_when_drained_s=0.5, checkpoint_every_s=0.0)
    base.update(kw)
    return TrainerConfig(**base)


def test_recipe_trains_promotes_checkpoints_and_resumes(tmp_path, tiny_model, events) -> None:
    cfg = _cfg(tmp_path, tiny_model("llama"))
    prod = open_producer(cfg.events_url)
    for ev in events:
        prod.publish(ev)
    prod.close()
    t = Trainer(cfg)
    t.setup()
    try:
        stats = t.train()
    finally:
        t.cleanup()
    assert stats.events_consumed == 40 and stats.steps > 0
    assert stats.promotions >= 1, stats.last_decision  # a 2-layer cut learns the tiny target quickly
    folder, state = ckpt.latest(Path(cfg.state_dir))
    assert state["events_consumed"] == 40
    assert len(state["held"]) == 40  # every absorbed event is still held (buffer 512 > 32 trained + 8 held out)
    # A second start resumes: nothing is absorbed again, counters and steps continue.
    t2 = Trainer(cfg)
    t2.setup()
    try:
        assert t2.stats.events_consumed == 40
        assert len(t2.lineages["general"].buffer) == 32 and len(t2.lineages["general"].holdout) == 8
        assert t2.lineages["general"].step == state["lineages"]["general"]["step"] + 1
        assert t2.train().events_consumed == 40
    finally:
        t2.cleanup()


def test_a_checkpoint_whose_weights_changed_is_refused(tmp_path, tiny_model) -> None:
    cfg = _cfg(tmp_path, tiny_model("llama"), stop_when_drained_s=0.1)
    t = Trainer(cfg)
    t.setup()
    try:
        folder = t.checkpoint()
    finally:
        t.cleanup()
    weights = folder / "general" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ckpt.CheckpointError, match="sha256"):
        ckpt.latest(Path(cfg.state_dir))


def test_config_errors_name_the_field(tmp_path, tiny_model) -> None:
    with pytest.raises(ValueError, match="batch_size=0"):
        _cfg(tmp_path, tiny_model("llama"), batch_size=0)
    with pytest.raises(ValueError, match="loss='kl'"):
        _cfg(tmp_path, tiny_model("llama"), loss="kl")
    with pytest.raises(ValueError, match="margin=-1"):
        GateConfig(margin=-1)
    with pytest.raises(ValueError, match="domains="):
        _cfg(tmp_path, tiny_model("llama"), domains=("general",))


def test_router_rules_learning_and_round_trip() -> None:
    r = Router([Rule("code", frozenset({7, 8}), min_hits=2)], min_examples=3, min_log_odds=1.0)
    assert r.route([7, 8, 100]) == "code" and r.route([7, 100]) is None
    for i in range(5):
        r.learn([1, 2, 3, i + 10], "chat")
        r.learn([50, 51, 52, i + 60], "math")
    assert r.route([1, 2, 2, 3]) == "chat" and r.route([50, 52, 51]) == "math"
    assert r.route([200, 201]) is None  # nothing known: the general drafter
    back = Router.from_json(r.to_json())
    assert back.route([1, 2, 3]) == "chat" and back.route([7, 8]) == "code"


def test_drift_and_collapse_are_detected() -> None:
    m = DriftMonitor(DriftConfig(halflife_events=3, warmup_events=5, drop=0.1, collapse=0.5))
    for _ in range(20):
        m.observe("code", 6, 10)
    assert not m.drifting("code") and m.value("code") == pytest.approx(0.6)
    for _ in range(4):
        m.observe("code", 4, 10)
    assert m.drifting("code") and not m.collapsed("code")
    for _ in range(20):
        m.observe("code", 1, 10)
    assert m.collapsed("code")


def test_per_domain_lineages_train_apart_and_unlabelled_traffic_is_routed(tmp_path, tiny_model) -> None:
    folder = tiny_model("llama")
    chat = served_events(folder, 16, seed=7, domain="chat", pool=4, vocab=(0, 128), new_tokens=16)
    code = served_events(folder, 16, seed=8, domain="code", pool=4, vocab=(128, 256), new_tokens=16)
    cfg = _cfg(tmp_path, folder, domains=("chat", "code"), general=False, holdout_size=4,
               gate=GateConfig(min_samples=4, min_positions=32, margin=0.01, spec_len=3))
    prod = open_producer(cfg.events_url)
    for a, b in zip(chat, code):
        prod.publish(a)
        prod.publish(b)
    prod.close()
    t = Trainer(cfg)
    t.setup()
    try:
        t.train()
        lins = t.lineages
        assert set(lins) == {"chat", "code"}
        ids = {d: {ev.event_id for ev in evs} for d, evs in (("chat", chat), ("code", code))}
        for d, lin in lins.items():
            held = [s.event_id for _, s in lin.buffer.items] + [s.event_id for s in lin.holdout.items]
            assert len(held) == 16 and set(held) <= ids[d]  # each lineage saw only its own domain
            assert lin.step > 0
        assert lins["chat"].name.endswith("-chat") and lins["code"].name.endswith("-code")
        # An unlabelled request goes where its prompt tokens say.
        unlabelled = dataclasses.replace(code[0], domain=None)
        assert t._lineage_for(unlabelled) is lins["code"]
    finally:
        t.cleanup()
