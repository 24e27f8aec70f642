"""deploy/k8s: every manifest parses and has what its kind requires; the overlays build; what the
manifests say agrees with the code (topic names, env vars, Serve config, ports, Ray version).

No cluster here: overlays are built by deploy/k8s/kbuild.py, a small kustomize for the features this
bundle uses (it fails on any other). Where kubectl is installed its own kustomize builds them too and
must give the same objects.
"""
from __future__ import annotations

import copy
import importlib.util
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
OVERLAYS = ("dev", "prod", "prod-gpu")
# Created out of band in production (deploy/README.md says how); every other reference must resolve.
EXTERNAL_SECRETS = {"prod": {"spectutor-postgres", "spectutor-s3"}, "prod-gpu": {"spectutor-postgres", "spectutor-s3"}}
SPECTUTOR_IMAGES = ("spectutor-serving", "spectutor-trainer")  # Dockerfile targets that run the code


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SCHEMAS = _load("deploy_k8s_schemas", K8S / "schemas.py").SCHEMAS
RENDER = _load("deploy_k8s_render", K8S / "render.py")
KBUILD = _load("deploy_k8s_kbuild", K8S / "kbuild.py")
build, json_patch, walk_containers = KBUILD.build, KBUILD.json_patch, KBUILD.walk_containers
for _schema in SCHEMAS.values():
    jsonschema.Draft202012Validator.check_schema(_schema)
VALIDATORS = {key: jsonschema.Draft202012Validator(schema) for key, schema in SCHEMAS.items()}


def validate(doc: dict[str, Any]) -> None:
    """Raise jsonschema.ValidationError unless `doc` matches its kind's schema."""
    key = (doc.get("apiVersion"), doc.get("kind"))
    assert key in VALIDATORS, f"no schema for {key}; add one to deploy/k8s/schemas.py"
    VALIDATORS[key].validate(doc)


@pytest.fixture(scope="module")
def builds() -> dict[str, list[dict[str, Any]]]:
    return {name: build(K8S / "overlays" / name) for name in OVERLAYS}


