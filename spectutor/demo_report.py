"""The demo's results: a summary (JSON) and, over time, acceptance, tokens/s and its ratio to the
no-speculation baseline requests (PNG), from the requests' outcomes,
the promotions seen and the registry's versions. Pure functions of their inputs (no services)."""
from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any, Sequence

from serving.replay import Outcome, acceptance
from serving.swap import numeric_version


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version()}


def thirds(outcomes: Sequence[Outcome]) -> tuple[list[Outcome], list[Outcome]]:
    """The first and the last third of successful outcomes, in the order they were sent."""
    ok = sorted((o for o in outcomes if o.ok), key=lambda o: o.index)
    n = len(ok) // 3
    return (ok[:n], ok[-n:]) if n else ([], [])


def summarize(outcomes: Sequence[Outcome], shift_s: float, promotions: Sequence[dict], registry: dict,
              config: dict, trainer: dict | None, interrupted: bool) -> dict[str, Any]:
    """Counts, acceptance per domain and phase (first vs last third of each phase), promotions."""
    by_domain: dict[str, dict[str, Any]] = {}
    for domain in sorted({o.domain for o in outcomes}):
        everyone = [o for o in outcomes if o.domain == domain]
        mine = [o for o in everyone if o.speculate]
        first, last = thirds(mine)
        a_first, a_last = acceptance(first), acceptance(last)
        by_domain[domain] = {
            "requests": len(mine), "failed": sum(not o.ok for o in mine),
            "acceptance": acceptance(mine), "acceptance_first_third": a_first, "acceptance_last_third": a_last,
            "rise": (a_last - a_first) if a_first is not None and a_last is not None else None,
            "tokens_per_step_last_third": _tokens_per_step(last),
            "tokens_per_s": speed(everyone)}
    failed = [o for o in outcomes if not o.ok]
    return {
        "machine": machine(), "config": config, "interrupted": interrupted, "shift_at_s": shift_s,
        "requests": {"total": len(outcomes), "ok": len(outcomes) - len(failed), "failed": len(failed),
                     "errors": sorted({o.error for o in failed})[:10]},
        "domains": by_domain,
        "versions_served": sorted({v for o in outcomes for v in o.versions}, key=numeric_version),
        "promotions": list(promotions), "registry": registry, "trainer": trainer}


def mean_tokens_per_s(outcomes: Sequence[Outcome]) -> float | None:
    """Mean over requests of completion tokens / latency (successful ones)."""
    rates = [o.tokens_per_s for o in outcomes if o.tokens_per_s is not None]
    return sum(rates) / len(rates) if rates else None


def speed(outcomes: Sequence[Outcome]) -> dict[str, Any]:
    """Tokens/s per request with speculation and in the baseline sent without it, and their ratio."""
    spec = mean_tokens_per_s([o for o in outcomes if o.speculate])
    base = mean_tokens_per_s([o for o in outcomes if not o.speculate])
    return {"speculative": spec, "baseline": base,
            "baseline_requests": sum(1 for o in outcomes if not o.speculate and o.ok),
            "vs_baseline": spec / base if spec is not None and base else None}


def _tokens_per_step(outcomes: Sequence[Outcome]) -> float | None:
    """Output tokens per target forward: what acceptance buys (1.0 = no gain)."""
    accepted = sum(o.accepted_tokens for o in outcomes)
    tokens = sum(o.completion_tokens for o in outcomes)
    steps = tokens - accepted  # each step emits its accepted drafts plus one target token
    return tokens / steps if steps > 0 else None


def plot(outcomes: Sequence[Outcome], shift_s: float, promotions: Sequence[dict], path: Path, title: str,
         window: int = 8) -> None:
    """Per domain over time: acceptance (per request and its rolling mean), tokens/s per request with
    speculation and in the no-speculation baseline (rolling means), and their ratio; the shift and promotions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (acc_ax, tps_ax, ratio_ax) = plt.subplots(3, 1, figsize=(10, 10), sharex=True)
    colors = {"sharegpt": "tab:blue", "humaneval": "tab:orange"}
    end = lambda o: (o.started_s + o.latency_s) / 60  # noqa: E731 - answer time in minutes
    for domain in sorted({o.domain for o in outcomes}):
        color = colors.get(domain)
        done = sorted((o for o in outcomes if o.domain == domain and o.ok), key=end)
        drafted = [o for o in done if o.speculate and o.draft_tokens]
        if drafted:
            acc_ax.scatter([end(o) for o in drafted], [o.acceptance for o in drafted], s=10, alpha=0.35, color=color)
            acc_ax.plot([end(o) for o in drafted],
                        [acceptance(drafted[max(0, i - window + 1):i + 1]) for i in range(len(drafted))],
                        color=color, lw=2, label=f"{domain} (mean of last {window} requests)")
        spec = [o for o in done if o.speculate]
        base = [o for o in done if not o.speculate]
        for group, style, label in ((spec, "-", "speculative"), (base, "--", "no speculation")):
            if group:
                tps_ax.plot([end(o) for o in group],
                            [mean_tokens_per_s(group[max(0, i - window + 1):i + 1]) for i in range(len(group))],
                            color=color, ls=style, lw=2, label=f"{domain}, {label}")
        if spec and base:
            xs, ys = [], []
            for i, o in enumerate(spec):  # the last `window` of each group answered by then
                b = [x for x in base if end(x) <= end(o)][-window:]
                if b:
                    xs.append(end(o))
                    ys.append(mean_tokens_per_s(spec[max(0, i - window + 1):i + 1]) / mean_tokens_per_s(b))
            ratio_ax.plot(xs, ys, color=color, lw=2, label=domain)
    for ax in (acc_ax, tps_ax, ratio_ax):
        ax.axvline(shift_s / 60, color="black", ls="--", lw=1)
        for p in promotions:
            ax.axvline(p["at_s"] / 60, color="tab:green", ls=":", lw=1)
    acc_ax.text(shift_s / 60, 0.9, " traffic shifts to HumanEval", transform=acc_ax.get_xaxis_transform(), fontsize=9)
    for p in promotions:
        acc_ax.text(p["at_s"] / 60, 0.97, f"v{p['version']}", transform=acc_ax.get_xaxis_transform(), fontsize=8,
                    color="tab:green", ha="center")
    ratio_ax.axhline(1.0, color="gray", lw=1)
    acc_ax.set_ylabel("draft acceptance\n(accepted / proposed)")
    acc_ax.set_ylim(0, 1)
    tps_ax.set_ylabel(f"tokens/s per request\n(mean of last {window})")
    ratio_ax.set_ylabel("speculative / no speculation\n(tokens/s)")
    ratio_ax.set_xlabel("minutes since traffic started (answer time)")
    acc_ax.set_title(title, fontsize=10)
    for ax in (acc_ax, tps_ax, ratio_ax):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="center left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(summary: dict, outcomes: Sequence[Outcome], out_dir: Path, title: str) -> dict[str, str]:
    """summary.json, requests.jsonl and acceptance.png in out_dir; their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"summary": str(out_dir / "summary.json"), "requests": str(out_dir / "requests.jsonl"),
             "plot": str(out_dir / "acceptance.png")}
    summary = {**summary, "files": files}
    Path(files["summary"]).write_text(json.dumps(summary, indent=2, default=str) + "\n")
    with open(files["requests"], "w") as fh:
        for o in outcomes:
            fh.write(json.dumps({k: v for k, v in o.as_dict().items() if k != "text"}) + "\n")
    plot(outcomes, summary["shift_at_s"], summary["promotions"], Path(files["plot"]), title)
    return files
