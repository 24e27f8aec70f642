"""Idle compute: a step in flight is preempted within 1 s of load returning; training resumes after."""
from __future__ import annotations

import threading
import time

import pytest
import torch

from drafters.draft_lm import draft_from_target
from streams.schema import Heartbeat
from trainer.forward import causal_logits
from trainer.idle import IdleConfig, LoadWatcher, Preempted, load_of


def _wait(cond, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not cond():
        time.sleep(0.01)
    return cond()


def test_load_is_running_plus_queued_over_replicas() -> None:
    beats = [Heartbeat("a", 2, 10.0, 1), Heartbeat("b", 0, 0.0, 3)]
    assert load_of(beats) == 6 and load_of([]) == 0
    with pytest.raises(ValueError, match="poll_s=2"):
        IdleConfig(poll_s=2)


def test_training_pauses_within_one_second_and_resumes(tiny_model) -> None:
    beats: list[Heartbeat] = []
    watcher = LoadWatcher(lambda: list(beats), IdleConfig(max_busy=0, poll_s=0.1))
    draft = draft_from_target(str(tiny_model("llama")), 3).train()
    undo = watcher.guard(draft)
    ids = torch.randint(0, 256, (4, 128))
    steps, preempted_at, stop = [0], [], threading.Event()

    def loop() -> None:
        while not stop.is_set():
            try:
                causal_logits(draft.decoder, ids, torch.ones_like(ids)).sum().backward()
                steps[0] += 1
            except Preempted:
                preempted_at.append(time.monotonic())
                watcher.wait_idle(stop)

    th = threading.Thread(target=loop)
    th.start()
    try:
        assert _wait(lambda: steps[0] > 0, 20)
        assert not preempted_at
        beats.append(Heartbeat("replica-0", running=3, tokens_per_s=20.0, queue_depth=0))
        loaded = time.monotonic()
        while not preempted_at and time.monotonic() - loaded < 3:
            time.sleep(0.01)
        assert preempted_at and preempted_at[0] - loaded < 1.0
        paused_steps = steps[0]
        time.sleep(0.4)
        assert steps[0] == paused_steps  # nothing trains while serving is busy
        beats.clear()
        assert _wait(lambda: steps[0] > paused_steps, 10)  # and it resumes once load is gone
    finally:
        stop.set()
        beats.clear()
        th.join(timeout=10)
        undo()
        watcher.close()
    draft.eval()
    assert watcher.preemptions >= 1


def test_a_backward_in_flight_is_preempted_too(tiny_model) -> None:
    beats: list[Heartbeat] = []
    watcher = LoadWatcher(lambda: list(beats), IdleConfig(max_busy=0, poll_s=0.1))
    draft = draft_from_target(str(tiny_model("llama")), 2).train()
    undo = watcher.guard(draft)
    try:
        ids = torch.randint(0, 256, (2, 16))
        loss = causal_logits(draft.decoder, ids, torch.ones_like(ids)).sum()
        watcher.busy = True  # load arrived between forward and backward
        with pytest.raises(Preempted):
            loss.backward()
        watcher.busy = False
        causal_logits(draft.decoder, ids, torch.ones_like(ids)).sum().backward()  # and training goes on
        assert draft.decoder.layers[0].attn.qkv.weight.grad is not None
    finally:
        undo()
        watcher.close()
