"""deploy/grafana and deploy/prometheus: the dashboard charts only metrics that exist (the replicas'
own, read from serving/metrics.py's MetricsSink, and a short list of Ray Serve built-ins), and the
scrape configs reach the port Ray exports them on.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "spectutor.json"
# Ray Serve's own metrics (ray.serve tests' expected list; docs "Monitor your application").
RAY_SERVE_BUILTINS = {"ray_serve_num_http_requests_total", "ray_serve_http_request_latency_ms_bucket",
                      "ray_serve_deployment_replica_healthy", "ray_serve_deployment_request_counter_total",
                      "ray_serve_deployment_error_counter_total", "ray_serve_replica_processing_queries",
                      "ray_serve_deployment_queued_queries"}
PROMQL_WORDS = {"sum", "rate", "increase", "by", "without", "scalar", "histogram_quantile", "avg", "max", "min",
                "count", "le", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool",
                "irate", "clamp_min", "topk", "offset"}


class _Recorder:
    """Stands in for ray.serve.metrics: records each metric's kind and name."""

    made: list[tuple[str, str]] = []

    def __init__(self, kind: str):
        self.kind = kind

    def __call__(self, name: str, **_kw):
        _Recorder.made.append((self.kind, name))
        return self

    def inc(self, *a, **k):
        pass

    set = observe = inc


def exported_names() -> set[str]:
    """Prometheus series names of the replicas' metrics, as Ray exports them."""
    from serving.metrics import MetricsSink

    class Module:
        Counter, Gauge, Histogram = _Recorder("counter"), _Recorder("gauge"), _Recorder("histogram")

    _Recorder.made = []
    MetricsSink(lambda: {}, lambda: [], metrics_module=Module)
    names = set()
    for kind, name in _Recorder.made:
        base = "ray_" + name  # Ray's exporter prefix
        if kind == "counter":
            names.add(base + "_total")
        elif kind == "histogram":
            names |= {base + s for s in ("_bucket", "_sum", "_count")}
        else:
            names.add(base)
    return names


def _panels(dash: dict) -> list[dict]:
    out = []
    for p in dash["panels"]:
        out.append(p)
        out += p.get("panels", [])
    return out


def _metric_names(expr: str) -> set[str]:
    expr = re.sub(r"\{[^}]*\}", "", expr)          # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)          # range selectors
    expr = re.sub(r'"[^"]*"', "", expr)
    expr = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", expr)  # grouping labels
    words = set(re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", expr))
    return {w for w in words if w not in PROMQL_WORDS and not w.startswith("$")}


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def test_exported_names_follow_vllm_with_the_project_prefix():
    names = exported_names()
    for n in ("ray_spectutor_spec_decode_num_drafts_total", "ray_spectutor_spec_decode_num_draft_tokens_total",
              "ray_spectutor_spec_decode_num_accepted_tokens_total"):
        assert n in names


def test_every_panel_metric_is_exported(dashboard):
    exported = exported_names()
    used: set[str] = set()
    for p in _panels(dashboard):
        for t in p.get("targets", []):
            names = _metric_names(t["expr"])
            assert names, f"{p['title']}: no metric in {t['expr']!r}"
            unknown = names - exported - RAY_SERVE_BUILTINS
            assert not unknown, f"panel {p['title']!r} uses {unknown}, which nothing exports"
            used |= names
    # The speculative-decoding counters, the latencies and the swap counters are all charted.
    mine = {n for n in exported if n.startswith("ray_spectutor_")}
    assert mine - used <= {n for n in mine if n.endswith("_count")}, f"not charted: {sorted(mine - used)}"


def test_metric_name_parser():
    assert _metric_names('sum by (le) (rate(a_b_bucket{x="1"}[$__rate_interval]))') == {"a_b_bucket"}
    assert _metric_names("1 + sum(rate(x[5m])) / scalar(sum(rate(y_total[5m])))") == {"x", "y_total"}


def test_dashboard_shape(dashboard):
    panels = _panels(dashboard)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    assert dashboard["uid"] and dashboard["title"]
    assert {v["name"] for v in dashboard["templating"]["list"]} >= {"datasource"}
    for p in panels:
        if p["type"] == "row":
            continue
        assert {"h", "w", "x", "y"} <= set(p["gridPos"]) and p["gridPos"]["x"] + p["gridPos"]["w"] <= 24
        for t in p.get("targets", []):
            assert t["expr"].count("(") == t["expr"].count(")"), t["expr"]
            assert t["datasource"]["uid"] == "${datasource}"
    # The trainer has no Prometheus endpoint: the dashboard says so instead of charting nothing.
    assert any(p["type"] == "text" and "MLflow" in p["options"]["content"] for p in panels)


def test_grafana_provisioning_points_at_the_dashboards(dashboard):
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    grafana = compose["services"]["grafana"]
    mounts = dict(m.rsplit(":", 1)[0].split(":", 1) for m in grafana["volumes"])
    provider = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "dashboards" / "spectutor.yaml").read_text())
    path = provider["providers"][0]["options"]["path"]
    assert mounts["./grafana/dashboards"] == path
    ds = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yaml").read_text())
    url = ds["datasources"][0]["url"]
    assert url == "http://prometheus:9090" and "prometheus" in compose["services"]


def test_kubernetes_scrape_configs_use_the_ray_metrics_port():
    rs = yaml.safe_load((DEPLOY / "k8s" / "base" / "rayservice.yaml").read_text())
    cluster = rs["spec"]["rayClusterConfig"]
    for spec, params in [(cluster["headGroupSpec"]["template"]["spec"], cluster["headGroupSpec"]["rayStartParams"])] + \
            [(g["template"]["spec"], g["rayStartParams"]) for g in cluster["workerGroupSpecs"]]:
        ports = {p["name"]: p["containerPort"] for p in spec["containers"][0]["ports"]}
        assert ports["metrics"] == int(params["metrics-export-port"])
    job = yaml.safe_load((DEPLOY / "prometheus" / "kubernetes.yml").read_text())["scrape_configs"][0]
    keep_port = [r for r in job["relabel_configs"] if r.get("source_labels") == ["__meta_kubernetes_pod_container_port_name"]]
    assert keep_port and keep_port[0]["regex"] == "metrics" and keep_port[0]["action"] == "keep"
    pm = yaml.safe_load((DEPLOY / "prometheus" / "podmonitor.yaml").read_text())
    assert pm["kind"] == "PodMonitor" and pm["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
    assert pm["spec"]["selector"]["matchExpressions"][0]["key"] == "ray.io/cluster"