def _index(docs: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    out = {}
    for d in docs:
        key = (d["kind"], d["metadata"]["name"])
        assert key not in out, f"duplicate {key}"
        out[key] = d
    return out


def _pod_specs(doc: dict[str, Any]) -> list[dict[str, Any]]:
    if doc["kind"] in ("Deployment", "StatefulSet"):
        return [doc["spec"]["template"]["spec"]]
    if doc["kind"] == "RayService":
        cluster = doc["spec"]["rayClusterConfig"]
        return [cluster["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in cluster.get("workerGroupSpecs", [])]
    return []


def _pod_templates(doc: dict[str, Any]) -> list[dict[str, Any]]:
    if doc["kind"] in ("Deployment", "StatefulSet"):
        return [doc["spec"]["template"]]
    if doc["kind"] == "RayService":
        cluster = doc["spec"]["rayClusterConfig"]
        return [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster.get("workerGroupSpecs", [])]
    return []


def _rayservice(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (rs,) = [d for d in docs if d["kind"] == "RayService"]
    return rs


def _serve_yaml() -> Path:
    path = REPO / "deploy" / "serve.yaml"
    assert path.is_file(), "deploy/serve.yaml (the Ray Serve config the RayService embeds) is missing"
    return path


# ---- parsing and schemas -------------------------------------------------------------------------

def _all_manifest_files() -> list[Path]:
    return sorted(p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml")


def test_every_manifest_file_parses_and_matches_its_kind_schema():
    files = _all_manifest_files()
    assert len(files) >= 10
    seen = set()
    for path in files:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        assert docs, f"{path}: no documents"
        for d in docs:
            validate(d)
            seen.add((d["apiVersion"], d["kind"]))
    # Every schema is used: a stale schema would hide that a kind was renamed.
    assert seen == set(SCHEMAS) - {("v1", "Secret")}  # Secrets only exist in builds (generated)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_builds_and_every_object_matches_its_schema(builds, overlay):
    docs = builds[overlay]
    _index(docs)  # no duplicates
    for d in docs:
        validate(d)
        assert d["metadata"].get("namespace"), f"{overlay}: {d['kind']}/{d['metadata']['name']} has no namespace"


def test_schemas_reject_what_they_should():
    """The schemas are not vacuous: drop a required field and validation fails."""
    base = {d["kind"]: d for d in yaml.safe_load_all((K8S / "base" / "topics.yaml").read_text())}
    topic = copy.deepcopy(base["KafkaTopic"])
    del topic["spec"]["partitions"]
    with pytest.raises(jsonschema.ValidationError):
        validate(topic)
    rs = yaml.safe_load((K8S / "base" / "rayservice.yaml").read_text())
    rs["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0].pop("image")
    with pytest.raises(jsonschema.ValidationError):
        validate(rs)


def test_kbuild_refuses_what_it_cannot_build(tmp_path):
    (tmp_path / "kustomization.yaml").write_text("resources: []\nhelmCharts: [{name: x}]\n")
    with pytest.raises(ValueError, match="helmCharts"):
        build(tmp_path)
    (tmp_path / "kustomization.yaml").write_text("patches: [{target: {kind: Service}, patch: '[]'}]\n")
    with pytest.raises(ValueError, match="matches nothing"):
        build(tmp_path)


def test_json_patch_semantics():
    doc = {"a": {"b": [1, 2]}, "c": 1}
    json_patch(doc, [{"op": "add", "path": "/a/b/-", "value": 3}, {"op": "replace", "path": "/c", "value": 2},
                     {"op": "add", "path": "/a/x~1y", "value": 4}, {"op": "remove", "path": "/a/b/0"}])
    assert doc == {"a": {"b": [2, 3], "x/y": 4}, "c": 2}
    with pytest.raises(KeyError):
        json_patch(doc, [{"op": "replace", "path": "/missing", "value": 1}])


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with its built-in kustomize) not installed")
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_kubectl_kustomize_builds_the_same_objects(builds, overlay):
    out = subprocess.run(["kubectl", "kustomize", str(K8S / "overlays" / overlay)], capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 0, out.stderr
    theirs = _index([d for d in yaml.safe_load_all(out.stdout) if d])
    ours = _index(builds[overlay])
    assert theirs.keys() == ours.keys()
    for key in ours:
        assert theirs[key] == ours[key], f"{overlay}: {key} differs between kubectl kustomize and this test's build"


# ---- the RayService and deploy/serve.yaml --------------------------------------------------------

def test_rayservice_serve_config_is_deploy_serve_yaml(builds):
    serve_yaml = _serve_yaml().read_text()
    committed = (K8S / "base" / "rayservice.yaml").read_text()
    assert RENDER.render(committed, serve_yaml) == committed, \
        "deploy/k8s/base/rayservice.yaml is stale: run python deploy/k8s/render.py"
    for overlay in OVERLAYS:
        assert _rayservice(builds[overlay])["spec"]["serveConfigV2"] == serve_yaml, overlay
    assert yaml.safe_load(yaml.safe_load(committed)["spec"]["serveConfigV2"]) == yaml.safe_load(serve_yaml)


def test_render_roundtrips_any_serve_yaml():
    manifest = (K8S / "base" / "rayservice.yaml").read_text()
    for text in ("applications:\n  - name: a\n\n    import_path: x:y\n", "a: 1\nb:\n  - 2\n\n\n", "a: 1"):
        out = RENDER.render(manifest, text)
        assert yaml.safe_load(out)["spec"]["serveConfigV2"] == text
        assert RENDER.render(out, text) == out  # idempotent
        rest = yaml.safe_load(out)
        rest["spec"].pop("serveConfigV2")
        ref = yaml.safe_load(manifest)
        ref["spec"].pop("serveConfigV2")
        assert rest == ref  # nothing else touched


def test_serve_yaml_is_reachable_inside_the_cluster():
    """serveConfigV2 is the laptop file: it must not bind Serve to loopback or a non-8000 port,
    or the RayService's serve Service (port 8000) and the readiness probe reach nothing."""
    cfg = yaml.safe_load(_serve_yaml().read_text())
    http = cfg.get("http_options") or {}
    # Ray Serve starts its proxies with these options when KubeRay submits serveConfigV2: loopback would
    # leave spectutor-serve-svc and every probe with nothing to reach.
    assert http.get("host", "0.0.0.0") == "0.0.0.0", \
        f"deploy/serve.yaml: http_options.host is {http['host']!r}; the RayService needs 0.0.0.0 (or unset)"
    assert int(http.get("port", 8000)) == 8000
    # The worker pods' readiness probe and KubeRay's serve Service expect a proxy on every node.
    assert cfg.get("proxy_location", "EveryNode") == "EveryNode", \
        f"deploy/serve.yaml: proxy_location is {cfg['proxy_location']!r}; worker pods need a proxy (EveryNode)"
    apps = cfg["applications"]
    assert apps and all(a["import_path"] for a in apps)
    for app in apps:
        module, _, attr = app["import_path"].partition(":")
        source = REPO / (module.replace(".", "/") + ".py")
        assert source.is_file() and re.search(rf"^(def|class) {attr}\b|^{attr}\s*=", source.read_text(), re.M), \
            f"{app['import_path']} not found"


def test_worker_readiness_probe_is_the_serve_health_route(builds):
    assert re.search(r'@app\.get\("/health"\)', (REPO / "serving" / "openai_api.py").read_text())
    for overlay, docs in builds.items():
        rs = _rayservice(docs)
        for group in rs["spec"]["rayClusterConfig"]["workerGroupSpecs"]:
            (c,) = group["template"]["spec"]["containers"]
            probe = c["readinessProbe"]["httpGet"]
            assert (probe["path"], probe["port"]) == ("/health", 8000), overlay
            assert 8000 in [p["containerPort"] for p in c["ports"]]


def _graceful_shutdown_timeouts() -> list[float]:
    cfg = yaml.safe_load(_serve_yaml().read_text())
    found = [d["graceful_shutdown_timeout_s"] for a in cfg["applications"] for d in a.get("deployments", [])
             if "graceful_shutdown_timeout_s" in d]
    # Deployments the file does not configure keep the decorator's value in serving/app.py.
    found += [float(v) for v in re.findall(r"graceful_shutdown_timeout_s=(\d+(?:\.\d+)?)",
                                            (REPO / "serving" / "app.py").read_text())]
    return found


def test_workers_outlive_the_serve_graceful_shutdown(builds):
    timeouts = _graceful_shutdown_timeouts()
    assert timeouts, "no graceful_shutdown_timeout_s found in deploy/serve.yaml or serving/app.py"
    for overlay, docs in builds.items():
        for group in _rayservice(docs)["spec"]["rayClusterConfig"]["workerGroupSpecs"]:
            grace = group["template"]["spec"]["terminationGracePeriodSeconds"]
            assert grace > max(timeouts), f"{overlay}: pods killed before replicas drain ({grace} <= {max(timeouts)})"


def test_ray_version_matches_the_image():
    dockerfile = (REPO / "deploy" / "Dockerfile").read_text()
    pinned = re.search(r"^ARG RAY_VERSION=(\S+)$", dockerfile, re.M).group(1)
    rs = yaml.safe_load((K8S / "base" / "rayservice.yaml").read_text())
    assert rs["spec"]["rayClusterConfig"]["rayVersion"] == pinned


def test_rayservice_head_and_workers(builds):
    for overlay, docs in builds.items():
        cluster = _rayservice(docs)["spec"]["rayClusterConfig"]
        head = cluster["headGroupSpec"]
        assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0"
        assert head["rayStartParams"]["metrics-export-port"] == "8080"
        ports = {p["name"]: p["containerPort"] for p in head["template"]["spec"]["containers"][0]["ports"]}
        # KubeRay's port names: it builds the head Service from them and adds any default it misses.
        assert ports == {"redis": 6379, "dashboard": 8265, "client": 10001, "serve": 8000, "metrics": 8080}
        groups = cluster["workerGroupSpecs"]
        assert groups
        for g in groups:
            assert 1 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], overlay
            assert g["rayStartParams"]["metrics-export-port"] == "8080"
        for group in [head] + groups:
            spec = group["template"]["spec"]
            res = spec["containers"][0]["resources"]
            # KubeRay gives Ray the pod's CPU count from the limit; without one Ray sees the node's cores.
            assert res["limits"]["cpu"] == res["requests"]["cpu"], overlay
            shm = [v for v in spec["volumes"] if v.get("emptyDir", {}).get("medium") == "Memory"]
            assert [m["mountPath"] for m in spec["containers"][0]["volumeMounts"] if m["name"] == shm[0]["name"]] == ["/dev/shm"]
            store = int(group["rayStartParams"]["object-store-memory"])
            assert store < _bytes(shm[0]["emptyDir"]["sizeLimit"]) < _bytes(res["limits"]["memory"]), overlay


def _bytes(quantity: str) -> int:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6, "G": 10**9}
    for suffix, factor in units.items():
        if quantity.endswith(suffix):
            return int(float(quantity[: -len(suffix)]) * factor)
    return int(quantity)


# ---- Strimzi: topics, node pools, and what the code uses ----------------------------------------

def test_topic_names_are_the_codes():
    from streams import DEFAULT_TOPIC
    from streams.consumer import ConsumerConfig

    topics = [d for d in yaml.safe_load_all((K8S / "base" / "topics.yaml").read_text()) if d]
    names = sorted(t["spec"]["topicName"] for t in topics)
    assert names == sorted([DEFAULT_TOPIC, ConsumerConfig().dead_letter_topic])


def test_trainer_topic_default_is_the_event_topic():
    source = (REPO / "trainer" / "config.py").read_text()
    assert re.search(r"^\s+topic: str = DEFAULT_TOPIC$", source, re.M)


def test_kafka_node_pools_and_topics_are_consistent(builds):
    for overlay, docs in builds.items():
        (kafka,) = [d for d in docs if d["kind"] == "Kafka"]
        cluster = kafka["metadata"]["name"]
        pools = [d for d in docs if d["kind"] == "KafkaNodePool"]
        assert pools and all(p["metadata"]["labels"]["strimzi.io/cluster"] == cluster for p in pools)
        brokers = sum(p["spec"]["replicas"] for p in pools if "broker" in p["spec"]["roles"])
        controllers = sum(p["spec"]["replicas"] for p in pools if "controller" in p["spec"]["roles"])
        assert brokers >= 1 and controllers % 2 == 1, f"{overlay}: KRaft needs an odd controller quorum"
        for p in pools:
            vols = p["spec"]["storage"].get("volumes", [])
            assert sum(v.get("kraftMetadata") == "shared" for v in vols) <= 1
        conf = kafka["spec"]["kafka"]["config"]
        for key in ("offsets.topic.replication.factor", "transaction.state.log.replication.factor",
                    "default.replication.factor"):
            assert conf[key] <= brokers, f"{overlay}: {key}={conf[key]} > {brokers} brokers"
        assert conf["min.insync.replicas"] <= conf["default.replication.factor"]
        topics = [d for d in docs if d["kind"] == "KafkaTopic"]
        assert len(topics) == 2
        for t in topics:
            assert t["metadata"]["labels"]["strimzi.io/cluster"] == cluster
            assert 1 <= t["spec"]["replicas"] <= brokers
            # With acks=all, a topic whose replicas equal min ISR stops taking writes when one broker dies.
            if brokers >= 3:
                assert t["spec"]["replicas"] > conf["min.insync.replicas"], overlay
            assert int(t["spec"]["config"]["retention.ms"]) >= 24 * 3600 * 1000
    prod = {d["metadata"]["name"]: d for d in builds["prod"] if d["kind"] == "KafkaNodePool"}
    assert {n: p["spec"]["roles"] for n, p in prod.items()} == {"controller": ["controller"], "broker": ["broker"]}


def test_topic_accepts_the_producers_largest_request():
    source = (REPO / "streams" / "kafka_producer.py").read_text()
    match = re.search(r"max_request_size=(\d+)\s*<<\s*(\d+)", source)
    assert match, "max_request_size not found in streams/kafka_producer.py"
    largest = int(match.group(1)) << int(match.group(2))
    for t in yaml.safe_load_all((K8S / "base" / "topics.yaml").read_text()):
        assert int(t["spec"]["config"]["max.message.bytes"]) >= largest


# ---- references between objects ----------------------------------------------------------------

def _named_ports(doc: dict[str, Any]) -> set[str]:
    return {p["name"] for spec in _pod_specs(doc) for c in spec["containers"] for p in c.get("ports", []) if "name" in p}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_references_resolve(builds, overlay):
    docs = builds[overlay]
    by_key = _index(docs)
    external = EXTERNAL_SECRETS.get(overlay, set())

    def has(kind: str, name: str, key: str | None = None) -> bool:
        if kind == "Secret" and name in external:
            return True
        d = by_key.get((kind, name))
        return d is not None and (key is None or key in d.get("data", {}) or key in d.get("stringData", {}))

    for d in docs:
        for spec in _pod_specs(d):
            claims = {v["name"] for v in spec.get("volumes", [])}
            templates = {t["metadata"]["name"] for t in d["spec"].get("volumeClaimTemplates", [])} \
                if d["kind"] == "StatefulSet" else set()
            for v in spec.get("volumes", []):
                if "persistentVolumeClaim" in v:
                    assert has("PersistentVolumeClaim", v["persistentVolumeClaim"]["claimName"]), v
            for c in spec["containers"] + spec.get("initContainers", []):
                where = f"{overlay}: {d['kind']}/{d['metadata']['name']}/{c['name']}"
                for src in c.get("envFrom", []):
                    if "configMapRef" in src:
                        assert has("ConfigMap", src["configMapRef"]["name"]), where
                    if "secretRef" in src:
                        assert has("Secret", src["secretRef"]["name"]), where
                for e in c.get("env", []):
                    ref = e.get("valueFrom", {})
                    if "configMapKeyRef" in ref:
                        assert has("ConfigMap", ref["configMapKeyRef"]["name"], ref["configMapKeyRef"]["key"]), where
                    if "secretKeyRef" in ref:
                        assert has("Secret", ref["secretKeyRef"]["name"], ref["secretKeyRef"]["key"]), where
                for m in c.get("volumeMounts", []):
                    assert m["name"] in claims | templates, f"{where}: mount {m['name']} has no volume"
                ports = {p.get("name") for p in c.get("ports", [])}
                for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
                    action = c.get(probe, {}).get("httpGet") or c.get(probe, {}).get("tcpSocket")
                    if action and isinstance(action["port"], str):
                        assert action["port"] in ports, f"{where}: {probe} port {action['port']}"
        if d["kind"] == "StatefulSet":
            assert has("Service", d["spec"]["serviceName"]), d["metadata"]["name"]
    # Every Service selects some pod template and targets a port it declares.
    workloads = [d for d in docs if d["kind"] in ("Deployment", "StatefulSet")]
    for svc in (d for d in docs if d["kind"] == "Service"):
        selector = svc["spec"]["selector"]
        matches = [w for w in workloads
                   if selector.items() <= w["spec"]["template"]["metadata"]["labels"].items()]
        assert len(matches) == 1, f"{overlay}: Service {svc['metadata']['name']} selects {len(matches)} workloads"
        for port in svc["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            if isinstance(target, str):
                assert target in _named_ports(matches[0]), f"{overlay}: {svc['metadata']['name']} -> {target}"
    for w in workloads:
        assert w["spec"]["selector"]["matchLabels"].items() <= w["spec"]["template"]["metadata"]["labels"].items()


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_service_addresses_point_at_the_bundles_services(builds, overlay):
    docs = builds[overlay]
    by_key = _index(docs)
    env = by_key[("ConfigMap", "spectutor-env")]["data"]

    def service_port(name: str, port: int) -> None:
        svc = by_key.get(("Service", name))
        assert svc is not None, f"{overlay}: no Service {name}"
        assert port in [p["port"] for p in svc["spec"]["ports"]], f"{overlay}: Service {name} has no port {port}"

    (kafka,) = [d for d in docs if d["kind"] == "Kafka"]
    host, _, port = env["SPECTUTOR_KAFKA_BOOTSTRAP"].partition(":")
    assert host == f"{kafka['metadata']['name']}-kafka-bootstrap"  # the Service Strimzi creates
    plain = [lst for lst in kafka["spec"]["kafka"]["listeners"] if not lst["tls"]]
    assert int(port) in [lst["port"] for lst in plain]
    redis = urlparse(env["SPECTUTOR_REDIS_URL"])
    assert redis.scheme == "redis"
    service_port(redis.hostname, redis.port)
    mlflow = urlparse(env["MLFLOW_TRACKING_URI"])
    assert mlflow.scheme == "http"
    service_port(mlflow.hostname, mlflow.port)
    gcs_host, _, gcs_port = _rayservice(docs)["spec"]["rayClusterConfig"]["gcsFaultToleranceOptions"]["redisAddress"].partition(":")
    service_port(gcs_host, int(gcs_port))
    (server,) = by_key[("Deployment", "mlflow")]["spec"]["template"]["spec"]["containers"]
    backend = re.search(r"postgresql://[^@]+@([^:/]+):(\d+)/", " ".join(server["args"]))
    service_port(backend.group(1), int(backend.group(2)))
    assert "--artifacts-destination" in " ".join(server["args"])


# ---- containers: the code's env vars, commands, resources --------------------------------------

def _env_vars_the_code_reads() -> set[str]:
    names: set[str] = set()
    pattern = re.compile(r"""(?:os\.environ\.get|os\.getenv|os\.environ\.setdefault|environ\.get)\(\s*["']([A-Z0-9_]+)["']"""
                         r"""|os\.environ\[\s*["']([A-Z0-9_]+)["']\s*\]""")
    for folder in ("moe", "drafters", "serving", "streams", "trainer", "spectutor"):
        for path in (REPO / folder).rglob("*.py"):
            for m in pattern.finditer(path.read_text()):
                names.add(m.group(1) or m.group(2))
    return names


def _container_env_names(container: dict[str, Any], by_key: dict) -> set[str]:
    names = {e["name"] for e in container.get("env", [])}
    for src in container.get("envFrom", []):
        if "configMapRef" in src:
            names |= set(by_key[("ConfigMap", src["configMapRef"]["name"])]["data"])
        if "secretRef" in src and ("Secret", src["secretRef"]["name"]) in by_key:
            names |= set(by_key[("Secret", src["secretRef"]["name"])].get("data", {}))
    return names


def _spectutor_containers(docs):
    for d in docs:
        for spec in _pod_specs(d):
            for c in spec["containers"]:
                if c["image"].rsplit("/", 1)[-1].split(":")[0] in SPECTUTOR_IMAGES:
                    yield d, c


def test_env_vars_given_to_spectutor_containers_are_read_by_the_code(builds):
    read = _env_vars_the_code_reads()
    for key in ("SPECTUTOR_KAFKA_BOOTSTRAP", "SPECTUTOR_REDIS_URL", "MLFLOW_TRACKING_URI", "SPECTUTOR_HOME"):
        assert key in read, f"the code no longer reads {key}"
    for overlay, docs in builds.items():
        by_key = _index(docs)
        found = list(_spectutor_containers(docs))
        assert {d["kind"] for d, _ in found} == {"RayService", "Deployment"}
        for d, c in found:
            names = _container_env_names(c, by_key)
            assert names <= read, f"{overlay}: {d['metadata']['name']}/{c['name']} sets {names - read}, unread by the code"
            # Each process is told where Kafka, Redis and MLflow are.
            assert {"SPECTUTOR_KAFKA_BOOTSTRAP", "SPECTUTOR_REDIS_URL", "MLFLOW_TRACKING_URI"} <= names


def test_trainer_runs_spectutor_train_with_its_state_on_a_volume(builds):
    for overlay, docs in builds.items():
        by_key = _index(docs)
        trainer = by_key[("Deployment", "spectutor-trainer")]
        assert trainer["spec"]["replicas"] == 1 and trainer["spec"]["strategy"]["type"] == "Recreate"
        (c,) = trainer["spec"]["template"]["spec"]["containers"]
        assert c["command"][:2] == ["spectutor", "train"]
        mounts = {m["mountPath"] for m in c["volumeMounts"]}
        assert "/opt/spectutor/trainer" in mounts  # $SPECTUTOR_HOME/trainer = TrainerConfig.state_dir's default
    dockerfile = (REPO / "deploy" / "Dockerfile").read_text()
    assert re.search(r"^ENV (?:[^\n]*\\\n)*[^\n]*\bSPECTUTOR_HOME=/opt/spectutor\b", dockerfile, re.M)
    assert '"SPECTUTOR_HOME"' in (REPO / "trainer" / "config.py").read_text()


def test_images_are_dockerfile_targets(builds):
    targets = set(re.findall(r"^FROM \S+ AS (\S+)$", (REPO / "deploy" / "Dockerfile").read_text(), re.M))
    for docs in (builds["dev"],):  # dev keeps the local image names
        for c in walk_containers(docs):
            repo = c["image"].split(":")[0]
            if repo.startswith("spectutor-"):
                assert repo.removeprefix("spectutor-") in targets, c["image"]
            else:
                assert ":" in c["image"] and not c["image"].endswith(":latest"), f"unpinned image {c['image']}"


def test_every_container_requests_cpu_and_memory_and_limits_memory(builds):
    for overlay, docs in builds.items():
        for d in docs:
            for spec in _pod_specs(d):
                for c in spec["containers"]:
                    res = c.get("resources", {})
                    where = f"{overlay}: {d['kind']}/{d['metadata']['name']}/{c['name']}"
                    assert {"cpu", "memory"} <= set(res.get("requests", {})), where
                    assert "memory" in res.get("limits", {}), where


def test_gpu_overlay_requests_gpus_and_others_do_not(builds):
    def gpus(docs):
        return {(d["metadata"]["name"], c["name"]) for d in docs for spec in _pod_specs(d) for c in spec["containers"]
                if "nvidia.com/gpu" in c.get("resources", {}).get("limits", {})}

    assert gpus(builds["dev"]) == gpus(builds["prod"]) == set()
    assert gpus(builds["prod-gpu"]) == {("spectutor", "ray-worker"), ("spectutor-trainer", "trainer")}


def test_readme_says_how_to_create_the_external_secrets():
    readme = (REPO / "deploy" / "README.md").read_text()
    for name in sorted(set().union(*EXTERNAL_SECRETS.values())):
        assert f"kubectl create secret generic {name}" in readme, name
