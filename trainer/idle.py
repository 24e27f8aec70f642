"""Train only in idle compute: read replica load from Redis heartbeats, preempt within a fraction of a second.

A watcher thread polls the heartbeats every `poll_s` and keeps one flag, `busy`. The recipe checks
it between steps, and hooks on the draft's norms (two per layer, forward and backward) check it inside a step: when
load returns mid-step, the next layer raises `Preempted`, the step's partial gradients are dropped,
and the trainer waits. So the pause comes within poll_s + one layer's compute, well under 1 s.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Callable

from torch import nn

from streams.schema import Heartbeat


class Preempted(RuntimeError):
    """Serving load came back during a training step."""


@dataclass(frozen=True)
class IdleConfig:
    """When serving leaves room for training."""

    max_busy: int = 0
    """Train only while the replicas' running + queued sequences, summed, are at most this."""
    poll_s: float = 0.2
    """How often heartbeats are read."""
    threads: int = 1
    """torch intra-op threads the trainer may use (the rest of the cores stay with serving)."""

    def __post_init__(self) -> None:
        if self.max_busy < 0:
            raise ValueError(f"max_busy={self.max_busy}: must be >= 0")
        if not 0 < self.poll_s <= 0.5:
            raise ValueError(f"poll_s={self.poll_s}: must be in (0, 0.5] to pause within 1 s")
        if self.threads < 1:
            raise ValueError(f"threads={self.threads}: must be >= 1")


def load_of(beats: list[Heartbeat]) -> int:
    """Sequences running or waiting over every live replica."""
    return sum(b.running + b.queue_depth for b in beats)


class LoadWatcher:
    """Keeps `busy` current from `read_beats` (RedisBus.heartbeats); no Redis means always idle."""

    def __init__(self, read_beats: Callable[[], list[Heartbeat]] | None, cfg: IdleConfig):
        self.cfg = cfg
        self._read = read_beats
        self.busy = False
        self.load = 0
        self.paused_s = 0.0
        self.preemptions = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if read_beats is not None:
            self._refresh()
            self._thread = threading.Thread(target=self._run, name="trainer-load", daemon=True)
            self._thread.start()

    def _refresh(self) -> None:
        assert self._read is not None
        self.load = load_of(self._read())
        self.busy = self.load > self.cfg.max_busy

    def _run(self) -> None:
        while not self._stop.wait(self.cfg.poll_s):
            self._refresh()

    def wait_idle(self, stop: threading.Event | None = None, timeout_s: float | None = None) -> bool:
        """Block while busy; True once idle, False on stop or timeout."""
        start = time.monotonic()
        while self.busy:
            if (stop is not None and stop.is_set()) or (timeout_s is not None and time.monotonic() - start > timeout_s):
                self.paused_s += time.monotonic() - start
                return False
            time.sleep(min(self.cfg.poll_s, 0.05))
        self.paused_s += time.monotonic() - start
        return True

    def guard(self, module: nn.Module) -> Callable[[], None]:
        """Make every norm of `module` (two per decoder layer) raise Preempted while busy, in the training
        forward and in backward; returns an undo. Norms, because the training forward calls them but
        not DecoderLayer.forward."""
        def hook(mod: nn.Module, args: object) -> None:
            if mod.training and self.busy:
                self.preemptions += 1
                raise Preempted("serving load returned")

        def backward_hook(mod: nn.Module, grad_output: object) -> None:
            if self.busy:  # backward can take longer than the forward: stop there too
                self.preemptions += 1
                raise Preempted("serving load returned")

        norms = [m for m in module.modules() if type(m).__name__ == "RMSNorm"]
        handles = [m.register_forward_pre_hook(hook) for m in norms]
        handles += [m.register_full_backward_pre_hook(backward_hook) for m in norms]
        return lambda: [h.remove() for h in handles] and None

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
