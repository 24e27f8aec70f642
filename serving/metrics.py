"""Prometheus metrics of a replica: a sink that reads the plain stats objects and pushes deltas.

The engine thread only adds to ServiceStats / SwapStats / the publisher's counters; `MetricsSink.
update()` (called every few seconds on the replica's event loop) turns them into Ray Serve metrics.
Names follow vLLM's speculative-decoding metrics with a `spectutor_` prefix (Ray exports them with
`ray_` in front and `_total` on counters), so vLLM's dashboard works after a rename:
    acceptance rate         = rate(spec_decode_num_accepted_tokens) / rate(spec_decode_num_draft_tokens)
    mean acceptance length  = 1 + rate(spec_decode_num_accepted_tokens) / rate(spec_decode_num_drafts)
    per-position rate       = rate(spec_decode_num_accepted_tokens_per_pos{position=i}) / rate(num_drafts)
"""
from __future__ import annotations

import time
from typing import Any, Callable

PREFIX = "spectutor_"
TTFT_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]
TPOT_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0]

COUNTERS = {
    "spec_decode_num_drafts": ("drafts", "Sequence-steps that verified at least one draft token"),
    "spec_decode_num_draft_tokens": ("draft_tokens", "Draft tokens verified by the target"),
    "spec_decode_num_accepted_tokens": ("accepted_tokens", "Draft tokens accepted"),
    "generation_tokens": ("output_tokens", "Output tokens of finished requests"),
    "request_success": ("finished", "Requests finished with stop or length"),
    "request_aborted": ("aborted", "Requests cancelled (client disconnect)"),
    "request_rejected": ("rejected", "Requests refused because the replica was overloaded (429)"),
    "request_failed": ("failed", "Requests ended by an engine failure"),
}


def snapshot(service_stats: Any, swap_stats: Any = None, publisher: Any = None) -> dict[str, Any]:
    """The numbers a sink needs, read once from the plain stats objects."""
    st = service_stats
    out: dict[str, Any] = {key: getattr(st, key) for key, _ in COUNTERS.values()}
    out["accepted_per_position"] = list(st.accepted_per_position)
    out["by_drafter"] = {name: list(v) for name, v in getattr(st, "by_drafter", {}).items()}
    out["running"], out["waiting"] = st.running, st.waiting
    out["suffix_nodes"] = getattr(st, "suffix_nodes", 0)
    out["swaps"] = swap_stats.swaps if swap_stats else 0
    out["swap_failures"] = swap_stats.failures if swap_stats else 0
    out["drafter_version"] = swap_stats.version if swap_stats else ""
    out["event_drops"] = publisher.dropped if publisher else 0
    return out


