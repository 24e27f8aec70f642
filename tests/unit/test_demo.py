"""The demo's pure parts: parsing answers into outcomes, the summary's arithmetic, the plot, bad input.
(The demo's loop itself is tests/integration/test_full_loop.py: same LocalLoop, tiny model.)"""
from __future__ import annotations

import json
from itertools import islice
import socket

import httpx
import pytest

from serving.replay import Outcome, RequestSpec, acceptance, outcome_of, request_body
from spectutor import demo_report
from spectutor.cli import main as cli


def _answer(draft: int, accepted: int, tokens: int, versions: list[str], kind: str = "completion") -> httpx.Response:
    choice = {"text": "x"} if kind == "completion" else {"message": {"role": "assistant", "content": "x"}}
    served = [{"drafter": "draft-lm", "version": v, "first_step": 0, "last_step": 1, "steps": 1} for v in versions]
    body = {"id": "cmpl-1", "choices": [choice],
            "usage": {"completion_tokens": tokens, "speculative": {
                "draft_tokens": draft, "accepted_tokens": accepted, "drafter_version": versions[-1],
                "served_by": served, "replica_id": "r0"}}}
    return httpx.Response(200, json=body)


def test_outcomes_read_usage_and_errors() -> None:
    spec = RequestSpec("humaneval", "def f():", "completion", "humaneval")
    o = outcome_of(3, spec, 1.0, 0.5, _answer(12, 3, 10, ["cut-4", "7"]))
    assert o.ok and o.request_id == "cmpl-1" and o.versions == ("cut-4", "7") and o.drafter_version == "7"
    assert o.acceptance == 0.25 and o.completion_tokens == 10
    bad = outcome_of(4, spec, 1.0, 0.1, httpx.Response(429, json={"error": {"message": "busy", "type": "x"}}))
    assert not bad.ok and bad.status == 429 and "busy" in bad.error
    assert not outcome_of(5, spec, 1.0, 0.1, httpx.Response(502, text="<html>")).ok
    path, body = request_body(RequestSpec("sharegpt", "hi", "chat"), "m", 8)
    assert path == "/v1/chat/completions" and body["messages"][0]["content"] == "hi"
    assert body["metadata"] == {"domain": "sharegpt"} and body["temperature"] == 0
    with pytest.raises(ValueError, match="kind"):
        request_body(RequestSpec("x", "hi", "embedding"), "m", 8)


def _outcome(i: int, domain: str, draft: int, accepted: int, tokens: int = 10, ok: bool = True) -> Outcome:
    return Outcome(i, domain, domain, float(i), 1.0, ok, draft_tokens=draft, accepted_tokens=accepted,
                   completion_tokens=tokens, versions=("cut-4",) if i < 3 else ("1",))


def test_summary_pools_acceptance_by_thirds_and_counts_failures(tmp_path) -> None:
    # 6 humaneval requests: the first two accept 1 of 10, the last two 6 of 10; one failure in between.
    outs = [_outcome(0, "humaneval", 10, 1), _outcome(1, "humaneval", 10, 1), _outcome(2, "humaneval", 10, 3),
            _outcome(3, "humaneval", 10, 0, ok=False), _outcome(4, "humaneval", 10, 4), _outcome(5, "humaneval", 10, 6),
            _outcome(6, "humaneval", 10, 6)]
    s = demo_report.summarize(outs, 0.0, [{"version": "1", "at_s": 3.0}], {}, {}, None, interrupted=False)
    assert s["requests"] == {"total": 7, "ok": 6, "failed": 1, "errors": [""]}
    he = s["domains"]["humaneval"]
    assert he["acceptance_first_third"] == pytest.approx(2 / 20) and he["acceptance_last_third"] == pytest.approx(12 / 20)
    assert he["rise"] == pytest.approx(0.5)
    # 20 tokens, 12 of them accepted drafts: 8 target forwards -> 2.5 tokens per forward.
    assert he["tokens_per_step_last_third"] == pytest.approx(20 / 8)
    assert s["versions_served"] == ["cut-4", "1"]
    assert acceptance([o for o in outs if not o.ok]) is None
    files = demo_report.write(s, outs, tmp_path / "run", "test")
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["files"] == files
    assert len((tmp_path / "run" / "requests.jsonl").read_text().splitlines()) == 7
    assert (tmp_path / "run" / "acceptance.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_speed_is_compared_with_the_requests_sent_without_speculation(tmp_path) -> None:
    # Speculative requests: 10 tokens in 0.5 s and 1.0 s (20 and 10 tokens/s, mean 15); baseline: 10 in 2.0 s (5).
    outs = [Outcome(0, "sharegpt", "sharegpt", 0.0, 0.5, True, completion_tokens=10, draft_tokens=8, accepted_tokens=4),
            Outcome(1, "sharegpt", "sharegpt", 1.0, 2.0, True, completion_tokens=10, speculate=False),
            Outcome(2, "sharegpt", "sharegpt", 2.0, 1.0, True, completion_tokens=10, draft_tokens=8, accepted_tokens=2),
            Outcome(3, "sharegpt", "sharegpt", 3.0, 2.0, False, speculate=False)]
    s = demo_report.summarize(outs, 10.0, [], {}, {}, None, interrupted=False)
    speed = s["domains"]["sharegpt"]["tokens_per_s"]
    assert speed == {"speculative": 15.0, "baseline": 5.0, "baseline_requests": 1, "vs_baseline": 3.0}
    assert s["domains"]["sharegpt"]["requests"] == 2  # acceptance and its counts are the speculative ones'
    assert acceptance(outs) == pytest.approx(6 / 16)
    demo_report.write(s, outs, tmp_path / "run", "test")
    assert (tmp_path / "run" / "acceptance.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    path, body = request_body(RequestSpec("sharegpt", "hi", "chat", speculate=False), "m", 8)
    assert body["speculate"] is False
    assert "speculate" not in request_body(RequestSpec("sharegpt", "hi", "chat"), "m", 8)[1]


def test_traffic_sends_every_nth_request_of_a_domain_without_speculation() -> None:
    import time

    from spectutor.demo_cmd import traffic

    specs = list(islice(traffic(3600.0, time.monotonic(), baseline_every=4), 12))
    assert [s.speculate for s in specs] == [True, True, True, False] * 3
    assert all(s.speculate for s in islice(traffic(3600.0, time.monotonic()), 12))


@pytest.mark.parametrize("argv,named", [(["--minutes", "0.5"], "--minutes"), (["--minutes", "ten"], "--minutes"),
                                        (["--shift-at", "1.5"], "--shift-at"), (["--baseline-every", "1"], "--baseline-every"),
                                        (["--baseline-every", "x"], "--baseline-every")])
def test_bad_demo_arguments_name_the_value(argv, named, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        cli(["demo", *argv])
    assert exc.value.code == 2 and named in capsys.readouterr().err


def test_demo_refuses_a_busy_port_before_starting_anything(monkeypatch, capsys) -> None:
    for name in ("SPECTUTOR_KAFKA_BOOTSTRAP", "SPECTUTOR_REDIS_URL", "MLFLOW_TRACKING_URI"):
        monkeypatch.setenv(name, "unused")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert cli(["demo", "--port", str(port)]) == 2
    assert f"--port {port}" in capsys.readouterr().err
    monkeypatch.delenv("SPECTUTOR_REDIS_URL")
    assert cli(["demo"]) == 2
    assert "SPECTUTOR_REDIS_URL" in capsys.readouterr().err