class MetricsSink:
    """Pushes stats deltas to Ray Serve metrics (or to any factory with the same Counter/Gauge/Histogram API)."""

    def __init__(self, read: Callable[[], dict[str, Any]], drain_latencies: Callable[[], list[tuple]],
                 metrics_module: Any = None, drafter_name: str = ""):
        if metrics_module is None:
            from ray.serve import metrics as metrics_module
        m = metrics_module
        self.read, self.drain_latencies = read, drain_latencies
        self.drafter_name = drafter_name
        self.counters = {name: m.Counter(PREFIX + name, description=desc) for name, (_, desc) in COUNTERS.items()}
        self.per_pos = m.Counter(PREFIX + "spec_decode_num_accepted_tokens_per_pos",
                                 description="Drafts whose i-th draft token was accepted", tag_keys=("position",))
        self.per_drafter = {key: m.Counter(PREFIX + name + "_by_drafter", description=desc + ", per drafter",
                                           tag_keys=("drafter",))
                            for key, (name, desc) in enumerate((
                                ("spec_decode_num_drafts", "Sequence-steps that verified at least one draft token"),
                                ("spec_decode_num_draft_tokens", "Draft tokens verified by the target"),
                                ("spec_decode_num_accepted_tokens", "Draft tokens accepted")))}
        self.swaps = m.Counter(PREFIX + "drafter_swaps", description="Drafter hot swaps done")
        self.swap_failures = m.Counter(PREFIX + "drafter_swap_failures",
                                       description="Drafter versions refused (download, sha256, shape, smoke)")
        self.event_drops = m.Counter(PREFIX + "event_publish_drops", description="Token events not published")
        self.running = m.Gauge(PREFIX + "num_requests_running", description="Sequences being decoded")
        self.waiting = m.Gauge(PREFIX + "num_requests_waiting", description="Requests waiting for a slot")
        self.suffix_nodes = m.Gauge(PREFIX + "suffix_trie_nodes",
                                    description="Nodes in the suffix drafters' tries (per-sequence and shared)")
        self.tokens_per_s = m.Gauge(PREFIX + "generation_tokens_per_second", description="Output tokens/s, recent")
        self.mean_acceptance = m.Gauge(PREFIX + "spec_decode_mean_acceptance_length",
                                       description="1 + accepted / drafts since the last update")
        self.version_info = m.Gauge(PREFIX + "drafter_version_info", description="1 for the drafter version serving",
                                    tag_keys=("drafter", "version"))
        self.ttft = m.Histogram(PREFIX + "time_to_first_token_seconds", description="Time to first token",
                                boundaries=TTFT_BUCKETS)
        self.tpot = m.Histogram(PREFIX + "time_per_output_token_seconds", description="Time per output token "
                                "after the first", boundaries=TPOT_BUCKETS)
        self._last: dict[str, Any] = {}
        self._last_t = time.monotonic()
        self._version = ""

    def update(self) -> dict[str, Any]:
        """Push what changed since the last call; returns the deltas (tests read them)."""
        now = self.read()
        last = self._last or {k: (0 if not isinstance(v, (list, str, dict)) else
                                  ([] if isinstance(v, list) else {} if isinstance(v, dict) else ""))
                               for k, v in now.items()}
        delta: dict[str, Any] = {}
        for name, (key, _) in COUNTERS.items():
            d = now[key] - last[key]
            if d > 0:
                self.counters[name].inc(d)
            delta[key] = d
        per = now["accepted_per_position"]
        old = last["accepted_per_position"] + [0] * (len(per) - len(last["accepted_per_position"]))
        for i, (a, b) in enumerate(zip(per, old)):
            if a > b:
                self.per_pos.inc(a - b, tags={"position": str(i)})
        by_drafter: dict[str, list[int]] = {}
        for name, counts in now["by_drafter"].items():
            before = last["by_drafter"].get(name, [0, 0, 0])
            by_drafter[name] = [a - b for a, b in zip(counts, before)]
            for key, d in enumerate(by_drafter[name]):
                if d > 0:
                    self.per_drafter[key].inc(d, tags={"drafter": name})
        delta["by_drafter"] = by_drafter
        for key, counter in (("swaps", self.swaps), ("swap_failures", self.swap_failures),
                             ("event_drops", self.event_drops)):
            d = now[key] - last[key]
            if d > 0:
                counter.inc(d)
            delta[key] = d
        self.running.set(now["running"])
        self.waiting.set(now["waiting"])
        self.suffix_nodes.set(now.get("suffix_nodes", 0))
        t = time.monotonic()
        self.tokens_per_s.set(delta["output_tokens"] / max(t - self._last_t, 1e-6))
        if delta["drafts"]:
            self.mean_acceptance.set(1 + delta["accepted_tokens"] / delta["drafts"])
        version = now["drafter_version"]
        if version != self._version:
            if self._version:
                self.version_info.set(0, tags={"drafter": self.drafter_name, "version": self._version})
            self.version_info.set(1, tags={"drafter": self.drafter_name, "version": version})
            self._version = version
        for ttft, tpot, _n in self.drain_latencies():
            self.ttft.observe(ttft)
            if tpot is not None:
                self.tpot.observe(tpot)
        self._last, self._last_t = now, t
        return delta
